"""Keras layer walking shared by the Keras probe and the doctor's Keras training steps:
layers by dotted path, the BatchNormalization ones, the tensor read from a model's output.
Its own module so that ``keras_probe`` and ``keras_train`` both import it and neither
imports the other.
"""

from __future__ import annotations

from typing import Any

import keras

BN = keras.layers.BatchNormalization


def children(layer: Any) -> list[Any]:
    """A layer's direct sublayers (a model's layers), without the layer itself."""
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


def first_output(output: Any) -> tuple[Any, str]:
    """The tensor the probe reads from a model's output, and how it was reached."""
    note = ""
    while isinstance(output, (tuple, list, dict)) and output:
        if isinstance(output, dict):
            key = "logits" if "logits" in output else next(iter(output))
            output, note = output[key], f"{note}[{key!r}]"
        else:
            output, note = output[0], f"{note}[0]"
    return output, f"output{note}" if note else ""
