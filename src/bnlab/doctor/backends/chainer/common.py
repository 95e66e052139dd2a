"""Small Chainer helpers: the model's input in the model's floating dtype, trial runs of a
throwaway copy in test mode (no update of the running statistics, no graph)."""

from __future__ import annotations

import copy
from typing import Any

import chainer
import numpy as np

from bnlab.doctor.outputs import pick_output


def float_dtype(model: chainer.Link) -> np.dtype | None:
    """The dtype of the model's first initialized floating parameter (else persistent array,
    as ``avg_mean``): what its inputs must be, since a link built under
    ``chainer.using_config('dtype', numpy.float64)`` refuses float32 inputs ("Expect:
    x.dtype == W.dtype"). None for a model holding no floating array."""
    arrays = [param.array for param in model.params()]
    arrays += [getattr(link, name) for link in model.links() for name in sorted(link._persistent)]
    for array in arrays:
        dtype = getattr(array, "dtype", None)  # an uninitialized parameter's array is None
        if dtype is not None and np.issubdtype(dtype, np.floating):
            return np.dtype(dtype)
    return None


def from_torch(value: Any) -> Any:
    """A torch tensor as numpy (the doctor's sources may hand over torch batches); anything
    else as it is."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()
    return value


def as_input(model: chainer.Link, inputs: Any) -> Any:
    """What the doctor feeds ``model``: torch tensors as numpy, floating arrays in the model's
    :func:`float_dtype` (the doctor's batches are float32); for a model without floating
    arrays, float64 as float32 (Chainer's default dtype). Variables are passed as they are."""
    inputs = from_torch(inputs)
    if not isinstance(inputs, np.ndarray) or not np.issubdtype(inputs.dtype, np.floating):
        return inputs
    dtype = float_dtype(model)
    if dtype is None:
        dtype = np.dtype(np.float32) if inputs.dtype == np.float64 else inputs.dtype
    return inputs.astype(dtype, copy=False)


def output_array(value: Any) -> tuple[Any, str]:
    """The Variable or array of a model's output that the doctor reads (a tuple's first,
    a dict's ``logits`` or first entry, as for PyTorch), and where it was found."""
    kinds = (chainer.Variable, *chainer.get_array_types())
    return pick_output(value, lambda item: isinstance(item, kinds))


def test_mode_output(model: chainer.Link, x: np.ndarray) -> Any:
    """The output of a deep copy of ``model`` on ``x`` with ``config.train`` False."""
    trial = copy.deepcopy(model)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return trial(as_input(trial, x))


def runs_on(model: chainer.Link, x: np.ndarray) -> bool:
    try:
        test_mode_output(model, x)
    except Exception:  # noqa: BLE001 - any failure means: not this shape
        return False
    return True


def eval_output(model: chainer.Link, x: np.ndarray) -> np.ndarray | None:
    out, _ = output_array(test_mode_output(model, x))
    return None if out is None else np.asarray(getattr(out, "array", out))
