"""stale-stats: running statistics that don't describe the activations they normalize.

Judged on the model as handed over: after the doctor's own few training steps the
statistics lag by construction (5 updates at momentum 0.1 move them 41% of the way).
"""

from __future__ import annotations

from bnlab.doctor import thresholds
from bnlab.doctor.backend import Fixes
from bnlab.doctor.facts import share_moved, tracked, vs_running
from bnlab.doctor.findings import Finding, number
from bnlab.doctor.records import CallRecord, LayerInfo
from bnlab.doctor.registry import Context, register
from bnlab.doctor.stats import Distance


@register("stale-stats", "warning", "running statistics far from the probe batch's statistics (model as handed over)")
def check_stale(ctx: Context) -> list[Finding]:
    given = ctx.probe.as_given
    findings = []
    for path, layer in given.layers.items():
        calls = given.calls_of(path)
        if (
            len(calls) != 1  # shared layers are reported, with these numbers, by shared-bn
            or not tracked(layer)
            or not layer.is_batchnorm
            or layer.at_init  # never updated: stats-reset / untrained-stats
            or calls[0].values_per_channel < thresholds.MIN_VALUES_FOR_STATS
        ):
            continue
        dist = vs_running(calls[0], layer)
        if dist is not None and dist.is_off():
            findings.append(_finding(ctx.fixes, layer, calls[0], dist, ctx.probe.trained))
    return findings


def _finding(fixes: Fixes, layer: LayerInfo, call: CallRecord, dist: Distance, doctor_trained: bool) -> Finding:
    evidence = [
        f"probe batch ({call.values_per_channel} values per channel) vs running statistics: {dist.describe()}",
        f"thresholds: mean shift > {thresholds.MEAN_SHIFT_WARN} SD or variance ratio "
        f"outside [{thresholds.VAR_RATIO_LOW}, {thresholds.VAR_RATIO_HIGH}]",
    ]
    if doctor_trained:
        evidence.append("judged on your model as handed over, before the doctor's training steps")
    moved = None
    if layer.num_batches_tracked is not None:
        moved = share_moved(layer, layer.num_batches_tracked)
    warming = moved is not None and moved < thresholds.WARMED_UP
    if warming:
        evidence.append(
            f"num_batches_tracked is {layer.num_batches_tracked}: at {layer.rate_name}="
            f"{number(layer.rate)} that many updates move the running statistics only "
            f"{moved:.0%} of the way from their initial values"
        )
    return Finding(
        check="stale-stats",
        severity="info" if warming else "warning",
        title=(
            f"running statistics of '{layer.path}' are still warming up"
            if warming
            else f"running statistics of '{layer.path}' don't describe its input"
        ),
        where=layer.path,
        sites=[call.site],
        evidence=evidence,
        data={"site": call.site, **dist.as_dict(), "values_per_channel": call.values_per_channel, "share_moved": moved},
        consequence=(
            "In eval mode this layer normalizes with statistics of a different distribution, "
            "so the next layer receives shifted, rescaled activations it was not trained on."
        ),
        fix=(
            "Re-estimate the running statistics on training data (too few updates, stale "
            "statistics from another data set or a changed preprocessing all show up here), "
            "and check that the probe data is preprocessed like the training data."
        ),
        fix_code=fixes.recompute_stats(),
    )
