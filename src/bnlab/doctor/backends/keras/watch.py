"""Light hooks on a Keras 3 model while it trains: ``model.fit`` (through
:class:`bnlab.doctor.keras.BNDoctorCallback`) or the user's own loop (``watch``).

Keras runs every layer through ``layer.call``; an instance attribute shadows it for the
duration of the watch (as :class:`bnlab.doctor.backends.keras.probe.Recorder` does). The wrappers
note only the mode and the static sizes of each BatchNormalization call: no tensor is
read, nothing is added to the computation, and the results are the layer's own.

``fit`` compiles its step on TensorFlow and JAX (and on torch with ``jit_compile=True``):
Python code then runs once, while the step is traced, not at every step. So steps are
counted by wrapping ``model.train_function`` (one call runs ``steps_per_execution``
steps), and a compiled step that ran no Python repeats the BatchNormalization calls of
the latest traced train-mode pass, which is exactly what its compiled code executes.
Steps that run eagerly (``fit`` on torch, ``run_eagerly=True``, a custom loop) are
counted as they run. In a custom loop without ``fit``, a step is the optimizer's
``iterations`` counter moving.

The probe at the end needs a training batch: the last one a step ran on (eager steps;
on JAX the batches fit's step takes from its iterator), or, on TensorFlow, where the
batches never reach Python, one read from fit's dataset once training is over.

The moving statistics are copied once at :meth:`KerasWatcher.attach` and compared once,
in :meth:`KerasWatcher.updates`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from bnlab.doctor.backends.keras.common import bn_layers
from bnlab.doctor.records import CallRecord, StatUpdates

_NOTHING = np.zeros(0)  # call records here carry no statistics
_ORIGINAL = "__bnlab_original__"  # marks a wrapper of this module on a layer or model


def _numpy(value: Any) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(value))


def _first_array(value: Any) -> Any:
    """The first array-like leaf of a (nested) batch: the model input of ``(x, y, w)``."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return next((found for found in map(_first_array, value) if found is not None), None)
    return value if getattr(value, "shape", None) is not None else None


def symbolic(x: Any) -> bool:
    """Whether ``x`` is a traced stand-in (tf.function, jax.jit, torch.compile) rather than data."""
    kind = type(x)
    if kind.__name__ in ("SymbolicTensor", "KerasTensor") or "Tracer" in kind.__name__:
        return True
    if kind.__module__.startswith("torch"):
        import torch  # loaded already: x is a torch tensor

        return bool(torch.compiler.is_compiling())
    return False


def _size(dim: Any) -> int | None:
    return dim if isinstance(dim, int) else None


def _training(value: Any) -> bool:
    try:
        return bool(value)
    except Exception:  # noqa: BLE001 - a symbolic flag: Keras decides at run time
        return True


class _Batches:
    """An iterator of batches, passed through, that keeps the latest batch for the probe."""

    def __init__(self, batches: Any, keep: Callable[[Any], None]) -> None:
        self._batches = batches
        self._keep = keep

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> Any:
        batch = next(self._batches)
        self._keep(batch)
        return batch


