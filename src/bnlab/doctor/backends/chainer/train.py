"""The doctor's own training steps, on a copy of a Chainer model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import chainer
import chainer.functions as F
import numpy as np

from bnlab.doctor.backends.chainer.common import as_input, from_torch, output_array
from bnlab.doctor.batching import cycle, staged_step
from bnlab.doctor.errors import UsageError
from bnlab.doctor.records import TrainLog


def _labels(labels: Any) -> np.ndarray:
    return np.asarray(from_torch(labels)).astype(np.int32)


def _read(output: Any) -> Any:
    """The part of the model's output the loss is computed on (as the probe reads it)."""
    array, _ = output_array(output)
    if array is None:
        raise TypeError("the model's output holds no array")
    return array


def pseudo_labels(model: chainer.Link, x: Any, seed: int = 0) -> np.ndarray:
    """Random class labels shaped like the model's output (see torch_train.pseudo_labels)."""
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        out, _ = output_array(model(as_input(model, x)))
    if out is None:
        raise UsageError("train_steps needs labels when the model's output is not class scores")
    array: Any = out.array if isinstance(out, chainer.Variable) else np.asarray(out)
    if array.ndim < 2 or array.shape[1] < 2:
        raise UsageError("train_steps needs labels when the model's output is not class scores")
    rng = np.random.RandomState(seed)
    shape = (array.shape[0],) + array.shape[2:]
    return rng.randint(0, array.shape[1], size=shape).astype(np.int32)


def train(
    model: chainer.Link,
    x: Any,
    labels: Any,
    steps: int,
    *,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    optimizer_factory: Callable[[], Any] | None = None,
    batches: Iterable[tuple[Any, Any]] | None = None,
    lr: float = 0.01,
) -> TrainLog:
    """``steps`` updates of ``model`` (already a copy) in train mode.

    ``optimizer_factory()`` returns a Chainer optimizer (default Adam(alpha=lr), float16 parameters updated in float32) that is
    set up on the copy here; ``loss_fn(output, labels)`` defaults to softmax cross-entropy.
    Inputs are cast to the model's floating dtype (:func:`common.as_input`).
    """
    if batches is None:
        batches = [(x, pseudo_labels(model, x) if labels is None else labels)]
    optimizer = optimizer_factory() if optimizer_factory else _default_optimizer(lr)
    optimizer.setup(model)
    loss_fn = loss_fn or F.softmax_cross_entropy
    log = TrainLog(steps=steps)
    with chainer.using_config("train", True):
        for step, (bx, by) in zip(range(steps), cycle(batches)):
            loss = staged_step(
                step,
                lambda: _read(model(as_input(model, bx))),  # noqa: B023 - called at once
                lambda output: loss_fn(output, _labels(by)),  # noqa: B023 - called at once
                lambda loss: _update(model, optimizer, loss),
                _scalar,
            )
            log.add_loss(step, float(loss.array))
    return log


def _default_optimizer(lr: float) -> Any:
    """Adam, updating float16 parameters through a float32 copy (Chainer's mixed-precision
    mode; float32/float64 parameters are updated as they are): in float16 its eps 1e-8 is 0,
    and the zero gradient of a bias before BN gives 0/0 = NaN at the first update."""
    optimizer = chainer.optimizers.Adam(alpha=lr)
    optimizer.use_fp32_update()
    return optimizer


def _update(model: chainer.Link, optimizer: Any, loss: Any) -> None:
    model.cleargrads()
    loss.backward()
    optimizer.update()


def _scalar(loss: Any) -> float | None:
    """The loss as a number, when it is one (a user's loss_fn may return anything)."""
    array = np.asarray(getattr(loss, "array", loss))
    return float(array) if array.size == 1 and np.issubdtype(array.dtype, np.number) else None
