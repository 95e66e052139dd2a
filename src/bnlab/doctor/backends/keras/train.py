"""The doctor's own training steps, on a clone of a Keras 3 model.

The clone is compiled with a Keras optimizer (Adam by default) and trained with
``train_on_batch``, run eagerly so that the probe's recorder sees every step (which
BatchNormalization layers ran in training mode, how often).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np

from bnlab.doctor.backends.keras.common import bn_layers
from bnlab.doctor.batching import cycle
from bnlab.doctor.errors import UsageError, training_step_failed
from bnlab.doctor.outputs import first_output
from bnlab.doctor.records import OptimizerInfo, StatUpdates, TrainLog


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(keras.ops.convert_to_numpy(value))


def _inputs(x: Any) -> np.ndarray:
    array = _numpy(x)
    return array.astype(np.float32) if array.dtype == np.float64 else array


def _scores(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(first_output(model(x, training=False))[0]))


def pseudo_labels(model: Any, x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Random class labels shaped like the model's output (see torch_train.pseudo_labels)."""
    scores = _scores(model, x)
    if scores.ndim < 2 or scores.shape[1] < 2:
        raise UsageError("train_steps needs labels when the model's output is not class scores")
    rng = np.random.RandomState(seed)
    return rng.randint(0, scores.shape[1], size=scores.shape[:1]).astype(np.int64)


def _default_loss(model: Any, x: np.ndarray) -> Any:
    """Sparse cross-entropy, on logits unless the model already ends in a softmax."""
    scores = _scores(model, x[:8])
    probabilities = (
        scores.ndim == 2 and bool(np.all(scores >= 0)) and bool(np.allclose(scores.sum(axis=1), 1.0, atol=1e-4))
    )
    return keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities)


def optimizer_info(model: Any, optimizer: Any) -> OptimizerInfo:
    """The optimizer's kind and the weight decay it applies to BatchNormalization's
    gamma/beta (Keras decays every variable not excluded with
    ``exclude_from_weight_decay``)."""
    decay = float(getattr(optimizer, "weight_decay", None) or 0.0)
    decayed: dict[str, float] = {}
    uses = getattr(optimizer, "_use_weight_decay", None)
    if decay > 0 and uses is not None:
        for path, layer in bn_layers(model).items():
            if any(uses(v) for v in layer.trainable_variables):
                decayed[path] = decay
    return OptimizerInfo(kind=type(optimizer).__name__, norm_weight_decay=decayed)


def _moving(model: Any) -> dict[str, np.ndarray]:
    return {
        path: np.concatenate([_numpy(layer.moving_mean), _numpy(layer.moving_variance)])
        for path, layer in bn_layers(model).items()
        if getattr(layer, "moving_mean", None) is not None
    }


def train(
    model: Any,
    x: Any,
    labels: Any,
    steps: int,
    *,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    optimizer_factory: Callable[[], Any] | None = None,
    batches: Iterable[tuple[Any, Any]] | None = None,
    lr: float = 0.01,
    recorder: Any = None,
) -> TrainLog:
    """``steps`` optimizer steps on ``model`` (already a clone) with ``training=True``.

    ``optimizer_factory()`` returns a Keras optimizer (default Adam(learning_rate=lr));
    ``loss_fn(output, labels)`` (the doctor's argument order) defaults to sparse
    cross-entropy. ``recorder`` (a keras_probe.Recorder without statistics) counts the
    BatchNormalization calls of every step.
    """
    x = _inputs(x)
    if batches is None:
        batches = [(x, pseudo_labels(model, x) if labels is None else labels)]
    optimizer = optimizer_factory() if optimizer_factory else keras.optimizers.Adam(learning_rate=lr)
    if loss_fn is None:
        loss: Any = _default_loss(model, x)
    else:
        user_loss = loss_fn

        def loss(y_true: Any, y_pred: Any) -> Any:  # Keras passes (labels, output)
            return user_loss(y_pred, y_true)

    # Eager steps: the recorder's wrapped calls must run every step, not once at tracing.
    model.compile(optimizer=optimizer, loss=loss, run_eagerly=True)
    before = _moving(model)
    forward_calls: Counter[str] = Counter()
    eval_steps: Counter[str] = Counter()
    log = TrainLog(steps=steps, optimizer=optimizer_info(model, optimizer))
    if recorder is not None:
        recorder.attach()
    try:
        for step, (bx, by) in zip(range(steps), cycle(batches), strict=False):
            try:
                metrics = model.train_on_batch(_inputs(bx), _numpy(by), return_dict=True)
            except Exception as err:  # reported as a probe failure
                raise training_step_failed(step, err) from err
            if recorder is not None:
                forward_calls.update(c.path for c in recorder.calls if c.training)
                eval_steps.update({c.path for c in recorder.calls if not c.training})
                recorder.calls.clear()
                recorder.new_pass()
            log.add_loss(step, float(metrics["loss"]))
    finally:
        if recorder is not None:
            recorder.detach()
    after = _moving(model)
    log.eval_mode_steps = dict(eval_steps)
    log.updates = {
        path: StatUpdates(
            forward_calls=forward_calls.get(path, 0),
            extra_calls=0,  # Keras has no recomputation that updates statistics twice
            counter_delta=None,
            changed=path in before and not np.array_equal(before[path], after[path]),
        )
        for path in after
    }
    return log
