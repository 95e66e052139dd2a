"""Probe a Keras 3 model: forward passes on a clone, observed by wrapping layers' ``call``.

Keras is imported here only (and only for a model whose class comes from Keras, so
Keras is already loaded). Works on every Keras backend: tensors are read back with
``keras.ops.convert_to_numpy``.

Keras keeps no train/eval mode on the model: each call says ``training=True/False``,
and a BatchNormalization with ``trainable=False`` always runs in inference mode. The
train-mode pass is ``model(x, training=True)``, the eval-mode pass ``training=False``.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Self

import keras
import numpy as np

from bnlab.doctor import source_lines
from bnlab.doctor.backends.keras import train as keras_train
from bnlab.doctor.backends.keras.common import BN as _BN
from bnlab.doctor.backends.keras.common import as_array, bn_layers, children, clone_model, named_layers, numpy
from bnlab.doctor.errors import UsageError, forward_failed, quote_error
from bnlab.doctor.locations import call_site
from bnlab.doctor.outputs import classes, first_output, relative_change
from bnlab.doctor.records import CallRecord, LayerInfo, ProbeResult, TrainLog
from bnlab.doctor.stats import channel_stats

_WITH_BIAS = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv2DTranspose,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
)


def _built(layer: Any) -> bool:
    return getattr(layer, "moving_mean", None) is not None


def layer_info(path: str, layer: Any) -> LayerInfo:
    built = _built(layer)
    mean = numpy(layer.moving_mean) if built else None
    gamma = numpy(layer.gamma) if built and layer.scale else None
    beta = numpy(layer.beta) if built and layer.center else None
    affine = bool(layer.scale or layer.center)
    return LayerInfo(
        path=path,
        kind=type(layer).__name__,
        framework="keras",
        num_channels=int(mean.size) if mean is not None else 0,
        tracks_running_stats=True,
        is_batchnorm=True,
        eps=float(layer.epsilon),
        rate=float(layer.momentum),
        rate_name="momentum",
        running_mean=mean,
        running_var=numpy(layer.moving_variance) if built else None,
        num_batches_tracked=None,  # Keras keeps no update counter
        # No stored mode in Keras: a trainable BN follows the call's `training`; one with
        # trainable=False always runs in inference mode (Keras's documented freeze).
        training=bool(layer.trainable),
        affine=affine,
        params_frozen=affine and not layer.trainable,
        weight=gamma,
        bias=beta,
    )


# -- keeping the user's model untouched -------------------------------------------


def clone(model: Any, x: np.ndarray) -> Any:
    """A clone of ``model`` with the same weights and moving statistics.

    Functional and Sequential models are cloned layer by layer (a shared layer stays
    shared); subclassed ones through their config (Keras captures constructor
    arguments). Raises whatever Keras raises when it cannot.
    """
    work = clone_model(model)
    build(work, x)
    if model.built and model.weights:
        work.set_weights(model.get_weights())
    return work


def build(model: Any, x: np.ndarray) -> None:
    """Build an unbuilt (subclassed) model with one inference call, so that every
    BatchNormalization has its moving statistics before a train-mode pass."""
    if not model.built or any(not _built(layer) for layer in bn_layers(model).values()):
        forward(model, x[:2], False)


@contextlib.contextmanager
def borrowed(model: Any, x: np.ndarray, need_copy: bool) -> Iterator[Any]:
    """A clone of ``model``; or, when it cannot be cloned, the model itself with every
    variable put back afterwards (only for probing: the doctor never trains the user's
    model, so ``need_copy`` turns a failed clone into a UsageError)."""
    try:
        work = clone(model, x)
    except Exception as err:  # any failure to clone means: restore instead
        if need_copy:
            raise UsageError(
                f"training steps run on a copy, and this Keras model cannot be cloned "
                f"({quote_error(err)}). Give the model class a get_config() "
                "(keras.models.clone_model needs it for subclassed models), or probe "
                "without training (--train-steps 0)."
            ) from err
        work = None
        build(model, x)
    if work is not None:
        yield work
        return
    saved = [(v, keras.ops.convert_to_numpy(v)) for v in model.variables]
    try:
        yield model
    finally:
        for variable, value in saved:
            variable.assign(value)


@contextlib.contextmanager
def frozen_statistics(model: Any) -> Iterator[None]:
    """Train-mode passes that leave the moving statistics as they were."""
    saved = [
        (v, keras.ops.convert_to_numpy(v))
        for layer in bn_layers(model).values()
        if _built(layer)
        for v in (layer.moving_mean, layer.moving_variance)
    ]
    try:
        yield
    finally:
        for variable, value in saved:
            variable.assign(value)


# -- observing a forward pass ---------------------------------------------------------


class Recorder:
    """Which layer produced each tensor, and what every BatchNormalization received.

    Keras runs every layer through ``layer.call``; an instance attribute shadows the
    class's method for the duration of the recording (Keras's own ``__call__`` does
    the casting and masking around it, as usual).
    """

    def __init__(self, model: Any, stats: bool = True) -> None:
        self.model = model
        self.stats = stats
        self.layers = named_layers(model)
        self.paths = {id(layer): path for path, layer in self.layers.items()}
        self.calls: list[CallRecord] = []
        self.counts: Counter[str] = Counter()
        self.produced: dict[int, tuple[str, Any]] = {}
        self.pinned: list[Any] = []  # keeps produced tensors alive: ids stay unique
        self.last_leaf: tuple[str, Any] | None = None
        self.wrapped: list[Any] = []

    def new_pass(self) -> None:
        """Call numbers and producers restart with every forward pass."""
        self.counts = Counter()
        self.produced.clear()
        self.pinned = []
        self.last_leaf = None

    def attach(self) -> Self:
        for layer in self.layers.values():
            if "call" in vars(layer):  # the user's own per-instance call: leave it alone
                continue
            object.__setattr__(layer, "call", self._wrap(layer, layer.call))
            self.wrapped.append(layer)
        return self

    def detach(self) -> None:
        for layer in self.wrapped:
            vars(layer).pop("call", None)
        self.wrapped.clear()
        self.new_pass()

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _wrap(self, layer: Any, call: Callable[..., Any]) -> Callable[..., Any]:
        path = self.paths[id(layer)]
        leaf = not children(layer)

        def recorded_call(*args: Any, **kwargs: Any) -> Any:
            if isinstance(layer, _BN) and args:
                self._bn_call(path, layer, args[0], kwargs.get("training"))
            out = call(*args, **kwargs)
            if leaf:
                self.last_leaf = (path, layer)
            if id(out) not in self.produced:
                self.produced[id(out)] = (path, layer)
                self.pinned.append(out)
            return out

        return recorded_call

    def _producer(self, x: Any) -> tuple[str | None, str | None, str, bool, bool]:
        """(producer path, kind, via, producer has bias, producer is dropout)."""
        found = self.produced.get(id(x))
        if found is not None:
            path, layer = found
            has_bias = isinstance(layer, _WITH_BIAS) and bool(getattr(layer, "use_bias", False))
            dropout = isinstance(layer, keras.layers.Dropout)
            return path, type(layer).__name__, "direct", has_bias, dropout
        if self.last_leaf is None:
            return None, None, "input", False, False
        path, layer = self.last_leaf
        return path, type(layer).__name__, "ops", False, False

    def _bn_call(self, path: str, layer: Any, x: Any, training: Any) -> None:
        self.counts[path] += 1
        array = keras.ops.convert_to_numpy(x)
        axis = layer.axis if layer.axis >= 0 else array.ndim + layer.axis
        reduce = tuple(d for d in range(array.ndim) if d != axis)
        flat = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
        if self.stats:
            mean, var = channel_stats(flat)
        else:
            mean = var = np.zeros(array.shape[axis])
        producer, kind, via, has_bias, dropout = self._producer(x)
        self.calls.append(
            CallRecord(
                path=path,
                index=self.counts[path],
                producer=producer,
                producer_kind=kind,
                via=via,
                producer_has_bias=has_bias,
                producer_is_dropout=dropout,
                batch_size=int(array.shape[0]),
                values_per_channel=int(np.prod([array.shape[d] for d in reduce])),
                mean=mean,
                var=var,
                training=bool(training) and bool(layer.trainable),
                location=call_site(),
            )
        )


# -- the probe -------------------------------------------------------------------------


def forward(model: Any, x: Any, training: bool) -> Any:
    try:
        return model(x, training=training)
    except (Exception, SystemExit) as err:  # a probe failure, for the user
        raise forward_failed(err) from err


def observe(
    work: Any,
    x: np.ndarray,
    labels: Any,
    user_layers: dict[str, LayerInfo],
    modes: dict[str, bool],
) -> ProbeResult:
    """One round of observations of ``work`` (moving statistics left as they were)."""
    layers = {path: layer_info(path, layer) for path, layer in bn_layers(work).items()}
    for path, layer in layers.items():
        if path in user_layers:
            layer.training = user_layers[path].training
        layer.training = modes.get(path, layer.training)
    with frozen_statistics(work):
        recorder = Recorder(work)
        with recorder:
            train_out, note = first_output(forward(work, x, True))
            train_array = numpy(train_out)
        counter = Recorder(work, stats=False)
        with counter:
            eval_array = numpy(first_output(forward(work, x, False))[0])
    train_pred, eval_pred = classes(train_array), classes(eval_array)
    diff = relative_change(train_array, eval_array) if train_pred is None else None
    return ProbeResult(
        framework="keras",
        model_name="",
        input_shape=tuple(int(d) for d in np.shape(x)),
        layers=layers,
        calls=recorder.calls,
        eval_calls=dict(counter.counts),
        train_pred=train_pred,
        eval_pred=eval_pred,
        labels=None if labels is None else np.asarray(as_array(labels)).reshape(-1),
        output_diff=diff,
        output_finite=bool(np.all(np.isfinite(train_array)) and np.all(np.isfinite(eval_array))),
        output_note=note,
    )


# Models that the report names by their ``name``: built, not subclassed, so the class says nothing.
_NAMED_BY_INSTANCE = ("Functional", "Sequential", "Model")


def model_name(model: Any) -> str:
    kind = type(model).__name__
    return model.name if kind in _NAMED_BY_INSTANCE else kind


def has_own_name(model: Any) -> bool:
    """False for Keras's automatic name of a built model: its class in snake case, numbered
    from the second on ("functional", "sequential_2")."""
    kind = type(model).__name__
    return kind not in _NAMED_BY_INSTANCE or not re.fullmatch(rf"{kind.lower()}(_\d+)?", model.name)


def probe(
    model: Any,
    inputs: Any,
    *,
    labels: Any = None,
    train_steps: int = 0,
    loss_fn: Any = None,
    optimizer_factory: Any = None,
    train_batches: Iterable[tuple[Any, Any]] | None = None,
    lr: float = 0.01,
    modes: dict[str, bool] | None = None,
) -> ProbeResult:
    """Everything the checks need, measured on a clone of the Keras ``model``.

    With ``train_steps`` the clone is observed as handed over (``result.given``), then
    trained with a Keras optimizer and observed again.
    """
    if isinstance(inputs, tuple):  # watch-style positional arguments
        inputs = inputs[0]
    x = as_array(inputs)
    user_layers = {path: layer_info(path, layer) for path, layer in bn_layers(model).items()}
    with borrowed(model, x, need_copy=train_steps > 0) as work:
        result = observe(work, x, labels, user_layers, modes or {})
        log = TrainLog(steps=0)
        if train_steps > 0:
            given = result
            log = keras_train.train(
                work,
                x,
                labels,
                train_steps,
                loss_fn=loss_fn,
                optimizer_factory=optimizer_factory,
                batches=train_batches,
                lr=lr,
                recorder=Recorder(work, stats=False),
            )
            result = observe(work, x, labels, user_layers, modes or {})
            result.given = given
    result.model_name = model_name(model)
    result.train_log = log
    source_lines.attach(result, bn_layers(model))
    return result
