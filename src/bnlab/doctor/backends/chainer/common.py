"""Small Chainer helpers: trial runs of a throwaway copy in test mode (no update of the
running statistics, no graph)."""

from __future__ import annotations

import copy
from typing import Any

import chainer
import numpy as np

from bnlab.doctor.outputs import pick_output


def output_array(value: Any) -> tuple[Any, str]:
    """The Variable or array of a model's output that the doctor reads (a tuple's first,
    a dict's ``logits`` or first entry, as for PyTorch), and where it was found."""
    kinds = (chainer.Variable, *chainer.get_array_types())
    return pick_output(value, lambda item: isinstance(item, kinds))


def test_mode_output(model: chainer.Link, x: np.ndarray) -> Any:
    """The output of a deep copy of ``model`` on ``x`` with ``config.train`` False."""
    trial = copy.deepcopy(model)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return trial(x)


def runs_on(model: chainer.Link, x: np.ndarray) -> bool:
    try:
        test_mode_output(model, x)
    except Exception:  # noqa: BLE001 - any failure means: not this shape
        return False
    return True


def eval_output(model: chainer.Link, x: np.ndarray) -> np.ndarray | None:
    out, _ = output_array(test_mode_output(model, x))
    return None if out is None else np.asarray(getattr(out, "array", out))
