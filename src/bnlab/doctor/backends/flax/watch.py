"""Hooks on a Flax nnx model while the user's own training loop runs (``bnlab.doctor.watch``).

nnx updates the model in place, in an eager loop and through ``nnx.jit`` alike, so:

- an optimizer step is seen when the model's parameter arrays are replaced (the step
  marker holds the arrays themselves and compares them by identity: no device sync);
- a forward pass is a call of the model itself, or a call of an ``nnx.jit`` function
  that takes the model (``JitWrapped.__call__`` is wrapped while watching, so the batch
  is seen as concrete arrays);
- BatchNorm calls are recorded by the probe's recorder (``__call__`` of the model's
  classes replaced while watching). Inside ``nnx.jit`` they run only while jax traces
  the function; the compiled function repeats exactly those calls, so each later call
  of the same jitted function replays the calls of its trace.

The running statistics are copied once at :meth:`FlaxWatcher.attach` and compared once,
in :meth:`FlaxWatcher.updates`. linen models are refused: their state lives outside
the module, in the loop's own variables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.nnx.transforms import compilation

from bnlab.doctor.backend import Watcher
from bnlab.doctor.backends.flax import common
from bnlab.doctor.backends.flax.common import Recorder, nnx_hooks, nnx_layers
from bnlab.doctor.errors import UnsupportedModel
from bnlab.doctor.records import CallRecord, StatUpdates

# nnx.jit's wrappers (graph mode; tree mode where this Flax has it).
_JIT_CLASSES = [getattr(compilation, name) for name in ("JitWrapped", "SimpleJitWrapped") if hasattr(compilation, name)]


class _Arrays:
    """The model's parameter arrays at one moment, compared by identity (no device work)."""

    def __init__(self, arrays: list[Any]) -> None:
        self.arrays = arrays

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Arrays) and all(a is b for a, b in zip(self.arrays, other.arrays, strict=True))

    def __hash__(self) -> int:
        return hash(tuple(id(a) for a in self.arrays))


class FlaxWatcher:
    """Counts BatchNorm calls and optimizer steps of an nnx model; see the module docs."""

    def __init__(self, model: nnx.Module, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> None:
        self.model = model
        self.on_pass_start = on_pass_start
        self._optimizer = optimizer
        self.calls: list[CallRecord] = []
        self.extra_calls: dict[str, int] = {}
        self.forward_calls: Counter[str] = Counter()
        self._params = [v for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        self._recorder = Recorder(stats=False, force=None)
        self._recorder.on_root_call = self._root_call
        self._recorder.adopt = self._adopt
        self._in_jit = 0
        self._traced: dict[int, list[CallRecord]] = {}  # id(jitted function) -> one call's BN calls
        self._start: dict[str, np.ndarray] = {}
        self._stack = contextlib.ExitStack()

    # -- attach / detach -------------------------------------------------------------
    def attach(self) -> None:
        self._start = _statistics(self.model)
        try:
            self._stack.enter_context(nnx_hooks(self.model, self._recorder))
            for cls in _JIT_CLASSES:
                self._stack.enter_context(_replaced_call(cls, self._jit_call))
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        self._stack.close()

    # -- hooks -----------------------------------------------------------------------------
    def _root_call(self, args: tuple) -> None:
        # Inside nnx.jit the pass was seen at _jit_call, with concrete inputs; a pass on
        # traced inputs elsewhere (a jax.jit of the user's own) cannot be probed later.
        if not self._in_jit and not any(isinstance(a, jax.core.Tracer) for a in args):
            self._take_calls()
            self.on_pass_start(args)

    def _adopt(self, module: Any) -> bool:
        """A copy of the watched model made by an nnx transform (nnx.jit, nnx.grad...)."""
        return type(module) is type(self.model)

    def _jit_call(self, original: Callable[..., Any], wrapped: Any, args: tuple, kwargs: dict) -> Any:
        if self._in_jit or not any(a is self.model for a in (*args, *kwargs.values())):
            return original(wrapped, *args, **kwargs)
        self._take_calls()
        self.on_pass_start(tuple(a for a in args if not isinstance(a, nnx.Pytree)))
        self._recorder.calls = []
        self._in_jit += 1
        try:
            return original(wrapped, *args, **kwargs)
        finally:
            self._in_jit -= 1
            traced = self._recorder.calls
            if traced:
                self._traced[id(wrapped)] = traced
            self._recorder.calls = [dataclasses.replace(c) for c in self._traced.get(id(wrapped), [])]

    def _take_calls(self) -> None:
        """Move the recorder's calls to :attr:`calls` (read and cleared by watch)."""
        for call in self._recorder.calls:
            if call.training:
                self.forward_calls[call.path] += 1
        self.calls.extend(self._recorder.calls)
        self._recorder.calls = []
        self._recorder.new_pass()

    # -- what was seen ---------------------------------------------------------------------
    def step_marker(self) -> object:
        self._take_calls()  # the pass before the marker is read is complete
        return _Arrays([v.get_value() for v in self._params])

    def optimizer(self) -> Any:
        return self._optimizer

    def updates(self) -> dict[str, StatUpdates]:
        self._take_calls()
        now = _statistics(self.model)
        return {
            path: StatUpdates(
                forward_calls=self.forward_calls[path],
                extra_calls=0,
                counter_delta=None,
                changed=path not in now or not np.array_equal(start, now[path]),
            )
            for path, start in self._start.items()
        }


def _statistics(model: nnx.Module) -> dict[str, np.ndarray]:
    return {
        path: np.concatenate([np.ravel(bn.mean[...]), np.ravel(bn.var[...])]) for path, bn in nnx_layers(model).items()
    }


@contextlib.contextmanager
def _replaced_call(cls: type, hook: Callable[..., Any]) -> Iterator[None]:
    original = cls.__call__

    @functools.wraps(original)
    def watched(self: Any, *args: Any, **kwargs: Any) -> Any:
        return hook(original, self, args, kwargs)

    cls.__call__ = watched  # type: ignore[method-assign]
    try:
        yield
    finally:
        cls.__call__ = original  # type: ignore[method-assign]


def watcher(model: Any, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> Watcher:
    if not common.is_nnx(model):
        raise UnsupportedModel(
            "bnlab.doctor.watch takes flax.nnx models (updated in place by the loop); a linen "
            "model's state lives in the loop's variables. Check it with "
            "bnlab.doctor.check((module, variables), x, train_steps=N)."
        )
    return FlaxWatcher(model, on_pass_start, optimizer)
