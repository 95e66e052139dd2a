"""Presets (every program in the seed), the parsing of overrides and seed lists, and sweeps.

A preset is a RunConfig plus what the seed claims about it and the band that bnlab
accepts as "reproduced" for the final validation accuracy. A sweep runs every
(preset, seed) pair, in parallel worker processes, resumably (see the "sweeps" section).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bnlab.conventions import to_torch_momentum
from bnlab.models import ModelConfig
from bnlab.train import TABLE_HEADER, EpochRecord, RunConfig, TrainConfig, TrainingDiverged, read_history


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    seed_claim: str          # the seed's words
    accept: tuple[float, float]  # final val acc band that counts as reproduced
    accept_note: str         # why that band
    config: RunConfig


def _chainer_model(norm: str, decay: float = 0.9) -> ModelConfig:
    # The question's Chainer program: L.Linear with HeNormal, L.BatchNormalization(eps=1e-3).
    return ModelConfig(norm=norm, init="chainer-he-normal",
                       bn_momentum=to_torch_momentum("chainer", decay), bn_eps=1e-3)


def _tf_model(norm: str) -> ModelConfig:
    # tf.layers.dense defaults (Glorot uniform, zero bias) and tf.layers.batch_normalization
    # (momentum 0.9 weighting the old value, eps 1e-3, biased moving variance on 2-D input),
    # applied after both hidden layers and on the logits.
    bn = norm != "none"
    return ModelConfig(norm=norm, logits_norm=bn, init="tf-glorot-uniform",
                       bn_momentum=to_torch_momentum("tf1", 0.9), bn_eps=1e-3, running_var="biased")


# Chainer's Adam and TF1's AdamOptimizer both add eps before bias correction.
_CHAINER_TRAIN = TrainConfig(lr=0.01, adam_eps=1e-8, adam_eps_mode="chainer")
_TF_TRAIN = TrainConfig(lr=0.01, adam_eps=1e-8, adam_eps_mode="chainer",
                        train_metrics="eval-after-step", batching="array-split")

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("question",
           "The question's full Chainer program: ONE BatchNormalization (decay 0.9, eps 1e-3) "
           "applied after both hidden layers, HeNormal, Adam lr 0.01.",
           "with batchnormalization, it is less than 0.80 after 100 epochs",
           (0.0, 0.90),
           "the seed's own program on these files ends at 0.871 / 0.883, swinging 0.66-0.95 between "
           "epochs; bnlab calls it reproduced at <= 0.90 (and >= 0.08 below `answer` when both ran)",
           RunConfig("question", _chainer_model("shared", 0.9), _CHAINER_TRAIN)),
    Preset("question-first-snippet",
           "The question's first snippet: shared BatchNormalization with decay 0.99, eps 1e-3, "
           "and Adam with Chainer's default alpha 0.001.",
           "same failure (less than 0.80)",
           (0.0, 0.80),
           "the seed's own program gives about 0.4 to 0.7",
           RunConfig("question-first-snippet", _chainer_model("shared", 0.99),
                     dataclasses.replace(_CHAINER_TRAIN, lr=0.001))),
    Preset("answer",
           "The answer: one BatchNormalization per hidden layer (bn1, bn2; decay 0.9, eps 1e-3), "
           "HeNormal, Adam lr 0.01.",
           "achieves 98% validation accuracy after 100 epochs",
           (0.978, 1.0),
           "the seed's own program on these files gives 0.982 / 0.983",
           RunConfig("answer", _chainer_model("per-layer", 0.9), _CHAINER_TRAIN)),
    Preset("no-bn",
           "The Chainer program without batch normalization: HeNormal, Adam lr 0.01.",
           "without batchnormalization, the validation accuracy is within 0.97 and 0.98",
           (0.970, 0.986),
           "the seed's own program on these files gives 0.978 / 0.978",
           RunConfig("no-bn", _chainer_model("none"), _CHAINER_TRAIN)),
    Preset("tensorflow",
           "The TensorFlow 1.14 program: Glorot dense layers, BN (momentum 0.9, eps 1e-3, biased "
           "moving variance) after both hidden layers and on the logits, Adam lr 0.01; train "
           "metrics re-evaluated in inference mode after each step, as the program does.",
           "the validation accuracy is around 0.98 ... with batchnormalization",
           (0.975, 1.0),
           "around 0.98",
           RunConfig("tensorflow", _tf_model("per-layer"), _TF_TRAIN)),
    Preset("tensorflow-no-bn",
           "The TensorFlow program without batch normalization: Glorot dense layers, Adam lr 0.01.",
           "the validation accuracy is around 0.98 ... without batchnormalization",
           (0.975, 1.0),
           "around 0.98",
           RunConfig("tensorflow-no-bn", _tf_model("none"), _TF_TRAIN)),
]}

# The seed's story in the order the README tells it.
STORY = ("question", "answer", "no-bn", "tensorflow")
ALL_PRESETS = tuple(PRESETS)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; `bnlab presets` lists them: {', '.join(PRESETS)}") from None


def reproduced(preset: Preset, final_val_acc: float) -> bool:
    low, high = preset.accept
    return low <= final_val_acc <= high


# ------------------------------------------------------------------------------ overrides

def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


MODEL_FIELDS = _field_types(ModelConfig)
TRAIN_FIELDS = _field_types(TrainConfig)


def parse_value(text: str, typ: typing.Any) -> typing.Any:
    """Parse a command-line string into a config field's type."""
    text = text.strip()
    if typ is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if typ is int:
        return int(text)
    if typ is float:
        return float(text)
    if typing.get_origin(typ) is tuple:
        parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
        if not parts:
            raise ValueError("expected a comma-separated list of integers")
        return tuple(int(p) for p in parts)
    return text


