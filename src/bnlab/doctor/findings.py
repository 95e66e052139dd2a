"""Findings and reports: plain data, rendered as text or JSON.

A :class:`Report` is what ``bnlab doctor`` returns: the findings plus the context
needed to read them (which model, which probe, which BN layers were seen).
Everything stored here is JSON-compatible (numbers are cleaned on construction),
so ``Report.from_json(report.to_json()) == report`` holds.
"""

from __future__ import annotations

import html
import json
import math
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from bnlab.doctor.listing import grouped_places, layer_calls, name_list
from bnlab.jsonsafe import json_safe as clean  # the one JSON sanitizer, shared with the reports

SEVERITIES = ("error", "warning", "info")
_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}

# The least severe finding that makes the exit status 1 ("never": always 0).
FailOn = Literal["error", "warning", "info", "never"]
FAIL_ON: tuple[str, ...] = get_args(FailOn)


def number(value: float | None) -> str:
    """A setting as people write it: ``0.1``, not ``0.09999999999999998`` (``1 - 0.9``).

    Rounded to 12 significant digits, then Python's shortest repr (``1e-05``, ``0.9``).
    """
    if value is None:
        return "None"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    rounded = float(f"{value:.12g}")
    return str(int(rounded)) if rounded.is_integer() and abs(rounded) < 1e15 else repr(rounded)


@dataclass
class Finding:
    """One problem (or remark) about one place in the model.

    ``check`` is a stable id (``shared-bn``, ``stale-stats``...); ``where`` the dotted
    module path; ``sites`` the call sites (``"call 1 after l1"``) when they matter;
    ``evidence`` human-readable lines backed by the numbers in ``data``.
    ``definitions`` (``{"layer", "file", "line"}``) and ``call_sites`` (``{"site", "file",
    "line"}``) are the lines of code behind ``where`` and ``sites``, where known; a
    ``"library"`` key marks a line in an installed package rather than the user's files.
    """

    check: str
    severity: str
    title: str
    where: str
    sites: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    consequence: str = ""
    fix: str = ""
    fix_code: str = ""
    definitions: list[dict[str, Any]] = field(default_factory=list)
    call_sites: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.severity not in _RANK:
            raise ValueError(f"severity must be one of {SEVERITIES}, not {self.severity!r}")
        self.sites = [str(site) for site in self.sites]
        self.definitions = clean(self.definitions)
        self.call_sites = clean(self.call_sites)
        self.evidence = [str(line) for line in self.evidence]
        self.data = clean(self.data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(**data)


@dataclass
class Report:
    """The doctor's verdict on one model: findings, most severe first."""

    findings: list[Finding] = field(default_factory=list)
    model: str = ""
    framework: str = ""
    probe: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fail_on: FailOn = "error"

    def __post_init__(self) -> None:
        if self.fail_on not in FAIL_ON:
            raise ValueError(f"fail_on must be one of {FAIL_ON}, not {self.fail_on!r}")
        # Stable order: severity, then place, so reports diff cleanly between runs.
        self.findings = sorted(self.findings, key=lambda f: (_RANK[f.severity], f.where, f.check))
        self.probe = clean(self.probe)
        self.summary = clean(self.summary)
        self.notes = [str(note) for note in self.notes]

    # -- queries -------------------------------------------------------------
    def by_severity(self, severity: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.severity == severity]

    def by_check(self, check: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.check == check]

    @property
    def errors(self) -> list[Finding]:
        return self.by_severity("error")

    @property
    def warnings(self) -> list[Finding]:
        return self.by_severity("warning")

    def exit_status(self, fail_on: FailOn = "error") -> int:
        """1 when any finding is at least as severe as ``fail_on``, else 0 (``"never"``: 0)."""
        if fail_on == "never":
            return 0
        return 1 if any(_RANK[f.severity] <= _RANK[fail_on] for f in self.findings) else 0

    @property
    def exit_code(self) -> int:
        """The CLI's exit status: :meth:`exit_status` at this report's ``fail_on``
        (by default 1 when any finding is an error, else 0)."""
        return self.exit_status(self.fail_on)

    # -- JSON ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "framework": self.framework,
            "probe": self.probe,
            "summary": self.summary,
            "notes": list(self.notes),
            "fail_on": self.fail_on,
            "exit_code": self.exit_code,
            "findings": [finding.to_dict() for finding in self.findings],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        return cls(
            findings=[Finding.from_dict(item) for item in data.get("findings", [])],
            model=data.get("model", ""),
            framework=data.get("framework", ""),
            probe=data.get("probe", {}),
            summary=data.get("summary", {}),
            notes=data.get("notes", []),
            fail_on=data.get("fail_on", "error"),
        )

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))

    # -- text ----------------------------------------------------------------
    def to_text(self, width: int = 88) -> str:
        return render_text(self, width)

    def __str__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        """The report in a Jupyter notebook (escaped HTML, no scripts, no external files)."""
        return render_html(self)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _header(report: Report) -> list[str]:
    probe = report.probe
    line = f"bnlab doctor: {report.model or 'model'} ({report.framework or '?'})"
    lines = [line]
    if probe:
        shape = "x".join(str(d) for d in probe.get("input_shape", []))
        source = probe.get("source", "")
        text = f"probe: {shape} {source}".rstrip()
        steps = probe.get("train_steps", 0)
        if steps:
            where = probe.get("trained_where") or "on a copy of the model"
            text += f"; checked after {steps} training steps {where}"
            if probe.get("loss_first") is not None and probe.get("loss_last") is not None:
                text += f" (loss {probe['loss_first']:.3f} -> {probe['loss_last']:.3f})"
        lines.append(text)
    layers = report.summary.get("layers", [])
    if layers:
        lines.append(f"normalization layers: {layer_calls(layers)}")
    agreement = report.summary.get("train_eval")
    if agreement and agreement.get("differ") is not None:
        text = f"train vs eval mode: {agreement['differ']:.1%} of predictions differ"
        if agreement.get("acc_train") is not None:
            text += f"; accuracy {agreement['acc_train']:.3f} (train mode) vs {agreement['acc_eval']:.3f} (eval mode)"
        lines.append(text)
    counts = [_count(len(report.by_severity(name)), name) for name in SEVERITIES]
    lines.append(", ".join(counts) + f" -> exit {report.exit_code}")
    return lines


