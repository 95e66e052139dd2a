"""``fail_on`` of the doctor's training callbacks (Lightning, Keras): which findings turn
the report at the end of fit into an exception."""

from __future__ import annotations

from typing import Literal

from bnlab.doctor.findings import Report

FailOn = Literal["error", "warning"] | None
_SEVERITIES: dict[FailOn, tuple[str, ...]] = {None: (), "error": ("error",), "warning": ("error", "warning")}


class BNDoctorFailed(RuntimeError):
    """Raised after fit when the report has findings at or above ``fail_on``."""

    def __init__(self, report: Report, *, other_ranks: list[int] | None = None) -> None:
        if other_ranks:  # a multi-process job: this rank stops with the ranks that found something
            message = (
                f"bnlab doctor: rank(s) {', '.join(map(str, other_ranks))} of this job found batch "
                f"normalization problems at the fail_on level in {report.model}, so every rank stops "
                "(none is left waiting for the others). This rank's report is in callback.report; "
                "rank 0 printed its own."
            )
        else:
            worst = report.findings[0]
            message = (
                f"bnlab doctor found {len(report.errors)} error(s) and {len(report.warnings)} "
                f"warning(s) in the batch normalization of {report.model}; the first: "
                f"[{worst.check}] {worst.title}. The full report is in callback.report."
            )
        super().__init__(message)
        self.report = report


def checked(fail_on: object) -> FailOn:
    """``fail_on`` as given, once known to be one of None, "error", "warning"."""
    if fail_on not in _SEVERITIES:
        raise ValueError(f"fail_on must be None, 'error' or 'warning', not {fail_on!r}")
    return fail_on


def fails(report: Report | None, fail_on: FailOn) -> bool:
    """Whether ``report`` has a finding at or above ``fail_on``."""
    return report is not None and any(f.severity in _SEVERITIES[fail_on] for f in report.findings)


def raise_if_failed(report: Report | None, fail_on: FailOn) -> None:
    """BNDoctorFailed when ``report`` has a finding at or above ``fail_on``."""
    if report is not None and fails(report, fail_on):
        raise BNDoctorFailed(report)
