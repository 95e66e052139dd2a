"""The PyTorch backend of the doctor (see :mod:`bnlab.doctor.backends`).

torch is imported only once a torch model is handled.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from bnlab.doctor.records import OptimizerInfo, ProbeResult

NAME = "torch"


def owns(model: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def probe(model: Any, inputs: Any, **options: Any) -> ProbeResult:
    from bnlab.doctor import torch_probe

    return torch_probe.probe(model, inputs, **options)


def watcher(model: Any, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> Any:
    from bnlab.doctor.torch_common import check_supported
    from bnlab.doctor.torch_watch import TorchWatcher

    check_supported(model)
    return TorchWatcher(model, on_pass_start, optimizer)


def describe_optimizer(model: Any, optimizer: Any) -> OptimizerInfo | None:
    from bnlab.doctor.torch_common import optimizer_info

    return None if optimizer is None else optimizer_info(model, optimizer)
