"""stats-never-updated: training steps ran, the running statistics stayed at 0/1."""

from __future__ import annotations

from bnlab.doctor.facts import called, tracked
from bnlab.doctor.findings import Finding, number
from bnlab.doctor.registry import Context, register


@register(
    "stats-never-updated", "error", "training steps ran but the running statistics stayed at their initial values"
)
def check_never_updated(ctx: Context) -> list[Finding]:
    probe = ctx.probe
    if not probe.trained:
        return []
    log = probe.train_log
    assert log is not None
    findings = []
    for path, layer in probe.layers.items():
        if not (tracked(layer) and layer.is_batchnorm and called(probe, path)):
            continue  # an unused layer is reported by unused-bn
        if not layer.at_init:
            # Statistics that differ from the initial ones came from somewhere: training, or
            # a checkpoint (a deliberately frozen, pretrained BN). Not this check's business.
            continue
        evidence = [
            f"after {log.steps} training steps {log.where}:",
            "running mean is all 0 and running variance all 1 (initial values)",
        ]
        if layer.num_batches_tracked == 0:
            evidence.append("num_batches_tracked is 0: no train-mode forward pass reached it")
        eval_steps = log.eval_mode_steps.get(path, 0)
        if eval_steps:
            evidence.append(f"the layer was in eval mode in {eval_steps} of {log.steps} steps")
        if layer.rate == 0 or (layer.rate_name == "decay" and layer.rate == 1):
            evidence.append(f"{layer.rate_name}={number(layer.rate)}: the update rate is zero")
        findings.append(
            Finding(
                check="stats-never-updated",
                severity="error",
                title=f"running statistics of '{path}' are never updated by training",
                where=path,
                evidence=evidence,
                data={
                    "steps": log.steps,
                    "at_init": layer.at_init,
                    "eval_mode_steps": eval_steps,
                    "num_batches_tracked": layer.num_batches_tracked,
                },
                consequence=(
                    "In eval mode the layer normalizes with mean 0 and variance 1, i.e. not at "
                    "all, so activations keep whatever scale training gave them."
                ),
                fix=(
                    "Keep BN layers in train mode while training (don't call eval() or override "
                    "train() to freeze them unless they hold pretrained statistics) and use a "
                    "non-zero update rate."
                ),
                fix_code=ctx.fixes.train_mode_during_training(),
            )
        )
    return findings
