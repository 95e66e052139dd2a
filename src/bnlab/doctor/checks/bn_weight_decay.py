"""bn-weight-decay: the optimizer decays BN's gamma/beta (torch-audit's TA402 idea).

Checked when the optimizer is known: the doctor's own (``optimizer_factory``) or the
user's (``watch(model, optimizer=opt)``, or seen stepping the model).
"""

from __future__ import annotations

from bnlab.doctor.findings import Finding, number
from bnlab.doctor.listing import name_list
from bnlab.doctor.registry import Context, register


@register("bn-weight-decay", "info", "weight decay applied to BN's affine parameters")
def check_weight_decay(ctx: Context) -> list[Finding]:
    log = ctx.probe.train_log
    info = log.optimizer if log is not None else None
    if info is None or not info.norm_weight_decay:
        return []
    decays = info.norm_weight_decay
    values = sorted(set(decays.values()))
    return [
        Finding(
            check="bn-weight-decay",
            severity="info",
            title=f"{info.kind} applies weight decay to the parameters of {len(decays)} normalization layer(s)",
            where=", ".join(decays),
            evidence=[
                f"weight_decay {', '.join(number(v) for v in values)} on gamma/beta of {name_list(list(decays))}"
            ],
            data={"optimizer": info.kind, "weight_decay": decays},
            consequence=(
                "BN makes the layer before it scale-invariant, so decaying gamma only shrinks "
                "the output scale the network must then restore; the usual recipe "
                "(torchvision's norm_weight_decay=0) leaves norm parameters undecayed."
            ),
            fix=(
                "Exclude the normalization parameters from weight decay (a parameter group with "
                "weight_decay=0; Keras: exclude_from_weight_decay; Chainer: per-parameter hooks)."
            ),
            fix_code=ctx.fixes.no_decay_on_norms(),
        )
    ]
