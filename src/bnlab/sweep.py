"""Sweeps: many runs (presets x grid points x seeds), planned, resumed, executed in
parallel, with progress from structured per-epoch events.

A sweep trains every (preset, seed) pair into OUT/runs/PRESET/seedN/, and with a grid
(``bnlab.grid``) every (preset, point, seed) into OUT/runs/PRESET/POINT/seedN/, e.g.
OUT/runs/question/bn_momentum-0.01__batch_size-100/seed0. ``plan_sweep`` turns names,
grid axes and seeds into RunSpecs; ``run_sweep`` skips the runs already finished on disk and
hands the rest to an Executor, which reports progress as SweepEvents and returns one
RunOutcome per spec. ``bnlab.comparison.compare`` is the whole job (plan, train, report)
as one call, above this module and the reports. One process owns a sweep directory at a time
(a lock on OUT).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bnlab.config import DatasetName, EpochRecord, RunConfig, apply_overrides, config_differences, overrides_field
from bnlab.errors import BnlabError, InputError, UsageError
from bnlab.grid import GridAxis, GridPoint, check_axes, grid_points, point_label, point_name, point_overrides
from bnlab.presets import ALL_PRESETS, get_preset
from bnlab.rundir import (
    FINISHED_STATUSES,
    RUN_COMPLETE,
    RUN_DIVERGED,
    RUN_FAILED,
    RunInUse,
    RunRecorder,
    clear_run_files,
    read_run,
    safe_name,
)

# Measured on the 2-core development machine (shared with other jobs), training time of
# run_sweep over question and answer x seeds 0-1 at 20 epochs (4 full-size runs), two
# alternating rounds: 2 workers x 1 thread 25.4 s and 23.2 s, 1 worker x 2 threads 28.1 s
# and 33.0 s (9.5-10.4 against 7.3-8.5 runs a minute). The whole `bnlab compare` of the same
# runs at 10 epochs took 25.7 s against 41.2 s. The matrices are small (784-100-100-10, batch
# 1000), so a second thread inside a run buys little and suffers most when cores are busy,
# while a second process doubles the work in flight: one worker per core, one thread each.
DEFAULT_THREADS_PER_WORKER = 1
TRACE_CHANNELS = 4


def default_workers() -> int:
    """The CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity mask
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class RunSpec:
    """One planned run: the config to train, the directory it owns and, in a grid sweep,
    its grid point (``(("model.bn_momentum", 0.01), ("train.batch_size", 100))``)."""

    preset: str
    seed: int
    config: RunConfig
    run_dir: Path
    data_dir: Path | None = None
    grid: GridPoint = ()

    @property
    def label(self) -> str:
        point = point_label(self.grid)
        return f"{self.preset} {point} seed {self.seed}" if point else f"{self.preset} seed {self.seed}"

    def outcome(
        self, status: str, history: list[EpochRecord] | None = None, message: str = "", **extra: typing.Any
    ) -> RunOutcome:
        return RunOutcome(
            self.preset, self.seed, self.run_dir, status, list(history or []), message, label=self.label, **extra
        )


@dataclass
class RunOutcome:
    """How one run ended: status complete, diverged or failed, and its epochs."""

    preset: str
    seed: int
    run_dir: Path
    status: str
    history: list[EpochRecord] = field(default_factory=list)
    message: str = ""
    cached: bool = False  # finished by an earlier invocation and not run again
    seconds: float = 0.0  # wall time this invocation spent on it (0 when cached)
    label: str = ""  # the spec's label ("question bn_momentum=0.01 seed 0")

    def __post_init__(self) -> None:
        if not self.label:
            self.label = f"{self.preset} seed {self.seed}"

    @property
    def final_val_acc(self) -> float | None:
        return self.history[-1].val_acc if self.status == RUN_COMPLETE and self.history else None


