"""From a probe to a report: every registered check, plus the numbers behind them."""

from __future__ import annotations

from typing import Any

from bnlab.doctor import registry, source_lines
from bnlab.doctor.backend import Fixes
from bnlab.doctor.facts import divergence, tracked, vs_running
from bnlab.doctor.findings import Report
from bnlab.doctor.records import ProbeResult


def _setting(value: float | None) -> float | None:
    """A setting to 12 significant digits: ``1 - 0.9`` is reported as 0.1."""
    return None if value is None else float(f"{value:.12g}")


def summary(probe: ProbeResult) -> dict[str, Any]:
    """Per-layer facts (calls, settings, distance of each call site from the running
    statistics) and the train/eval agreement: the numbers behind a clean report too."""
    layers = []
    for path, layer in probe.layers.items():
        calls = probe.calls_of(path)
        sites = []
        for call in calls:
            dist = vs_running(call, layer) if tracked(layer) else None
            sites.append(
                {"site": call.site, "values_per_channel": call.values_per_channel, **(dist.as_dict() if dist else {})}
            )
        layers.append(
            {
                "path": path,
                "kind": layer.kind,
                "calls": len(calls) or probe.eval_calls.get(path, 0),
                layer.rate_name: _setting(layer.rate),
                "eps": _setting(layer.eps),
                "tracks_running_stats": layer.tracks_running_stats,
                "at_init": layer.at_init,
                "sites": sites,
            }
        )
    result: dict[str, Any] = {"layers": layers}
    div = divergence(probe)
    if div is not None:
        result["train_eval"] = div
    if probe.given is not None:
        given = divergence(probe.given)
        if given is not None:
            result["train_eval_given"] = given
    if probe.output_diff is not None:
        result["output_diff"] = probe.output_diff
    return result


def run_checks(probe: ProbeResult, fixes: Fixes, source: str = "") -> Report:
    """All registered checks on one probe, as a report; ``fixes``: the code sketches of
    the probed model's framework (``Backend.fixes``)."""
    findings = registry.run_all(probe, fixes)
    source_lines.annotate(findings, probe)
    log = probe.train_log
    probe_info: dict[str, Any] = {
        "input_shape": list(probe.input_shape),
        "source": source,
        "samples": probe.input_shape[0] if probe.input_shape else None,
        "train_steps": log.steps if log else 0,
    }
    if log is not None and log.steps:
        probe_info["loss_first"] = log.loss_first
        probe_info["loss_last"] = log.loss_last
        probe_info["trained_where"] = log.where
    if probe.output_note:
        probe_info["output"] = probe.output_note
    notes = list(probe.notes)
    if not probe.layers:
        notes.append(
            "the model has no BatchNorm/InstanceNorm layers (LayerNorm and GroupNorm keep no "
            "running statistics, so there is nothing here for the doctor to check)"
        )
    return Report(
        findings=findings,
        model=probe.model_name,
        framework=probe.framework,
        probe=probe_info,
        summary=summary(probe),
        notes=notes,
    )
