"""Reading a model's output, framework-free: the array the probe looks at, predicted
classes, and how far train-mode and eval-mode outputs are apart when there are no classes.

Backends whose tensors convert to numpy hand their outputs here (Keras, Flax).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def first_output(output: Any) -> tuple[Any, str]:
    """The tensor the probe reads from a model's output, and how it was reached: the first
    item of a tuple or list, the ``logits`` (or first) entry of a dict, recursively."""
    note = ""
    while isinstance(output, (tuple, list, dict)) and output:
        if isinstance(output, dict):
            key = "logits" if "logits" in output else next(iter(output))
            output, note = output[key], f"{note}[{key!r}]"
        else:
            output, note = output[0], f"{note}[0]"
    return output, f"output{note}" if note else ""


def classes(array: np.ndarray | None) -> np.ndarray | None:
    """Predicted classes (argmax over axis 1) when ``array`` looks like finite class scores."""
    if array is None or array.ndim < 2 or array.shape[1] < 2 or not np.all(np.isfinite(array)):
        return None
    return array.argmax(axis=1).reshape(-1)


def relative_change(train: np.ndarray, eval_: np.ndarray) -> float | None:
    """``|train - eval| / |eval|`` for outputs that are not class scores (None when the
    shapes differ)."""
    if train.shape != eval_.shape:
        return None
    return float(np.linalg.norm(train - eval_) / (np.linalg.norm(eval_) + 1e-12))
