"""unused-bn: a norm layer the forward pass never calls."""

from __future__ import annotations

from bnlab.doctor.facts import called
from bnlab.doctor.findings import Finding
from bnlab.doctor.registry import Context, register


@register("unused-bn", "info", "a normalization layer defined but never called")
def check_unused(ctx: Context) -> list[Finding]:
    """Harmless alone, telling next to a shared one."""
    probe = ctx.probe
    log = probe.train_log
    moved = {path for path, upd in (log.updates if log else {}).items() if upd.changed}
    unused = [path for path in probe.layers if not called(probe, path) and path not in moved]
    if not unused or not (probe.calls or probe.eval_calls):
        return []
    shared = [p for p in probe.layers if len(probe.calls_of(p)) > 1]
    evidence = [f"defined but not called in the forward pass: {', '.join(unused)}"]
    if shared:
        evidence.append(
            f"meanwhile {', '.join(shared)} is called several times: was {unused[0]} meant for one of those calls?"
        )
    return [
        Finding(
            check="unused-bn",
            severity="info",
            title="normalization layer(s) never called",
            where=", ".join(unused),
            evidence=evidence,
            data={"unused": unused, "shared": shared},
            consequence="An unused layer does nothing; its parameters only take up space.",
            fix="Use it where it was meant to go, or delete it.",
        )
    ]
