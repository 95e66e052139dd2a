"""bias-before-bn: a bias directly before BN, which the BN's mean subtraction removes."""

from __future__ import annotations

from bnlab.doctor.findings import Finding
from bnlab.doctor.registry import Context, register


@register("bias-before-bn", "info", "a layer's bias directly before BN is redundant")
def check_bias_before_bn(ctx: Context) -> list[Finding]:
    probe = ctx.probe
    pairs: list[tuple[str | None, str | None, str]] = []
    for call in probe.calls:
        layer = probe.layers[call.path]
        if call.producer_has_bias and call.via in ("direct", "view") and layer.is_batchnorm:
            pair = (call.producer, call.producer_kind, call.path)
            if pair not in pairs:
                pairs.append(pair)
    if not pairs:
        return []
    return [
        Finding(
            check="bias-before-bn",
            severity="info",
            title="bias directly before BN is redundant",
            where=", ".join(str(p[0]) for p in pairs),
            sites=[f"{producer} ({kind}, with bias) -> {bn}" for producer, kind, bn in pairs],
            evidence=["BN subtracts the batch mean, which removes any constant bias"],
            data={"pairs": [{"producer": p, "kind": k, "bn": b} for p, k, b in pairs]},
            consequence="The bias is a wasted parameter: it never changes the BN's output.",
            fix="Create the layer without a bias.",
            fix_code=ctx.fixes.no_bias([str(p[1]) for p in pairs]),
        )
    ]
