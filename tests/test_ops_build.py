"""The op cache's key: one build per torch build, kernel set, Python ABI and source content."""

from __future__ import annotations

import re

import torch

from mmshiftkv.ops import compiled


def test_the_key_follows_torch_and_every_source_byte(tmp_path, monkeypatch):
    setup, sources = tmp_path / "setup.py", tmp_path / "csrc"
    sources.mkdir()
    setup.write_text("setup()\n")
    (sources / "op.cpp").write_text("int f() { return 1; }\n")
    monkeypatch.setattr(compiled, "SETUP", setup)
    monkeypatch.setattr(compiled, "SOURCES", sources)
    monkeypatch.setenv("FORCE_CUDA", "0")
    key = compiled.build_key()
    assert key.startswith(f"torch{torch.__version__}-cpu-")
    (sources / "op.cpp").write_text("int f() { return 2; }\n")
    edited = compiled.build_key()
    assert edited != key
    (sources / "op.h").write_text("\n")
    assert compiled.build_key() not in (key, edited)
    monkeypatch.setenv("FORCE_CUDA", "1")
    assert f"-cuda{torch.version.cuda}-" in compiled.build_key()


def test_a_cached_build_is_found_under_its_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSHIFTKV_OP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FORCE_CUDA", "0")
    assert compiled.cache_root() == tmp_path / "cache"
    assert compiled.cached_extension() is None
    built = compiled.cache_root() / compiled.build_key() / compiled.EXTENSION
    built.parent.mkdir(parents=True)
    built.write_bytes(b"")
    assert compiled.cached_extension() == built


def test_no_key_without_the_source_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "SOURCES", tmp_path / "missing")
    assert compiled.build_key() is None
    assert compiled.cached_extension() is None


def test_an_extension_from_older_sources_is_recognised_by_its_missing_operators():
    from types import SimpleNamespace

    older = SimpleNamespace(shiftkv_scores=object(), shiftkv_logit_max=object())
    assert compiled.missing_operators(older) == [
        "prompt_moments",
        "shiftkv_cpu_kernel",
        "weight_products",
        "rotate_half",
        "affine_rotate_half",
    ]
    everything = SimpleNamespace(**{name: object() for name in compiled.OPERATORS})
    assert compiled.missing_operators(everything) == []


def test_every_operator_the_sources_define_is_checked():
    sources = "\n".join(
        path.read_text() for path in compiled.SOURCES.rglob("*") if path.suffix in (".cpp", ".cu")
    )
    defined = set(re.findall(r'm\.def\(\s*"(\w+)\(', sources))
    assert defined == set(compiled.OPERATORS)
