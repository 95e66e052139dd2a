# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv on first use and reuse it afterwards.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bnlab-installed
DEMO_ARGS ?= --seeds 0 --out runs/demo

.PHONY: demo test bench venv clean

demo: $(STAMP)
	$(BIN)/bnlab repro $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python bench/bench_epoch.py

venv: $(STAMP)

# torch==2.13.0 is pinned first: it installs a CPU build from this machine's disk, where a
# bare `torch` could pull a multi-GB CUDA build. Chainer comes last: it needs numpy<2 and
# setuptools<70 at run time (its import uses pkg_resources and numpy.distutils), which the
# resolver would otherwise upgrade for torch's sake. See DEVELOPERS.md.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet "setuptools<70" wheel "numpy<2"
	$(BIN)/python -m pip install --quiet --no-build-isolation "chainer==7.8.1"
	$(BIN)/python -c "import torch, chainer, bnlab; print('bnlab', bnlab.__version__, '| torch', torch.__version__, '| chainer', chainer.__version__)"
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs build src/*.egg-info
