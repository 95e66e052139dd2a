"""train-eval-divergence: train and eval mode predict different classes.

Reported under the finding that explains it: when another check (a shared BN, reset or
stale statistics...) has an error or warning, the divergence joins its evidence and no
finding of its own is made. Without a cause it is info -- it may be the doctor's own
short training (5 updates at momentum 0.1 move statistics only 41% of the way), and
is then said so. Judged on the model as handed over, unless that is untrained.
"""

from __future__ import annotations

from bnlab.doctor import thresholds
from bnlab.doctor.facts import divergence, divergence_line, share_moved, untrained
from bnlab.doctor.findings import Finding
from bnlab.doctor.records import ProbeResult
from bnlab.doctor.registry import Context, register

# Findings that explain a divergence when they are errors or warnings.
CAUSES = (
    "shared-bn",
    "stats-reset",
    "stale-stats",
    "stats-never-updated",
    "momentum-convention",
    "eval-mode-training",
    "extra-stat-updates",
    "stats-updated-outside",
    "small-batch",
    "dropout-before-bn",
)


@register("train-eval-divergence", "info", "train and eval mode disagree (joins the finding that explains it)", phase=1)
def check_divergence(ctx: Context) -> list[Finding]:
    probe = ctx.probe
    given = probe.as_given
    judged, when = given, ""
    if probe.given is not None and _untrained_given(given):
        judged, when = probe, " (after the doctor's training)"
    div = divergence(judged)
    if div is None or div["differ"] <= thresholds.DIVERGENCE_WARN:
        return []
    line = divergence_line(div, when)
    causes = [f for f in ctx.findings if f.check in CAUSES and f.severity != "info"]
    for finding in causes:
        if not any(item.startswith("train vs eval mode") for item in finding.evidence):
            finding.evidence.append(line)
    if causes:
        return []
    return [_finding(probe, judged, div, line)]


def _untrained_given(given: ProbeResult) -> bool:
    layers = [layer for layer in given.layers.values() if layer.is_batchnorm]
    return bool(layers) and all(layer.at_init and not layer.affine_moved for layer in layers)


def _short_training_line(steps: int, shares: list[float]) -> str:
    """What the doctor's few steps did to the running statistics (the share of the way
    from their initial values, ``facts.share_moved``): still warming up, or warmed up but
    an average over weights that changed at every step."""
    low = min(shares)
    if low < thresholds.WARMED_UP:
        return (
            f"after the doctor's {steps} training steps the running statistics are only "
            f"{low:.0%} of the way from their initial values to the data's (the slowest BN "
            "layer): they are still warming up"
        )
    shown = f"{low:.1%}" if low < 0.9995 else "over 99.9%"
    return (
        f"after the doctor's {steps} training steps every BN layer's running statistics are "
        f"{shown} of the way from their initial values to the data's, but they average batch "
        "statistics taken while each step changed the weights: they trail the final weights"
    )


def _finding(probe: ProbeResult, judged: ProbeResult, div: dict, line: str) -> Finding:
    evidence = [line]
    fix = (
        "Check the trained model (or train it longer); if the modes still disagree, "
        "look for BN misuse the probe can't see (statistics from other data, "
        "preprocessing that differs between training and evaluation)."
    )
    title = "train mode and eval mode predict different classes; no BN cause found"
    if untrained(probe):
        title = "train and eval mode disagree (expected: the model is untrained)"
        fix = "Train the model (or pass train_steps / --train-steps) and check again."
    elif judged is probe and probe.train_log is not None and probe.given is not None:
        steps = probe.train_log.steps
        moved = [share_moved(layer, steps) for layer in probe.layers.values() if layer.is_batchnorm]
        shares = [m for m in moved if m is not None]
        if shares:
            evidence.append(_short_training_line(steps, shares))
        fix = "Give the doctor more training steps (--train-steps), or check your trained model."
    return Finding(
        check="train-eval-divergence",
        severity="info",
        title=title,
        where="model output",
        evidence=evidence,
        data=div,
        consequence=(
            "The eval-mode model you deploy is not the model you watched during training: "
            "it uses running statistics where training used batch statistics."
        ),
        fix=fix,
    )
