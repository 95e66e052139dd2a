"""untrained-stats: an untrained model (statistics and parameters at their initial values)."""

from __future__ import annotations

from bnlab.doctor.facts import untrained
from bnlab.doctor.findings import Finding
from bnlab.doctor.registry import Context, register


@register("untrained-stats", "info", "the model looks untrained (statistical checks skipped)")
def check_untrained(ctx: Context) -> list[Finding]:
    layers = untrained(ctx.probe)
    if not layers:
        return []
    return [
        Finding(
            check="untrained-stats",
            severity="info",
            title="running statistics are at their initial values: the model looks untrained",
            where=", ".join(layer.path for layer in layers),
            evidence=[
                f"{len(layers)} BN layer(s) have running mean 0 and variance 1, and gamma/beta at their initial values",
                "statistical checks of these layers (stale-stats) were skipped",
            ],
            data={"layers": [layer.path for layer in layers]},
            consequence=("Eval-mode behaviour of an untrained model says nothing about the trained one."),
            fix=(
                "Check the trained model, or let the doctor train a copy first "
                "(train_steps=N in the API, --train-steps N on the command line)."
            ),
        )
    ]
