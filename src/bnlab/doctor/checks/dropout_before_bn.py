"""dropout-before-bn: dropout feeding BN (variance shift between train and eval mode)."""

from __future__ import annotations

from bnlab.doctor.findings import Finding
from bnlab.doctor.registry import Context, register


@register("dropout-before-bn", "info", "dropout directly before BN (variance shift)")
def check_dropout_before_bn(ctx: Context) -> list[Finding]:
    probe = ctx.probe
    findings = []
    seen = set()
    for call in probe.calls:
        if not call.producer_is_dropout or call.path in seen:
            continue
        seen.add(call.path)
        findings.append(
            Finding(
                check="dropout-before-bn",
                severity="info",
                title=f"dropout directly before '{call.path}'",
                where=call.path,
                sites=[call.site],
                evidence=["dropout is active in train mode and off in eval mode"],
                consequence=(
                    "The running variance is learned with dropout noise that is absent in eval "
                    "mode (variance shift), so eval-mode activations are scaled differently."
                ),
                fix="Move dropout after the BN layers (e.g. just before the final classifier).",
                fix_code=ctx.fixes.dropout_after_bn(),
            )
        )
    return findings
