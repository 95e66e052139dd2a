"""The cure on a PyTorch model: split shared BNs, re-estimate running statistics.

Everything happens on a deep copy. A shared stateful norm becomes a
:class:`PerCallNorm` (one copy of the norm per call site, chosen by call order within a
forward pass); bnlab's own MLP with ``norm="shared"`` becomes the per-layer MLP (the
answer's layout). Running statistics are then re-estimated as a cumulative average over
the given batches in train mode, with ``torch.optim.swa_utils.update_bn`` where it fits.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from bnlab.doctor.backends.torch.common import (
    as_args,
    classes,
    first_tensor,
    float_dtype,
    is_stateful_norm,
    model_device,
)
from bnlab.doctor.errors import RepairError


class PerCallNorm(nn.Module):
    """A norm that was shared by ``calls`` call sites, split into one copy per site.

    Call ``i`` of a forward pass uses ``per_call[i]``; the count restarts with every
    forward pass of the model (a pre-hook on the root) and wraps around after the last
    site, so calling a submodule on its own keeps the order too.
    """

    def __init__(self, norm: nn.Module, calls: int) -> None:
        super().__init__()
        self.per_call = nn.ModuleList(copy.deepcopy(norm) for _ in range(calls))
        self.calls_made = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.per_call[self.calls_made % len(self.per_call)]
        self.calls_made += 1
        return module(x)


class _RestartCallOrder:
    """Root forward pre-hook: every pass starts again at call site 1 (deep-copyable)."""

    def __init__(self, modules: list[PerCallNorm]) -> None:
        self.modules = modules

    def __call__(self, _module: nn.Module, _args: tuple) -> None:
        for module in self.modules:
            module.calls_made = 0


# -- which norms are shared, and where their calls come from ------------------------


def call_sites(model: nn.Module, x: Any) -> dict[str, list[str]]:
    """Per stateful norm: the call sites of one eval-mode forward pass on ``x``.

    Runs a copy; sites are named as the doctor names them ("after l1").
    """
    from bnlab.doctor.backends.torch.probe import Recorder

    work = copy.deepcopy(model)
    work.eval()
    stateful = {name for name, m in work.named_modules() if name and is_stateful_norm(m)}
    with torch.no_grad(), Recorder(work, stats=False) as recorder:
        work(*as_args(x, model_device(work), float_dtype(work)))
    sites: dict[str, list[str]] = {}
    for call in recorder.calls:
        if call.path in stateful:
            sites.setdefault(call.path, []).append(f"call {call.index} {call.site}")
    return sites


def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if child is old:
                module._modules[name] = new


def split_shared(model: nn.Module, calls: dict[str, int]) -> nn.Module:
    """A copy of ``model`` in which each norm named in ``calls`` has one copy per call.

    ``calls`` maps a module path to its number of call sites, as in the repair's
    ``changes``; use it to rebuild the repaired architecture before
    ``load_state_dict(torch.load(OUT/model.pt, weights_only=True))``.
    """
    new = copy.deepcopy(model)
    modules = dict(new.named_modules())
    splits = []
    for path, count in calls.items():
        if path not in modules or not isinstance(modules[path], _NormBase):
            raise RepairError(f"no normalization layer {path!r} in {type(model).__name__}.")
        split = PerCallNorm(modules[path], int(count))
        _replace_everywhere(new, modules[path], split)
        splits.append(split)
    if splits:
        new.register_forward_pre_hook(_RestartCallOrder(splits))
    return new


def _is_shared_mlp(model: nn.Module) -> bool:
    from bnlab.models import MLP

    return isinstance(model, MLP) and model.cfg.norm == "shared" and model.n_layers > 2


def _per_layer_mlp(model: Any) -> nn.Module:
    """bnlab's shared-BN MLP as the per-layer MLP: ``bn`` copied into bn1..bnK."""
    from bnlab.models import build_model

    cfg = dataclasses.replace(model.cfg, norm="per-layer")
    new = build_model(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("bn.")}
    for i in range(1, model.n_layers):
        for key, value in model.bn.state_dict().items():
            state[f"bn{i}.{key}"] = value.clone()
    new.load_state_dict(state)
    return new.to(model_device(model))


# -- re-estimating running statistics -------------------------------------------------------


def _stateful_norms(model: nn.Module) -> dict[str, Any]:
    return {name: m for name, m in model.named_modules() if name and is_stateful_norm(m)}


def _update_bn_fits(norms: dict[str, nn.Module], single_input: bool) -> bool:
    """``update_bn`` handles plain BatchNorm layers fed one tensor: stock classes only."""
    return single_input and all(
        isinstance(m, _BatchNorm) and type(m).forward is _BatchNorm.forward for m in norms.values()
    )


