"""frozen-bn-train-mode: affine parameters frozen, layer still in train mode."""

from __future__ import annotations

from bnlab.doctor.facts import tracked
from bnlab.doctor.findings import Finding
from bnlab.doctor.registry import Context, register


@register("frozen-bn-train-mode", "info", "a BN with frozen parameters left in train mode (its statistics still move)")
def check_frozen(ctx: Context) -> list[Finding]:
    findings = []
    for path, layer in ctx.probe.layers.items():
        if not (layer.params_frozen and layer.training and tracked(layer)):
            continue
        findings.append(
            Finding(
                check="frozen-bn-train-mode",
                severity="info",
                title=f"'{path}' has frozen parameters but is in train mode",
                where=path,
                evidence=["its affine parameters are not trained, yet its mode is train"],
                consequence=(
                    "Its running statistics still move with every training batch, so the layer "
                    "is not frozen: a frozen layer should also be in eval mode."
                ),
                fix="Put frozen BN layers in eval mode after every model.train() call.",
                fix_code=ctx.fixes.freeze_bn(),
            )
        )
    return findings