@dataclass(frozen=True)
class SweepEvent:
    """Progress of one run: ``kind`` is "start", "epoch" (``record`` is the epoch just
    finished), "restart" (an executor lost the worker and trains the run again from epoch
    0: the epochs reported so far do not count) or "done" (``outcome`` set;
    ``outcome.cached`` when it was finished on disk already)."""

    kind: str
    spec: RunSpec
    record: EpochRecord | None = None
    outcome: RunOutcome | None = None


EventHandler = Callable[[SweepEvent], None]


class Executor(typing.Protocol):
    """Something that trains RunSpecs and reports their progress.

    ``map_runs`` trains every spec into its own ``spec.run_dir`` (by calling
    ``execute_spec``), calls ``on_event`` in the calling process for each start, finished
    epoch and end of a run, and returns one RunOutcome per spec, in the order given. A run
    that diverges or raises is an outcome (status diverged or failed), never an exception
    of ``map_runs``; a KeyboardInterrupt stops the work and propagates.

    ``LocalProcessExecutor`` uses this machine's cores. A Ray or torchrun engine plugs in
    by implementing this one method: ship each spec to a remote worker that calls
    ``execute_spec(spec, on_epoch)`` with an ``on_epoch`` that forwards epochs home, and
    let the run directories live on a file system both sides see.
    """

    def map_runs(self, run_specs: Sequence[RunSpec], on_event: EventHandler) -> list[RunOutcome]: ...


def plan_sweep(
    presets: Sequence[str],
    seeds: Sequence[int],
    out: str | os.PathLike,
    overrides: dict[str, typing.Any] | None = None,
    *,
    dataset: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    trace_bn_channels: int = TRACE_CHANNELS,
    grid: Sequence[GridAxis] = (),
) -> list[RunSpec]:
    """Every (preset, grid point, seed) run in that order, each owning
    OUT/runs/PRESET/seedN, or OUT/runs/PRESET/POINT/seedN with a grid.

    Models with batch norm record ``trace_bn_channels`` channels of their BN statistics
    (the report's picture of the shared-BN bug) unless the overrides set it themselves.
    Every config is validated here, before anything trains.
    """
    overrides = dict(overrides or {})
    check_axes(grid, {k: v for k, v in overrides.items() if k != "threads"})
    trace = {} if overrides_field(overrides, "trace_bn_channels") else {"trace_bn_channels": trace_bn_channels}
    specs: list[RunSpec] = []
    for name in presets:
        preset = get_preset(name)
        for point in grid_points(grid):
            folder = Path(out) / "runs" / name / point_name(point) if point else Path(out) / "runs" / name
            for seed in seeds:
                cfg = apply_overrides(preset.config, {**overrides, **point_overrides(point), "seed": seed})
                if cfg.model.norm != "none" or cfg.model.logits_norm:
                    cfg = apply_overrides(cfg, trace)
                cfg = dataclasses.replace(cfg, dataset=typing.cast(DatasetName, dataset))
                specs.append(
                    RunSpec(
                        name, seed, cfg, folder / f"seed{seed}", Path(data_dir) if data_dir is not None else None, point
                    )
                )
    return specs


def saved_run(spec: RunSpec) -> tuple[str | None, list[EpochRecord], str]:
    """(status, history, message) saved in the spec's run directory; (None, [], "") when
    there is none, and for a directory whose files cannot be trusted (it is re-run)."""
    try:
        run = read_run(spec.run_dir)
    except InputError:
        return None, [], ""
    if run is None or run.preset != spec.preset or run.seed != spec.seed:
        return None, [], ""
    return run.status, run.history, run.message