def _cumulative_by_hooks(model: nn.Module, norms: list[Any], inputs: list[tuple]) -> None:
    """The cumulative average for norms update_bn can't drive (its ``momentum=None``):
    before the k-th call a norm's momentum is set to 1/k, which averages all calls."""
    counts: Counter[int] = Counter()
    saved = {m: m.momentum for m in norms}

    def pre(module: Any, _args: tuple) -> None:
        counts[id(module)] += 1
        module.momentum = 1.0 / counts[id(module)]

    handles = [m.register_forward_pre_hook(pre) for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
        for args in inputs:
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
        for m, momentum in saved.items():
            m.momentum = momentum


def reestimate(model: nn.Module, batches: Iterable[Any]) -> dict[str, Any]:
    """Running statistics of ``model`` (changed in place) as the cumulative average over
    ``batches`` in train mode. Norms the model's own ``train()`` keeps in eval mode
    (deliberately frozen) are left as they are."""
    device = model_device(model)
    inputs = [as_args(x, device, float_dtype(model)) for x, _ in batches]
    if not inputs:
        raise RepairError("re-estimating running statistics needs at least one batch.")
    was_training = model.training
    model.train()
    norms = _stateful_norms(model)
    active = {name: m for name, m in norms.items() if m.training}
    frozen = sorted(set(norms) - set(active))
    method = "torch.optim.swa_utils.update_bn"
    with torch.no_grad():
        if active and len(active) == len(norms) and _update_bn_fits(norms, all(len(args) == 1 for args in inputs)):
            torch.optim.swa_utils.update_bn([args[0] for args in inputs], model)
        else:
            method = "per-call momentum 1/k (cumulative average)"
            _cumulative_by_hooks(model, list(active.values()), inputs)
    model.train(was_training)
    return {"batches": len(inputs), "method": method, "frozen": frozen}


# -- the repair ----------------------------------------------------------------------------


def _stats(module: Any) -> tuple[np.ndarray, np.ndarray]:
    return (
        module.running_mean.detach().double().cpu().numpy().copy(),
        module.running_var.detach().double().cpu().numpy().copy(),
    )


def repair(
    model: nn.Module, batches: list[Any], split: Iterable[str] | None = None
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The repaired copy of ``model`` and the list of what changed where."""
    if not batches:
        raise RepairError("repair needs at least one batch of training inputs.")
    sites = call_sites(model, batches[0][0])
    shared = {path: s for path, s in sites.items() if len(s) > 1}
    wanted = set(shared) if split is None else set(split)
    unknown = wanted - set(shared)
    if split is not None and unknown:
        raise RepairError(
            f"cannot split {', '.join(sorted(unknown))}: not a stateful norm called more than once per forward pass."
        )
    changes: list[dict[str, Any]] = []
    before = {name: _stats(m) for name, m in _stateful_norms(model).items()}
    if wanted and _is_shared_mlp(model):
        new = _per_layer_mlp(model)
        new_names = [name for name in _stateful_norms(new) if name != "bn_logits"]
        changes.append(
            {
                "change": "split",
                "where": "bn",
                "calls": len(shared["bn"]),
                "sites": shared["bn"],
                "into": new_names,
                "layout": "per-layer MLP",
            }
        )
        origin = {name: "bn" for name in new_names}
    else:
        new = split_shared(model, {path: len(shared[path]) for path in sorted(wanted)})
        origin = {}
        for path in sorted(wanted):
            into = [f"{path}.per_call.{i}" for i in range(len(shared[path]))]
            changes.append(
                {
                    "change": "split",
                    "where": path,
                    "calls": len(shared[path]),
                    "sites": shared[path],
                    "into": into,
                    "layout": "PerCallNorm",
                }
            )
            origin.update({name: path for name in into})
    info = reestimate(new, batches)
    for name, module in _stateful_norms(new).items():
        if name in info["frozen"]:
            changes.append(
                {"change": "kept", "where": name, "why": "kept in eval mode by the model's train(): frozen on purpose"}
            )
            continue
        old_mean, old_var = before[origin.get(name, name)]
        mean, var = _stats(module)
        changes.append(_reestimated(name, origin.get(name), old_mean, old_var, mean, var, float(module.eps), info))
    return new, changes


def _reestimated(
    name: str,
    origin: str | None,
    old_mean: np.ndarray,
    old_var: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    info: dict[str, Any],
) -> dict[str, Any]:
    from bnlab.doctor.stats import distance

    moved = distance(old_mean, old_var, mean, var, eps)
    return {
        "change": "re-estimated",
        "where": name,
        "from": origin or name,
        "batches": info["batches"],
        "method": info["method"],
        "old_vs_new": moved.as_dict(),
    }


# -- evaluation -----------------------------------------------------------------------------


def evaluate(model: nn.Module, batches: list[Any]) -> dict[str, Any]:
    """Eval-mode accuracy and loss over labelled ``batches``, and the share of predictions
    that train-mode BN (batch statistics, dropout off) and eval mode agree on. A copy runs."""
    from bnlab.doctor.backends.torch.probe import _set_bn_only_train, frozen_buffers

    work = copy.deepcopy(model)
    device = model_device(work)
    correct = agree = total = 0
    loss_sum = 0.0
    scored = True
    with torch.no_grad():
        for x, y in batches:
            args = as_args(x, device, float_dtype(work))
            target = torch.as_tensor(y).to(device)
            work.eval()
            out = first_tensor(work(*args))
            with frozen_buffers(work):
                _set_bn_only_train(work)
                train_pred = classes(work(*args))
            eval_pred = classes(out)
            if out is None or eval_pred is None or train_pred is None:
                scored = False
                break
            total += len(eval_pred)
            correct += int((eval_pred == target.reshape(-1).cpu().numpy()).sum())
            agree += int((eval_pred == train_pred).sum())
            loss_sum += float(F.cross_entropy(out, target, reduction="sum"))
    if not scored or not total:
        return {"val_acc": None, "val_loss": None, "train_eval_agreement": None, "samples": 0}
    return {
        "val_acc": correct / total,
        "val_loss": loss_sum / total,
        "train_eval_agreement": agree / total,
        "samples": total,
    }
