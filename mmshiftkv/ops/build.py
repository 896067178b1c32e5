"""The compiled op built for the running torch into the op cache: ``python -m mmshiftkv.ops.build``.

``pip install -e .`` builds ``mmshiftkv/_C`` in place against one torch. Another environment that
imports the same checkout runs its own torch (vLLM pins one), and an extension built against
another torch does not load there (undefined torch symbols). This module builds the extension
with the checkout's own ``setup.py`` (the same sources and compiler flags) for the running torch,
into the op cache that :mod:`mmshiftkv.ops.compiled` loads from when the in-tree build does not
load. Nothing is compiled at import: the build runs once, in the environment's set-up
(``scripts/setup_vllm_venv.sh`` runs it for the vLLM venv).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mmshiftkv.ops import compiled


def build() -> Path:
    """Build the extension for this torch into the cache with the checkout's ``setup.py``; its path.

    Raises
    ------
    RuntimeError
        Without a checkout to build from, or when the compilation fails (its output is shown).
    """
    key = compiled.build_key()
    if key is None:
        raise RuntimeError(
            f"mmshiftkv.ops.build needs the source checkout ({compiled.SETUP} and {compiled.SOURCES}); "
            "an installed package is built when it is installed"
        )
    target = compiled.cache_root() / key
    target.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FORCE_CUDA="1" if compiled.builds_cuda() else "0")
    # The environment's own tools (ninja) come first, as when its bin/ is activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    with tempfile.TemporaryDirectory(dir=target) as scratch:
        command = [
            *(sys.executable, str(compiled.SETUP), "build_ext"),
            *("--build-lib", f"{scratch}/lib", "--build-temp", f"{scratch}/temp"),
        ]
        result = subprocess.run(command, cwd=compiled.REPO, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"building the compiled op for torch {torch.__version__} failed:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        # One rename: a process loading the cache meanwhile sees no file or the whole file.
        os.replace(Path(scratch) / "lib" / "mmshiftkv" / compiled.EXTENSION, target / compiled.EXTENSION)
    return target / compiled.EXTENSION


def main() -> None:
    """Build unless an extension already loads, then load the build in a fresh interpreter."""
    if compiled.LOAD_ERROR is None:
        print(f"mmshiftkv: the compiled op loads for torch {torch.__version__} ({compiled.EXTENSION_FILE})")
        return
    print(f"mmshiftkv: building the compiled op for torch {torch.__version__} ({compiled.LOAD_ERROR})")
    path = build()
    # A fresh interpreter loads what was just built, as the next import will.
    check = "from mmshiftkv.ops import compiled; assert compiled.LOAD_ERROR is None, compiled.LOAD_ERROR"
    subprocess.run([sys.executable, "-c", check], check=True)
    print(f"mmshiftkv: built {path}")


if __name__ == "__main__":
    main()
