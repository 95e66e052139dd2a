"""stats-updated-outside: a layer's running statistics change although the layer itself
is never called (``F.batch_norm(x, bn.running_mean, bn.running_var, training=True)``
from somewhere else): whatever normalizes with them is invisible to the doctor."""

from __future__ import annotations

from bnlab.doctor.findings import Finding
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
        findings.append(
            Finding(
                check="stats-updated-outside",
                severity="warning",
                title=f"running statistics of '{path}' change, but '{path}' is never called",
                where=path,
                evidence=[
                    f"over {log.steps} training steps {log.where} its running mean/variance "
                    "changed, yet no train-mode call of the layer was seen",
                    "num_batches_tracked did not grow"
                    if upd.counter_delta == 0
                    else f"num_batches_tracked grew by {upd.counter_delta}",
                ],
                data={"steps": log.steps, "counter_delta": upd.counter_delta},
                consequence=(
                    "Code outside the module updates its buffers (typically F.batch_norm with "
                    "the layer's running_mean / running_var). How many call sites feed them, "
                    "and whether they see alike activations, can't be checked; several such "
                    "callers share one set of statistics like a shared BN."
                ),
                fix="Call the layer itself (self.bn(x)), one layer per call site.",
                fix_code="h = self.bn(x)  # instead of F.batch_norm(x, self.bn.running_mean, ...)",
            )
        )
    return findings
