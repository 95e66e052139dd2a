"""Small PyTorch helpers shared by the probe, the training steps and ``watch``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


def is_norm(module: nn.Module) -> bool:
    """BatchNorm*, SyncBatchNorm, InstanceNorm*: the norms that may keep running stats."""
    return isinstance(module, _NormBase)


def is_stateful_norm(module: nn.Module) -> bool:
    return is_norm(module) and module.track_running_stats and module.running_mean is not None


def first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, dict):
        return first_tensor(list(value.values()))
    return None


def model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def as_args(inputs: Any, device: torch.device) -> tuple:
    """The probe input as positional arguments on the model's device."""
    items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    out = []
    for item in items:
        if isinstance(item, np.ndarray):
            # numpy defaults to float64, models to float32
            item = torch.from_numpy(item.astype(np.float32) if item.dtype == np.float64 else item)
        if isinstance(item, torch.Tensor):
            item = item.to(device)
        out.append(item)
    return tuple(out)


def classes(output: Any) -> np.ndarray | None:
    """Predicted classes (argmax over dim 1) when the output looks like class scores."""
    tensor = first_tensor(output)
    if tensor is None or tensor.dim() < 2 or tensor.shape[1] < 2:
        return None
    return tensor.detach().argmax(dim=1).reshape(-1).cpu().numpy()