def finished_outcome(spec: RunSpec) -> RunOutcome | None:
    """The outcome saved in ``spec.run_dir`` if that run finished with the planned config,
    or None if it has to (re)run.

    Raises UsageError when the directory holds a finished run with other settings: results
    are never overwritten, nor reused for a different question, without the user saying so.
    """
    status, history, message = saved_run(spec)
    if status not in FINISHED_STATUSES:
        return None
    try:
        run = read_run(spec.run_dir)
        on_disk = run.run_config() if run else None
    except InputError:
        return None  # history without a readable config is not a run we can vouch for
    if on_disk is None:
        return None
    differences = config_differences(on_disk, spec.config)
    if differences:
        shown = ", ".join(differences[:6]) + (" ..." if len(differences) > 6 else "")
        raise UsageError(
            f"{spec.run_dir} already holds a finished run of {spec.label} trained with other settings "
            f"(differing: {shown}). bnlab reuses finished runs only when their settings match, and does "
            "not overwrite them: choose another --out for the new settings, or delete that directory to "
            "train it again."
        )
    return spec.outcome(status, history, message, cached=True)


def _failure_message(err: BaseException) -> str:
    """A failed run's reason: bnlab's own message as it is; anything else (a bug, or an
    error of a framework) with its type and where it was raised."""
    if isinstance(err, BnlabError):
        return str(err)
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def execute_spec(spec: RunSpec, on_epoch: Callable[[EpochRecord], None] | None = None) -> RunOutcome:
    """Train one spec from scratch into its run directory and return its outcome.

    The files an earlier attempt wrote are removed first (only bnlab's own files).
    ``on_epoch`` gets each finished epoch's record. TrainingDiverged and other exceptions
    become outcomes (diverged / failed, with the error's own message) so that one bad run
    never ends a sweep.
    """
    from bnlab.engines import train
    from bnlab.errors import TrainingDiverged

    started = time.perf_counter()
    status, message = RUN_COMPLETE, ""
    history: list[EpochRecord] = []
    try:
        clear_run_files(spec.run_dir)
        result = train(
            spec.config, data_dir=spec.data_dir, out_dir=spec.run_dir, echo=None, on_epoch=on_epoch, overwrite=True
        )
        history = result.history
    except TrainingDiverged as err:
        status, message = RUN_DIVERGED, str(err)
    except RunInUse as err:  # another process trains it: its directory is not ours to write
        status, message = RUN_FAILED, str(err)
    except Exception as err:  # noqa: BLE001 - a failed run is reported and the sweep goes on
        status, message = RUN_FAILED, _failure_message(err)
        # A run that failed before writing anything is recorded too, so that the run
        # directory itself says what happened (a rerun clears it and tries again).
        RunRecorder(spec.config, spec.run_dir, echo=None).record_failed_start(message)
    if status != RUN_COMPLETE:
        history = saved_run(spec)[1]
    return spec.outcome(status, history, message, seconds=time.perf_counter() - started)


class InlineExecutor:
    """Trains the specs one after another in this process (debugging, or callers that
    parallelize elsewhere). Ctrl-C interrupts the run in progress."""

    def map_runs(self, run_specs: Sequence[RunSpec], on_event: EventHandler) -> list[RunOutcome]:
        outcomes = []
        for spec in run_specs:
            on_event(SweepEvent("start", spec))

            def on_epoch(rec: EpochRecord, s: RunSpec = spec) -> None:
                on_event(SweepEvent("epoch", s, record=rec))

            outcome = execute_spec(spec, on_epoch)
            on_event(SweepEvent("done", spec, outcome=outcome))
            outcomes.append(outcome)
        return outcomes


def _worker_main(worker: int, tasks, events, threads: int) -> None:
    """A worker process: set up once, then train specs from ``tasks`` until a None arrives."""
    # Ctrl-C in a terminal reaches the whole process group; the parent alone decides what
    # stops, and terminates the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    if threads:
        torch.set_num_threads(threads)
    parent = multiprocessing.parent_process()

    def parent_alive() -> bool:
        return parent is None or parent.is_alive()

    while True:
        try:
            item = tasks.get(timeout=1.0)
        except queue.Empty:
            if not parent_alive():
                return
            continue
        if item is None:
            return
        index, spec = item
        events.put(("start", index, worker, None))

        def on_epoch(record: EpochRecord, index: int = index) -> None:
            if not parent_alive():  # nobody is left to use the result: stop now
                raise SystemExit(1)
            events.put(("epoch", index, worker, record))

        events.put(("done", index, worker, execute_spec(spec, on_epoch)))


