"""The cure for a Flax model: one BatchNorm per call site, statistics re-estimated.

nnx, on a clone (``nnx.clone``; the model given is never changed):

1. every ``nnx.BatchNorm`` called more than once per forward pass is replaced, at each
   attribute that holds it, by a :class:`SiteBatchNorm`: one clone of it per call site
   (scale and bias copied), call k of a pass going to site k;
2. every BatchNorm's ``mean``/``var`` are re-estimated over one pass of the batches in
   training mode as a cumulative average (call k of a layer gets momentum (k - 1) / k:
   Flax's momentum weights the OLD value), eagerly, so that every call is counted.

linen, on new variables (the module and the variables given are never changed):

1. a BatchNorm called more than once per forward pass cannot be given a sibling inside
   the user's module; the module is wrapped instead (:class:`~.sites.SiteSplit`: the
   calls of the shared layer routed to one clone per call site), its variables laid out
   for the wrapper (each site starting from the shared layer's);
2. ``batch_stats`` re-estimated as for nnx, by train-mode passes of
   ``apply(..., mutable=['batch_stats'])`` with the momentum of call k set to (k - 1) / k.

No gradient step is taken.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx
from flax.core import unfreeze

from bnlab.doctor.backend import Batch, Change
from bnlab.doctor.backends.flax import common
from bnlab.doctor.backends.flax.common import Linen, Recorder, nnx_hooks, nnx_layers
from bnlab.doctor.backends.flax.sites import SiteSplit, site_name, site_variables
from bnlab.doctor.errors import RepairError
from bnlab.doctor.outputs import first_output
from bnlab.doctor.stats import distance

LAYOUT = "by call order within a forward pass: call k -> <bn>.sites[k-1]"
METHOD = "nnx, momentum (k - 1) / k at call k of each BatchNorm"
LINEN_LAYOUT = "by call order within a forward pass: call k -> <bn>_site<k-1> of bnlab's SiteSplit wrapper"
LINEN_METHOD = "linen, apply(mutable=['batch_stats']) with momentum (k - 1) / k at call k of each BatchNorm"


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
    """nnx and linen models both can be repaired (linen: on new variables)."""


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


def split_shared(model: Any, calls: dict[str, int]) -> Any:
    """A clone of ``model`` where each BatchNorm at a path of ``calls`` is one per call site
    (linen: the :class:`SiteSplit` wrapper of the module, with its variables laid out for it
    when ``model`` is a ``(module, variables)`` pair)."""
    from bnlab.doctor.backends.flax.probe import nnx_layer_infos

    if not common.is_nnx(model):
        given = common.as_linen(model)
        module = SiteSplit(given.module.clone(), tuple(sorted(calls.items())))
        return module if given.variables is None else (module, site_variables(given.variables, module.splits))
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


def _wanted(recorder: Recorder, split: Iterable[str] | None) -> dict[str, int]:
    """The BatchNorms to split (path -> call sites): ``split``, or every one called more
    than once per forward pass."""
    shared = {path: n for path, n in recorder.counts.items() if n > 1}
    wanted = set(shared) if split is None else set(split)
    if wanted - set(shared):
        raise RepairError(
            f"cannot split {', '.join(sorted(wanted - set(shared)))}: not a BatchNorm "
            "called more than once per forward pass."
        )
    return {path: shared[path] for path in sorted(wanted)}


def _split_changes(recorder: Recorder, wanted: dict[str, int], into: Any, layout: str) -> list[Change]:
    """One "split" change per BatchNorm of ``wanted``; ``into(path, k)``: site k's path."""
    return [
        {
            "change": "split",
            "where": path,
            "calls": calls,
            "sites": [f"call {c.index} {c.site}" for c in recorder.calls if c.path == path],
            "into": [into(path, k) for k in range(calls)],
            "layout": layout,
        }
        for path, calls in wanted.items()
    ]


Stats = tuple[np.ndarray, np.ndarray]  # (mean, var)


def _reestimated(path: str, source: str, batches: int, method: str, old: Stats, new: Stats, eps: float) -> Change:
    """The "re-estimated" change of one BatchNorm (``old``, ``new``: (mean, var))."""
    return {
        "change": "re-estimated",
        "where": path,
        "from": source,
        "batches": batches,
        "method": method,
        "old_vs_new": distance(old[0], old[1], new[0], new[1], eps).as_dict(),
    }


def repair(model: Any, batches: list[Batch], *, split: Iterable[str] | None = None) -> tuple[Any, list[Change]]:
    """The repaired clone of ``model`` and what changed where; see the module docs."""
    check_repairable(model)
    if not batches:
        raise RepairError("repair needs at least one batch of training inputs.")
    if not common.is_nnx(model):
        return _repair_linen(common.as_linen(model), batches, split)
    recorder = call_counts(model, _inputs(batches[0]))
    wanted = _wanted(recorder, split)
    new = split_shared(model, wanted)
    old = {path: (common.numpy64(bn.mean[...]), common.numpy64(bn.var[...])) for path, bn in nnx_layers(new).items()}
    seen = _reestimate(new, batches)
    changes = _split_changes(recorder, wanted, lambda path, k: f"{path}.sites.{k}", LAYOUT)
    for path, bn in nnx_layers(new).items():
        source = path.split(".sites.")[0] if ".sites." in path else path
        mean, var = common.numpy64(bn.mean[...]), common.numpy64(bn.var[...])
        changes.append(_reestimated(path, source, seen[path], METHOD, old[path], (mean, var), float(bn.epsilon)))
    return new, changes


# -- linen ---------------------------------------------------------------------------------


