"""Helpers shared by the Keras backend's modules: walking a model's layers, reading
tensors back as numpy, and finding the output the doctor reads.

Keras is imported at module level: this module is loaded only once a Keras model is
handled (see :mod:`bnlab.doctor.backends.keras`).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from bnlab.doctor.outputs import first_output

BN = keras.layers.BatchNormalization


def numpy(value: Any) -> np.ndarray:
    """Any backend's tensor (or a Keras variable) as a float64 numpy copy."""
    return np.array(keras.ops.convert_to_numpy(value), dtype=np.float64)


def children(layer: Any) -> list[Any]:
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is None:
        return list(getattr(layer, "layers", []))
    return list(flatten(include_self=False, recursive=False))


def named_layers(model: Any) -> dict[str, Any]:
    """Every layer once, under a dotted path of Keras layer names (``block.bn``)."""
    found: dict[str, Any] = {}
    seen: set[int] = set()

    def walk(layer: Any, prefix: str) -> None:
        for child in children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            found[path] = child
            walk(child, path + ".")

    walk(model, "")
    return found


def bn_layers(model: Any) -> dict[str, Any]:
    return {path: layer for path, layer in named_layers(model).items() if isinstance(layer, BN)}


def as_array(inputs: Any) -> np.ndarray:
    """Probe input as float32 numpy (torch tensors and float64 arrays converted)."""
    if hasattr(inputs, "detach") and hasattr(inputs, "numpy"):  # a torch tensor
        inputs = inputs.detach().cpu().numpy()
    array = np.asarray(keras.ops.convert_to_numpy(inputs))
    return array.astype(np.float32) if array.dtype == np.float64 else array


def trial(model: Any) -> Any:
    """A clone to try inputs on (Keras models don't deep-copy); the model itself if it
    cannot be cloned: an inference call updates nothing (it only builds an unbuilt
    subclassed model, as its first real call would)."""
    try:
        return keras.models.clone_model(model)
    except Exception:  # noqa: BLE001 - any failure to clone: try on the model itself
        return model


def runs_on(model: Any, x: np.ndarray) -> bool:
    try:
        trial(model)(x, training=False)  # inference mode: nothing is updated
    except Exception:  # noqa: BLE001 - any failure means: not this shape
        return False
    return True


def eval_output(model: Any, x: np.ndarray) -> np.ndarray | None:
    out, _ = first_output(trial(model)(x, training=False))
    return None if out is None else np.asarray(keras.ops.convert_to_numpy(out))
