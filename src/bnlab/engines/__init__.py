"""Training engines: the same experiment run by PyTorch, Chainer or TensorFlow.

``train(cfg)`` looks the engine up by ``cfg.train.engine`` in ``ENGINES`` and runs it
through the shared parts: the data, the run directory (its lock, its files, how a run that
did not complete is recorded) and the per-epoch events. An engine is one module with

- ``check_config(cfg)``: raise ``UsageError`` (field and fix named) for what it cannot run;
- ``run(cfg, data, recorder, *, initial_state)``: train, reporting through ``recorder``
  (``start``, ``epoch`` per finished epoch, ``finish``), and return a ``RunResult``.

A new engine joins by adding its module and one line to ``ENGINES``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bnlab.config import ENGINES as ENGINE_NAMES
from bnlab.config import EpochRecord, RunConfig
from bnlab.engines.common import RunResult, check_minibatches, load_data
from bnlab.errors import MissingExtra, TrainingDiverged, UsageError

# Engine name -> module. Imported only when used: each framework is an optional extra.
ENGINES: dict[str, str] = {
    "torch": "bnlab.engines.torch",
    "chainer": "bnlab.engines.chainer",
    "tensorflow": "bnlab.engines.tensorflow",
}
assert tuple(ENGINES) == ENGINE_NAMES, "config.EngineName and the registry must name the same engines"


def engine_module(name: str) -> Any:
    if name not in ENGINES:
        raise UsageError(f"unknown engine {name!r}; engines are: {', '.join(ENGINES)}.")
    try:
        return importlib.import_module(ENGINES[name])
    except ModuleNotFoundError as err:
        if err.name != ENGINES[name]:
            raise  # the engine exists but something it imports is missing: its own check says so
        raise MissingExtra(
            f"the {name} engine is not part of this bnlab installation ({ENGINES[name]} "
            f"is missing); train with --engine torch, or install a bnlab that has it."
        ) from None


def check_config(cfg: RunConfig) -> None:
    """Raise UsageError if ``cfg``'s engine cannot run it (or is not installed)."""
    engine_module(cfg.train.engine).check_config(cfg)


def train(
    cfg: RunConfig,
    data: Any = None,
    *,
    data_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    echo: Callable[[str], None] | None = print,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    initial_state: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Train one run and return its history and model.

    ``echo`` prints the question's table (None: silent); ``on_epoch`` receives each
    finished epoch's EpochRecord. With ``out_dir`` the run directory is written (see
    ``bnlab.rundir``); a folder that already holds a run is refused unless ``overwrite``.
    ``initial_state`` (a torch-keyed state_dict) replaces the seeded initial weights.
    Raises TrainingDiverged if the loss becomes NaN or infinite; a run that stops on any
    other error is recorded as failed (or interrupted) before the error propagates.
    """
    from bnlab.rundir import (
        RUN_DIVERGED,
        RUN_FAILED,
        RUN_INTERRUPTED,
        RunLock,
        RunRecorder,
        prepare_run_dir,
        refuse_to_overwrite,
    )

    engine = engine_module(cfg.train.engine)
    engine.check_config(cfg)
    data = data if data is not None else load_data(cfg.dataset, data_dir)
    check_minibatches(cfg, len(data.train_labels))
    lock = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        refuse_to_overwrite(out_dir, overwrite=overwrite)  # before the lock file: a refusal writes nothing
        lock = RunLock(out_dir)
        lock.acquire()
        try:
            prepare_run_dir(out_dir, overwrite=overwrite)
        except BaseException:
            lock.release()
            raise
    recorder = RunRecorder(cfg, out_dir, echo, on_epoch=on_epoch)
    try:
        return engine.run(cfg, data, recorder, initial_state=initial_state)
    except TrainingDiverged as err:
        recorder.end(RUN_DIVERGED, str(err))
        raise
    except KeyboardInterrupt:
        recorder.end(RUN_INTERRUPTED, f"interrupted after {len(recorder.history)} finished epoch(s)")
        raise
    except BaseException as err:
        recorder.end(RUN_FAILED, f"{type(err).__name__}: {err}")
        raise
    finally:
        if lock is not None:
            lock.release()
