"""Facts about a probe that several checks read (no verdicts here)."""

from __future__ import annotations

import numpy as np

from bnlab.conventions import CONVENTIONS, to_torch_momentum
from bnlab.doctor.findings import number
from bnlab.doctor.records import CallRecord, LayerInfo, ProbeResult
from bnlab.doctor.stats import Distance, distance


def tracked(layer: LayerInfo) -> bool:
    return layer.tracks_running_stats and layer.running_mean is not None


def vs_running(call: CallRecord, layer: LayerInfo) -> Distance | None:
    """The call's batch statistics against the layer's running statistics."""
    if layer.running_mean is None or layer.running_var is None or not call.mean.size:
        return None
    if call.mean.shape != layer.running_mean.shape:
        return None
    return distance(call.mean, call.var, layer.running_mean, layer.running_var, layer.eps)


def called(probe: ProbeResult, path: str) -> bool:
    return bool(probe.calls_of(path)) or probe.eval_calls.get(path, 0) > 0


def untrained(probe: ProbeResult) -> list[LayerInfo]:
    """Layers of the model as handed over whose statistics and parameters are both at
    their initial values (a model nobody trained), when the doctor did not train it."""
    if probe.trained:
        return []
    return [
        layer
        for layer in probe.layers.values()
        if layer.is_batchnorm and layer.at_init and not layer.affine_moved and called(probe, layer.path)
    ]


def divergence(probe: ProbeResult) -> dict[str, float] | None:
    """Share of samples whose class differs between train-mode and eval-mode BN."""
    if probe.train_pred is None or probe.eval_pred is None:
        return None
    if probe.train_pred.shape != probe.eval_pred.shape:
        return None
    result = {
        "differ": float(np.mean(probe.train_pred != probe.eval_pred)),
        "samples": int(probe.train_pred.size),
    }
    if probe.labels is not None and probe.labels.size == probe.train_pred.size:
        labels = probe.labels.reshape(probe.train_pred.shape)
        result["acc_train"] = float(np.mean(probe.train_pred == labels))
        result["acc_eval"] = float(np.mean(probe.eval_pred == labels))
    return result


def divergence_line(div: dict[str, float], when: str = "") -> str:
    line = f"train vs eval mode{when}: {div['differ']:.1%} of {div['samples']} probe predictions differ"
    if "acc_train" in div:
        line += f"; accuracy {div['acc_train']:.3f} (train mode) vs {div['acc_eval']:.3f} (eval mode)"
    return line


def settings(layer: LayerInfo) -> str:
    """``momentum=0.1, eps=1e-05`` in the layer's own convention."""
    rate = "None" if layer.rate is None else number(layer.rate)
    return f"{layer.rate_name}={rate}, eps={number(layer.eps)}"


def share_moved(layer: LayerInfo, updates: int) -> float | None:
    """How far ``updates`` exponential-average updates move ``layer``'s running statistics
    from where they started towards the data's: ``1 - (1 - momentum) ** updates``, with
    momentum the weight of the NEW batch (the layer's own rate read in its framework's
    convention: Chainer's decay, Keras's and Flax's momentum weight the old value).

    None for PyTorch's cumulative average (momentum None), which is exact after any
    number of updates."""
    if layer.rate is None:
        return None
    momentum = to_torch_momentum(layer.framework, layer.rate) if layer.framework in CONVENTIONS else layer.rate
    return 1.0 - (1.0 - momentum) ** max(updates, 0)
