"""Probe and training inputs for the command line: random tensors or real MNIST.

Arrays are float32 numpy; both probes accept them. MNIST comes from
``bnlab.data.load_mnist`` and is reshaped to whatever the model accepts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from bnlab.doctor.errors import InputError

# Shapes an MNIST model may expect, tried in this order (per sample).
MNIST_SHAPES: tuple[tuple[int, ...], ...] = ((784,), (1, 28, 28), (28, 28))


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


def _accepts(model: Any, framework: str, x: np.ndarray) -> bool:
    """Whether ``model`` (a throwaway copy) runs on ``x`` in eval mode."""
    try:
        if framework == "keras":
            model(x, training=False)  # inference mode: nothing is updated
        elif framework == "chainer":
            import chainer

            with chainer.using_config("train", False), chainer.no_backprop_mode():
                model(x)
        else:
            import torch

            with torch.no_grad():
                model(torch.from_numpy(x))
    except Exception:  # noqa: BLE001 - any failure means: not this shape
        return False
    return True


def _keras_trial(model: Any) -> Any:
    """A Keras clone to try shapes on (Keras models don't deep-copy); the model itself
    if it cannot be cloned: an inference call updates nothing (it only builds an
    unbuilt subclassed model, as its first real call would)."""
    import keras

    try:
        return keras.models.clone_model(model)
    except Exception:  # noqa: BLE001 - any failure to clone: try on the model itself
        return model


def fit_shape(model: Any, framework: str, flat: np.ndarray) -> tuple[int, ...]:
    """The per-sample MNIST shape that ``model`` accepts, tried on two samples."""
    for shape in MNIST_SHAPES:
        # A fresh copy per shape: a Lazy module takes its shapes from the first batch it sees.
        trial = _keras_trial(model) if framework == "keras" else _copy(model, framework)
        if framework == "torch":
            trial.eval()
        if _accepts(trial, framework, flat[:2].reshape((2,) + shape)):
            return shape
    tried = ", ".join("(N," + ",".join(map(str, s)) + ")" for s in MNIST_SHAPES)
    raise InputError(
        f"the model accepts none of the MNIST shapes {tried}; give the shape it expects with "
        "--input-shape instead of --data."
    )


def _copy(model: Any, framework: str) -> Any:
    if framework != "torch":
        return copy.deepcopy(model)
    from bnlab.doctor.torch_probe import _lazy_memo  # deepcopy refuses uninitialized Lazy tensors

    return copy.deepcopy(model, _lazy_memo(model))


Batch = tuple[np.ndarray, np.ndarray]


def _flat(images: Any) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    return images.reshape(len(images), -1)


def mnist(
    data_dir: str | None, batch_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, Callable[[tuple[int, ...]], Iterator[Batch]]]:
    """Probe batch from the MNIST test set, and a factory of training batches (train set)
    in a given per-sample shape."""
    try:
        from bnlab.data import load_mnist, to_float
    except ImportError as err:
        raise InputError(f"--data mnist needs bnlab.data, which could not be imported ({err}).") from err
    try:
        data = load_mnist(data_dir)
    except Exception as err:  # noqa: BLE001 - missing files, bad checksum, no network...
        raise InputError(
            f"could not load MNIST ({type(err).__name__}: {err}); point --data-dir at the folder with the MNIST files."
        ) from err
    rng = np.random.default_rng(seed)
    test_x = _flat(to_float(data.test_images))
    test_y = np.asarray(data.test_labels).astype(np.int64)
    if batch_size > len(test_x):
        raise InputError(f"--batch-size {batch_size} is larger than the MNIST test set ({len(test_x)}).")
    pick = rng.permutation(len(test_x))[:batch_size]
    train_x = _flat(to_float(data.train_images))
    train_y = np.asarray(data.train_labels).astype(np.int64)

    def batches(shape: tuple[int, ...]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:  # shuffled epochs, full batches only
            order = rng.permutation(len(train_x))
            for start in range(0, len(order) - batch_size + 1, batch_size):
                idx = order[start : start + batch_size]
                yield train_x[idx].reshape((batch_size,) + shape), train_y[idx]

    return test_x[pick], test_y[pick], batches
