"""A doctor report as SARIF 2.1.0, the format code-scanning pages read.

One rule per registered check (its one-line summary, its module's docstring as help),
one result per finding: the level (``info`` is SARIF's ``note``), a message, and a
physical location (file relative to the working directory, start line) for each call
site; the creation line of each layer is a related location (the primary one when the
finding names no call site). A finding without any line in the user's files points at
the model file, when it is known, without a line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bnlab.doctor import registry
from bnlab.doctor.findings import Finding, Report

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_LEVELS = {"error": "error", "warning": "warning", "info": "note"}
_BASE = "%SRCROOT%"


def _help(spec: registry.CheckSpec) -> str:
    """The check module's docstring (why it matters), or its summary."""
    module = sys.modules.get(spec.module)
    doc = (getattr(module, "__doc__", None) or "").strip()
    return " ".join(doc.split()) if doc else spec.summary


def _rule(spec: registry.CheckSpec) -> dict[str, Any]:
    return {
        "id": spec.id,
        "name": "".join(part.capitalize() for part in spec.id.split("-")),
        "shortDescription": {"text": spec.summary},
        "fullDescription": {"text": _help(spec)},
        "help": {"text": _help(spec)},
        "defaultConfiguration": {"level": _LEVELS[spec.severity]},
    }


def _uri(file: str) -> tuple[str, str | None]:
    """(uri, uriBaseId): relative files against the working directory, others absolute."""
    path = Path(file)
    if path.is_absolute():
        return path.as_uri(), None
    return path.as_posix(), _BASE


def _location(item: dict[str, Any] | None, file: str, where: str, text: str, ident: int | None = None) -> dict:
    uri, base = _uri(file)
    artifact: dict[str, Any] = {"uri": uri}
    if base is not None:
        artifact["uriBaseId"] = base
    physical: dict[str, Any] = {"artifactLocation": artifact}
    if item is not None:
        physical["region"] = {"startLine": int(item["line"])}
    location: dict[str, Any] = {"physicalLocation": physical, "message": {"text": text}}
    if where:
        location["logicalLocations"] = [{"fullyQualifiedName": where, "kind": "member"}]
    if ident is not None:
        location["id"] = ident
    return location


def _message(finding: Finding) -> str:
    parts = [f"{finding.title}."]
    if finding.sites:
        parts.append(f"Where: {finding.where} -- {'; '.join(finding.sites)}.")
    if finding.consequence:
        parts.append(finding.consequence)
    if finding.fix:
        parts.append(f"Fix: {finding.fix}")
    return " ".join(parts)


def _result(finding: Finding, rule_index: int, target_file: str | None) -> dict[str, Any]:
    # Lines inside installed libraries are not in the scanned repository: related only.
    sites = [item for item in finding.call_sites if not item.get("library")]
    defined = finding.definitions
    locations = [_location(item, item["file"], finding.where, item["site"]) for item in sites]
    related = [
        _location(item, item["file"], item["layer"], f"{item['layer']} is created here", ident)
        for ident, item in enumerate(defined)
    ]
    if not locations:
        primary = [item for item in defined if not item.get("library")]
        locations = [
            _location(item, item["file"], item["layer"], f"{item['layer']} is created here") for item in primary
        ]
        related = [] if primary else related
    if not locations and target_file:
        locations = [_location(None, target_file, finding.where, "the model file")]
    result: dict[str, Any] = {
        "ruleId": finding.check,
        "ruleIndex": rule_index,
        "level": _LEVELS[finding.severity],
        "message": {"text": _message(finding)},
        "locations": locations,
        "properties": {"where": finding.where, "sites": finding.sites, "evidence": finding.evidence},
    }
    if related:
        result["relatedLocations"] = related
    return result


def to_sarif(report: Report, *, target_file: str | None = None, tool_version: str = "") -> dict[str, Any]:
    """``report`` as a SARIF 2.1.0 log (a JSON-able dict); ``target_file`` (the model's
    file, relative to the working directory) locates findings that have no line."""
    specs = sorted(registry.all_checks(), key=lambda spec: spec.id)
    index = {spec.id: i for i, spec in enumerate(specs)}
    driver: dict[str, Any] = {
        "name": "bnlab doctor",
        "rules": [_rule(spec) for spec in specs],
    }
    if tool_version:
        driver["version"] = tool_version
    run = {
        "tool": {"driver": driver},
        "originalUriBaseIds": {_BASE: {"uri": Path.cwd().as_uri() + "/"}},
        "results": [_result(finding, index[finding.check], target_file) for finding in report.findings],
        "properties": {"model": report.model, "framework": report.framework, "exitCode": report.exit_code},
    }
    return {"$schema": SCHEMA, "version": "2.1.0", "runs": [run]}
