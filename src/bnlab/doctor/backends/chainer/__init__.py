"""The Chainer backend of the doctor (see :mod:`bnlab.doctor.backends`).

Chainer is imported only once a Chainer model is handled.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bnlab.doctor.backend import Backend, Batch, Change, Watcher
from bnlab.doctor.backends.chainer.fixes import ChainerFixes
from bnlab.doctor.records import OptimizerInfo, ProbeResult


class ChainerBackend:
    NAME = "chainer"
    WEIGHTS_NAME = "model.npz"
    fixes = ChainerFixes()

    def owns(self, model: Any) -> bool:
        # A Chainer model can only exist if chainer has been imported already.
        chainer = sys.modules.get("chainer")
        return chainer is not None and isinstance(model, chainer.Link)

    def copy(self, model: Any) -> Any:
        return copy.deepcopy(model)

    def seed(self, seed: int) -> None:
        return None  # Chainer's initializers draw from numpy's global RNG, seeded by the caller

    def runs_on(self, model: Any, x: np.ndarray) -> bool:
        from bnlab.doctor.backends.chainer.common import runs_on

        return runs_on(model, x)

    def eval_output(self, model: Any, x: np.ndarray) -> np.ndarray | None:
        from bnlab.doctor.backends.chainer.common import eval_output

        return eval_output(model, x)

    def probe(self, model: Any, inputs: Any, **options: Any) -> ProbeResult:
        from bnlab.doctor.backends.chainer import probe

        if isinstance(inputs, tuple):  # watch hands over the forward's positional arguments
            inputs = inputs[0]
        return probe.probe(model, inputs, **options)

    def watcher(self, model: Any, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> Watcher:
        from bnlab.doctor.backends.chainer.watch import ChainerWatcher

        return ChainerWatcher(model, on_pass_start, optimizer)

    def describe_optimizer(self, model: Any, optimizer: Any) -> OptimizerInfo | None:
        # Chainer's weight decay is an optimizer hook over every parameter; not checked yet.
        return None

    def check_repairable(self, model: Any) -> None:
        return None  # every Chainer model can be split and re-estimated

    def repair(
        self, model: Any, batches: list[Batch], *, split: Iterable[str] | None = None
    ) -> tuple[Any, list[Change]]:
        from bnlab.doctor.backends.chainer import repair

        return repair.repair(model, batches, split=split)

    def split_shared(self, model: Any, calls: dict[str, int]) -> Any:
        from bnlab.doctor.backends.chainer import repair

        return repair.split_shared(model, calls)

    def evaluate(self, model: Any, batches: list[Batch]) -> dict[str, Any]:
        from bnlab.doctor.backends.chainer import repair

        return repair.evaluate(model, batches)

    def load_checkpoint(self, model: Any, path: Path) -> None:
        from bnlab.doctor.backends.chainer import io

        io.load_checkpoint(model, path)

    def save_weights(self, model: Any) -> bytes:
        from bnlab.doctor.backends.chainer import io

        return io.save_weights(model)

    def how_to_load(self, changes: list[Change], weights: Path, target: str, mlp_config: Any) -> str:
        from bnlab.doctor.backends.chainer import io

        return io.how_to_load(changes, weights, target, mlp_config)


BACKEND: Backend = ChainerBackend()
