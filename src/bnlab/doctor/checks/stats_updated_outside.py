"""stats-updated-outside: a layer's running statistics change although the layer itself
is never called (``F.batch_norm(x, bn.running_mean, bn.running_var, training=True)``
from somewhere else): whatever normalizes with them is invisible to the doctor."""

from __future__ import annotations

from bnlab.doctor.findings import Finding
from bnlab.doctor.listing import name_list
from bnlab.doctor.records import CallRecord
from bnlab.doctor.registry import Context, register


@register(
    "stats-updated-outside",
    "warning",
    "running statistics change although the layer is never called (F.batch_norm elsewhere)",
)
def check_updated_outside(ctx: Context) -> list[Finding]:
    log = ctx.probe.train_log
    if log is None or not log.steps:
        return []
    findings = []
    for path, upd in log.updates.items():
        if not upd.changed or upd.forward_calls or upd.extra_calls:
            continue
        seen = ctx.probe.calls_of(path)  # F.batch_norm calls with its statistics, where the probe sees them
        findings.append(
            Finding(
                check="stats-updated-outside",
                severity="warning",
                title=f"running statistics of '{path}' change, but the module '{path}' is never called",
                where=path,
                evidence=[
                    f"over {log.steps} training steps {log.where} its running mean/variance "
                    "changed, yet the module itself was never called in train mode",
                    "num_batches_tracked did not grow"
                    if upd.counter_delta == 0
                    else f"num_batches_tracked grew by {upd.counter_delta}",
                    *_seen_line(seen),
                ],
                data={"steps": log.steps, "counter_delta": upd.counter_delta, "probe_calls": len(seen)},
                consequence=_consequence(bool(seen)),
                fix="Call the layer itself (self.bn(x)), one layer per call site.",
                fix_code="h = self.bn(x)  # instead of F.batch_norm(x, self.bn.running_mean, ...)",
            )
        )
    return findings


def _seen_line(calls: list[CallRecord]) -> list[str]:
    if not calls:
        return []
    sites = name_list([f"call {call.index} {call.site}" for call in calls])
    return [f"the probe's forward pass gives its statistics to F.batch_norm at {len(calls)} site(s): {sites}"]


def _consequence(seen: bool) -> str:
    if seen:
        return (
            "Code outside the module updates its buffers (F.batch_norm with the layer's "
            "running_mean / running_var); the doctor counts each such call as a call of the "
            "layer, so several of them are a shared-bn finding."
        )
    return (
        "Code outside the module updates its buffers (typically F.batch_norm with "
        "the layer's running_mean / running_var). How many call sites feed them, "
        "and whether they see alike activations, can't be checked; several such "
        "callers share one set of statistics like a shared BN."
    )