class _PoolState:
    """The parent's view of the workers: which run each is on, and the outcomes so far."""

    def __init__(self, specs: list[RunSpec], on_event: EventHandler) -> None:
        self.specs = specs
        self.on_event = on_event
        self.results: dict[int, RunOutcome] = {}
        self.running: dict[int, int] = {}  # worker -> index of its run

    def all_done(self) -> bool:
        return len(self.results) == len(self.specs)

    def handle(self, message: tuple) -> None:
        kind, index, worker, payload = message
        spec = self.specs[index]
        if kind == "start":
            self.running[worker] = index
            self.on_event(SweepEvent("start", spec))
        elif kind == "epoch":
            self.on_event(SweepEvent("epoch", spec, record=payload))
        elif kind == "done":
            self.running.pop(worker, None)
            self._finish(index, payload)

    def _finish(self, index: int, outcome: RunOutcome) -> None:
        self.results[index] = outcome
        self.on_event(SweepEvent("done", self.specs[index], outcome=outcome))

    def _fail(self, index: int, message: str) -> None:
        spec = self.specs[index]
        self._finish(index, spec.outcome(RUN_FAILED, saved_run(spec)[1], message))

    def reap(self, procs: list, events) -> None:
        """Account for workers that died without reporting (killed, out of memory)."""
        dead = [w for w, p in enumerate(procs) if not p.is_alive()]
        if not any(w in self.running for w in dead) and len(dead) < len(procs):
            return
        # A dead worker's last messages may still be in the pipe: read them first.
        while True:
            try:
                self.handle(events.get(timeout=0.2))
            except queue.Empty:
                break
        for w in dead:
            if w in self.running:
                p = procs[w]
                self._fail(
                    self.running.pop(w),
                    f"worker process {p.name} exited with code {p.exitcode} "
                    "during the run (killed, or out of memory?); it will run again on the next invocation",
                )
        if len(dead) == len(procs):
            for index in range(len(self.specs)):
                if index not in self.results:
                    self._fail(index, "no worker process was left to run it; it will run on the next invocation")

    def outcomes(self) -> list[RunOutcome]:
        return [self.results[i] for i in range(len(self.specs))]


def _stop_workers(procs: list, tasks, graceful: bool) -> None:
    if graceful:
        for p in procs:
            p.join(timeout=10)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    # Unread tasks must not keep this process waiting for the queue's feeder thread at exit.
    tasks.cancel_join_thread()
    tasks.close()


class LocalProcessExecutor:
    """Trains specs in ``workers`` processes on this machine, ``threads`` torch threads each.

    Workers are started with "spawn": forking a process whose torch/OpenMP thread pool
    already exists can hang the child. Each worker sets its thread count once, loads the
    data once (bnlab.data caches it per process) and takes specs from a shared queue, so a
    slow run never holds the others up; epochs come back through a second queue. Workers
    ignore SIGINT: on Ctrl-C this process terminates them and re-raises KeyboardInterrupt.
    Finished runs are complete on disk by then; runs in flight restart on the next call.
    As with any "spawn" pool, a script that calls this must guard its entry point with
    ``if __name__ == "__main__":`` (the ``bnlab`` command does).
    """

    def __init__(
        self, workers: int | None = None, threads: int = DEFAULT_THREADS_PER_WORKER, *, poll_s: float = 0.5
    ) -> None:
        if workers is not None and workers < 1:
            raise UsageError(f"workers must be >= 1; got {workers}")
        if threads < 0:
            raise UsageError(f"threads must be >= 0 (0 keeps torch's default); got {threads}")
        self.workers = workers or default_workers()
        self.threads = threads
        self.poll_s = poll_s

    def map_runs(self, run_specs: Sequence[RunSpec], on_event: EventHandler) -> list[RunOutcome]:
        specs = list(run_specs)
        if not specs:
            return []
        ctx = multiprocessing.get_context("spawn")
        tasks, events = ctx.Queue(), ctx.Queue()
        for item in enumerate(specs):
            tasks.put(item)
        n = min(self.workers, len(specs))
        for _ in range(n):
            tasks.put(None)  # one stop sign per worker
        procs = [
            ctx.Process(
                target=_worker_main, args=(w, tasks, events, self.threads), name=f"bnlab-worker-{w}", daemon=True
            )
            for w in range(n)
        ]
        state = _PoolState(specs, on_event)
        started: list = []
        finished = False
        try:
            for p in procs:
                p.start()
                started.append(p)
            while not state.all_done():
                try:
                    message = events.get(timeout=self.poll_s)
                except queue.Empty:
                    state.reap(procs, events)
                    continue
                state.handle(message)
            finished = True
        finally:
            _stop_workers(started, tasks, graceful=finished)
        return state.outcomes()


