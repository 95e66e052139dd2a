# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv on first use and reuse it afterwards.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bnlab-installed
DEMO_ARGS ?= --seeds 0 --out runs/demo

.PHONY: demo test lint bench venv clean

demo: $(STAMP)
	$(BIN)/bnlab repro $(DEMO_ARGS)

test: lint
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python bench/bench_epoch.py

venv: $(STAMP)

# torch==2.13.0 is pinned first: it installs a CPU build from this machine's disk, where a
# bare `torch` could pull a multi-GB CUDA build. torchvision 0.28.0 (built for CUDA torch)
# and timm come without dependencies, for the doctor's real-model zoo tests (see
# DEVELOPERS.md). TensorFlow is the CPU build; tf_keras comes with --no-deps, or pip pulls
# the full 572 MB tensorflow over tensorflow-cpu. Chainer comes last: it needs numpy<2 and
# setuptools<70 at run time (its import uses pkg_resources and numpy.distutils), which the
# resolver would otherwise upgrade for torch's sake.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test,lint,tensorflow,keras,ray,lightning]" "numpy<2"
	$(BIN)/python -m pip install --quiet --no-deps "tf_keras==2.21.0" "torchvision==0.28.0" "timm==1.0.31"
	$(BIN)/python -m pip install --quiet "setuptools<70" wheel "numpy<2"
	$(BIN)/python -m pip install --quiet --no-build-isolation "chainer==7.8.1"
	$(BIN)/python -c "import torch, chainer, tensorflow, keras, ray, bnlab; print('bnlab', bnlab.__version__, '| torch', torch.__version__, '| chainer', chainer.__version__, '| tensorflow', tensorflow.__version__, '| keras', keras.__version__, '| ray', ray.__version__)"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs build src/*.egg-info
