"""Light hooks on a Chainer model during the user's training loop (``watch``).

The Chainer counterpart of :mod:`bnlab.doctor.backends.torch.watch`: a ``chainer.LinkHook`` on
every link notes, per BatchNormalization call, only the mode and sizes, and counts the
train-mode calls inside the model's forward passes and outside them (``F.forget``
recomputing a forward during backward runs the links again, and each train-mode run
updates ``avg_mean`` / ``avg_var`` once more). A step is ``optimizer.update()``: the
update counter ``t`` of the optimizer (or of the parameters' update rules) moves; for
hand-written updates, the sums of the parameter arrays (numpy, on the host for CPU
models). ``avg_mean`` / ``avg_var`` are copied once at :meth:`ChainerWatcher.attach`
and compared once, in :meth:`ChainerWatcher.updates`.

Weight decay: ``optimizer.add_hook(WeightDecay(rate))`` decays every parameter of the
model, BatchNormalization's gamma and beta included; so do update-rule hooks on those
parameters and Adam's ``weight_decay_rate``. Hooks on the optimizer itself are seen only
when ``watch`` is given the optimizer (parameters do not know their optimizer).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import chainer
import numpy as np
from chainer.optimizer_hooks import WeightDecay

from bnlab.doctor.backends.chainer.probe import Recorder, is_bn, named_links
from bnlab.doctor.records import CallRecord, OptimizerInfo, StatUpdates


class _CountingRecorder(Recorder):
    """The probe's recorder (sizes only), also counting train-mode BN calls per link,
    inside the model's forward passes and outside them."""

    def __init__(self, model: chainer.Link, on_pass_start: Callable[[tuple], None] | None) -> None:
        super().__init__(model, stats=False, on_pass_start=on_pass_start)
        self.in_pass = False
        self.forward_calls: Counter[str] = Counter()
        self.extra_calls: Counter[str] = Counter()

    def forward_preprocess(self, args: Any) -> None:
        if args.link is self.model:
            self.in_pass = True
        elif is_bn(args.link) and args.args and chainer.config.train:
            counts = self.forward_calls if self.in_pass else self.extra_calls
            counts[self.paths.get(id(args.link), "?")] += 1
        super().forward_preprocess(args)

    def forward_postprocess(self, args: Any) -> None:
        super().forward_postprocess(args)
        if args.link is self.model:
            self.in_pass = False


def _statistics(link: chainer.Link) -> np.ndarray | None:
    if link.avg_mean is None:
        return None
    return np.concatenate([chainer.backends.cuda.to_cpu(a).ravel() for a in (link.avg_mean, link.avg_var)])


class ChainerWatcher:
    def __init__(
        self,
        model: chainer.Link,
        on_pass_start: Callable[[tuple], None] | None = None,
        optimizer: Any = None,
    ) -> None:
        self.model = model
        self._optimizer = optimizer
        self._recorder = _CountingRecorder(model, on_pass_start)
        self.norms = {path: link for path, link in named_links(model).items() if is_bn(link)}
        self._start: dict[str, np.ndarray | None] = {}

    @property
    def calls(self) -> list[CallRecord]:
        return self._recorder.calls

    @property
    def extra_calls(self) -> dict[str, int]:
        return dict(self._recorder.extra_calls)

    def attach(self) -> None:
        self._start = {path: _statistics(link) for path, link in self.norms.items()}
        self._recorder.attach()

    def detach(self) -> None:
        self._recorder.detach()

    def step_marker(self) -> object:
        if self._optimizer is not None:
            return self._optimizer.t
        rules = [p.update_rule for p in self.model.params() if p.update_rule is not None]
        if rules:  # an optimizer was set up on the model: its update() moves every rule's t
            return sum(rule.t for rule in rules)
        return tuple(None if p.array is None else float(p.array.sum()) for p in self.model.params())

    def optimizer(self) -> Any:
        return self._optimizer

    def updates(self) -> dict[str, StatUpdates]:
        result = {}
        for path, link in self.norms.items():
            now, before = _statistics(link), self._start.get(path)
            if now is None:
                continue
            result[path] = StatUpdates(
                forward_calls=self._recorder.forward_calls[path],
                extra_calls=self._recorder.extra_calls[path],
                counter_delta=None,  # Chainer's BN keeps no update counter
                changed=before is None or not np.array_equal(before, now),
            )
        return result


# -- weight decay ------------------------------------------------------------------------


def _hooks(owner: Any) -> list[Any]:
    """The update hooks of an optimizer (kept by its hookable) or of an update rule."""
    found: list[Any] = []
    for holder in (owner, getattr(owner, "_hookable", None)):
        for timing in ("_pre_update_hooks", "_post_update_hooks"):
            found.extend((getattr(holder, timing, None) or {}).values())
    return found


def _decay(rule: Any, everywhere: float) -> float:
    """The weight decay one parameter's update applies (``everywhere``: the optimizer's hooks)."""
    if rule is None or not rule.enabled:
        return 0.0
    rate = everywhere + sum(hook.rate for hook in _hooks(rule) if isinstance(hook, WeightDecay))
    return rate + float(getattr(rule.hyperparam, "weight_decay_rate", 0.0) or 0.0)


def optimizer_info(model: chainer.Link, optimizer: Any) -> OptimizerInfo | None:
    """The weight decay applied to each BatchNormalization's gamma/beta, or None when no
    optimizer is set up on the model."""
    rules = [p.update_rule for p in model.params() if p.update_rule is not None]
    if optimizer is None and not rules:
        return None
    everywhere = sum(
        hook.rate
        for hook in (_hooks(optimizer) if optimizer is not None else [])
        if isinstance(hook, WeightDecay) and getattr(hook, "call_for_each_param", False)
    )
    decayed = {}
    for path, link in named_links(model).items():
        if is_bn(link):
            rate = max((_decay(p.update_rule, everywhere) for p in link.params()), default=0.0)
            if rate > 0:
                decayed[path] = rate
    kind = type(optimizer).__name__ if optimizer is not None else type(rules[0]).__name__
    return OptimizerInfo(kind=kind, norm_weight_decay=decayed)