def apply_overrides(cfg: RunConfig, overrides: dict[str, str | typing.Any]) -> RunConfig:
    """Return ``cfg`` with fields replaced; keys are field names of ModelConfig or
    TrainConfig (optionally prefixed ``model.`` / ``train.``), values strings or typed."""
    model_changes: dict[str, typing.Any] = {}
    train_changes: dict[str, typing.Any] = {}
    for key, raw in overrides.items():
        section, _, name = key.rpartition(".")
        name = name.replace("-", "_")
        if section not in ("", "model", "train"):
            raise ValueError(f"unknown setting {key!r}: use a field name, optionally prefixed model. or train.")
        if name in MODEL_FIELDS and section in ("", "model"):
            target, typ = model_changes, MODEL_FIELDS[name]
        elif name in TRAIN_FIELDS and section in ("", "train"):
            target, typ = train_changes, TRAIN_FIELDS[name]
        else:
            known = ", ".join(sorted({*MODEL_FIELDS, *TRAIN_FIELDS}))
            raise ValueError(f"unknown setting {key!r}; settings are: {known}")
        try:
            target[name] = parse_value(raw, typ) if isinstance(raw, str) else raw
        except ValueError as err:
            raise ValueError(f"bad value for {key}: {err}") from None
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model_changes),
                               train=dataclasses.replace(cfg.train, **train_changes))


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,3,7-8' -> [0, 3, 7, 8]; duplicates removed, order kept."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty item in seed list {text!r}")
        lo, sep, hi = part.partition("-")
        if sep:
            start, stop = int(lo), int(hi)
            if stop < start:
                raise ValueError(f"seed range {part!r} runs backwards")
            if stop - start > 10_000:
                raise ValueError(f"seed range {part!r} is too long")
            seeds.extend(range(start, stop + 1))
        else:
            seeds.append(int(part))
    if any(s < 0 for s in seeds):
        raise ValueError("seeds must be >= 0")
    return list(dict.fromkeys(seeds))


