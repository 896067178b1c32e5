"""Every ```python block of the README runs as written (in a fresh interpreter, offline)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.MULTILINE | re.DOTALL)
#: Blocks that import kvpress (their test ids end in "-kvpress": `make test-kvpress` runs them on the newest).
KVPRESS = [bool(re.search(r"^import kvpress|^from kvpress", code, flags=re.MULTILINE)) for code in BLOCKS]


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize(
    "index", range(len(BLOCKS)), ids=[f"{i}-kvpress" if k else str(i) for i, k in enumerate(KVPRESS)]
)
def test_readme_block_runs(index: int, tmp_path: Path):
    code = BLOCKS[index]
    if KVPRESS[index] and not importlib.util.find_spec("kvpress"):
        pytest.skip("kvpress interop example: runs where kvpress is installed (.venv-oldest, .venv-kvpress)")
    script = tmp_path / f"block_{index}.py"
    script.write_text(code)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, f"README block {index} failed:\n{code}\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), "every README example prints what it shows"