def _linen_calls(model: Linen, x: Any) -> Recorder:
    """The BatchNorm calls of one eval-mode pass of ``model`` on ``x`` (nothing written)."""
    recorder = Recorder(stats=False, force=False)
    with linen.intercept_methods(recorder.intercept):
        common.linen_apply(model, x, False, mutable=True)
    return recorder


def _stat_layers(batch_stats: Any) -> dict[str, tuple[Any, Any]]:
    """dotted path -> (mean, var) of every BatchNorm entry in ``batch_stats``."""
    found: dict[str, tuple[Any, Any]] = {}

    def walk(tree: Any, path: str) -> None:
        if "mean" in tree and "var" in tree and not isinstance(tree["mean"], dict):
            found[path] = (tree["mean"], tree["var"])
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{path}.{key}" if path else str(key))

    walk(unfreeze(batch_stats), "")
    return found


def _reestimate_linen(model: Linen, batches: list[Batch]) -> tuple[dict[str, Any], Counter[str], dict[str, float]]:
    """New variables: ``model``'s with ``batch_stats`` the cumulative averages over
    ``batches`` in train mode; the calls counted per layer; each layer's epsilon."""
    assert model.variables is not None
    layers = set(_stat_layers(model.variables.get("batch_stats", {})))
    seen: Counter[str] = Counter()
    eps: dict[str, float] = {}
    touched: list[tuple[Any, float]] = []

    def before(path: str, bn: Any) -> None:
        if path not in layers:  # a shared layer that the wrapper routes to its sites
            return
        seen[path] += 1
        eps[path] = float(bn.epsilon)
        touched.append((bn, bn.momentum))
        object.__setattr__(bn, "momentum", (seen[path] - 1) / seen[path])  # this apply's own bound copy

    recorder = Recorder(stats=False, force=True)
    recorder.before_bn = before
    variables = dict(model.variables)
    try:
        with linen.intercept_methods(recorder.intercept):
            for batch in batches:
                _, updates = common.linen_apply(
                    Linen(model.module, variables), _inputs(batch), True, mutable=["batch_stats"]
                )
                variables["batch_stats"] = updates["batch_stats"]
                recorder.new_pass()
    finally:
        for bn, momentum in touched:
            object.__setattr__(bn, "momentum", momentum)
    return variables, seen, eps


def _repair_linen(model: Linen, batches: list[Batch], split: Iterable[str] | None) -> tuple[Any, list[Change]]:
    """A new ``(module, variables)`` pair: shared BatchNorms split by the wrapper, all
    statistics re-estimated; ``model`` is not changed."""
    given = common.init_linen(model.copy(), np.asarray(_inputs(batches[0])))
    assert given.variables is not None
    recorder = _linen_calls(given, _inputs(batches[0]))
    wanted = _wanted(recorder, split)
    work = given
    if wanted:
        module = SiteSplit(given.module.clone(), tuple(wanted.items()))
        work = Linen(module, site_variables(given.variables, module.splits))
    old = _stat_layers((work.variables or {}).get("batch_stats", {}))
    variables, seen, eps = _reestimate_linen(work, batches)
    changes = _split_changes(recorder, wanted, site_name, LINEN_LAYOUT)
    sources = {site_name(path, k): path for path, calls in wanted.items() for k in range(calls)}
    for path, new in _stat_layers(variables.get("batch_stats", {})).items():
        as64 = (common.numpy64(new[0]), common.numpy64(new[1]))
        before = (common.numpy64(old[path][0]), common.numpy64(old[path][1]))
        changes.append(
            _reestimated(path, sources.get(path, path), seen[path], LINEN_METHOD, before, as64, eps.get(path, 1e-5))
        )
    return (work.module, variables), changes


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


def _nnx_scorer(model: nnx.Module) -> Any:
    """(eval-mode scores, train-mode predictions) of ``x`` on a clone of ``model`` (its
    statistics put back after each train-mode pass)."""
    work = nnx.clone(model)
    saved = nnx.clone(nnx.state(work, nnx.BatchStat))

    def score(x: Any) -> tuple[np.ndarray, np.ndarray]:
        scores = _scores(work, x, False)
        train_pred = _scores(work, x, True).argmax(axis=1)
        nnx.update(work, saved)
        return scores, train_pred

    return score


def _linen_scorer(model: Any, x: Any) -> Any:
    """As :func:`_nnx_scorer` for a linen model (its train-mode updates are dropped)."""
    given = common.init_linen(common.as_linen(model).copy(), np.asarray(x))

    @jax.jit
    def both(variables: Any, x: Any) -> tuple[Any, Any]:
        run = Linen(given.module, variables)
        scores = first_output(common.linen_apply(run, x, False, mutable=True)[0])[0]
        train_scores = first_output(common.linen_apply(run, x, True, mutable=True)[0])[0]
        return scores, train_scores.argmax(axis=1)

    def score(x: Any) -> tuple[np.ndarray, np.ndarray]:
        scores, train_pred = both(given.variables, x)
        return np.asarray(scores), np.asarray(train_pred)

    return score


def evaluate(model: Any, batches: list[Batch]) -> dict[str, Any]:
    """Eval-mode accuracy and loss over labelled ``batches``, and the share of predictions
    that train mode (batch statistics) and eval mode agree on; on a copy of ``model``."""
    if not batches or any(y is None for _, y in batches):
        return {"val_acc": None, "val_loss": None, "train_eval_agreement": None, "samples": 0}
    score = _nnx_scorer(model) if common.is_nnx(model) else _linen_scorer(model, _inputs(batches[0]))
    total = correct = agree = 0
    loss = 0.0
    for bx, by in batches:
        x, labels = _inputs((bx, by)), np.asarray(common.as_array(by)).reshape(-1).astype(np.int64)
        scores, train_pred = score(x)
        scores = scores.astype(np.float64)
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
