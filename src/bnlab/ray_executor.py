"""Sweeps on a Ray cluster: ``RayExecutor`` implements ``bnlab.sweep.Executor`` with one
Ray task per run (``bnlab compare --executor ray``; the ``bnlab[ray]`` extra).

Each task calls ``bnlab.sweep.execute_spec`` in a Ray worker, which reads the data set
itself (``spec.data_dir``, the vendored copy or the cache: bnlab.data keeps it per worker
process), never through the driver. Progress comes home as it happens: the task puts
"start" and each epoch's record into a small event actor, which the driver drains while it
waits for the tasks, so the driver sees the same SweepEvents, in the same order per run, as
with ``LocalProcessExecutor``. The run directory is written by the worker: on a cluster of
several machines OUT must be on a file system every node sees.

A worker that dies mid-run (killed, out of memory, a lost node) is a system failure for
Ray, which runs the task again (``max_retries``); the new attempt starts the run from epoch
0 and the driver announces it as a "restart" event. Runs already finished are never
touched. Ray is imported only when an executor maps runs.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any

from bnlab.errors import MissingExtra, UsageError
from bnlab.rundir import RUN_FAILED
from bnlab.sweep import (
    DEFAULT_THREADS_PER_WORKER,
    EventHandler,
    RunOutcome,
    RunSpec,
    SweepEvent,
    execute_spec,
    saved_run,
)

# Ray retries a task whose worker process died this many times before the run is failed.
DEFAULT_MAX_RETRIES = 3

# Ray waits for a cluster that is not there for minutes, retrying (measured: still waiting
# after 200 s on 127.0.0.1:1); one TCP connect with this timeout answers at once.
ADDRESS_PROBE_TIMEOUT_S = 5.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingExtra(
            "--executor ray needs Ray: install the extra with `pip install 'bnlab[ray]'` "
            "(ray 2.40 to 2.60), or use --executor local."
        ) from None
    return ray


def check_reachable(address: str, timeout_s: float = ADDRESS_PROBE_TIMEOUT_S) -> None:
    """Refuse a HOST:PORT (or ray://HOST:PORT) where nothing listens, before Ray starts
    waiting on it. "auto" and "local" are Ray's to resolve (it fails fast on those)."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(
            f"--ray-address {address!r} is not an address: give HOST:PORT (the head node's "
            "`ray start --head --port PORT`), ray://HOST:10001 for Ray Client, or auto."
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UsageError(
            f"nothing answers at the Ray address {address!r} ({reason}); start the cluster with "
            "`ray start --head --port PORT` and give its HOST:PORT, or leave --ray-address out "
            "to start a local cluster."
        ) from None


class EventLog:
    """An actor (created with ``num_cpus=0``) that holds the tasks' events until the
    driver takes them; one call takes them all, in the order they were put."""

    def __init__(self) -> None:
        self._events: list[tuple] = []

    def put(self, event: tuple) -> None:
        self._events.append(event)

    def take(self) -> list[tuple]:
        events, self._events = self._events, []
        return events


def train_task(index: int, spec: RunSpec, log: Any, threads: int) -> tuple[int, str, RunOutcome]:
    """The body of one Ray task: train ``spec``, telling ``log`` when it starts and after
    every epoch. ``log.put`` is waited on, so every event of an attempt is in the log before
    the task's result is. Returns (index, attempt id, outcome)."""
    import ray
    import torch

    if threads:
        torch.set_num_threads(threads)
    attempt = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ray.get(log.put.remote(("start", index, attempt, None)))

    def on_epoch(record: Any) -> None:
        ray.get(log.put.remote(("epoch", index, attempt, record)))

    return index, attempt, execute_spec(spec, on_epoch)


class _Runs:
    """The driver's view: which attempt of each run is current, and the outcomes."""

    def __init__(self, specs: list[RunSpec], on_event: EventHandler) -> None:
        self.specs = specs
        self.on_event = on_event
        self.attempt: dict[int, str] = {}
        self.results: dict[int, RunOutcome] = {}

    def handle(self, event: tuple) -> None:
        kind, index, attempt, record = event
        spec = self.specs[index]
        if kind == "start":
            restarted = index in self.attempt
            self.attempt[index] = attempt
            self.on_event(SweepEvent("restart" if restarted else "start", spec))
        elif kind == "epoch" and self.attempt.get(index) == attempt:  # a lost attempt's epochs do not count
            self.on_event(SweepEvent("epoch", spec, record=record))

    def finish(self, index: int, outcome: RunOutcome) -> None:
        self.results[index] = outcome
        self.on_event(SweepEvent("done", self.specs[index], outcome=outcome))


class RayExecutor:
    """Trains specs as Ray tasks, at most ``workers`` at a time (default: as many as the
    cluster has CPUs), ``threads`` torch threads each.

    ``address=None`` uses the Ray runtime already initialized in this process, or starts a
    local one (``num_cpus=workers``) and shuts it down after the sweep; an address
    ("auto", "HOST:PORT", "ray://HOST:10001") joins that cluster, whose nodes need bnlab
    installed and the data set readable.
    """

    def __init__(
        self,
        workers: int | None = None,
        threads: int = DEFAULT_THREADS_PER_WORKER,
        *,
        address: str | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        poll_s: float = 0.2,
    ) -> None:
        if workers is not None and workers < 1:
            raise UsageError(f"workers must be >= 1; got {workers}")
        if threads < 0:
            raise UsageError(f"threads must be >= 0 (0 keeps torch's default); got {threads}")
        self.workers = workers
        self.threads = threads
        self.address = address
        self.max_retries = max_retries
        self.poll_s = poll_s

    def _connect(self, ray: Any) -> bool:
        """Make sure a Ray runtime is up; True when this call started it (and must stop it;
        for a cluster it joined, ``ray.shutdown`` only disconnects)."""
        if ray.is_initialized():
            return False
        if self.address is not None:
            check_reachable(self.address)
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if self.address is None and self.workers is not None:
            options["num_cpus"] = self.workers
        try:
            ray.init(address=self.address, **options)
        except ConnectionError as err:
            raise UsageError(
                f"could not join the Ray cluster at {self.address!r} ({err}); start it with "
                "`ray start --head`, give its address with --ray-address, or leave "
                "--ray-address out to start a local cluster."
            ) from None
        return True

    def map_runs(self, run_specs: Sequence[RunSpec], on_event: EventHandler) -> list[RunOutcome]:
        specs = list(run_specs)
        if not specs:
            return []
        ray = import_ray()
        owns = self._connect(ray)
        log = None
        refs: dict[Any, int] = {}
        try:
            log = ray.remote(num_cpus=0)(EventLog).remote()
            task = ray.remote(num_cpus=1, max_retries=self.max_retries)(train_task)
            runs = _Runs(specs, on_event)
            limit = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
            queued = iter(range(len(specs)))

            def submit() -> None:  # keep ``limit`` runs in flight
                while len(refs) < limit:
                    index = next(queued, None)
                    if index is None:
                        return
                    refs[task.remote(index, specs[index], log, self.threads)] = index

            submit()
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=self.poll_s)
                for event in ray.get(log.take.remote()):
                    runs.handle(event)
                for ref in ready:
                    index = refs.pop(ref)
                    outcome = self._result(ray, ref, specs[index])
                    for event in ray.get(log.take.remote()):  # the attempt's last events come first
                        runs.handle(event)
                    runs.finish(index, outcome)
                submit()
            return [runs.results[i] for i in range(len(specs))]
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        finally:
            if log is not None and ray.is_initialized():
                ray.kill(log)
            if owns:
                ray.shutdown()

    def _result(self, ray: Any, ref: Any, spec: RunSpec) -> RunOutcome:
        try:
            return ray.get(ref)[2]
        except ray.exceptions.RayError as err:
            # Retries exhausted (or the task could not run): the run is failed, the sweep goes on.
            first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            return spec.outcome(
                RUN_FAILED,
                saved_run(spec)[1],
                f"the Ray task training it failed after {self.max_retries} retries "
                f"({type(err).__name__}: {first_line}); it will run again on the next invocation",
            )
