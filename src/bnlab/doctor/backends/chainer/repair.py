"""The cure on a Chainer model: split shared BatchNormalization links, re-estimate
``avg_mean`` / ``avg_var`` as a cumulative average in train mode (on a deep copy).

Chainer is imported here only.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable
from typing import Any

import chainer
import chainer.functions as F
import numpy as np
from chainer.backends import cuda

from bnlab.doctor.backends.chainer.common import as_input, output_array
from bnlab.doctor.backends.chainer.probe import Recorder, bn_links, frozen_statistics
from bnlab.doctor.errors import RepairError


class PerCallBatchNormalization(chainer.ChainList):
    """A BN link that was shared by several call sites, split into one copy per site.

    Call ``i`` uses copy ``i`` modulo the number of sites: Chainer has no hook on the
    start of a forward pass, and every pass makes the same calls in the same order.
    """

    def __init__(self, link: chainer.Link, calls: int) -> None:
        super().__init__(*(copy.deepcopy(link) for _ in range(calls)))
        self.calls_made = 0

    def forward(self, x: Any, **kwargs: Any) -> Any:
        link = self[self.calls_made % len(self)]
        self.calls_made += 1
        return link(x, **kwargs)


class _CumulativeDecay(chainer.LinkHook):
    """Before the k-th call of a BN link, decay = 1 - 1/k: the average of all calls."""

    name = "bnlab_repair_decay"

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    def forward_preprocess(self, args: Any) -> None:
        link = args.link
        self.counts[id(link)] += 1
        link.decay = 1.0 - 1.0 / self.counts[id(link)]


def call_sites(model: chainer.Link, x: Any) -> dict[str, list[str]]:
    """Per BN link: the call sites of one eval-mode forward pass of a copy on ``x``,
    named as the doctor names them ("after l1")."""
    work = copy.deepcopy(model)
    with chainer.using_config("train", False), chainer.no_backprop_mode(), Recorder(work, stats=False) as recorder:
        work(as_input(work, x))
    sites: dict[str, list[str]] = {}
    for call in recorder.calls:
        sites.setdefault(call.path, []).append(f"call {call.index} {call.site}")
    return sites


def _replace_everywhere(model: chainer.Link, old: chainer.Link, new: chainer.Link) -> None:
    for parent in list(model.links()):
        if isinstance(parent, chainer.ChainList):
            for i, child in enumerate(parent._children):
                if child is old:
                    parent._children[i] = new
                    new.name = str(i)
        elif isinstance(parent, chainer.Chain):
            for name in list(parent._children):
                if getattr(parent, name) is old:
                    delattr(parent, name)
                    with parent.init_scope():
                        setattr(parent, name, new)


def split_shared(model: chainer.Link, calls: dict[str, int]) -> chainer.Link:
    """A copy of ``model`` in which each BN link named in ``calls`` has one copy per call
    (rebuild the repaired architecture with it, then ``load_npz(OUT/model.npz, model)``)."""
    new = copy.deepcopy(model)
    links = bn_links(new)
    for path, count in calls.items():
        if path not in links:
            raise RepairError(f"no BatchNormalization link {path!r} in {type(model).__name__}.")
        _replace_everywhere(new, links[path], PerCallBatchNormalization(links[path], int(count)))
    return new


def reestimate(model: chainer.Link, batches: Iterable[Any]) -> int:
    """avg_mean / avg_var of every BN link, in place, averaged over ``batches``."""
    links = list(bn_links(model).values())
    saved = {link: link.decay for link in links}
    hook = _CumulativeDecay()
    for link in links:
        link.add_hook(hook)
    count = 0
    try:
        with chainer.using_config("train", True), chainer.no_backprop_mode():
            for x, _ in batches:
                model(as_input(model, x))
                count += 1
    finally:
        for link, decay in saved.items():
            link.delete_hook(hook.name)
            link.decay = decay
    return count


def _stats(link: chainer.Link) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.asarray(cuda.to_cpu(link.avg_mean), np.float64).copy(),
        np.asarray(cuda.to_cpu(link.avg_var), np.float64).copy(),
    )


def repair(
    model: chainer.Link, batches: list[Any], split: Iterable[str] | None = None
) -> tuple[chainer.Link, list[dict[str, Any]]]:
    """The repaired copy of ``model`` and what changed where."""
    from bnlab.doctor.stats import distance

    if not batches:
        raise RepairError("repair needs at least one batch of training inputs.")
    sites = call_sites(model, batches[0][0])
    shared = {path: len(s) for path, s in sites.items() if len(s) > 1}
    wanted = set(shared) if split is None else set(split)
    if wanted - set(shared):
        raise RepairError(
            f"cannot split {', '.join(sorted(wanted - set(shared)))}: not a "
            "BatchNormalization link called more than once per forward pass."
        )
    before = {path: (_stats(link), float(link.eps)) for path, link in bn_links(model).items()}
    new = split_shared(model, {path: shared[path] for path in sorted(wanted)})
    changes: list[dict[str, Any]] = []
    origin = {}
    for path in sorted(wanted):
        into = [f"{path}.{i}" for i in range(shared[path])]
        changes.append(
            {
                "change": "split",
                "where": path,
                "calls": shared[path],
                "sites": sites[path],
                "into": into,
                "layout": "PerCallBatchNormalization",
            }
        )
        origin.update({name: path for name in into})
    count = reestimate(new, batches)
    for path, link in bn_links(new).items():
        (old_mean, old_var), eps = before[origin.get(path, path)]
        mean, var = _stats(link)
        changes.append(
            {
                "change": "re-estimated",
                "where": path,
                "from": origin.get(path, path),
                "batches": count,
                "method": "decay 1 - 1/k at the k-th call",
                "old_vs_new": distance(old_mean, old_var, mean, var, eps).as_dict(),
            }
        )
    return new, changes


def _scores(out: Any) -> np.ndarray:
    scores, _ = output_array(out)
    return np.asarray(cuda.to_cpu(getattr(scores, "array", scores)))


def evaluate(model: chainer.Link, batches: list[Any]) -> dict[str, Any]:
    """Eval-mode accuracy and loss, and train/eval agreement, over labelled ``batches``."""
    work = copy.deepcopy(model)
    correct = agree = total = 0
    loss_sum = 0.0
    with chainer.no_backprop_mode():
        for batch, y in batches:
            x = as_input(work, batch)
            labels = np.asarray(y).astype(np.int32)
            with chainer.using_config("train", False):
                out = work(x)
            with frozen_statistics(work), chainer.using_config("train", True):
                train_scores = _scores(work(x))
            scores = _scores(out)
            if scores.ndim != 2 or scores.shape[1] < 2:
                return {"val_acc": None, "val_loss": None, "train_eval_agreement": None, "samples": 0}
            pred = scores.argmax(axis=1)
            total += len(pred)
            correct += int((pred == labels).sum())
            agree += int((pred == train_scores.argmax(axis=1)).sum())
            loss_sum += float(F.softmax_cross_entropy(out, labels, reduce="no").array.sum())
    if not total:
        return {"val_acc": None, "val_loss": None, "train_eval_agreement": None, "samples": 0}
    return {
        "val_acc": correct / total,
        "val_loss": loss_sum / total,
        "train_eval_agreement": agree / total,
        "samples": total,
    }
