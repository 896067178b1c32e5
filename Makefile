# One command sets up and runs the demo, one sets up and runs lint + tests (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CI (CI=true) must compile the CUDA half of the op: a .cu compile error fails the run.
FORCE_CUDA ?= $(if $(CI),1,)
export FORCE_CUDA

.PHONY: demo test lint build clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q setuptools wheel ninja
	$(PIP) install -q --no-build-isolation -e ".[dev,eval]"
	touch $@

build: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m mmshiftkv.demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest

clean:
	rm -rf build mmshiftkv/*.so $(VENV)/.installed
