"""``compare``: the whole job of ``bnlab compare`` as one call -- plan a sweep, train it
(resuming, under the lock on OUT), then write its report (``bnlab.report``, or
``bnlab.grid_report`` for a grid). It sits above the sweep and both reports, so that neither
the sweep nor a report imports the other (``bnlab.compare`` is this function).
"""

from __future__ import annotations

import os
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

# Through the module: tests put an in-process executor in place of sweep.LocalProcessExecutor.
from bnlab import sweep
from bnlab.errors import OutputError, UsageError
from bnlab.rundir import RUN_COMPLETE, RunLock
from bnlab.sweep import DEFAULT_THREADS_PER_WORKER, EventHandler, Executor, RunOutcome, RunSpec

if typing.TYPE_CHECKING:
    from bnlab.grid import GridAxis
    from bnlab.grid_report import ExtraResult, GridReport
    from bnlab.report import Report

ExtraResults = Callable[[list[RunSpec], list[RunOutcome]], list["ExtraResult"]]


def compare(
    presets: Sequence[str],
    seeds: Sequence[int],
    out: str | os.PathLike,
    overrides: dict[str, typing.Any] | None = None,
    *,
    dataset: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    threads: int = DEFAULT_THREADS_PER_WORKER,
    executor: Executor | None = None,
    on_event: EventHandler | None = None,
    on_stage: Callable[[str], None] | None = None,
    on_plan: Callable[[list[RunSpec]], None] | None = None,
    grid: Sequence[GridAxis] = (),
    extra_results: ExtraResults | None = None,
) -> tuple[list[RunOutcome], Report | GridReport]:
    """Plan, train (resuming) and report one sweep: every preset x grid point x seed into
    OUT/runs, the report into OUT/report (``bnlab.grid_report`` for a grid). Returns the
    outcomes (in plan order) and the report.

    One process owns OUT at a time: a second one stops at once with a message naming the
    first. The report is written even when some runs failed; it lists them with their
    reasons. ``on_plan`` receives every planned spec before anything trains; ``on_stage``
    hears what is happening between the epochs ("checking the data", "building the report").
    ``extra_results(specs, outcomes)`` (grids only) runs under the lock after training and
    returns more results for the grid report (the sharing study's repaired models).
    """
    from bnlab.engines import check_config
    from bnlab.engines.common import load_data

    stage = on_stage or (lambda text: None)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; give a folder for the sweep.")
    specs = sweep.plan_sweep(
        presets, seeds, out, {**(overrides or {}), "threads": threads}, dataset=dataset, data_dir=data_dir, grid=grid
    )
    with RunLock(out, "sweep directory"):
        pending = [s for s in specs if sweep.finished_outcome(s) is None]
        for spec in pending[:1]:
            check_config(spec.config)  # a missing framework or device is said once, before any worker
        if executor is None:
            executor = sweep.LocalProcessExecutor(workers, threads)
        if pending:
            stage(f"checking the {dataset} files")
            load_data(dataset, data_dir)  # find, verify or download once, before any worker starts
            cached = len(specs) - len(pending)
            stage(f"training {len(pending)} run(s)" + (f"; {cached} finished earlier" if cached else ""))
            workers_started = getattr(executor, "workers", None)  # local worker processes, if any
            if isinstance(workers_started, int):
                n = min(workers_started, len(pending))
                stage(
                    f"starting {n} worker process{'es' if n > 1 else ''} (each imports torch and reads the "
                    "data before its first epoch)"
                )
        if on_plan is not None:
            on_plan(specs)
        outcomes = sweep.run_sweep(specs, executor, on_event)
        extra = extra_results(specs, outcomes) if extra_results is not None and grid else []
        started = time.perf_counter()
        stage("building the report")
        report: Report | GridReport
        try:
            if grid:
                from bnlab.grid_report import build_grid_report

                report = build_grid_report(specs, outcomes, grid, out / "report", extra=extra)
            else:
                from bnlab.report import build_report

                report = build_report(
                    [s.run_dir for s in specs],
                    out / "report",
                    outcomes=outcomes,
                    on_step=lambda text: stage(f"report: {text}"),
                )
        except OutputError as err:
            done = sum(o.status == RUN_COMPLETE for o in outcomes)
            raise OutputError(
                f"the report could not be written: {err} The runs are saved ({done} of "
                f"{len(outcomes)} complete, in {out / 'runs'}); make room and rerun the same "
                "command: finished runs are not trained again, only the report is built."
            ) from None
        stage(f"report built in {time.perf_counter() - started:.1f} s")
    return outcomes, report
