"""shared-bn: one stateful norm layer called more than once per forward pass."""

from __future__ import annotations

import numpy as np

from bnlab.doctor import thresholds
from bnlab.doctor.backend import Fixes
from bnlab.doctor.facts import (
    divergence,
    divergence_line,
    settings,
    tracked,
    vs_running,
)
from bnlab.doctor.findings import Finding
from bnlab.doctor.records import CallRecord, LayerInfo, ProbeResult
from bnlab.doctor.registry import Context, register
from bnlab.doctor.stats import site_distance, sites_alike, variances_comparable


@register(
    "shared-bn", "error", "a BN with running statistics called more than once per forward pass (also `bn(bn(x))`)"
)
def check_shared(ctx: Context) -> list[Finding]:
    probe = ctx.probe
    findings = []
    for path, layer in probe.layers.items():
        calls = probe.calls_of(path)
        count = max(len(calls), probe.eval_calls.get(path, 0))
        if count < 2 or not tracked(layer):
            # Sharing a norm without running statistics (or a stateless module) is fine.
            continue
        findings.append(_finding(ctx.fixes, probe, layer, calls, count))
    return findings


def _self_fed(layer: LayerInfo, calls: list[CallRecord]) -> list[CallRecord]:
    """Calls whose input is this same layer's output: ``bn(bn(x))``."""
    return [c for c in calls if c.producer == layer.path and c.via in ("direct", "view")]


def _updates_per_step(probe: ProbeResult, path: str) -> tuple[float, str] | None:
    """How often the user's own training (watch) updated the statistics per step."""
    log = probe.train_log
    upd = log.updates.get(path) if log is not None and log.watched else None
    if log is None or upd is None or not upd.forward_calls or not log.steps:
        return None
    rate = upd.forward_calls / log.steps
    return rate, (
        f"{log.where}: {upd.forward_calls} train-mode calls in {log.steps} training steps, so its "
        f"running statistics were updated {rate:.3g} times per step"
    )


def _finding(fixes: Fixes, probe: ProbeResult, layer: LayerInfo, calls: list[CallRecord], count: int) -> Finding:
    div = divergence(probe)
    evidence = [f"called {count} times in one forward pass, one set of running statistics ({settings(layer)})"]
    site_data = []
    for call in calls:
        dist = vs_running(call, layer)
        if dist is None:
            continue
        evidence.append(f"call {call.index} {call.site}: batch vs running statistics: {dist.describe()}")
        site_data.append({"index": call.index, "site": call.site, "producer": call.producer, **dist.as_dict()})
    pairs = [(a, b) for i, a in enumerate(calls) for b in calls[i + 1 :] if a.mean.shape == b.mean.shape]
    between = [site_distance(a.mean, a.var, b.mean, b.var, layer.eps) for a, b in pairs]
    values = [min(a.values_per_channel, b.values_per_channel) for a, b in pairs]
    worst = max(between, key=lambda d: d.mean_shift + abs(np.log(d.var_ratio)), default=None)
    if worst is not None:
        evidence.append(
            f"the call sites see different activations: means {worst.mean_shift:.2f} SD apart "
            f"(max {worst.max_mean_shift:.2f}), variances differ by a factor {worst.var_ratio:.2f}"
        )
        fewest = min(values)
        if not variances_comparable(fewest):
            evidence.append(
                f"with {fewest} values per channel the sites' variances are too noisy to compare "
                f"(fewer than {thresholds.MIN_VALUES_FOR_STATS}); judged on their means; probe "
                "with a larger batch or input to compare them"
            )
    self_fed = _self_fed(layer, calls)
    if self_fed:
        evidence.append(
            f"call {self_fed[0].index} normalizes the output of call {self_fed[0].index - 1}: "
            f"{layer.path}({layer.path}(x)); its running statistics average a raw and a "
            "normalized activation, whatever the weights"
        )
    per_step = _updates_per_step(probe, layer.path)
    if per_step is not None:
        evidence.append(per_step[1])
    if layer.at_init:
        evidence.append("the running statistics are still at their initial values (0, 1)")
    if div is not None:
        evidence.append(divergence_line(div))
    alike = worst is not None and all(sites_alike(d, n) for d, n in zip(between, values, strict=True)) and not self_fed
    consequence = (
        "In eval mode every call site is normalized with the same running statistics, a blend "
        "of all sites' activations, so the deployed model computes a different function than "
        "the one trained with batch statistics."
    )
    if alike:
        consequence = (
            "The call sites currently see alike activations, so one set of running statistics "
            "can describe them; if their inputs drift apart, eval mode breaks."
        )
    return Finding(
        check="shared-bn",
        severity="warning" if alike else "error",
        title=f"{layer.kind} '{layer.path}' is called {count} times per forward pass",
        where=layer.path,
        sites=[f"call {call.index} {call.site}" for call in calls],
        evidence=evidence,
        data={
            "calls": count,
            "sites": site_data,
            "between_sites": worst.as_dict() if worst else None,
            "self_fed": bool(self_fed),
            "aliases": layer.aliases,
            "train_eval": div,
            "updates_per_step": None if per_step is None else per_step[0],
        },
        consequence=consequence,
        fix="Give each call site its own BatchNorm layer.",
        fix_code=fixes.one_bn_per_site(layer, calls),
    )
