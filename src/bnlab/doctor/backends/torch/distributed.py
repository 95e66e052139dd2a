"""``watch`` inside a multi-process PyTorch job (DistributedDataParallel): what each rank
saw, exchanged once at the end of the ``with`` block.

Nothing here runs unless ``torch.distributed`` is initialised with two ranks or more and
the user enters ``watch``: importing this module creates no group and changes no state.

Per training pass, one forward pre-hook on the module DDP wraps copies the running
statistics as the pass begins (after DDP broadcast rank 0's buffers, when it does), into
buffers allocated once: no device sync, no collective. In a healthy job these copies are
equal on every rank; with ``broadcast_buffers=False`` (and no SyncBatchNorm) they drift.

The exchange at the end never hangs the job. It runs on a group of its own, created for
it with ``new_group(backend="gloo", timeout=EXCHANGE_TIMEOUT_S)`` over the ranks of the
DDP model's process group, and destroyed right after: the user's groups carry none of
the doctor's traffic, and every step of the exchange (connecting the group, two
all_gathers) fails after at most that timeout -- at once when a peer's process is gone
(its sockets close), after the timeout when a peer is alive but never reaches the end of
its block. Every rank makes the same two collectives whatever it saw (step counts, an
exception in its block are data in the message), so ranks cannot disagree on the number
of calls. A failed exchange becomes one paragraph in the report of the rank that saw it.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from bnlab.doctor import ranks
from bnlab.doctor.backends.torch.common import is_stateful_norm
from bnlab.doctor.records import RanksInfo, RankView

# Longest the exchange may wait for a peer (connect, then each all_gather).
EXCHANGE_TIMEOUT_S = 30.0


def local_module(model: nn.Module) -> nn.Module:
    """The module DDP wraps (what each rank trains and the probe copies), else ``model``."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def exchange_for(model: nn.Module) -> RankExchange | None:
    """A :class:`RankExchange` when ``model`` is a DDP model of two ranks or more.

    (The watcher also runs on the doctor's own copies, plain modules: those get none.)"""
    if not isinstance(model, nn.parallel.DistributedDataParallel) or not dist.is_initialized():
        return None
    members = dist.get_process_group_ranks(model.process_group)
    return RankExchange(model, members) if len(members) > 1 else None


class RankExchange:
    """Copies the statistics each synchronising training pass starts from; compares the
    ranks once, in :meth:`exchange`. See the module docs."""

    def __init__(self, model: nn.parallel.DistributedDataParallel, members: list[int]) -> None:
        self.module = local_module(model)
        self._ddp = model
        self.members = members
        self.rank = dist.get_rank()
        self.norms = {name: m for name, m in self.module.named_modules() if name and is_stateful_norm(m)}
        self.plain_bn = [
            name for name, m in self.norms.items() if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
        ]
        self._copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hooks(self) -> list[Any]:
        """Register the per-pass copy; the handles go with the watcher's own."""
        return [self.module.register_forward_pre_hook(self._pass_start)]

    def _pass_start(self, module: nn.Module, args: tuple) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # eval passes update nothing; DDP broadcasts buffers for training passes only
        if not self._ddp.require_forward_param_sync:
            return  # inside no_sync(): DDP broadcast nothing for this pass
        for path, norm in self.norms.items():
            mean, var = norm.running_mean, norm.running_var
            if mean is None or var is None or is_lazy(mean):
                continue
            copy = self._copies.get(path)
            if copy is None or copy[0].shape != mean.shape:
                self._copies[path] = (mean.detach().clone(), var.detach().clone())
            else:
                copy[0].copy_(mean)
                copy[1].copy_(var)

    def exchange(self, view: RankView) -> RanksInfo:
        """Every rank's view (``view`` completed with this rank's statistics); on failure
        this rank's alone, with the reason in ``problem``. Never raises, never hangs."""
        view = dataclasses.replace(view, rank=self.rank, synced_stats=self._synced(), final_stats=self._final())
        info = RanksInfo(self.rank, len(self.members), [view], list(self.plain_bn))
        try:
            payloads = _all_gather_bytes(ranks.encode(view), self.members)
        except Exception as err:  # noqa: BLE001 - any failure of the exchange is reported, not raised
            info.problem = _failure(self.rank, len(self.members), err)
            return info
        info.views = sorted((ranks.decode(p) for p in payloads), key=lambda v: v.rank)
        return info

    def _synced(self) -> dict[str, tuple[Any, Any]]:
        return {path: (m.double().cpu().numpy(), v.double().cpu().numpy()) for path, (m, v) in self._copies.items()}

    def _final(self) -> dict[str, tuple[float, float]]:
        return {
            path: (float(norm.running_mean.double().mean()), float(norm.running_var.double().mean()))
            for path, norm in self.norms.items()
            if norm.running_mean is not None and norm.running_var is not None and not is_lazy(norm.running_mean)
        }


def flagged_ranks(info: RanksInfo, flag: bool) -> list[int] | None:
    """The ranks, among those compared in ``info``, whose ``flag`` is true: one more gather,
    as the exchange's (a gloo group of its own, bounded by the same timeout), so that every
    rank can act on the same decision (the Lightning callback's ``fail_on``). ``None`` when
    the ranks were not compared or one does not answer now: each rank is then on its own."""
    if info.problem or len(info.views) < 2:
        return None
    members = [view.rank for view in info.views]
    try:
        flags = _all_gather_bytes(bytes([flag]), members)
    except Exception:  # noqa: BLE001 - a peer gone since the exchange: decide alone, never hang
        return None
    return [rank for rank, answer in zip(members, flags, strict=True) if answer == b"\x01"]


def _all_gather_bytes(data: bytes, members: list[int]) -> list[bytes]:
    """``data`` of every member, in rank order, over a gloo group made for this call."""
    # new_group is called by every rank that enters watch; with a timeout, so a missing
    # peer fails the connection instead of waiting forever.
    group = dist.new_group(ranks=members, backend="gloo", timeout=timedelta(seconds=EXCHANGE_TIMEOUT_S))
    try:
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in members]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=group)
        longest = max(int(size) for size in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        received = [torch.empty(longest, dtype=torch.uint8) for _ in members]
        dist.all_gather(received, mine, group=group)
        return [bytes(buf[: int(size)].numpy()) for buf, size in zip(received, sizes, strict=True)]
    finally:
        dist.destroy_process_group(group)


def _failure(rank: int, world_size: int, err: Exception) -> str:
    reason = " ".join(str(err).split())[:300]
    return (
        f"rank {rank} could not compare its statistics with the other {world_size - 1} rank(s) of "
        f"this job within {EXCHANGE_TIMEOUT_S:g} s: a rank died, hung, or did not reach the end "
        f"of its `with watch` block ({type(err).__name__}: {reason}). This report covers rank "
        f"{rank} alone; enter `watch` on every rank and let each finish its block."
    )
