"""The cure for a Flax nnx model: one BatchNorm per call site, statistics re-estimated.

On a clone (``nnx.clone``; the model given is never changed):

1. every ``nnx.BatchNorm`` called more than once per forward pass is replaced, at each
   attribute that holds it, by a :class:`SiteBatchNorm`: one clone of it per call site
   (scale and bias copied), call k of a pass going to site k;
2. every BatchNorm's ``mean``/``var`` are re-estimated over one pass of the batches in
   training mode as a cumulative average (call k of a layer gets momentum (k - 1) / k:
   Flax's momentum weights the OLD value), eagerly, so that every call is counted.

No gradient step is taken. linen models are refused with a message (their variables are
the user's to rebuild: one ``nn.BatchNorm`` per site, then the statistics re-estimated).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bnlab.doctor.backend import Batch, Change
from bnlab.doctor.backends.flax import common
from bnlab.doctor.backends.flax.common import Recorder, nnx_hooks, nnx_layers
from bnlab.doctor.errors import RepairError
from bnlab.doctor.outputs import first_output
from bnlab.doctor.stats import distance

LAYOUT = "by call order within a forward pass: call k -> <bn>.sites[k-1]"
METHOD = "nnx, momentum (k - 1) / k at call k of each BatchNorm"


class _Turn:
    """Which site the next call goes to: shared by every copy of one SiteBatchNorm (nnx
    keeps it as a static attribute, so jit-traced copies count on the same object)."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls = 0

    def take(self, sites: int) -> int:
        site = self.calls % sites
        self.calls += 1
        return site


class SiteBatchNorm(nnx.Module):
    """A formerly shared BatchNorm, one per call site: call k of every forward pass goes
    to ``sites[k - 1]``. A forward pass calls the layer as often as it has sites, so the
    turn comes round to site 0 at the start of each pass (also while jax traces a step,
    which runs the Python once)."""

    def __init__(self, bn: nnx.BatchNorm, calls: int) -> None:
        self.sites = nnx.List([nnx.clone(bn) for _ in range(calls)])
        self.turn = nnx.static(_Turn())

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return self.sites[self.turn.take(len(self.sites))](x, *args, **kwargs)


def check_repairable(model: Any) -> None:
    if not common.is_nnx(model):
        raise RepairError(
            "--fix and bnlab.doctor.repair take flax.nnx models; for a linen model give each "
            "call site its own nn.BatchNorm (in setup, or inline under @nn.compact) and "
            "re-estimate batch_stats with one pass of apply(..., train=True, "
            "mutable=['batch_stats']) over the training data."
        )


def _inputs(batch: Batch) -> Any:
    return jnp.asarray(common.as_array(batch[0]))


def call_counts(model: nnx.Module, x: Any) -> Recorder:
    """The BatchNorm calls of one eval-mode pass of a clone of ``model`` on ``x``."""
    work = nnx.clone(model)
    with nnx_hooks(work, Recorder(stats=False, force=False)) as recorder:
        common.call_nnx(work, x, False)
    return recorder


def _place(model: nnx.Module, path: str, new: Any) -> None:
    """Put ``new`` at the dotted attribute ``path`` of ``model`` (list items by index)."""
    *parents, last = path.split(".")
    node: Any = model
    for part in parents:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    if last.isdigit():
        node[int(last)] = new
    else:
        setattr(node, last, new)


def split_shared(model: nnx.Module, calls: dict[str, int]) -> nnx.Module:
    """A clone of ``model`` where each BatchNorm at a path of ``calls`` is one per call site."""
    from bnlab.doctor.backends.flax.probe import nnx_layer_infos

    check_repairable(model)
    work = nnx.clone(model)
    layers, infos = nnx_layers(work), nnx_layer_infos(work)
    for path, count in calls.items():
        if path not in layers:
            raise RepairError(f"cannot split {path}: not an nnx.BatchNorm of {type(model).__name__}.")
        site_bn = SiteBatchNorm(layers[path], count)
        for place in [path, *infos[path].aliases]:
            _place(work, place, site_bn)
    return work


