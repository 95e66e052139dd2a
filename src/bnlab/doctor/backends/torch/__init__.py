"""The PyTorch backend of the doctor (see :mod:`bnlab.doctor.backends`).

torch is imported only once a torch model is handled (the other modules of this folder
import it at module level and are imported from the methods here).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from bnlab.doctor.backend import Backend, Watcher
from bnlab.doctor.backends.folder import FolderBackend
from bnlab.doctor.backends.torch.fixes import TorchFixes
from bnlab.doctor.records import OptimizerInfo


class TorchBackend(FolderBackend):
    NAME = "torch"
    WEIGHTS_NAME = "model.pt"
    fixes = TorchFixes()

    def owns(self, model: Any) -> bool:
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(model, torch.nn.Module)

    def copy(self, model: Any) -> Any:
        from bnlab.doctor.backends.torch.common import deep_copy

        return deep_copy(model)

    def seed(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)

    def runs_on(self, model: Any, x: np.ndarray) -> bool:
        from bnlab.doctor.backends.torch.common import runs_on

        return runs_on(model, x)

    def eval_output(self, model: Any, x: np.ndarray) -> np.ndarray | None:
        from bnlab.doctor.backends.torch.common import eval_output

        return eval_output(model, x)

    def watcher(self, model: Any, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> Watcher:
        from bnlab.doctor.backends.torch.common import check_supported
        from bnlab.doctor.backends.torch.watch import TorchWatcher

        check_supported(model)
        return TorchWatcher(model, on_pass_start, optimizer)

    def describe_optimizer(self, model: Any, optimizer: Any) -> OptimizerInfo | None:
        from bnlab.doctor.backends.torch.common import optimizer_info

        return None if optimizer is None else optimizer_info(model, optimizer)

    def check_repairable(self, model: Any) -> None:
        return None  # every torch model can be split and re-estimated


BACKEND: Backend = TorchBackend()
