"""Small Chainer helpers: trial runs of a throwaway copy in test mode (no update of the
running statistics, no graph)."""

from __future__ import annotations

import copy
from typing import Any

import chainer
import numpy as np


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
    out = test_mode_output(model, x)
    return np.asarray(getattr(out, "array", out))
