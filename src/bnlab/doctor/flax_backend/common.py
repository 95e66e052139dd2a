"""What the Flax backend's modules share: the two model kinds, calling them in a mode,
reading their outputs, and the facts of a layer the probes record.

Two APIs are taken:

- ``flax.nnx``: a ``nnx.Module`` instance; state (``nnx.Param``, ``nnx.BatchStat``) lives
  in the objects and ``model.train()`` / ``model.eval()`` set ``use_running_average``.
- ``flax.linen``: an unbound ``linen.Module`` (the doctor initialises it from the probe's
  shape) or a pair ``(module, variables)`` of a trained one; ``batch_stats`` lives in the
  variables and is updated only where ``apply(..., mutable=['batch_stats'])`` asks.

Flax is imported here, so only once a Flax model is handled.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from bnlab.doctor.errors import forward_failed

# Keyword arguments through which a model's __call__ commonly takes its mode; the value
# is what means "training" (``deterministic`` and ``use_running_average`` are negated).
MODE_ARGUMENTS: dict[str, bool] = {
    "train": True,
    "training": True,
    "is_training": True,
    "deterministic": False,
    "use_running_average": False,
}

# Layers whose bias a following BN makes redundant (nnx and linen names).
WITH_BIAS = {"Linear", "LinearGeneral", "Einsum", "Conv", "ConvTranspose", "Dense", "DenseGeneral"}


@dataclass
class Linen:
    """A linen model: the module and its variables (None until initialised)."""

    module: linen.Module
    variables: dict[str, Any] | None = None

    def copy(self) -> Linen:
        # jax arrays are immutable: a new mapping tree is a copy the doctor may replace into.
        variables = None if self.variables is None else jax.tree.map(lambda a: a, dict(self.variables))
        return Linen(self.module.clone(), variables)


def is_linen_pair(model: Any) -> bool:
    return (
        isinstance(model, tuple)
        and len(model) == 2
        and isinstance(model[0], linen.Module)
        and isinstance(model[1], Mapping)
    )


def as_linen(model: Any) -> Linen:
    """The linen model in ``model``: an unbound module, a ``(module, variables)`` pair or
    a :class:`Linen` already."""
    if isinstance(model, Linen):
        return model
    if is_linen_pair(model):
        return Linen(model[0], dict(model[1]))
    return Linen(model)


def is_nnx(model: Any) -> bool:
    return isinstance(model, nnx.Module)


def dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in path)


def mode_kwargs(fn: Callable[..., Any], train: bool) -> dict[str, bool]:
    """The keyword that puts a model's ``__call__`` in training (or eval) mode, if it has one."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    for name, means_training in MODE_ARGUMENTS.items():
        if name in params:
            return {name: train if means_training else not train}
    return {}


def call_nnx(model: nnx.Module, x: Any, train: bool) -> Any:
    """``model(x)`` in nnx's own mode (``model.train()`` / ``model.eval()``) and with the
    mode argument its ``__call__`` takes, if any."""
    model.train() if train else model.eval()
    return model(x, **mode_kwargs(type(model).__call__, train))


def first_output(output: Any) -> tuple[Any, str]:
    """The array the probe reads from a model's output, and how it was reached."""
    note = ""
    while isinstance(output, (tuple, list, dict)) and output:
        if isinstance(output, dict):
            key = "logits" if "logits" in output else next(iter(output))
            output, note = output[key], f"{note}[{key!r}]"
        else:
            output, note = output[0], f"{note}[0]"
    return output, f"output{note}" if note else ""


def numpy64(value: Any) -> np.ndarray:
    return np.array(value, dtype=np.float64)


def as_array(inputs: Any) -> np.ndarray:
    """Probe input as numpy (torch tensors converted, float64 made float32)."""
    if hasattr(inputs, "detach") and hasattr(inputs, "numpy"):  # a torch tensor
        inputs = inputs.detach().cpu().numpy()
    array = np.asarray(inputs)
    return array.astype(np.float32) if array.dtype == np.float64 else array


def classes(array: np.ndarray | None) -> np.ndarray | None:
    if array is None or array.ndim < 2 or array.shape[1] < 2 or not np.all(np.isfinite(array)):
        return None
    return array.argmax(axis=1).reshape(-1)


def is_batchnorm(module: Any) -> bool:
    return isinstance(module, (nnx.BatchNorm, linen.BatchNorm))


def producer_facts(module: Any) -> tuple[str, bool, bool]:
    """(class name, has a bias a BN makes redundant, is dropout) of a layer."""
    kind = type(module).__name__
    if isinstance(module, nnx.Module):
        has_bias = kind in WITH_BIAS and getattr(module, "bias", None) is not None
    else:
        has_bias = kind in WITH_BIAS and bool(getattr(module, "use_bias", False))
    return kind, has_bias, isinstance(module, (nnx.Dropout, linen.Dropout))


def init_linen(model: Linen, x: np.ndarray, seed: int = 0) -> Linen:
    """``model`` with variables: initialised from two samples of ``x`` when it has none."""
    if model.variables is not None:
        return model
    kwargs = mode_kwargs(model.module.__call__, False)
    try:
        variables = model.module.init(jax.random.key(seed), jnp.asarray(x[:2]), **kwargs)
    except Exception as err:  # the user's module on the probe's shape
        raise forward_failed(err) from err
    return Linen(model.module, dict(variables))


def linen_apply(model: Linen, x: Any, train: bool, *, mutable: Any = False, rng: Any = None) -> Any:
    """``module.apply(variables, x, <mode>)``; with ``mutable``, (output, updates)."""
    assert model.variables is not None
    kwargs: dict[str, Any] = dict(mode_kwargs(model.module.__call__, train))
    rngs = {"dropout": rng if rng is not None else jax.random.key(0)}
    return model.module.apply(model.variables, x, rngs=rngs, mutable=mutable, **kwargs)
