"""The PyTorch backend of the doctor (see :mod:`bnlab.doctor.backends`).

torch is imported only once a torch model is handled (the other modules of this folder
import it at module level and are imported from the methods here).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bnlab.doctor.backend import Backend, Batch, Change, Watcher
from bnlab.doctor.backends.torch.fixes import TorchFixes
from bnlab.doctor.records import OptimizerInfo, ProbeResult


class TorchBackend:
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

    def probe(self, model: Any, inputs: Any, **options: Any) -> ProbeResult:
        from bnlab.doctor.backends.torch import probe

        return probe.probe(model, inputs, **options)

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

    def repair(
        self, model: Any, batches: list[Batch], *, split: Iterable[str] | None = None
    ) -> tuple[Any, list[Change]]:
        from bnlab.doctor.backends.torch import repair

        return repair.repair(model, batches, split=split)

    def split_shared(self, model: Any, calls: dict[str, int]) -> Any:
        from bnlab.doctor.backends.torch import repair

        return repair.split_shared(model, calls)

    def evaluate(self, model: Any, batches: list[Batch]) -> dict[str, Any]:
        from bnlab.doctor.backends.torch import repair

        return repair.evaluate(model, batches)

    def load_checkpoint(self, model: Any, path: Path) -> None:
        from bnlab.doctor.backends.torch import io

        io.load_checkpoint(model, path)

    def save_weights(self, model: Any) -> bytes:
        from bnlab.doctor.backends.torch import io

        return io.save_weights(model)

    def how_to_load(self, changes: list[Change], weights: Path, target: str, mlp_config: Any) -> str:
        from bnlab.doctor.backends.torch import io

        return io.how_to_load(changes, weights, target, mlp_config)


BACKEND: Backend = TorchBackend()
