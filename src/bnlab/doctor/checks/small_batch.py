"""small-batch: BN trained on batches too small for batch statistics.

Counted in samples: the values of one image's spatial positions are strongly
correlated, so a conv BN on 2 images of 31x31 (1922 values per channel) still has
statistics of 2 samples. One value per channel is an error (variance 0).
"""

from __future__ import annotations

from bnlab.doctor import thresholds
from bnlab.doctor.backend import Fixes
from bnlab.doctor.findings import Finding
from bnlab.doctor.records import LayerInfo, SmallCall
from bnlab.doctor.registry import Context, register


@register("small-batch", "error", "BN normalizing over too few samples in train mode (one value per channel: error)")
def check_small_batch(ctx: Context) -> list[Finding]:
    probe = ctx.probe
    log = probe.train_log
    findings = []
    if log is not None and log.watched:  # the batches of the user's own loop
        per_rank = set(probe.ranks.plain_bn) if probe.ranks is not None else set()  # small-batch-per-rank's
        for path, seen in log.smallest.items():
            layer = probe.layers.get(path)
            if path in per_rank:
                continue
            if layer is not None and layer.is_batchnorm and too_small(seen.samples, seen.values):
                findings.append(
                    _finding(
                        ctx.fixes, layer, seen, f"in your loop ({seen.passes} train-mode pass(es) this small), smallest"
                    )
                )
        return findings
    for path, layer in probe.layers.items():
        train_calls = [c for c in probe.calls_of(path) if c.training]
        if not layer.is_batchnorm or not train_calls:
            continue
        smallest = min(train_calls, key=lambda c: (c.batch_size, c.values_per_channel))
        if too_small(smallest.batch_size, smallest.values_per_channel):
            seen = SmallCall(smallest.batch_size, smallest.values_per_channel, smallest.site)
            findings.append(_finding(ctx.fixes, layer, seen, "in the probe"))
    return findings


def too_small(samples: int, values: int) -> bool:
    return samples < thresholds.SMALL_BATCH_WARN or values < thresholds.SMALL_BATCH_WARN


def _finding(fixes: Fixes, layer: LayerInfo, seen: SmallCall, where: str) -> Finding:
    single = seen.values <= 1
    return Finding(
        check="small-batch",
        severity="error" if single else "warning",
        title=(
            f"'{layer.path}' normalizes over {seen.values} value(s) per channel in train mode"
            if single or seen.values < thresholds.SMALL_BATCH_WARN
            else f"'{layer.path}' normalizes over batches of {seen.samples} sample(s) in train mode"
        ),
        where=layer.path,
        sites=[seen.site],
        evidence=[
            f"{where}: batch of {seen.samples} -> {seen.values} value(s) per channel "
            f"(warning below {thresholds.SMALL_BATCH_WARN} samples; values of one sample's "
            "positions are correlated, so they count as one)"
        ],
        data={"values_per_channel": seen.values, "batch_size": seen.samples},
        consequence=(
            "With one value per channel the batch variance is 0: the output is beta for every "
            "input (PyTorch refuses with 'Expected more than 1 value per channel')."
            if single
            else "Batch statistics this noisy make training unstable and the running statistics a poor estimate."
        ),
        fix=(
            "Train with larger batches (drop a final partial batch), or use GroupNorm / "
            "LayerNorm, which don't depend on the batch."
        ),
        fix_code=fixes.bigger_batches(),
    )
