"""Doctor backends: what the doctor needs from a framework, and the ONE place that picks it.

A backend is a module (``bnlab.doctor.keras_backend``, ``torch_backend``, ``chainer_backend``)
that provides the functions of :class:`Backend`: recognise a model, probe it (training a
copy first when asked) and watch a user's training loop. :data:`BACKENDS` lists them in
the order they are asked; :func:`detect` is the only framework detection in the doctor.

Adding a framework is one module plus one line in :data:`BACKENDS`. Backend modules must
not import their framework at module level: ``owns`` looks the framework up in
``sys.modules`` (a model of a framework that was never imported cannot exist), so
``import bnlab.doctor`` stays cheap and optional frameworks stay optional.

Frameworks the doctor recognises but cannot check yet are refused here with a message
(:data:`NOT_YET`), until a backend of the same name is registered.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, Protocol, cast

from bnlab.doctor.errors import UnsupportedModel, UsageError
from bnlab.doctor.records import CallRecord, ProbeResult, StatUpdates

# name -> module; asked in this order (a framework built on another comes first:
# a Keras 3 model on the torch backend is also a torch.nn.Module).
BACKENDS: dict[str, str] = {
    "keras": "bnlab.doctor.keras_backend",
    "torch": "bnlab.doctor.torch_backend",
    "chainer": "bnlab.doctor.chainer_backend",
}


class Watcher(Protocol):
    """Hooks on the user's model while their own loop runs.

    Nothing here may wait on the device per step: counts are kept on the host, the
    running statistics are compared once, at :meth:`updates`.
    """

    calls: list[CallRecord]  # norm calls since the last take (stats not measured)
    extra_calls: dict[str, int]  # train-mode norm calls outside any forward pass

    def attach(self) -> None: ...

    def detach(self) -> None: ...

    def step_marker(self) -> object:
        """Changes whenever an optimizer step has updated the model (cheap, host only)."""
        ...

    def updates(self) -> dict[str, StatUpdates]:
        """Per norm layer: how its running statistics moved since :meth:`attach`."""
        ...

    def optimizer(self) -> Any:
        """The optimizer seen stepping the model (or given), None if unknown."""
        ...


class Backend(Protocol):
    """The functions a backend module provides."""

    NAME: str

    def owns(self, model: Any) -> bool:
        """Whether ``model`` is this framework's model (never imports the framework)."""
        ...

    def probe(
        self,
        model: Any,
        inputs: Any,
        *,
        labels: Any = None,
        train_steps: int = 0,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        optimizer_factory: Callable[..., Any] | None = None,
        train_batches: Iterable[tuple[Any, Any]] | None = None,
        lr: float = 0.01,
        modes: dict[str, bool] | None = None,
    ) -> ProbeResult:
        """Everything the checks need, measured on a copy of ``model``; with
        ``train_steps`` the copy is trained first and ``ProbeResult.given`` holds the
        observations of the model as handed over."""
        ...

    def watcher(self, model: Any, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> Watcher:
        """Hooks for :func:`bnlab.doctor.watch` (not attached yet)."""
        ...

    def describe_optimizer(self, model: Any, optimizer: Any) -> Any:
        """``OptimizerInfo`` of ``optimizer`` on ``model`` (None when it can't tell)."""
        ...


def _keras_2_model(obj: Any) -> bool:
    return any((getattr(c, "__module__", "") or "").startswith("tf_keras") for c in type(obj).__mro__)


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
]


def load(name: str) -> Backend:
    """The backend registered as ``name``."""
    if name not in BACKENDS:
        choices = ", ".join(["auto", *BACKENDS])
        raise UsageError(f"framework must be one of {choices}, not {name!r}")
    module: ModuleType = importlib.import_module(BACKENDS[name])
    return cast(Backend, module)


def _refusal(model: Any) -> str | None:
    for name, test, message in NOT_YET:
        if name not in BACKENDS and test(model):
            return message
    return None


def recognised(model: Any) -> bool:
    """A model of a framework the doctor knows (supported or refused with a message)."""
    return _refusal(model) is not None or any(load(name).owns(model) for name in BACKENDS)


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
            f"expected a keras.Model, a torch.nn.Module or a chainer.Link, got {kind}. bnlab "
            "doctor checks Keras 3, PyTorch and Chainer models."
        )
    if wanted not in ("auto", found):
        load(wanted)  # an unknown name is its own error
        raise UsageError(f"framework {wanted!r} was given, but the model is a {found} model.")
    return load(found)
