"""momentum-convention: a momentum/decay that looks like another framework's convention."""

from __future__ import annotations

from bnlab.conventions import CONVENTIONS, OLD, from_torch_momentum, to_torch_momentum
from bnlab.doctor import thresholds
from bnlab.doctor.backend import Fixes
from bnlab.doctor.facts import tracked
from bnlab.doctor.findings import Finding, number
from bnlab.doctor.records import LayerInfo
from bnlab.doctor.registry import Context, register


@register(
    "momentum-convention", "warning", "a BN momentum/decay of 0 or one that looks like another framework's convention"
)
def check_momentum(ctx: Context) -> list[Finding]:
    findings = []
    for layer in ctx.probe.layers.values():
        if not tracked(layer) or layer.rate is None:
            continue
        finding = _finding(ctx.fixes, layer)
        if finding is not None:
            findings.append(finding)
    return findings


def _finding(fixes: Fixes, layer: LayerInfo) -> Finding | None:
    rate = float(layer.rate) if layer.rate is not None else 0.0
    torch_equiv = to_torch_momentum(layer.framework, rate)  # weight of the new batch
    convention = CONVENTIONS[layer.framework]
    weights_old = convention.weights == OLD  # Chainer's decay, Keras's momentum
    name = layer.rate_name
    if torch_equiv == 0:
        title = f"{name}={number(rate)}: running statistics never change"
        detail = "each training batch gets weight 0 in the running average"
        converted = convention.default
        fix = f"Use the default {name}={number(converted)}."
    elif torch_equiv > thresholds.MOMENTUM_SUSPECT:
        title = f"{name}={number(rate)} looks like another framework's convention"
        detail = (
            f"each training batch replaces {torch_equiv:.0%} of the running statistics, "
            "so they follow the last few batches almost exactly"
        )
        if weights_old:
            # decay=0.1 / momentum=0.1 is PyTorch's momentum=0.1 typed into Chainer/Keras.
            converted = from_torch_momentum(layer.framework, rate)
            fix = (
                f"{convention.name}'s {name} weights the OLD value. If you meant PyTorch's "
                f"momentum={number(rate)}, use {name}={number(converted)} "
                f"(bnlab.conventions.from_torch_momentum({layer.framework!r}, {number(rate)}))."
            )
        else:
            # momentum=0.9 is Keras/TF/Chainer's 0.9 typed into PyTorch.
            converted = to_torch_momentum("keras", rate)
            fix = (
                f"PyTorch's momentum weights the NEW batch. If you meant Keras/TF/Chainer's "
                f"{number(rate)}, use momentum={number(converted)} "
                f"(bnlab.conventions.to_torch_momentum('keras', {number(rate)}))."
            )
    else:
        return None
    converted = round(converted, 12)  # 1 - 0.9 is stored as 0.1, not 0.09999999999999998
    return Finding(
        check="momentum-convention",
        severity="warning",
        title=title,
        where=layer.path,
        evidence=[detail, f"as a PyTorch momentum: {number(torch_equiv)}"],
        data={name: rate, "torch_momentum": round(torch_equiv, 12), "suggested": converted},
        consequence=(
            "Eval mode then uses statistics of the last batch (noisy) or of no batch at all "
            "instead of an average over training."
        ),
        fix=fix,
        fix_code=fixes.rate_code(layer, converted),
    )
