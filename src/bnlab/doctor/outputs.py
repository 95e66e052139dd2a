"""Reading a model's output, framework-free: the array the probe looks at, predicted
classes, and how far train-mode and eval-mode outputs are apart when there are no classes.

Backends whose tensors convert to numpy hand their outputs here (Keras, Flax); PyTorch and
Chainer find the tensor they read with :func:`pick_output` (a tuple's first, a dict's
``logits`` or first entry), which skips entries that hold no tensor.
"""

from __future__ import annotations

from collections.abc import Callable
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


def pick_output(value: Any, is_array: Callable[[Any], bool]) -> tuple[Any, str]:
    """The array of ``value`` the doctor reads, and where it was found.

    An array is itself (``""``); in a tuple or list the first array (``"[0]"``); in a
    dict the ``logits`` entry if there is one, else the first array (``"['logits']"``).
    Nested containers are searched depth first; ``(None, "")`` if there is no array.
    """
    if is_array(value):
        return value, ""
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: k != "logits")  # logits first, else in order
        for key in keys:
            found, where = pick_output(value[key], is_array)
            if found is not None:
                return found, f"[{key!r}]{where}"
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found, where = pick_output(item, is_array)
            if found is not None:
                return found, f"[{index}]{where}"
    return None, ""


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
