"""Doctor backends: one folder per framework, and the ONE place that picks one.

Each framework lives in ``backends/<name>/`` (see README.md here) and exposes
``BACKEND``, an instance of a class implementing :class:`bnlab.doctor.backend.Backend`.
:data:`BACKENDS` lists them in the order they are asked; :func:`detect` is the only
framework detection in the doctor, and the object it returns is passed on from there.

Adding a framework is one folder plus one line in :data:`BACKENDS`. Backend folders must
not import their framework at module level in ``__init__.py``: ``owns`` looks the
framework up in ``sys.modules`` (a model of a framework that was never imported cannot
exist), so ``import bnlab.doctor`` stays cheap and optional frameworks stay optional.

Frameworks the doctor recognises but cannot check yet are refused here with a message
(:data:`NOT_YET`), until a backend of the same name is registered.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from bnlab.doctor.backend import Backend
from bnlab.doctor.errors import UnsupportedModel, UsageError
from bnlab.errors import MissingExtra, chainer_missing_text

# name -> package holding BACKEND; asked in this order (a framework built on another comes first:
# a Keras 3 model on the torch backend is also a torch.nn.Module).
BACKENDS: dict[str, str] = {
    "keras": "bnlab.doctor.backends.keras",
    "torch": "bnlab.doctor.backends.torch",
    "chainer": "bnlab.doctor.backends.chainer",
    "flax": "bnlab.doctor.backends.flax",
}


def _keras_2_model(obj: Any) -> bool:
    return any((getattr(c, "__module__", "") or "").startswith("tf_keras") for c in type(obj).__mro__)


def _equinox_model(obj: Any) -> bool:
    return any((getattr(c, "__module__", "") or "").split(".")[0] == "equinox" for c in type(obj).__mro__)


# Recognised, not supported yet: (name, test, message). Skipped once a backend of
# that name is registered in BACKENDS.
NOT_YET: list[tuple[str, Callable[[Any], bool], str]] = [
    (
        "tf_keras",
        _keras_2_model,
        (
            "Keras 2 (tf_keras) models: not supported; bnlab doctor checks Keras 3 "
            "(keras.Model), PyTorch (torch.nn.Module) and Chainer (chainer.Link) models. "
            "Build the model with `import keras` (Keras 3) to check it."
        ),
    ),
    (
        "equinox",
        _equinox_model,
        (
            "Equinox models (eqx.Module, with eqx.nn.BatchNorm keeping its statistics in an "
            "eqx.nn.State): not supported yet; bnlab doctor checks JAX models written with "
            "flax.nnx or flax.linen, and PyTorch, Keras 3 and Chainer models. Write the model "
            "with flax.nnx (nnx.BatchNorm) to check it."
        ),
    ),
]


# A model file that imports a framework this environment cannot hold: the package's top-level
# name -> (what it is, the paragraph that says where it lives). Chainer 7.8.1 needs numpy<2, so
# the modern environment (numpy 2, JAX) has none.
ELSEWHERE: dict[str, Callable[[str, BaseException], str]] = {
    "chainer": lambda path, err: chainer_missing_text(f"{path} imports chainer; checking a Chainer model", err),
}


def missing_framework(err: BaseException, path: object) -> MissingExtra | None:
    """The error for ``path`` failing to import because a framework kept in another
    environment is missing here; None for any other failure."""
    if not isinstance(err, ImportError):
        return None
    explain = ELSEWHERE.get((err.name or "").split(".")[0])
    return MissingExtra(explain(str(path), err)) if explain else None


def load(name: str) -> Backend:
    """The backend registered as ``name``."""
    if name not in BACKENDS:
        choices = ", ".join(["auto", *BACKENDS])
        raise UsageError(f"framework must be one of {choices}, not {name!r}")
    backend: Backend = importlib.import_module(BACKENDS[name]).BACKEND
    return backend


def _refusal(model: Any) -> str | None:
    for name, test, message in NOT_YET:
        if name not in BACKENDS and test(model):
            return message
    return None


def recognised(model: Any) -> bool:
    """A model of a framework the doctor knows (supported or refused with a message)."""
    return _refusal(model) is not None or any(load(name).owns(model) for name in BACKENDS)


def chosen(model: Any, framework: str | Backend) -> Backend:
    """``framework`` when it is a Backend already (detected once upstream), else
    :func:`detect` with ``framework`` as the wanted name."""
    return detect(model, framework) if isinstance(framework, str) else framework


def detect(model: Any, wanted: str = "auto") -> Backend:
    """The backend for ``model``: ``wanted`` ("auto" to detect) after checking it fits.

    UnsupportedModel (a UsageError: exit 2 on the command line) for a framework that is
    not supported yet and for anything that is not a model; UsageError for a ``wanted``
    framework that does not match.
    """
    refusal = _refusal(model)
    if refusal is not None:
        raise UnsupportedModel(refusal)
    found = next((name for name in BACKENDS if load(name).owns(model)), None)
    if found is None:
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        raise UnsupportedModel(
            f"expected a keras.Model, a torch.nn.Module, a chainer.Link or a Flax module "
            f"(flax.nnx.Module, flax.linen.Module), got {kind}. bnlab doctor checks Keras 3, "
            "PyTorch, Chainer and Flax models."
        )
    if wanted not in ("auto", found):
        load(wanted)  # an unknown name is its own error
        raise UsageError(f"framework {wanted!r} was given, but the model is a {found} model.")
    return load(found)


def seed_all(seed: int) -> None:
    """Seed every registered framework's own generators (before a model is built, so
    before its framework is known)."""
    for name in BACKENDS:
        load(name).seed(seed)
