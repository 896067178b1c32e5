# One command sets up and runs the demo, one sets up and runs lint + tests (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The oldest supported transformers (with kvpress, whose releases support only transformers < 5.3), in a
# second venv that reuses $(VENV)'s packages (torch, the built op) and overrides transformers, tokenizers
# and kvpress: the suite runs on both ends of the supported range.
OLDEST ?= .venv-oldest
# transformers 5.2.0's own range for the `kernels` package (its `kernels` extra): newer transformers require
# kernels >= 0.19, which the overlay would otherwise see and which 5.2.0's hub-kernel table cannot construct.
OLDEST_PINS ?= transformers==5.2.0 kvpress==0.5.5 "kernels>=0.10.2,<0.11" "setuptools>=77"
# CI (CI=true) must compile the CUDA half of the op: a .cu compile error fails the run.
FORCE_CUDA ?= $(if $(CI),1,)
export FORCE_CUDA

# kvpress on the newest transformers: kvpress without its pin (--no-deps) plus what it imports (the
# `kvpress` extra of pyproject.toml), in an overlay of $(VENV) like $(OLDEST). Only the kvpress tests run
# there: importing kvpress patches transformers' attention functions for the whole process.
KVPRESS_VENV ?= .venv-kvpress
KVPRESS ?= kvpress==0.5.5
KVPRESS_TESTS ?= tests/test_kvpress_interop.py tests/test_kvpress_scorers.py tests/test_readme.py -k kvpress

# vLLM's CPU build pins its own torch and transformers: the plugin's tests run in a third venv.
VLLM_VENV ?= .venv-vllm

.PHONY: demo test test-newest test-oldest test-kvpress test-rounding test-vllm lint build clean

# A venv at $(1) that sees $(VENV)'s packages (torch, the built op, transformers) and installs over them.
define overlay_venv
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -c "import site, sys; from pathlib import Path; \
	  base = Path(sys.argv[1]).resolve(); \
	  Path(site.getsitepackages()[0], 'zz_mmshiftkv_base.pth').write_text(f'import site; site.addsitedir({str(base)!r})\n')" \
	  "$$($(PY) -c 'import site; print(site.getsitepackages()[0])')"
endef

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q setuptools wheel ninja
	$(PIP) install -q --upgrade --no-build-isolation -e ".[dev,eval]"
	touch $@

$(OLDEST)/.installed: $(VENV)/.installed
	$(call overlay_venv,$(OLDEST))
	# pip resolves the old releases' own requirements (an older huggingface-hub, pandas < 3, ...) into the
	# overlay; packages of $(VENV) that satisfy them, torch first, are not installed again.
	$(OLDEST)/bin/python -m pip install -q $(OLDEST_PINS)
	$(OLDEST)/bin/python -m pip check
	touch $@

$(KVPRESS_VENV)/.installed: $(VENV)/.installed pyproject.toml
	$(call overlay_venv,$(KVPRESS_VENV))
	$(KVPRESS_VENV)/bin/python -m pip install -q --no-deps $(KVPRESS)
	$(KVPRESS_VENV)/bin/python -m pip install -q $$($(PY) -c "import tomllib; \
	  print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['kvpress']))")
	touch $@

build: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m mmshiftkv.demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The whole suite on the newest transformers the index offers, then on the oldest supported one, the
# kvpress tests on the newest with kvpress installed, the op tests again under another MKL rounding (a test
# must not depend on how a GEMM rounds), then the vLLM plugin's tests in vLLM's own venv.
test: lint test-newest test-oldest test-kvpress test-rounding test-vllm

test-newest: $(VENV)/.installed
	$(PY) -c "import transformers; print('transformers', transformers.__version__)"
	$(VENV)/bin/pytest

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -c "import transformers, kvpress; print('transformers', transformers.__version__)"
	$(OLDEST)/bin/python -m pytest

test-kvpress: $(KVPRESS_VENV)/.installed
	$(KVPRESS_VENV)/bin/python -c "import transformers, kvpress; print('transformers', transformers.__version__)"
	$(KVPRESS_VENV)/bin/python -m pytest $(KVPRESS_TESTS)

test-rounding: $(VENV)/.installed
	MKL_CBWR=COMPATIBLE $(VENV)/bin/pytest tests/test_ops_compiled.py tests/test_ops_reference.py tests/test_ops_api.py

test-vllm:
	bash scripts/setup_vllm_venv.sh $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pytest tests/vllm_plugin

clean:
	rm -rf build mmshiftkv/*.so $(VENV)/.installed $(OLDEST) $(KVPRESS_VENV)
