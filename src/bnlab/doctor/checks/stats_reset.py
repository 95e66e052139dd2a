"""stats-reset: a trained layer (gamma/beta moved) whose running statistics are at 0/1.

``reset_running_stats()`` after training, or a checkpoint loaded without its BN buffers:
the weights are trained, eval mode normalizes with mean 0 and variance 1.
"""

from __future__ import annotations

import numpy as np

from bnlab.doctor.backend import Fixes
from bnlab.doctor.facts import called, divergence, divergence_line, tracked
from bnlab.doctor.findings import Finding
from bnlab.doctor.records import LayerInfo, ProbeResult
from bnlab.doctor.registry import Context, register
from bnlab.doctor.stats import distance


@register(
    "stats-reset", "error", "gamma/beta trained but running statistics at their initial 0/1 (reset or not loaded)"
)
def check_reset(ctx: Context) -> list[Finding]:
    given = ctx.probe.as_given
    layers = [
        layer
        for layer in given.layers.values()
        if tracked(layer) and layer.is_batchnorm and layer.at_init and layer.affine_moved and called(given, layer.path)
    ]
    if not layers:
        return []
    return [_finding(ctx.fixes, given, layers)]


def _range(values: np.ndarray | None) -> str:
    if values is None or not values.size:
        return "?"
    return f"{values.min():.3g}..{values.max():.3g}"


def _finding(fixes: Fixes, given: ProbeResult, layers: list[LayerInfo]) -> Finding:
    evidence = []
    off = []
    for layer in layers:
        evidence.append(
            f"{layer.path}: gamma {_range(layer.weight)}, beta {_range(layer.bias)} (trained), "
            "running mean all 0 and variance all 1 (initial values)"
        )
        calls = given.calls_of(layer.path)
        if calls and calls[0].mean.size and layer.running_mean is not None and layer.running_var is not None:
            dist = distance(calls[0].mean, calls[0].var, layer.running_mean, layer.running_var, layer.eps)
            if dist.is_off():
                off.append(layer.path)
                evidence.append(f"the probe batch at {layer.path} vs (0, 1): {dist.describe()}")
    div = divergence(given)
    if div is not None:
        evidence.append(divergence_line(div))
    severity = "error" if off or (div is not None and div["differ"] > 0.1) else "warning"
    return Finding(
        check="stats-reset",
        severity=severity,
        title="BN layers are trained but their running statistics are at their initial values",
        where=", ".join(layer.path for layer in layers),
        evidence=evidence,
        data={"layers": [layer.path for layer in layers], "off_at_probe": off, "train_eval": div},
        consequence=(
            "Eval mode normalizes these layers with mean 0 and variance 1 instead of the "
            "statistics the weights were trained with, so the eval-mode model is not the "
            "trained one. Typical causes: reset_running_stats() after training, a "
            "checkpoint loaded without its BN buffers (strict=False, or buffers filtered "
            "out), or a model trained with its BN layers in eval mode."
        ),
        fix=(
            "Load the BN buffers with the weights, or re-estimate the statistics with one "
            "pass over training data in train mode (no gradient step needed)."
        ),
        fix_code=fixes.reset_stats(),
    )
