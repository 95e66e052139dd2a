"""The registry of checks: each check declared once, with its id, severity and function.

A check is a function of a :class:`Context` (the probe, and for phase-1 checks the
findings of phase 0) returning findings, registered with :func:`register`::

    @register("shared-bn", "error", "a stateful BN called more than once per pass")
    def check_shared(ctx: Context) -> list[Finding]: ...

``severity`` is the most severe level the check reports (a check may report less, never
more, and only findings carrying its own id). Checks live one per module in the package
:mod:`bnlab.doctor.checks`; every module there is imported by :func:`all_checks`, so
adding a check is adding a module (and its test) -- nothing else to edit.

Phase 0 checks read only the probe. Phase 1 checks interpret the findings of phase 0
(train/eval divergence is reported under the finding that explains it).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

from bnlab.doctor.backend import Fixes
from bnlab.doctor.findings import SEVERITIES, Finding
from bnlab.doctor.records import ProbeResult

_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}


@dataclass
class Context:
    """What a check reads: the probe, the framework's code sketches for its fixes and,
    in phase 1, the findings so far."""

    probe: ProbeResult
    fixes: Fixes
    findings: list[Finding] = field(default_factory=list)


CheckFn = Callable[[Context], list[Finding]]


@dataclass(frozen=True)
class CheckSpec:
    id: str  # stable, in reports and JSON ("shared-bn")
    severity: str  # the most severe level the check reports
    summary: str  # one line for the docs
    run: CheckFn
    phase: int = 0
    module: str = ""


_CHECKS: dict[str, CheckSpec] = {}


def register(id: str, severity: str, summary: str, *, phase: int = 0) -> Callable[[CheckFn], CheckFn]:
    """Declare a check (a decorator); the id must be new."""
    if severity not in _RANK:
        raise ValueError(f"severity must be one of {SEVERITIES}, not {severity!r}")

    def add(fn: CheckFn) -> CheckFn:
        existing = _CHECKS.get(id)
        if existing is not None and existing.module != fn.__module__:
            raise ValueError(f"check id {id!r} is declared twice ({existing.module}, {fn.__module__})")
        _CHECKS[id] = CheckSpec(id, severity, summary, fn, phase, fn.__module__)
        return fn

    return add


_loaded = False


def all_checks() -> list[CheckSpec]:
    """Every check, in a stable order (phase, then module, then id)."""
    global _loaded
    if not _loaded:
        from bnlab.doctor import checks

        for info in pkgutil.iter_modules(checks.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{checks.__name__}.{info.name}")
        _loaded = True
    return sorted(_CHECKS.values(), key=lambda spec: (spec.phase, spec.module, spec.id))


def check_ids() -> list[str]:
    """The ids of every check (what ``Finding.check`` can be)."""
    return sorted(spec.id for spec in all_checks())


def get(id: str) -> CheckSpec:
    for spec in all_checks():
        if spec.id == id:
            return spec
    raise KeyError(id)


def _validated(spec: CheckSpec, findings: list[Finding]) -> list[Finding]:
    for finding in findings:
        if finding.check != spec.id or _RANK[finding.severity] < _RANK[spec.severity]:
            raise RuntimeError(  # a bug in the check, not in the user's model
                f"check {spec.id!r} ({spec.module}) reported {finding.check!r}/"
                f"{finding.severity}; it may report only {spec.id!r}, at most {spec.severity}"
            )
    return findings


def run_all(probe: ProbeResult, fixes: Fixes) -> list[Finding]:
    """The findings of every registered check on ``probe`` (fix sketches from ``fixes``)."""
    ctx = Context(probe, fixes)
    for phase in sorted({spec.phase for spec in all_checks()}):
        found = [finding for spec in all_checks() if spec.phase == phase for finding in _validated(spec, spec.run(ctx))]
        ctx.findings.extend(found)
    return ctx.findings


def markdown_table() -> str:
    """The list of checks as a Markdown table (docs/doctor-json.md carries this)."""
    lines = ["| check id | at most | what it finds |", "|---|---|---|"]
    for spec in sorted(all_checks(), key=lambda s: s.id):
        lines.append(f"| `{spec.id}` | {spec.severity} | {spec.summary} |")
    return "\n".join(lines)
