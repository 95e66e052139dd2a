"""Light hooks on a PyTorch model during training: the user's loop (``watch``) or the
doctor's own steps on a copy.

Per call of a norm layer only host-side facts are noted (mode, batch size, values per
channel, inside a forward pass or not); no activation is read, nothing waits on the
device. Optimizer steps are counted by torch's global optimizer step hook (any
``torch.optim`` optimizer that updates the model's parameters) and, for hand-written
updates, by the parameters' version counters. The running statistics are copied once at
:meth:`attach` and compared once, in :meth:`updates`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.optim.optimizer import register_optimizer_step_post_hook

from bnlab.doctor.backends.torch import distributed as torch_distributed
from bnlab.doctor.backends.torch.common import is_stateful_norm
from bnlab.doctor.records import CallRecord, StatUpdates

_NOTHING = np.zeros(0)  # call records here carry no statistics


class TorchWatcher:
    """Counts norm calls and optimizer steps; see the module docs."""

    def __init__(
        self,
        model: nn.Module,
        on_pass_start: Callable[[tuple], None] | None = None,
        optimizer: Any = None,
    ) -> None:
        self.ranks = torch_distributed.exchange_for(model)  # None unless a multi-process job
        model = torch_distributed.local_module(model)  # DDP: watch the module it wraps
        self.model = model
        self.on_pass_start = on_pass_start
        self.norms = {name: m for name, m in model.named_modules() if name and is_stateful_norm(m)}
        self.paths = {id(m): name for name, m in self.norms.items()}
        self.calls: list[CallRecord] = []
        self.forward_calls: Counter[str] = Counter()
        self.extra_calls: Counter[str] = Counter()
        self.optimizer_steps = 0
        self._given_optimizer = optimizer
        self._seen_optimizer: Any = None
        self._owns: dict[int, bool] = {}
        self._params = list(model.parameters())
        self._param_ids = {id(p) for p in self._params}
        self._in_pass = False
        self._counts: Counter[str] = Counter()
        self._start: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._handles: list[Any] = []

    # -- attach / detach ---------------------------------------------------------
    def attach(self) -> None:
        self._start = {
            path: (
                m.running_mean.detach().clone(),
                m.running_var.detach().clone(),
                None if m.num_batches_tracked is None else m.num_batches_tracked.clone(),
            )
            for path, m in self.norms.items()
            if not is_lazy(m.running_mean)
        }
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._root_start))
            self._handles.append(self.model.register_forward_hook(self._root_done))
            for module in self.norms.values():
                self._handles.append(module.register_forward_pre_hook(self._norm_call))
            self._handles.append(register_optimizer_step_post_hook(self._optimizer_step))
            self._handles += self.ranks.hooks() if self.ranks is not None else []
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- hooks -----------------------------------------------------------------------
    def _root_start(self, module: nn.Module, args: tuple) -> None:
        if self.on_pass_start is not None:
            self.on_pass_start(args)
        self._in_pass = True
        self._counts.clear()

    def _root_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._in_pass = False

    def _norm_call(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return
        path = self.paths[id(module)]
        if not self._in_pass:
            # Run outside the model's forward: activation checkpointing recomputing it
            # during backward (or a caller using the layer directly).
            if module.training:
                self.extra_calls[path] += 1
            return
        if module.training:
            self.forward_calls[path] += 1
        self._counts[path] += 1
        channels = int(x.shape[1])
        self.calls.append(
            CallRecord(
                path=path,
                index=self._counts[path],
                producer=None,
                producer_kind=None,
                via="ops",
                producer_has_bias=False,
                producer_is_dropout=False,
                batch_size=int(x.shape[0]),
                values_per_channel=x.numel() // max(channels, 1),
                mean=_NOTHING,
                var=_NOTHING,
                training=bool(module.training),
            )
        )

    def _optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        owns = self._owns.get(id(optimizer))
        if owns is None:
            owns = any(id(p) in self._param_ids for group in optimizer.param_groups for p in group["params"])
            self._owns[id(optimizer)] = owns
        if owns:
            self.optimizer_steps += 1
            self._seen_optimizer = optimizer

    # -- what was seen -----------------------------------------------------------------
    def step_marker(self) -> object:
        # Version counters are host-side integers: reading them costs no device sync.
        return self.optimizer_steps, sum(p._version for p in self._params)

    def optimizer(self) -> Any:
        return self._given_optimizer or self._seen_optimizer

    def updates(self) -> dict[str, StatUpdates]:
        result = {}
        for path, (mean, var, counter) in self._start.items():
            module = self.norms[path]
            changed = not (torch.equal(mean, module.running_mean) and torch.equal(var, module.running_var))
            delta = None
            if counter is not None and module.num_batches_tracked is not None:
                delta = int(module.num_batches_tracked) - int(counter)
            result[path] = StatUpdates(
                forward_calls=self.forward_calls[path],
                extra_calls=self.extra_calls[path],
                counter_delta=delta,
                changed=changed,
            )
        return result
