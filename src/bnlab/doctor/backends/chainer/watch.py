"""Light hooks on a Chainer model during the user's training loop (``watch``).

The Chainer counterpart of :mod:`bnlab.doctor.backends.torch.watch`: per BN call, only the mode
and sizes are noted. Chainer optimizers update parameter arrays in place, so a step is
noticed by the sums of the parameter arrays (numpy, on the host for CPU models).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chainer

from bnlab.doctor.backends.chainer.probe import Recorder
from bnlab.doctor.records import CallRecord, StatUpdates


class ChainerWatcher:
    def __init__(
        self,
        model: chainer.Link,
        on_pass_start: Callable[[tuple], None] | None = None,
        optimizer: Any = None,
    ) -> None:
        self.model = model
        self._optimizer = optimizer
        self._recorder = Recorder(model, stats=False, on_pass_start=on_pass_start)
        self.extra_calls: dict[str, int] = {}  # Chainer recomputes no forward passes

    @property
    def calls(self) -> list[CallRecord]:
        return self._recorder.calls

    def attach(self) -> None:
        self._recorder.attach()

    def detach(self) -> None:
        self._recorder.detach()

    def step_marker(self) -> object:
        return tuple(None if p.array is None else float(p.array.sum()) for p in self.model.params())

    def optimizer(self) -> Any:
        return self._optimizer

    def updates(self) -> dict[str, StatUpdates]:
        # Not counted for Chainer yet: its BN has no update counter, and a pass-level
        # count would need every call kept. The checks then have nothing to compare.
        return {}