def _reestimate(model: nnx.Module, batches: list[Batch]) -> Counter[str]:
    """Cumulative averages over ``batches`` (train mode) in every BatchNorm of ``model``."""
    layers = nnx_layers(model)
    momentum = {path: bn.momentum for path, bn in layers.items()}
    for bn in layers.values():  # the first call's weight on the old value is 0: start anew
        bn.mean[...] = jnp.zeros_like(bn.mean[...])
        bn.var[...] = jnp.ones_like(bn.var[...])
    seen: Counter[str] = Counter()

    def before(path: str, bn: Any) -> None:
        seen[path] += 1
        bn.momentum = (seen[path] - 1) / seen[path]

    recorder = Recorder(stats=False, force=True)
    recorder.before_bn = before
    try:
        with nnx_hooks(model, recorder):
            for batch in batches:
                common.call_nnx(model, _inputs(batch), True)
                recorder.new_pass()
    finally:
        for path, bn in layers.items():
            bn.momentum = momentum[path]
    model.eval()
    return seen


def repair(model: nnx.Module, batches: list[Batch], *, split: Iterable[str] | None = None) -> tuple[Any, list[Change]]:
    """The repaired clone of ``model`` and what changed where; see the module docs."""
    check_repairable(model)
    if not batches:
        raise RepairError("repair needs at least one batch of training inputs.")
    recorder = call_counts(model, _inputs(batches[0]))
    shared = {path: n for path, n in recorder.counts.items() if n > 1}
    wanted = set(shared) if split is None else set(split)
    if wanted - set(shared):
        raise RepairError(
            f"cannot split {', '.join(sorted(wanted - set(shared)))}: not an nnx.BatchNorm "
            "called more than once per forward pass."
        )
    sites = {path: [f"call {c.index} {c.site}" for c in recorder.calls if c.path == path] for path in wanted}
    new = split_shared(model, {path: shared[path] for path in sorted(wanted)})
    old = {path: (common.numpy64(bn.mean[...]), common.numpy64(bn.var[...])) for path, bn in nnx_layers(new).items()}
    seen = _reestimate(new, batches)
    changes: list[Change] = [
        {
            "change": "split",
            "where": path,
            "calls": shared[path],
            "sites": sites[path],
            "into": [f"{path}.sites.{k}" for k in range(shared[path])],
            "layout": LAYOUT,
        }
        for path in sorted(wanted)
    ]
    for path, bn in nnx_layers(new).items():
        source = path.split(".sites.")[0] if ".sites." in path else path
        mean, var = common.numpy64(bn.mean[...]), common.numpy64(bn.var[...])
        changes.append(
            {
                "change": "re-estimated",
                "where": path,
                "from": source,
                "batches": seen[path],
                "method": METHOD,
                "old_vs_new": distance(*old[path], mean, var, float(bn.epsilon)).as_dict(),
            }
        )
    return new, changes


# -- evaluation --------------------------------------------------------------------------


@functools.cache
def _scores_fn(kwargs: tuple[tuple[str, bool], ...]) -> Any:
    """A jitted forward pass (nnx.jit: the BatchNorm updates of train mode land in the
    model) with the model's mode argument ``kwargs``."""

    @nnx.jit
    def scores(model: nnx.Module, x: Any) -> Any:
        return first_output(model(x, **dict(kwargs)))[0]

    return scores


def _scores(model: nnx.Module, x: Any, train: bool) -> np.ndarray:
    model.train() if train else model.eval()
    kwargs = tuple(common.mode_kwargs(type(model).__call__, train).items())
    return np.asarray(_scores_fn(kwargs)(model, x))


def _cross_entropy(scores: np.ndarray, labels: np.ndarray) -> float:
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].sum())


def evaluate(model: nnx.Module, batches: list[Batch]) -> dict[str, Any]:
    """Eval-mode accuracy and loss over labelled ``batches``, and the share of predictions
    that train mode (batch statistics) and eval mode agree on; on a clone of ``model``."""
    if not batches or any(y is None for _, y in batches):
        return {"val_acc": None, "val_loss": None, "train_eval_agreement": None, "samples": 0}
    work = nnx.clone(model)
    saved = nnx.clone(nnx.state(work, nnx.BatchStat))
    total = correct = agree = 0
    loss = 0.0
    for bx, by in batches:
        x, labels = _inputs((bx, by)), np.asarray(common.as_array(by)).reshape(-1).astype(np.int64)
        scores = _scores(work, x, False).astype(np.float64)
        train_pred = _scores(work, x, True).argmax(axis=1)
        nnx.update(work, saved)
        pred = scores.argmax(axis=1)
        total += len(labels)
        correct += int((pred == labels).sum())
        agree += int((pred == train_pred).sum())
        loss += _cross_entropy(scores, labels)
    return {
        "val_acc": correct / total,
        "val_loss": loss / total,
        "train_eval_agreement": agree / total,
        "samples": total,
    }
