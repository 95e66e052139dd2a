"""``fail_on`` of the doctor's training callbacks (Lightning, Keras): which findings turn
the report at the end of fit into an exception."""

from __future__ import annotations

from typing import Literal

from bnlab.doctor.findings import Report

FailOn = Literal["error", "warning"] | None
_SEVERITIES: dict[FailOn, tuple[str, ...]] = {None: (), "error": ("error",), "warning": ("error", "warning")}


class BNDoctorFailed(RuntimeError):
    """Raised after fit when the report has findings at or above ``fail_on``."""

    def __init__(self, report: Report) -> None:
        worst = report.findings[0]
        super().__init__(
            f"bnlab doctor found {len(report.errors)} error(s) and {len(report.warnings)} "
            f"warning(s) in the batch normalization of {report.model}; the first: "
            f"[{worst.check}] {worst.title}. The full report is in callback.report."
        )
        self.report = report


def checked(fail_on: object) -> FailOn:
    """``fail_on`` as given, once known to be one of None, "error", "warning"."""
    if fail_on not in _SEVERITIES:
        raise ValueError(f"fail_on must be None, 'error' or 'warning', not {fail_on!r}")
    return fail_on


def raise_if_failed(report: Report | None, fail_on: FailOn) -> None:
    """BNDoctorFailed when ``report`` has a finding at or above ``fail_on``."""
    if report is not None and any(f.severity in _SEVERITIES[fail_on] for f in report.findings):
        raise BNDoctorFailed(report)
