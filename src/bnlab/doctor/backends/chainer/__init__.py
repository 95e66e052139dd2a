"""The Chainer backend of the doctor (see :mod:`bnlab.doctor.backends`).

Chainer is imported only once a Chainer model is handled.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from bnlab.doctor.backend import Backend, Watcher
from bnlab.doctor.backends.chainer.fixes import ChainerFixes
from bnlab.doctor.backends.folder import FolderBackend
from bnlab.doctor.records import OptimizerInfo, ProbeResult


class ChainerBackend(FolderBackend):
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
        from bnlab.doctor.backends.chainer.watch import optimizer_info

        return optimizer_info(model, optimizer)

    def check_repairable(self, model: Any) -> None:
        return None  # every Chainer model can be split and re-estimated


BACKEND: Backend = ChainerBackend()
