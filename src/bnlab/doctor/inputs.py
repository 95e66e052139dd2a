"""Probe inputs for the command line: the shape given, random arrays, and the MNIST
shape a model accepts.

Arrays are float32 numpy; every backend's probe accepts them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnlab.doctor.backend import Backend
from bnlab.doctor.errors import InputError

# Shapes an MNIST model may expect, tried in this order (per sample); the last one is
# channels-last, as Flax's convolutions (and Keras's by default) take images.
MNIST_SHAPES: tuple[tuple[int, ...], ...] = ((784,), (1, 28, 28), (28, 28), (28, 28, 1))


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1000,784"`` -> (1000, 784)."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise InputError(f"--input-shape must be integers separated by commas, like 1000,784; got {text!r}") from None
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise InputError(
            f"--input-shape needs a batch size and at least one more positive dimension, like 1000,784; got {text!r}"
        )
    return shape


def random_inputs(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A standard-normal probe batch (training steps, if any, repeat it with random labels)."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def fit_shape(model: Any, backend: Backend, flat: np.ndarray) -> tuple[int, ...]:
    """The per-sample MNIST shape that ``model`` accepts, tried on two samples (each on a
    throwaway copy: a Lazy module takes its shapes from the first batch it sees)."""
    for shape in MNIST_SHAPES:
        if backend.runs_on(model, flat[:2].reshape((2,) + shape)):
            return shape
    tried = ", ".join("(N," + ",".join(map(str, s)) + ")" for s in MNIST_SHAPES)
    raise InputError(
        f"the model accepts none of the MNIST shapes {tried}; give the shape it expects with "
        "--input-shape instead of --data."
    )