def _wrap(label: str, text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=f"  {label}: ", subsequent_indent="    ")


def code_places(finding: Finding) -> list[tuple[str, str]]:
    """(``file:line``, what is there) for each known line of a finding: the layers'
    creation lines, then the call sites. Lines in an installed library say so."""
    places = []
    for item in finding.definitions:
        places.append((item, f"{item['layer']} created"))
    for item in finding.call_sites:
        places.append((item, item["site"]))
    shown = []
    for item, what in places:
        file = item["file"]
        if item.get("library"):  # from the package's folder on: the site-packages path is noise
            file = "/".join(_after_site_packages(file.replace("\\", "/").split("/")))
            what += f" (in {item['library']}, not your files)"
        shown.append((f"{file}:{item['line']}", what))
    return shown


def _after_site_packages(parts: list[str]) -> list[str]:
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return parts[len(parts) - parts[::-1].index(marker) :]
    return parts


def _code_lines(finding: Finding) -> list[str]:
    """``code: model.py:19: bn created`` lines: clickable in editors and terminals."""
    places = grouped_places(code_places(finding))
    return [f"  {'code:' if i == 0 else '     '} {place}: {what}" for i, (place, what) in enumerate(places)]


def _render_finding(finding: Finding, width: int) -> list[str]:
    lines = [f"{finding.severity.upper()} [{finding.check}] {finding.title}"]
    where = name_list(finding.where.split(", "))  # checks join layer paths with ", "
    if finding.sites:
        where += " -- " + "; ".join(finding.sites)
    lines += _wrap("where", where, width)
    lines += _code_lines(finding)
    if finding.evidence:
        lines.append("  evidence:")
        for item in finding.evidence:
            lines += textwrap.wrap(item, width=width, initial_indent="    - ", subsequent_indent="      ")
    if finding.consequence:
        lines += _wrap("consequence", finding.consequence, width)
    if finding.fix:
        lines += _wrap("fix", finding.fix, width)
    if finding.fix_code:
        lines += ["      " + code for code in finding.fix_code.splitlines()]
    return lines


