"""Flax weights on disk: msgpack state files for ``--checkpoint`` and ``--fix``.

The format is Flax's own serialization: ``flax.serialization.msgpack_serialize`` of the
model's state as plain nested dicts (nnx: ``nnx.state(model).to_pure_dict()``), read back
with ``flax.serialization.msgpack_restore``. msgpack holds arrays and containers only:
reading it runs no code from the file (unlike a pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx, serialization

from bnlab.doctor.backend import Change
from bnlab.doctor.backends import sketch
from bnlab.doctor.backends.flax import common
from bnlab.doctor.errors import InputError
from bnlab.doctor.state_fit import misfits

SAVE_LINE = "flax.serialization.msgpack_serialize(nnx.state(model).to_pure_dict())"


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
    try:
        state = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:
        raise InputError(
            f"{path} is not a Flax msgpack state ({type(err).__name__}: {str(err)[:160]}). bnlab reads "
            f"states written by {SAVE_LINE} (nnx); save the model that way."
        ) from err
    if not isinstance(state, dict) or not state:
        raise InputError(
            f"{path} holds a {type(state).__name__}, not a state (nested dicts of arrays); save {SAVE_LINE}."
        )
    return state


def _check_fits(own: dict[str, Any], given: dict[str, Any], path: Path, model_name: str) -> None:
    problems = misfits({k: np.shape(v) for k, v in own.items()}, {k: np.shape(v) for k, v in given.items()})
    if problems:
        raise InputError(
            f"{path} does not fit {model_name}: {'; '.join(problems)}. Give the state saved "
            "from this model class (with the same constructor arguments)."
        )


def load_checkpoint(model: Any, path: Path) -> None:
    """Load a msgpack state into the nnx ``model`` (freshly built by the doctor)."""
    if not common.is_nnx(model):
        raise InputError(
            f"--checkpoint {path}: a flax.linen module keeps no weights of its own. Give a "
            "function with no arguments returning (module, variables) instead, reading the "
            "variables with flax.serialization.msgpack_restore (or from orbax)."
        )
    state = nnx.state(model)
    given = read_state(path)
    own_flat = {k: v for k, v in _flat(state.to_pure_dict()).items()}
    _check_fits(own_flat, _flat(given), path, type(model).__name__)
    nnx.replace_by_pure_dict(state, _keys_like(state.to_pure_dict(), given))
    nnx.update(model, state)


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
    """The msgpack state of the nnx ``model`` (``nnx.state(model).to_pure_dict()``)."""
    return serialization.msgpack_serialize(jax.tree.map(np.asarray, nnx.state(model).to_pure_dict()))


def how_to_load(changes: list[Change], weights: Path, target: str, mlp_config: Any) -> str:
    load = (
        "state = nnx.state(model)\n"
        f"    nnx.replace_by_pure_dict(state, flax.serialization.msgpack_restore(open({str(weights)!r}, 'rb').read()))\n"
        "    nnx.update(model, state)\n"
        "    model.eval()  # running statistics for inference"
    )
    text = sketch.rebuild_and_load(changes, target, "flax", load)
    return text.replace("    import flax\n", "    import flax\n    from flax import nnx\n", 1)