def run_sweep(specs: Sequence[RunSpec], executor: Executor, on_event: EventHandler | None = None) -> list[RunOutcome]:
    """Train the specs not finished on disk yet; return every spec's outcome, in order.

    Runs finished earlier are announced first, as "done" events whose outcome is cached.
    Raises UsageError (before training anything) if two specs share a directory or a
    finished run on disk has other settings (see finished_outcome).
    """
    handler = on_event or (lambda event: None)
    dirs = [spec.run_dir.resolve() for spec in specs]
    if len(set(dirs)) != len(dirs):
        raise UsageError("two runs of the sweep would share a directory; list each preset and seed once.")
    known = [finished_outcome(spec) for spec in specs]
    for spec, outcome in zip(specs, known):
        if outcome is not None:
            handler(SweepEvent("done", spec, outcome=outcome))
    pending = [spec for spec, outcome in zip(specs, known) if outcome is None]
    fresh = iter(executor.map_runs(pending, handler) if pending else [])
    return [outcome if outcome is not None else next(fresh) for outcome in known]


class SweepProgress:
    """One tqdm bar over every epoch still to train, fed by SweepEvents.

    The bar appears as soon as training starts, and on a terminal it redraws every second
    even while no event comes, so its clock visibly runs while the workers start (import
    torch, read the data: tens of seconds on a busy machine). Its clock restarts at the
    first finished epoch, back-dated by that epoch's duration divided by the runs in flight
    (they advance together): counting the start-up would make the first ETA several times
    too long, and not counting the first epoch at all, too short. Epochs
    that will never come (cached, diverged or failed runs) leave the total, so the ETA
    counts only work that is really left. When the last run is done the bar closes: the
    time spent on the report is not training time. Print through ``note``/``write`` so
    lines do not tear the bar.
    """

    def __init__(
        self,
        total_runs: int,
        total_epochs: int | None = None,
        *,
        file: typing.TextIO | None = None,
        disable: bool = False,
    ) -> None:
        from tqdm import tqdm

        self._seen: dict[Path, int] = {}
        self._running: list[str] = []
        self._runs, self._done = total_runs, 0
        self._clock_started = False
        stream = file or sys.stderr
        # On a terminal the bar redraws often; into a log file a line every 30 s is enough.
        interactive = hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(
            total=total_epochs,
            unit="epoch",
            desc="training",
            file=stream,
            disable=disable,
            dynamic_ncols=True,
            smoothing=0.0,
            mininterval=0.1 if interactive else 30.0,
        )
        self._closed = False
        self._created = self.bar.start_t if hasattr(self.bar, "start_t") else time.time()
        self._postfix()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if interactive and not disable and total_runs:
            self._ticker = threading.Thread(target=self._tick, name="bnlab-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.bar.refresh()

    def __call__(self, event: SweepEvent) -> None:
        key = event.spec.run_dir
        planned = event.spec.config.train.epochs
        if event.kind == "start":
            self._running.append(event.spec.label)
        elif event.kind == "epoch":
            if not self._clock_started:
                self._clock_started = True
                self.bar.reset(total=self.bar.total)  # the ETA counts from here (see the class docstring)
                # The runs in flight advance together: one epoch of `seconds` from each of
                # them is `seconds / len(running)` of the bar's time per epoch.
                seconds = event.record.seconds if event.record is not None else 0.0
                per_epoch = seconds / max(1, len(self._running))
                self.bar.start_t -= max(0.0, min(per_epoch, self.bar.start_t - self._created))
            self._seen[key] = self._seen.get(key, 0) + 1
            self.bar.update(1)
        elif event.kind == "restart":
            # The epochs of the lost attempt stay counted as work done; the run's planned
            # epochs are all still to come.
            if self.bar.total is not None:
                self.bar.total += self._seen.get(key, 0)
                self.bar.refresh()
            self._seen[key] = 0
        elif event.kind == "done":
            self._done += 1
            if event.spec.label in self._running:
                self._running.remove(event.spec.label)
            if self.bar.total is not None:
                self.bar.total -= planned - self._seen.get(key, 0)
                self.bar.refresh()
        self._postfix()
        if self._done == self._runs:
            self.close()

    def _postfix(self) -> None:
        running = ", ".join(self._running[:4]) + (" ..." if len(self._running) > 4 else "")
        # refresh=False: the bar redraws at its own pace (mininterval), not at every event.
        self.bar.set_postfix_str(
            f"{self._done}/{self._runs} runs" + (f"; now: {running}" if running else ""), refresh=False
        )

    def note(self, text: str) -> None:
        """A status line (to the bar's stream) above the bar."""
        from tqdm import tqdm

        tqdm.write(text, file=self.bar.fp if hasattr(self.bar, "fp") else sys.stderr)

    @staticmethod
    def write(text: str, file: typing.TextIO | None = None) -> None:
        """Print ``text`` (to stdout by default) above any open bar (tqdm clears and redraws them)."""
        from tqdm import tqdm

        tqdm.write(text, file=file or sys.stdout)

    def close(self) -> None:
        """Stop the bar (again is harmless); its last state stays on the screen."""
        self._stop.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join(timeout=2.0)
        if not self._closed:
            self._closed = True
            self.bar.close()


class InOrder:
    """Hands items to ``emit`` in the order of ``keys`` as soon as all before them are in,
    so the output of parallel runs reads the same on every invocation."""

    def __init__(self, keys: Sequence[typing.Hashable], emit: Callable[[typing.Any], None]) -> None:
        self._keys = list(keys)
        self._next = 0
        self._ready: dict[typing.Hashable, typing.Any] = {}
        self._emit = emit

    def add(self, key: typing.Hashable, item: typing.Any) -> None:
        self._ready[key] = item
        while self._next < len(self._keys) and self._keys[self._next] in self._ready:
            self._emit(self._ready.pop(self._keys[self._next]))
            self._next += 1


def find_run_dirs(sweep_dir: str | os.PathLike) -> list[Path]:
    """OUT/runs/PRESET/seedN directories that hold a history, in preset then seed order.
    Folder names are untrusted: only plain names are taken."""
    found = [
        p.parent
        for p in Path(sweep_dir).glob("runs/*/seed*/history.json")
        if _plain(p.parent.parent.name) and p.parent.name[4:].isdigit()
    ]
    rank = {name: i for i, name in enumerate(ALL_PRESETS)}

    def key(p: Path) -> tuple:
        return (rank.get(p.parent.name, len(rank)), p.parent.name, int(p.name[4:]))

    return sorted(found, key=key)


def _plain(name: str) -> bool:
    try:
        safe_name(name)
    except InputError:
        return False
    return True