ALIKE = 4  # this many findings differing only in their layer are printed once in the text


def _alike_once(findings: list[Finding]) -> list[tuple[Finding, list[Finding]]]:
    """Each finding with the later ones it repeats for other layers (same check, severity,
    consequence and fix: ``small-batch`` on each of 53 BN layers), when there are at least
    ``ALIKE`` of them; the first stands for all, where it stood."""
    groups: dict[tuple[str, ...], list[Finding]] = {}
    for finding in findings:
        key = (finding.check, finding.severity, finding.consequence, finding.fix, finding.fix_code)
        groups.setdefault(key, []).append(finding)
    shown: list[tuple[Finding, list[Finding]]] = []
    for finding in findings:
        group = groups[(finding.check, finding.severity, finding.consequence, finding.fix, finding.fix_code)]
        if len(group) < ALIKE:
            shown.append((finding, []))
        elif finding is group[0]:
            shown.append((finding, group[1:]))
    return shown


def render_text(report: Report, width: int = 88) -> str:
    """The report as it is printed by ``bnlab doctor``."""
    lines = [
        wrapped for line in _header(report) for wrapped in textwrap.wrap(line, width=width, subsequent_indent="  ")
    ]
    for finding, alike in _alike_once(report.findings):
        lines.append("")
        lines += _render_finding(finding, width)
        if alike:
            text = f"the same for {len(alike)} more: {name_list([f.where for f in alike])} (the JSON lists each)"
            lines += _wrap("also", text, width)
    if report.notes:
        lines.append("")
        lines.append("notes:")
        for note in report.notes:
            lines += textwrap.wrap(note, width=width, initial_indent="  - ", subsequent_indent="    ")
    if not report.findings:
        lines.append("")
        lines.append("no batch-normalization problems found.")
    return "\n".join(lines) + "\n"


_COLOURS = {"error": "#b00020", "warning": "#a15c00", "info": "#2f5f8a"}


def _html_finding(finding: Finding) -> str:
    esc = html.escape
    colour = _COLOURS[finding.severity]
    parts = [
        f'<div style="border-left:4px solid {colour};padding:2px 10px;margin:10px 0">',
        f'<div><b style="color:{colour}">{esc(finding.severity.upper())}</b> '
        f"<code>[{esc(finding.check)}]</code> {esc(finding.title)}</div>",
    ]
    where = finding.where + (" -- " + "; ".join(finding.sites) if finding.sites else "")
    parts.append(f"<div><i>where</i>: <code>{esc(where)}</code></div>")
    for place, what in code_places(finding):
        parts.append(f"<div><i>code</i>: <code>{esc(place)}</code> {esc(what)}</div>")
    if finding.evidence:
        items = "".join(f"<li>{esc(item)}</li>" for item in finding.evidence)
        parts.append(f'<div><i>evidence</i>:<ul style="margin:2px 0">{items}</ul></div>')
    for label, text in (("consequence", finding.consequence), ("fix", finding.fix)):
        if text:
            parts.append(f"<div><i>{label}</i>: {esc(text)}</div>")
    if finding.fix_code:
        parts.append(f'<pre style="margin:4px 0 4px 12px">{esc(finding.fix_code)}</pre>')
    parts.append("</div>")
    return "".join(parts)


def render_html(report: Report) -> str:
    """The report as an HTML fragment (what a notebook shows for a Report)."""
    esc = html.escape
    header = _header(report)
    parts = [
        '<div class="bnlab-doctor-report" style="font-family:sans-serif;max-width:60em">',
        f'<h4 style="margin:4px 0">{esc(header[0])}</h4>',
    ]
    parts += [f"<div>{esc(line)}</div>" for line in header[1:]]
    parts += [_html_finding(finding) for finding in report.findings]
    if report.notes:
        items = "".join(f"<li>{esc(note)}</li>" for note in report.notes)
        parts.append(f"<div><i>notes</i>:<ul>{items}</ul></div>")
    if not report.findings:
        parts.append("<div><b>no batch-normalization problems found.</b></div>")
    parts.append("</div>")
    return "\n".join(parts)
