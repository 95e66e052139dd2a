"""Lines of code on probe records and on findings (framework-free).

:func:`attach` gives a probe's layers the lines where they were created, and its calls
the lines of a Keras functional model's graph (recorded by
:mod:`bnlab.doctor.locations` while the model was built). :func:`annotate` copies the
lines onto the findings: ``definitions`` per layer named in ``where``, ``call_sites`` per
site in ``sites``.
"""

from __future__ import annotations

from typing import Any

from bnlab.doctor.findings import Finding
from bnlab.doctor.locations import SourceLocation, applied_at, created_at
from bnlab.doctor.records import CallRecord, ProbeResult


def _graph_lines(calls: list[CallRecord], applied: list[tuple[SourceLocation | None, str | None]]) -> None:
    """Give calls without a line the line of their application in a functional graph:
    the one whose input came from the same producer, else the next in order."""
    unused = list(applied)
    for call in calls:
        if call.location is not None or not unused:
            continue
        producer = (call.producer or "").rpartition(".")[2]
        match = next((entry for entry in unused if producer and entry[1] == producer), unused[0])
        unused.remove(match)
        call.location = match[0]


def attach(result: ProbeResult, layers: dict[str, Any]) -> None:
    """Note on ``result`` (and the observations it holds of the model as handed over)
    where each layer of the user's model was created; ``layers`` maps the probe's layer
    paths to the user's layer objects (not the doctor's copies)."""
    for probe in (result, result.given):
        if probe is None:
            continue
        for path, info in probe.layers.items():
            layer = layers.get(path)
            if layer is None:
                continue
            info.defined = created_at(layer)
            _graph_lines(probe.calls_of(path), applied_at(layer))


def _layers(where: str) -> list[str]:
    return [part.strip() for part in where.split(",") if part.strip()]


def _site_call(site: str, calls: list[CallRecord]) -> CallRecord | None:
    """The call a finding's site names: ``"call 2 after l2"``, or ``"after l2"``."""
    for call in calls:
        if site in (f"call {call.index} {call.site}", call.site):
            return call
    return None


def annotate(findings: list[Finding], probe: ProbeResult) -> None:
    """Put the creation line of each layer in ``where`` and the line of each site on the
    findings (those the probe has lines for)."""
    for finding in findings:
        paths = [path for path in _layers(finding.where) if path in probe.layers]
        finding.definitions = [
            {"layer": path, **defined.to_dict()}
            for path in paths
            if (defined := probe.layers[path].defined) is not None
        ]
        calls = [call for path in paths for call in probe.calls_of(path)]
        sites = []
        for site in finding.sites:
            call = _site_call(site, calls)
            if call is not None and call.location is not None:
                sites.append({"site": site, **call.location.to_dict()})
        finding.call_sites = sites
