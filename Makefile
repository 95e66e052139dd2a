# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create their environments on first use and reuse them afterwards.
#
# Two environments, because Chainer 7.8.1 and current JAX cannot share one (measured):
#   .venv          the modern one: numpy 2, torch, TensorFlow + tf_keras, Keras 3, Ray, Lightning,
#                  JAX/Flax/optax, torchvision/timm for the doctor's real-model zoo. Lint and the
#                  whole suite but the Chainer tests run here.
#   .venv-chainer  torch + Chainer 7.8.1 + numpy<2 (+ setuptools<70 at run time): the tests marked
#                  `chainer` (engine, parity, the Chainer doctor, the conventions row) run here.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bnlab-installed
CVENV  ?= .venv-chainer
CBIN   := $(CVENV)/bin
CSTAMP := $(CVENV)/.bnlab-installed
DEMO_ARGS ?= --seeds 0 --out runs/demo
# Frameworks each environment must have: a test that would skip for want of one fails instead
# (tests/conftest.py), so CI can never pass by skipping.
MODERN_FRAMEWORKS  := torch,tensorflow,tf_keras,keras,ray,lightning,jax,flax,optax,torchvision,timm
CHAINER_FRAMEWORKS := torch,chainer

.PHONY: demo test test-modern test-chainer lint bench venv venv-chainer clean

demo: $(STAMP)
	$(BIN)/bnlab repro $(DEMO_ARGS)

test: lint test-modern test-chainer

# The Keras doctor tests run on Keras's torch backend with the rest, then again on TensorFlow.
KERAS_TESTS := tests/doctor/test_doctor_keras.py tests/doctor/test_doctor_repair_keras.py tests/doctor/test_doctor_keras_fit.py

test-modern: $(STAMP)
	BNLAB_REQUIRE_FRAMEWORKS=$(MODERN_FRAMEWORKS) $(BIN)/python -m pytest tests -m "not chainer"
	BNLAB_REQUIRE_FRAMEWORKS=$(MODERN_FRAMEWORKS) BNLAB_TEST_KERAS_BACKEND=tensorflow $(BIN)/python -m pytest $(KERAS_TESTS)

test-chainer: $(CSTAMP)
	BNLAB_REQUIRE_FRAMEWORKS=$(CHAINER_FRAMEWORKS) $(CBIN)/python -m pytest tests -m chainer

bench: $(STAMP)
	$(BIN)/python bench/bench_epoch.py

venv: $(STAMP)

venv-chainer: $(CSTAMP)

# torch==2.13.0 is pinned first: it installs a CPU build from this machine's disk, where a
# bare `torch` could pull a multi-GB CUDA build. torchvision 0.28.0 (built for CUDA torch)
# and timm come without dependencies, for the doctor's real-model zoo tests (see
# DEVELOPERS.md). TensorFlow is the CPU build; tf_keras comes with --no-deps, or pip pulls
# the full 572 MB tensorflow over tensorflow-cpu.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test,lint,tensorflow,keras,ray,lightning,jax]"
	$(BIN)/python -m pip install --quiet --no-deps "tf_keras==2.21.0" "torchvision==0.28.0" "timm==1.0.31"
	$(BIN)/python -c "import numpy, torch, tensorflow, keras, ray, jax, flax, bnlab; print('bnlab', bnlab.__version__, '| numpy', numpy.__version__, '| torch', torch.__version__, '| tensorflow', tensorflow.__version__, '| keras', keras.__version__, '| ray', ray.__version__, '| jax', jax.__version__, '| flax', flax.__version__)"
	touch $(STAMP)

# Chainer needs numpy<2 and setuptools<70 at run time (its import uses pkg_resources and
# numpy.distutils), which the resolver would otherwise upgrade for torch's sake: it comes last.
$(CSTAMP): pyproject.toml
	$(PYTHON) -m venv $(CVENV)
	$(CBIN)/python -m pip install --quiet "torch==2.13.0"
	$(CBIN)/python -m pip install --quiet -e ".[test]" "numpy<2"
	$(CBIN)/python -m pip install --quiet "setuptools<70" wheel "numpy<2"
	$(CBIN)/python -m pip install --quiet --no-build-isolation "chainer==7.8.1"
	$(CBIN)/python -c "import numpy, torch, chainer, bnlab; print('bnlab', bnlab.__version__, '| numpy', numpy.__version__, '| torch', torch.__version__, '| chainer', chainer.__version__)"
	touch $(CSTAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(CVENV) runs build src/*.egg-info
