"""Flax weights on disk: msgpack state files for ``--checkpoint`` and ``--fix``.

The format is Flax's own serialization: ``flax.serialization.msgpack_serialize`` of the
model's state as plain nested dicts (nnx: ``nnx.state(model).to_pure_dict()``; linen: the
variables, ``flax.serialization.to_bytes(variables)``), read back with
``flax.serialization.msgpack_restore``. msgpack holds arrays and containers only: reading
it runs no code from the file (unlike a pickle).

linen keeps its variables outside the module, so a linen checkpoint gives a new model: a
``(module, variables)`` pair read into the pair's variables, or, for an unbound module,
a :class:`~bnlab.doctor.backends.flax.common.Linen` that reads them into the template
``module.init`` makes at the probe's input (the shapes of a Dense layer's kernel depend
on its input).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx, serialization
from flax.core import unfreeze

from bnlab.doctor.backend import Change
from bnlab.doctor.backends import sketch
from bnlab.doctor.backends.flax import common
from bnlab.doctor.errors import InputError, a_type
from bnlab.doctor.state_fit import misfits

SAVE_LINE = "flax.serialization.msgpack_serialize(nnx.state(model).to_pure_dict())"
LINEN_SAVE_LINE = "flax.serialization.to_bytes(variables)"


class CheckpointMisfit(InputError):
    """A checkpoint whose entries do not fit the model. ``keys_differ``: entries are
    missing or unexpected (not only shapes, which for linen may follow the input's)."""

    def __init__(self, message: str, keys_differ: bool) -> None:
        super().__init__(message)
        self.keys_differ = keys_differ


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf of a nested mapping (keys as strings: msgpack stores them so)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    found: dict[str, Any] = {}
    for key, value in tree.items():
        found.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def read_state(path: Path) -> dict[str, Any]:
    """The nested dict in a msgpack state file, or an InputError naming the fix."""
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file.")
    if path.stat().st_size == 0:
        raise InputError(
            f"{path} is empty (0 bytes): was it written completely? Save {SAVE_LINE} (nnx) or {LINEN_SAVE_LINE} (linen) again."
        )
    try:
        state = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:
        raise InputError(
            f"{path} is not a Flax msgpack state ({type(err).__name__}: {str(err)[:160]}). bnlab reads "
            f"states written by {SAVE_LINE} (nnx) or {LINEN_SAVE_LINE} (linen); save the model that way."
        ) from err
    if not isinstance(state, dict) or not state:
        raise InputError(
            f"{path} holds {a_type(state)}, not a state (nested dicts of arrays); save "
            f"{SAVE_LINE} (nnx) or {LINEN_SAVE_LINE} (linen)."
        )
    return state


def _check_fits(own: dict[str, Any], given: dict[str, Any], path: Path, model_name: str) -> None:
    problems = misfits({k: np.shape(v) for k, v in own.items()}, {k: np.shape(v) for k, v in given.items()})
    if problems:
        raise CheckpointMisfit(
            f"{path} does not fit {model_name}: {'; '.join(problems)}. Give the state saved "
            "from this model class (with the same constructor arguments).",
            keys_differ=set(own) != set(given),
        )


def load_checkpoint(model: Any, path: Path, notes: list[str]) -> Any:
    """The model with the weights of the msgpack state at ``path``: the nnx ``model``
    itself (freshly built by the doctor, loaded in place), a new linen model otherwise. Nothing for ``notes``."""
    if not common.is_nnx(model):
        return _linen_checkpoint(common.as_linen(model), read_state(path), path)
    state = nnx.state(model)
    given = read_state(path)
    own_flat = {k: v for k, v in _flat(state.to_pure_dict()).items()}
    _check_fits(own_flat, _flat(given), path, type(model).__name__)
    nnx.replace_by_pure_dict(state, _keys_like(state.to_pure_dict(), given))
    nnx.update(model, state)
    return model


def _linen_checkpoint(model: common.Linen, given: dict[str, Any], path: Path) -> Any:
    """A ``(module, variables)`` pair for a pair, an unbound model that restores ``given``
    once its template is known otherwise (see the module docs)."""
    restore = functools.partial(_restore_linen, given=given, path=path, name=type(model.module).__name__)
    if model.variables is not None:
        return model.module, restore(model.variables)
    return common.Linen(model.module, None, restore)


def _restore_linen(template: Any, *, given: dict[str, Any], path: Path, name: str) -> dict[str, Any]:
    """``given`` (msgpack's nested dicts) read into ``template`` (variables or their
    shapes), in the template's dtypes, once keys and shapes are seen to fit."""
    template = unfreeze(template)
    _check_fits(_flat(template), _flat(given), path, name)
    restored = serialization.from_state_dict(template, given)
    return dict(jax.tree.map(lambda own, value: jax.numpy.asarray(value, dtype=own.dtype), template, restored))


def _keys_like(own: Any, given: Any) -> Any:
    """``given`` with the key types of ``own`` (msgpack turns list indices into strings)."""
    if not isinstance(own, dict) or not isinstance(given, dict):
        return jax.numpy.asarray(given) if isinstance(given, np.ndarray) else given
    by_text = {str(key): key for key in own}
    return {
        by_text.get(str(key), key): _keys_like(own.get(by_text.get(str(key), key)), value)
        for key, value in given.items()
    }


def save_weights(model: Any) -> bytes:
    """The msgpack state of the nnx ``model`` (``nnx.state(model).to_pure_dict()``), or
    of a linen model's variables."""
    if common.is_nnx(model):
        return serialization.msgpack_serialize(jax.tree.map(np.asarray, nnx.state(model).to_pure_dict()))
    variables = common.as_linen(model).variables
    assert variables is not None, "a repaired linen model has its variables"
    return serialization.msgpack_serialize(jax.tree.map(np.asarray, unfreeze(variables)))


def how_to_load(changes: list[Change], weights: Path, target: str, mlp_config: Any) -> str:
    from bnlab.doctor.backends.flax.repair import LINEN_METHOD

    if any(change.get("method") == LINEN_METHOD for change in changes):  # a linen repair
        return _how_to_load_linen(changes, weights, target)
    load = (
        "state = nnx.state(model)\n"
        f"    nnx.replace_by_pure_dict(state, flax.serialization.msgpack_restore(open({str(weights)!r}, 'rb').read()))\n"
        "    nnx.update(model, state)\n"
        "    model.eval()  # running statistics for inference"
    )
    text = sketch.rebuild_and_load(changes, target, "flax", load)
    return text.replace("    import flax\n", "    import flax\n    from flax import nnx\n", 1)


def _how_to_load_linen(changes: list[Change], weights: Path, target: str) -> str:
    load = (
        f"variables = flax.serialization.msgpack_restore(open({str(weights)!r}, 'rb').read())\n"
        "    scores = model.apply(variables, x, train=False)  # your module's eval-mode argument: running statistics"
    )
    return sketch.rebuild_and_load(changes, target, "flax", load)
