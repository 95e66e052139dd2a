"""extra-stat-updates: running statistics updated more often than the layer is called
in forward passes -- activation checkpointing recomputing the forward during backward
(``torch.utils.checkpoint``), which updates every BN inside it a second time."""

from __future__ import annotations

from bnlab.doctor.backend import Fixes
from bnlab.doctor.facts import share_moved
from bnlab.doctor.findings import Finding, number
from bnlab.doctor.records import LayerInfo, StatUpdates, TrainLog
from bnlab.doctor.registry import Context, register


@register(
    "extra-stat-updates",
    "warning",
    "BN statistics updated more often than the layer runs in forward passes (checkpoint recomputation)",
)
def check_extra_updates(ctx: Context) -> list[Finding]:
    log = ctx.probe.train_log
    if log is None or not log.steps:
        return []
    findings = []
    for path, upd in log.updates.items():
        layer = ctx.probe.layers.get(path)
        if layer is None or not upd.forward_calls:
            continue
        counted = upd.forward_calls + upd.extra_calls
        beyond_counter = upd.counter_delta is not None and upd.counter_delta > counted
        if upd.extra_calls or beyond_counter:
            findings.append(_finding(ctx.fixes, layer, upd, log))
    return findings


def _finding(fixes: Fixes, layer: LayerInfo, upd: StatUpdates, log: TrainLog) -> Finding:
    updates = upd.counter_delta if upd.counter_delta is not None else (upd.forward_calls + upd.extra_calls)
    per_call = updates / max(upd.forward_calls, 1)
    evidence = [
        f"over {log.steps} training steps {log.where}: {updates} updates of the running "
        f"statistics, {upd.forward_calls} calls in forward passes"
        + (f" and {upd.extra_calls} more outside them (during backward)" if upd.extra_calls else ""),
    ]
    if upd.counter_delta is not None:
        evidence.append(f"num_batches_tracked grew by {upd.counter_delta}")
    effective = share_moved(layer, round(per_call))
    if effective is not None and round(per_call) > 1:
        evidence.append(
            f"each batch is averaged in {round(per_call)} times: an effective momentum of "
            f"{number(round(effective, 4))} instead of {number(layer.rate)}"
        )
    return Finding(
        check="extra-stat-updates",
        severity="warning",
        title=f"running statistics of '{layer.path}' are updated {per_call:.3g} times per forward call",
        where=layer.path,
        evidence=evidence,
        data={
            "steps": log.steps,
            "updates": updates,
            "forward_calls": upd.forward_calls,
            "extra_calls": upd.extra_calls,
            "counter_delta": upd.counter_delta,
        },
        consequence=(
            "Activation checkpointing recomputes the forward pass during backward, and BN in "
            "train mode updates its statistics again on that recomputation: the running "
            "average weights each batch twice (momentum=None's cumulative average counts it "
            "twice), so the statistics are not the average the settings promise."
        ),
        fix=(
            "Keep BN layers outside checkpointed segments, or checkpoint only BN-free blocks; "
            "if the recomputation must include BN, compensate the momentum."
        ),
        fix_code=fixes.checkpoint_without_bn_updates(),
    )
