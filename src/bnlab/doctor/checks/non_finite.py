"""non-finite: NaN or infinity in the model's output or its running statistics."""

from __future__ import annotations

from bnlab.doctor.findings import Finding
from bnlab.doctor.records import ProbeResult
from bnlab.doctor.registry import Context, register


@register("non-finite", "error", "NaN/inf in the model's output or running statistics")
def check_non_finite(ctx: Context) -> list[Finding]:
    given = ctx.probe.as_given
    found = _problems(given)
    if found:
        return [_finding(found, "error", "your model as handed over")]
    if ctx.probe.given is not None:  # only after the doctor's own training steps
        found = _problems(ctx.probe)
        if found:
            return [_finding(found, "warning", "the doctor's copy after its training steps")]
    return []


def _problems(probe: ProbeResult) -> list[str]:
    lines = []
    if probe.output_finite is False:
        lines.append("the output holds NaN or infinite values (train or eval mode)")
    bad = [path for path, layer in probe.layers.items() if not layer.stats_finite]
    if bad:
        lines.append(f"running statistics hold NaN or infinite values in: {', '.join(bad)}")
    return lines


def _finding(problems: list[str], severity: str, whose: str) -> Finding:
    doctor = severity == "warning"
    return Finding(
        check="non-finite",
        severity=severity,
        title=f"non-finite values in {whose}",
        where="model output" if problems[0].startswith("the output") else "running statistics",
        evidence=problems,
        data={"problems": problems, "after_doctor_training": doctor},
        consequence=(
            "NaN spreads through every later layer; predictions of such a model mean nothing, "
            "and the train/eval comparison is skipped."
        ),
        fix=(
            "The doctor's training steps diverged: lower --lr (or pass your own optimizer), "
            "or check with --train-steps 0."
            if doctor
            else "Find where the NaN starts (torch.autograd.set_detect_anomaly, a lower learning "
            "rate, eps of the BN layers); re-estimate NaN running statistics on training data."
        ),
    )
