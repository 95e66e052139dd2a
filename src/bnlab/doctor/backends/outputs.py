"""Which part of a model's output the doctor reads, for every framework alike.

A model may return one array, a tuple or list (``(logits, aux)``), or a dict
(``{"out": ..., "aux": ...}``, Chainer's ``ResNet50Layers`` ``{"prob": ...}``). The
probes, the training steps and the class counts all read the same entry, found here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


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
