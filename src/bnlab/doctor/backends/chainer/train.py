"""The doctor's own training steps, on a copy of a Chainer model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import chainer
import chainer.functions as F
import numpy as np

from bnlab.doctor.batching import cycle, staged_step
from bnlab.doctor.errors import UsageError
from bnlab.doctor.records import TrainLog


def _labels(labels: Any) -> np.ndarray:
    if hasattr(labels, "detach"):  # a torch tensor
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels).astype(np.int32)


def _inputs(x: Any) -> Any:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray) and x.dtype == np.float64:
        x = x.astype(np.float32)
    return x


def pseudo_labels(model: chainer.Link, x: Any, seed: int = 0) -> np.ndarray:
    """Random class labels shaped like the model's output (see torch_train.pseudo_labels)."""
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        out = model(x)
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

    ``optimizer_factory()`` returns a Chainer optimizer (default Adam(alpha=lr)) that is
    set up on the copy here; ``loss_fn(output, labels)`` defaults to softmax cross-entropy.
    """
    if batches is None:
        batches = [(x, pseudo_labels(model, x) if labels is None else labels)]
    optimizer = optimizer_factory() if optimizer_factory else chainer.optimizers.Adam(alpha=lr)
    optimizer.setup(model)
    loss_fn = loss_fn or F.softmax_cross_entropy
    log = TrainLog(steps=steps)
    with chainer.using_config("train", True):
        for step, (bx, by) in zip(range(steps), cycle(batches)):
            loss = staged_step(
                step,
                lambda: model(_inputs(bx)),  # noqa: B023 - called at once
                lambda output: loss_fn(output, _labels(by)),  # noqa: B023 - called at once
                lambda loss: _update(model, optimizer, loss),
                _scalar,
            )
            log.add_loss(step, float(loss.array))
    return log


def _update(model: chainer.Link, optimizer: Any, loss: Any) -> None:
    model.cleargrads()
    loss.backward()
    optimizer.update()


def _scalar(loss: Any) -> float | None:
    """The loss as a number, when it is one (a user's loss_fn may return anything)."""
    array = np.asarray(getattr(loss, "array", loss))
    return float(array) if array.size == 1 and np.issubdtype(array.dtype, np.number) else None
