"""Small PyTorch helpers shared by the probe, the training steps and ``watch``."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy


def is_norm(module: nn.Module) -> bool:
    """BatchNorm*, SyncBatchNorm, InstanceNorm*: the norms that may keep running stats."""
    return isinstance(module, _NormBase)


def is_stateful_norm(module: nn.Module) -> bool:
    return bool(is_norm(module) and module.track_running_stats and module.running_mean is not None)


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


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter (or buffer): what its inputs must be
    (a ``model.double()`` computes in float64 and refuses float32 inputs); float32 if none."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point() and not is_lazy(tensor):
            return tensor.dtype
    return torch.float32


def as_args(inputs: Any, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple:
    """The probe input as positional arguments on the model's device; floating inputs in the
    model's floating ``dtype`` (the doctor's batches are float32 numpy arrays)."""
    items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    out = []
    for item in items:
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(item)
        if isinstance(item, torch.Tensor):
            item = item.to(device, dtype) if item.is_floating_point() else item.to(device)
        out.append(item)
    return tuple(out)


def classes(output: Any) -> np.ndarray | None:
    """Predicted classes (argmax over dim 1) when the output looks like finite class scores."""
    tensor, _ = output_tensor(output)
    if tensor is None or tensor.dim() < 2 or tensor.shape[1] < 2:
        return None
    if not bool(torch.isfinite(tensor).all()):
        return None  # argmax of NaN scores says nothing
    return tensor.detach().argmax(dim=1).reshape(-1).cpu().numpy()


def output_tensor(value: Any) -> tuple[torch.Tensor | None, str]:
    """The tensor of a model's output that the doctor reads, and where it was found.

    A tensor is itself (``""``); in a tuple or list the first tensor (``"output[0]"``);
    in a dict the ``logits`` entry if there is one, else the first tensor
    (``"output['logits']"``). Nested containers are searched depth first.
    """
    if isinstance(value, torch.Tensor):
        return value, ""
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: k != "logits")  # logits first, else in order
        for key in keys:
            found, where = output_tensor(value[key])
            if found is not None:
                return found, f"[{key!r}]{where}"
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found, where = output_tensor(item)
            if found is not None:
                return found, f"[{index}]{where}"
    return None, ""


def check_supported(model: nn.Module) -> None:
    """Refuse models whose modules can't be observed with hooks (TorchScript)."""
    from bnlab.doctor.errors import UnsupportedModel

    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            where = "the model" if not name else f"its submodule {name!r}"
            raise UnsupportedModel(
                f"{where} is TorchScript ({type(module).__name__}); bnlab doctor needs the "
                "Python nn.Module, whose layers it can watch with hooks. Give the model "
                "before torch.jit.script / torch.jit.trace (or torch.jit.load), e.g. by "
                "building it and loading its state_dict."
            )


def norm_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every path under which each norm module is registered (a module placed twice in a
    Sequential has two), first path first."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and is_norm(module):
            paths.setdefault(id(module), [])
            if name not in paths[id(module)]:
                paths[id(module)].append(name)
    return paths


def optimizer_info(model: nn.Module, optimizer: Any) -> Any:
    """Weight decay that ``optimizer`` applies to the affine parameters of norm layers."""
    from bnlab.doctor.records import OptimizerInfo

    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        return None
    decay_of = {
        id(param): float(group.get("weight_decay", 0.0) or 0.0) for group in groups for param in group["params"]
    }
    decays = {}
    for name, module in model.named_modules():
        if not (name and is_norm(module)):
            continue
        values = [decay_of.get(id(p), 0.0) for p in module.parameters(recurse=False)]
        if values and max(values) > 0:
            decays[name] = max(values)
    return OptimizerInfo(kind=type(optimizer).__name__, norm_weight_decay=decays)


def lazy_memo(model: nn.Module) -> dict[int, Any]:
    """A deepcopy memo giving each uninitialized (Lazy) tensor a fresh uninitialized
    copy: deepcopy refuses to touch them otherwise."""
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if is_lazy(tensor):
            memo[id(tensor)] = (
                UninitializedParameter(requires_grad=tensor.requires_grad)
                if isinstance(tensor, nn.Parameter)
                else UninitializedBuffer()
            )
    return memo


def deep_copy(model: nn.Module) -> nn.Module:
    """A deep copy, Lazy modules included (deepcopy refuses uninitialized tensors)."""
    return copy.deepcopy(model, lazy_memo(model))


def runs_on(model: nn.Module, x: np.ndarray) -> bool:
    """Whether a fresh copy of ``model`` runs on ``x`` in eval mode (a fresh copy per
    trial: a Lazy module takes its shapes from the first batch it sees)."""
    trial = deep_copy(model)
    trial.eval()
    try:
        with torch.no_grad():
            trial(*as_args(x, model_device(trial), float_dtype(trial)))
    except Exception:  # noqa: BLE001 - any failure means: not this shape
        return False
    return True


def eval_output(model: nn.Module, x: np.ndarray) -> np.ndarray | None:
    """The first tensor of a throwaway copy's eval-mode output on ``x``, as numpy."""
    trial = copy.deepcopy(model)
    trial.eval()
    with torch.no_grad():
        out = first_tensor(trial(*as_args(x, model_device(trial), float_dtype(trial))))
    return None if out is None else out.numpy()