def parse_presets(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("no preset named")
    if names == ["all"]:
        return list(ALL_PRESETS)
    for n in names:
        get_preset(n)
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------- sweeps
#
# A sweep trains every (preset, seed) pair into OUT/runs/PRESET/seedN/. plan_sweep() turns
# names and seeds into RunSpecs; run_sweep() skips the runs already finished on disk and
# hands the rest to an Executor, which reports progress as SweepEvents and returns one
# RunOutcome per spec. bnlab.report turns the run directories into statistics and pictures.

# Measured on the 2-core development machine (shared with other jobs), training time of
# run_sweep over question and answer x seeds 0-1 at 20 epochs (4 full-size runs), two
# alternating rounds: 2 workers x 1 thread 25.4 s and 23.2 s, 1 worker x 2 threads 28.1 s
# and 33.0 s (9.5-10.4 against 7.3-8.5 runs a minute). The whole `bnlab compare` of the same
# runs at 10 epochs took 25.7 s against 41.2 s. The matrices are small (784-100-100-10, batch
# 1000), so a second thread inside a run buys little and suffers most when cores are busy,
# while a second process doubles the work in flight: one worker per core, one thread each.
DEFAULT_THREADS_PER_WORKER = 1
TRACE_CHANNELS = 4

RUN_COMPLETE, RUN_DIVERGED, RUN_FAILED = "complete", "diverged", "failed"
# A diverged run is a result (it would diverge again), so it is not re-run on resume.
FINISHED_STATUSES = (RUN_COMPLETE, RUN_DIVERGED)
# TrainConfig fields that change how fast a run goes, not what it computes: a finished run
# on disk is reused when only these differ from the plan.
SPEED_ONLY_FIELDS = ("threads",)


def default_workers() -> int:
    """The CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity mask
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class RunSpec:
    """One planned run: the config to train and the directory it owns."""

    preset: str
    seed: int
    config: RunConfig
    run_dir: Path
    data_dir: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.preset} seed {self.seed}"


@dataclass
class RunOutcome:
    """How one run ended: status complete, diverged or failed, and its epochs."""

    preset: str
    seed: int
    run_dir: Path
    status: str
    history: list[EpochRecord] = field(default_factory=list)
    message: str = ""
    cached: bool = False   # finished by an earlier invocation and not run again
    seconds: float = 0.0   # wall time this invocation spent on it (0 when cached)

    @property
    def final_val_acc(self) -> float | None:
        return self.history[-1].val_acc if self.status == RUN_COMPLETE and self.history else None


@dataclass(frozen=True)
class SweepEvent:
    """Progress of one run: ``kind`` is "start", "epoch" (``epoch`` just finished) or
    "done" (``outcome`` set; ``outcome.cached`` when it was finished on disk already)."""

    kind: str
    spec: RunSpec
    epoch: int | None = None
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


def _overrides_field(overrides: dict[str, typing.Any], name: str) -> bool:
    return any(key.rpartition(".")[2].replace("-", "_") == name for key in overrides)


def plan_sweep(presets: Sequence[str], seeds: Sequence[int], out: str | os.PathLike,
               overrides: dict[str, typing.Any] | None = None, *, dataset: str = "mnist",
               data_dir: str | os.PathLike | None = None,
               trace_bn_channels: int = TRACE_CHANNELS) -> list[RunSpec]:
    """Every (preset, seed) run in (preset, seed) order, each owning OUT/runs/PRESET/seedN.

    Models with batch norm record ``trace_bn_channels`` channels of their BN statistics
    (the report's picture of the shared-BN bug) unless the overrides set it themselves.
    """
    overrides = dict(overrides or {})
    trace = {} if _overrides_field(overrides, "trace_bn_channels") else {"trace_bn_channels": trace_bn_channels}
    specs: list[RunSpec] = []
    for name in presets:
        preset = get_preset(name)
        for seed in seeds:
            cfg = apply_overrides(preset.config, {**overrides, "seed": seed})
            if cfg.model.norm != "none" or cfg.model.logits_norm:
                cfg = apply_overrides(cfg, trace)
            cfg = dataclasses.replace(cfg, dataset=dataset)
            specs.append(RunSpec(name, seed, cfg, Path(out) / "runs" / name / f"seed{seed}",
                                 Path(data_dir) if data_dir is not None else None))
    return specs


def _flat(d: dict[str, typing.Any], prefix: str = "") -> dict[str, typing.Any]:
    flat: dict[str, typing.Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def config_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """Fields (dotted names) whose values differ, ignoring SPEED_ONLY_FIELDS."""
    fa, fb = _flat(a.to_dict()), _flat(b.to_dict())
    ignored = {f"train.{name}" for name in SPEED_ONLY_FIELDS}
    return sorted(k for k in fa.keys() | fb.keys() if k not in ignored and fa.get(k) != fb.get(k))


def _saved_history(run_dir: Path) -> tuple[str | None, list[EpochRecord], str]:
    saved = read_history(run_dir) or {}
    try:
        history = [EpochRecord(**r) for r in saved.get("history", [])]
    except TypeError:
        history = []
    return saved.get("status"), history, saved.get("message", "")


def finished_outcome(spec: RunSpec) -> RunOutcome | None:
    """The outcome saved in ``spec.run_dir`` if that run finished with the planned config,
    or None if it has to (re)run.

    Raises ValueError when the directory holds a finished run with other settings: results
    are never overwritten, nor reused for a different question, without the user saying so.
    """
    status, history, message = _saved_history(spec.run_dir)
    if status not in FINISHED_STATUSES:
        return None
    try:
        on_disk = RunConfig.from_dict(json.loads((spec.run_dir / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # history without a readable config is not a run we can vouch for
    differences = config_differences(on_disk, spec.config)
    if differences:
        shown = ", ".join(f"{k}" for k in differences[:6]) + (" ..." if len(differences) > 6 else "")
        raise ValueError(
            f"{spec.run_dir} already holds a finished run of {spec.label} trained with other settings "
            f"(differing: {shown}). bnlab reuses finished runs only when their settings match, and does "
            "not overwrite them: choose another --out for the new settings, or delete that directory to "
            "train it again.")
    return RunOutcome(spec.preset, spec.seed, spec.run_dir, status, history, message, cached=True)


def clear_run_dir(run_dir: Path) -> None:
    """Delete what an interrupted attempt left, so a restarted run never mixes two attempts."""
    if run_dir.is_symlink() or run_dir.is_file():
        run_dir.unlink()
    elif run_dir.exists():
        shutil.rmtree(run_dir)


def _row_epoch(row: str) -> int:
    try:
        return int(row.split()[0])
    except (IndexError, ValueError):
        return -1


def _failure_message(err: Exception) -> str:
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def execute_spec(spec: RunSpec, on_epoch: Callable[[int], None] | None = None) -> RunOutcome:
    """Train one spec from scratch into its run directory and return its outcome.

    Whatever an earlier attempt left in the directory is deleted first. ``on_epoch`` gets
    each finished epoch's number. TrainingDiverged and other exceptions become outcomes
    (diverged / failed) so that one bad run never ends a sweep.
    """
    from bnlab.train import train

    clear_run_dir(spec.run_dir)
    started = time.perf_counter()

    def echo(line: str) -> None:
        # train() reports through its table printer: the header once, then one row per
        # finished epoch, whose first field is the epoch number.
        if line != TABLE_HEADER and on_epoch is not None:
            on_epoch(_row_epoch(line))

    status, message = RUN_COMPLETE, ""
    try:
        train(spec.config, data_dir=spec.data_dir, out_dir=spec.run_dir, echo=echo)
    except TrainingDiverged as err:
        status, message = RUN_DIVERGED, str(err)
    except Exception as err:  # noqa: BLE001 - a failed run is reported and the sweep goes on
        status, message = RUN_FAILED, _failure_message(err)
    _, history, _ = _saved_history(spec.run_dir)
    return RunOutcome(spec.preset, spec.seed, spec.run_dir, status, history, message,
                      seconds=time.perf_counter() - started)


class InlineExecutor:
    """Trains the specs one after another in this process (debugging, or callers that
    parallelize elsewhere). Ctrl-C interrupts the run in progress."""

    def map_runs(self, run_specs: Sequence[RunSpec], on_event: EventHandler) -> list[RunOutcome]:
        outcomes = []
        for spec in run_specs:
            on_event(SweepEvent("start", spec))
            outcome = execute_spec(spec, lambda epoch, s=spec: on_event(SweepEvent("epoch", s, epoch=epoch)))
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

        def on_epoch(epoch: int, index: int = index) -> None:
            if not parent_alive():  # nobody is left to use the result: stop now
                raise SystemExit(1)
            events.put(("epoch", index, worker, epoch))

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
            self.on_event(SweepEvent("epoch", spec, epoch=payload))
        elif kind == "done":
            self.running.pop(worker, None)
            self._finish(index, payload)

    def _finish(self, index: int, outcome: RunOutcome) -> None:
        self.results[index] = outcome
        self.on_event(SweepEvent("done", self.specs[index], outcome=outcome))

    def _fail(self, index: int, message: str) -> None:
        spec = self.specs[index]
        _, history, _ = _saved_history(spec.run_dir)
        self._finish(index, RunOutcome(spec.preset, spec.seed, spec.run_dir, RUN_FAILED, history, message))

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
                self._fail(self.running.pop(w), f"worker process {p.name} exited with code {p.exitcode} "
                           "during the run (killed, or out of memory?); it will run again on the next invocation")
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

    def __init__(self, workers: int | None = None, threads: int = DEFAULT_THREADS_PER_WORKER,
                 *, poll_s: float = 0.5) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1; got {workers}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0 keeps torch's default); got {threads}")
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
        procs = [ctx.Process(target=_worker_main, args=(w, tasks, events, self.threads),
                             name=f"bnlab-worker-{w}", daemon=True) for w in range(n)]
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


def run_sweep(specs: Sequence[RunSpec], executor: Executor,
              on_event: EventHandler | None = None) -> list[RunOutcome]:
    """Train the specs not finished on disk yet; return every spec's outcome, in order.

    Runs finished earlier are announced first, as "done" events whose outcome is cached.
    Raises ValueError (before training anything) if two specs share a directory or a
    finished run on disk has other settings (see finished_outcome).
    """
    handler = on_event or (lambda event: None)
    dirs = [spec.run_dir.resolve() for spec in specs]
    if len(set(dirs)) != len(dirs):
        raise ValueError("two runs of the sweep would share a directory; list each preset and seed once")
    known = [finished_outcome(spec) for spec in specs]
    for spec, outcome in zip(specs, known):
        if outcome is not None:
            handler(SweepEvent("done", spec, outcome=outcome))
    pending = [spec for spec, outcome in zip(specs, known) if outcome is None]
    fresh = iter(executor.map_runs(pending, handler) if pending else [])
    return [outcome if outcome is not None else next(fresh) for outcome in known]


class SweepProgress:
    """One tqdm bar over every epoch still to train; its ETA moves with each epoch that
    any worker finishes. Call it with each SweepEvent; print through ``write`` so that
    lines do not tear the bar."""

    def __init__(self, specs: Sequence[RunSpec], *, file: typing.TextIO | None = None,
                 disable: bool = False) -> None:
        from tqdm import tqdm

        self._planned = {spec.run_dir: spec.config.train.epochs for spec in specs}
        self._seen: dict[Path, int] = {}
        self._running: list[str] = []
        self._runs, self._done = len(specs), 0
        stream = file or sys.stderr
        # On a terminal the bar redraws often; into a log file a line every 30 s is enough.
        interactive = hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(total=sum(self._planned.values()), unit="epoch", desc="training",
                        file=stream, disable=disable, dynamic_ncols=True, smoothing=0.1,
                        mininterval=0.1 if interactive else 30.0)

    def __call__(self, event: SweepEvent) -> None:
        key = event.spec.run_dir
        if event.kind == "start":
            self._running.append(event.spec.label)
        elif event.kind == "epoch":
            self._seen[key] = self._seen.get(key, 0) + 1
            self.bar.update(1)
        elif event.kind == "done":
            self._done += 1
            if event.spec.label in self._running:
                self._running.remove(event.spec.label)
            # Epochs that will never come (cached, diverged or failed runs) leave the total,
            # so the ETA counts only work that is really left.
            self.bar.total -= self._planned.get(key, 0) - self._seen.get(key, 0)
        running = ", ".join(self._running[:4]) + (" ..." if len(self._running) > 4 else "")
        # refresh=False: the bar redraws at its own pace (mininterval), not at every event.
        self.bar.set_postfix_str(f"{self._done}/{self._runs} runs" + (f"; now: {running}" if running else ""),
                                 refresh=False)

    @staticmethod
    def write(text: str) -> None:
        """Print ``text`` to stdout above any open bar (tqdm clears and redraws them)."""
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)

    def close(self) -> None:
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
