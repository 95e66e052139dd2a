"""eval-mode-training: BN layers left in eval mode during the user's training steps
(seen by ``watch``), when stats-never-updated has not already made it an error."""

from __future__ import annotations

from bnlab.doctor.findings import Finding
from bnlab.doctor.registry import Context, register


@register("eval-mode-training", "warning", "watch: trainable BN layers in eval mode during training steps", phase=1)
def check_eval_mode_training(ctx: Context) -> list[Finding]:
    probe, log = ctx.probe, ctx.probe.train_log
    if log is None or not log.watched or not log.eval_mode_steps:
        return []
    covered = {f.where for f in ctx.findings if f.check == "stats-never-updated"}
    layers = {  # in model order
        path: log.eval_mode_steps[path]
        for path in probe.layers
        if path in log.eval_mode_steps
        and path not in covered
        and not probe.layers[path].params_frozen  # frozen + eval: deliberately frozen
    }
    if not layers:
        return []
    fix = ctx.fixes.train_mode_advice()
    return [
        Finding(
            check="eval-mode-training",
            severity="warning",
            title="BN layers were in eval mode during training steps",
            where=", ".join(layers),
            evidence=[
                f"{path}: in eval mode in {count} of {log.steps} training steps" for path, count in layers.items()
            ]
            + ["their parameters are trainable, but their running statistics did not follow those steps"],
            data={"eval_mode_steps": layers, "steps": log.steps},
            consequence=(
                "The layers normalize with frozen statistics while the weights before "
                "them change, so their statistics go stale."
            ),
            fix=fix,
            fix_code=ctx.fixes.train_mode_during_training(),
        )
    ]