class KerasWatcher:
    """Counts BatchNormalization calls and training steps; see the module docs."""

    def __init__(
        self,
        model: Any,
        on_pass_start: Callable[[tuple], None] | None = None,
        optimizer: Any = None,
    ) -> None:
        self.model = model
        self.on_pass_start = on_pass_start
        self.norms = bn_layers(model)
        self.paths = {id(layer): path for path, layer in self.norms.items()}
        self.calls: list[CallRecord] = []
        self.extra_calls: dict[str, int] = {}  # Keras recomputes no forward passes
        self.forward_calls: Counter[str] = Counter()
        self._given_optimizer = optimizer
        self._pattern: list[CallRecord] = []  # the BN calls of the latest traced train-mode pass
        self._pattern_updates: Counter[str] = Counter()  # its train-mode calls per layer
        self._pass_calls: list[CallRecord] | None = None  # the calls of the pass running now
        self._pass_symbolic = False
        self._pass_counts: Counter[str] = Counter()
        self._saw_eager = self._saw_trace = False  # during the current train_function call
        self._fit = False  # fit's train_function is wrapped: its calls count the steps
        self._fit_steps = 0
        self._fit_input: Any = None  # the latest argument of fit's train_function
        self._train_passes = 0
        self._start: dict[str, np.ndarray] = {}
        self._wrapped: list[Any] = []

    # -- attach / detach ---------------------------------------------------------
    def attach(self) -> None:
        self._start = {
            path: np.concatenate([_numpy(layer.moving_mean), _numpy(layer.moving_variance)])
            for path, layer in self.norms.items()
            if getattr(layer, "moving_mean", None) is not None
        }
        try:
            self._wrap(self.model, "call", self._root_call)
            for path, layer in self.norms.items():
                self._wrap(layer, "call", self._norm_call(path, layer))
            if getattr(self.model, "train_function", None) is not None:
                # fit built its step function before the callback began; build it anew
                # (as a re-compile would) so that this watch sees it traced, if it is.
                self.model.make_train_function(force=True)
                self._wrap(self.model, "train_function", self._train_function)
                self._fit = True
        except Exception:
            self.detach()
            raise

    def _wrap(self, owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        current = vars(owner).get(name)
        if current is not None and not hasattr(current, _ORIGINAL) and name == "call":
            return  # the user's own per-instance call: leave it alone
        original = getattr(current, _ORIGINAL, None) or getattr(owner, name)  # a leftover of a failed fit
        wrapper = make(original)
        setattr(wrapper, _ORIGINAL, original)
        object.__setattr__(owner, name, wrapper)
        self._wrapped.append((owner, name, current if current is not None and name != "call" else None))

    def detach(self) -> None:
        for owner, name, before in reversed(self._wrapped):
            if before is not None:
                object.__setattr__(owner, name, getattr(before, _ORIGINAL, before))
            else:
                vars(owner).pop(name, None)
        self._wrapped.clear()

    # -- wrappers ----------------------------------------------------------------------
    def _root_call(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def watched_call(*args: Any, **kwargs: Any) -> Any:
            if self._pass_calls is not None:  # the model inside itself: one pass
                return call(*args, **kwargs)
            traced = symbolic(_first_array(args))
            if self.on_pass_start is not None:
                self.on_pass_start(() if traced else args)
            if not traced and _training(kwargs.get("training")):
                self._train_passes += 1
            self._pass_calls, self._pass_symbolic = [], traced
            self._pass_counts.clear()
            try:
                return call(*args, **kwargs)
            finally:
                done, self._pass_calls = self._pass_calls, None
                # a training pass (fit's step), even when every BN in it is frozen
                trains = _training(kwargs["training"]) if "training" in kwargs else any(c.training for c in done)
                if traced and trains:
                    self._pattern, self._saw_trace = done, True
                    self._pattern_updates = Counter(c.path for c in done if c.training)
                self._saw_eager = self._saw_eager or not traced

        return watched_call

    def _norm_call(self, path: str, layer: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(call: Callable[..., Any]) -> Callable[..., Any]:
            def watched_norm(*args: Any, **kwargs: Any) -> Any:
                if args and self._pass_calls is not None:
                    self._note(path, layer, args[0], kwargs.get("training"))
                return call(*args, **kwargs)

            return watched_norm

        return wrap

    def _note(self, path: str, layer: Any, x: Any, training: Any) -> None:
        shape = tuple(getattr(x, "shape", ()) or ())
        if len(shape) < 2:
            return
        axis = layer.axis if layer.axis >= 0 else len(shape) + layer.axis
        sizes = [_size(d) for i, d in enumerate(shape) if i != axis]
        known = all(s is not None for s in sizes)
        self._pass_counts[path] += 1
        record = CallRecord(
            path=path,
            index=self._pass_counts[path],
            producer=None,
            producer_kind=None,
            via="ops",
            producer_has_bias=False,
            producer_is_dropout=False,
            # -1: a step traced for any batch size (the sizes are not known in Python)
            batch_size=sizes[0] if known and sizes[0] is not None else -1,
            values_per_channel=math.prod(s for s in sizes if s is not None) if known else -1,
            mean=_NOTHING,
            var=_NOTHING,
            training=_training(training) and bool(layer.trainable),
        )
        assert self._pass_calls is not None
        self._pass_calls.append(record)
        self.calls.append(record)
        if record.training and not self._pass_symbolic:
            self.forward_calls[path] += 1

    def _train_function(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def watched_steps(*args: Any, **kwargs: Any) -> Any:
            self._saw_eager = self._saw_trace = False
            if args and keras.backend.backend() == "jax":
                # JAX's fit hands the step a Python iterator of numpy batches: passed on
                # as it is, the batches it yields are noted on the way.
                args = (*args[:-1], _Batches(args[-1], self._keep_batch))
            else:
                self._fit_input = args[-1] if args else None
            out = function(*args, **kwargs)
            self._count_steps(max(1, int(getattr(self.model, "steps_per_execution", 1) or 1)))
            return out

        return watched_steps

    def _keep_batch(self, batch: Any) -> None:
        self._fit_input = batch

    def _count_steps(self, steps: int) -> None:
        """``steps`` steps of fit just ran: eagerly (their calls were seen) or compiled."""
        if self._saw_eager:
            self._fit_steps += steps
            return
        for step in range(steps):
            if step or not self._saw_trace:  # the pass traced in this call is the first step's
                if self.on_pass_start is not None:
                    self.on_pass_start(())
                self.calls.extend(self._pattern)  # read-only records: shared, not copied
            self.forward_calls.update(self._pattern_updates)
            self._fit_steps += 1

    # -- what was seen -----------------------------------------------------------------
    def step_marker(self) -> object:
        if self._fit:
            return self._fit_steps
        optimizer = self.optimizer()
        iterations = getattr(optimizer, "iterations", None)
        if iterations is None:  # no Keras optimizer known: every train-mode pass is a step
            return self._train_passes
        return int(_numpy(iterations))

    def optimizer(self) -> Any:
        return self._given_optimizer or getattr(self.model, "optimizer", None)

    def inputs_after_training(self) -> tuple[tuple, str] | None:
        """A training batch for the probe when every step was compiled (no data reached
        the model's Python code), and where it came from: the latest batch of fit's step,
        or, on TensorFlow, one from fit's own dataset, read only now that training is over
        (a fresh iterator earlier would move the shuffling of later epochs)."""
        found, source = self._fit_input, "(last training batch of fit)"
        dataset = getattr(found, "_dataset", None)  # fit's tf.data iterator on TensorFlow
        if dataset is not None:
            found = next(iter(dataset.take(1)), None)
            source = "(a batch of fit's training data, read after training)"
        x = _first_array(found)
        return None if x is None or symbolic(x) else ((x,), source)

    def updates(self) -> dict[str, StatUpdates]:
        result = {}
        for path, layer in self.norms.items():
            if getattr(layer, "moving_mean", None) is None:
                continue
            now = np.concatenate([_numpy(layer.moving_mean), _numpy(layer.moving_variance)])
            before = self._start.get(path)
            result[path] = StatUpdates(
                forward_calls=self.forward_calls[path],
                extra_calls=0,
                counter_delta=None,  # Keras keeps no update counter
                changed=before is None or not np.array_equal(before, now),
            )
        return result


def watcher(model: Any, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> KerasWatcher:
    """The watcher of :func:`bnlab.doctor.watch` for a Keras 3 model (not attached yet)."""
    return KerasWatcher(model, on_pass_start, optimizer)
