"""The run directory: what a run writes, how it is written, and the ONE reader of it.

A run directory holds ``config.json``, ``environment.json``, ``history.json`` (its
``status``: running, complete, diverged, failed or interrupted), ``history.csv``,
``checkpoint.pt`` (a state_dict plus the config; loads with ``weights_only=True``) and,
when traced, ``bn_trace.npz``. Every file is written to a temporary name and renamed, so
a reader never sees half a file; ``history.json`` is written last, so "complete" on disk
means every other file is there. Everything read back is untrusted and validated.
A run directory is owned by one process at a time (``RunLock``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnlab.config import EpochRecord, RunConfig
from bnlab.errors import InputError, OutputError, UsageError, output_error, quote_error
from bnlab.table import format_row, table_header

if TYPE_CHECKING:
    import numpy as np
    import torch

    from bnlab.models import MLP

RUN_RUNNING, RUN_COMPLETE, RUN_DIVERGED, RUN_FAILED, RUN_INTERRUPTED = (
    "running",
    "complete",
    "diverged",
    "failed",
    "interrupted",
)
RUN_STATUSES = (RUN_RUNNING, RUN_COMPLETE, RUN_DIVERGED, RUN_FAILED, RUN_INTERRUPTED)
# A diverged run is a result (it would diverge again), so a sweep does not re-run it.
FINISHED_STATUSES = (RUN_COMPLETE, RUN_DIVERGED)

# The files bnlab writes into a run directory: the only ones it ever removes there.
RUN_FILES = ("config.json", "environment.json", "history.json", "history.csv", "checkpoint.pt", "bn_trace.npz")
LOCK_FILE = ".bnlab.lock"

# Names read from disk go into file names (figures) and HTML: letters, digits, - _ . only.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def safe_name(name: Any, what: str = "name") -> str:
    """``name`` if it is safe to use in a file name, else InputError."""
    if not isinstance(name, str) or not SAFE_NAME.match(name) or ".." in name:
        raise InputError(
            f"the {what} {name!r} is not a plain name (letters, digits, '-', '_', '.'); "
            "the run directory may have been edited by hand or tampered with."
        )
    return name


# ---------------------------------------------------------------------------- writing


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write via a temp file in the same folder, then rename: readers never see half a file.
    An OSError (disk full, read-only, a file in the way) becomes an OutputError naming ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise output_error(path, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise output_error(path, err) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_file_set(
    folder: Path, files: dict[str, bytes], *, option: str = "--out", replace: bool = False
) -> list[Path]:
    """Make every file of ``files`` (name -> content) appear in ``folder`` together, or none.

    All contents are written to hidden temporary files in ``folder`` first (a full disk or a
    Ctrl-C there leaves nothing but removes the temporaries); only then is each renamed into
    place, and a failure among the renames puts back what was there before. A folder this
    call created is removed again if nothing was published. Files of the user's that are not
    in ``files`` are never touched; with ``replace`` our own earlier files are replaced (kept
    until the new set is complete). Errors are OutputErrors naming the path and ``option``.
    """
    created = _make_folder(folder, option)
    staged: dict[Path, Path] = {}
    backups: dict[Path, Path] = {}
    published: list[Path] = []
    try:
        for name, payload in files.items():
            staged[folder / name] = _stage(folder / name, payload, option)
        for target, tmp in staged.items():
            if target.exists():
                if not replace:
                    raise OutputError(f"{option} {folder}: {target.name} already exists; nothing was written.")
                backups[target] = Path(f"{tmp}.old")
                os.replace(target, backups[target])
            os.replace(tmp, target)
            published.append(target)
    except BaseException as err:
        for target in published:
            target.unlink(missing_ok=True)
        for target, backup in backups.items():
            os.replace(backup, target)
        for tmp in staged.values():
            Path(tmp).unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(err, OSError):
            raise output_error(folder, err, option) from None
        raise
    for backup in backups.values():
        backup.unlink(missing_ok=True)
    return published


def _make_folder(folder: Path, option: str) -> bool:
    """Create ``folder`` (and its parents); True if this call created it."""
    if folder.is_dir():
        return False
    try:
        folder.mkdir(parents=True)
    except OSError as err:
        raise output_error(folder, err, option) from None
    return True


def _stage(target: Path, payload: bytes, option: str) -> Path:
    """``payload`` in a hidden temporary file beside ``target``, flushed to the disk."""
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as err:
        raise output_error(target, err, option) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # a full disk shows here, not after the rename
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise output_error(target, err, option) from None
        raise
    return Path(tmp)


class RunInUse(UsageError):
    """Another live process holds the lock of a run or sweep directory."""


class RunLock:
    """An exclusive lock on a run directory (``flock`` on ``.bnlab.lock``), held while a
    process trains into it; the OS releases it when the process dies, so a crash never
    leaves a stale lock. The file records the owner's pid for the message."""

    def __init__(self, directory: Path, what: str = "run directory") -> None:
        self.directory = directory
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        path = self.directory / LOCK_FILE
        if self.directory.exists() and not self.directory.is_dir():
            raise OutputError(
                f"{self.directory} is a file, not a folder, and the {self.what} must be a "
                "folder; move the file away or choose another --out."
            )
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise output_error(path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise output_error(path, err) from None
            raise RunInUse(
                f"the {self.what} {self.directory} is in use by another bnlab process "
                f"({self.owner() or 'pid unknown'}); wait for it to finish, or give this one another --out."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        self._fd = fd

    def owner(self) -> str:
        try:
            return (self.directory / LOCK_FILE).read_text().strip()[:40]
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holds_run(directory: Path) -> bool:
    """Whether ``directory`` holds any file a bnlab run writes."""
    return any((directory / name).exists() for name in RUN_FILES)


def clear_run_files(directory: Path) -> None:
    """Remove what an earlier attempt of a run wrote (and its temp files), nothing else:
    a user's own files in the directory stay."""
    if not directory.is_dir():
        return
    ours = [directory / name for name in RUN_FILES]
    ours += [tmp for tmp in directory.glob(".*.tmp") if any(tmp.name.startswith(f".{name}.") for name in RUN_FILES)]
    for path in ours:
        if not path.exists():  # on a read-only file system even unlinking nothing fails
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise output_error(path, err) from None


def refuse_to_overwrite(directory: Path, *, overwrite: bool) -> None:
    """UsageError if training into ``directory`` would overwrite something without being
    asked (a file stands there, an earlier run, other files). Writes nothing."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(
            f"{directory} is a file, not a folder; a run directory must be a folder: move the "
            "file away or choose another --out."
        )
    if holds_run(directory):
        if not overwrite:
            raise UsageError(
                f"{directory} already holds a bnlab run; bnlab does not overwrite results "
                "without being asked: give another --out, or --overwrite to train it again "
                "from epoch 0."
            )
    elif directory.is_dir() and any(p.name != LOCK_FILE for p in directory.iterdir()) and not overwrite:
        raise UsageError(
            f"{directory} is a folder that already holds other files; give an empty or new "
            "folder with --out (or --overwrite to write the run's files beside them)."
        )


def prepare_run_dir(directory: Path, *, overwrite: bool) -> None:
    """Refuse to train into a folder that holds something, unless ``overwrite``: then the
    earlier run's files (only those) are removed first. Call it holding the run's lock."""
    refuse_to_overwrite(directory, overwrite=overwrite)
    if overwrite:
        clear_run_files(directory)


class RunRecorder:
    """Keeps the run directory valid after every epoch, and reports each epoch (the
    question's table through ``echo``, an EpochRecord to ``on_epoch``). Every engine
    records through this class."""

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | os.PathLike | None,
        echo: Callable[[str], None] | None = print,
        show_seconds: bool = True,
        on_epoch: Callable[[EpochRecord], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.echo = echo
        self.show_seconds = show_seconds
        self.on_epoch = on_epoch
        self.history: list[EpochRecord] = []
        self.status = RUN_RUNNING
        self.message = ""

    def start(self, env: dict[str, Any]) -> None:
        if self.out_dir is not None:
            atomic_write_json(self.out_dir / "config.json", self.cfg.to_dict())
            atomic_write_json(self.out_dir / "environment.json", env)
            self._write_history()
        if self.echo:
            self.echo(table_header(seconds=self.show_seconds))

    def epoch(self, rec: EpochRecord) -> None:
        self.history.append(rec)
        if self.out_dir is not None:
            self._write_history()
        if self.echo:
            self.echo(format_row(rec, seconds=self.show_seconds))
        if self.on_epoch:
            self.on_epoch(rec)

    def end(self, status: str, message: str) -> None:
        """Record how a run that did not complete ended (diverged, failed, interrupted).
        Never raises: it runs while another error is on its way to the user."""
        self.status, self.message = status, message
        if self.out_dir is not None and (self.out_dir / "history.json").exists():
            try:
                self._write_history()
            except OSError:
                pass
            except Exception:  # noqa: BLE001 - e.g. OutputError on a full disk: the first error wins
                pass

    def finish(self, state_dict: dict[str, torch.Tensor], bn_trace: dict[str, np.ndarray] | None = None) -> None:
        if self.out_dir is not None:
            import numpy as np
            import torch

            buf = io.BytesIO()
            cpu_state = {k: v.detach().cpu() for k, v in state_dict.items()}
            torch.save({"model": cpu_state, "config": self.cfg.to_dict()}, buf)
            atomic_write_bytes(self.out_dir / "checkpoint.pt", buf.getvalue())
            if bn_trace:
                npz = io.BytesIO()
                arrays: dict[str, Any] = dict(bn_trace)  # numpy 2's stubs type savez's kwargs narrowly
                np.savez(npz, **arrays)
                atomic_write_bytes(self.out_dir / "bn_trace.npz", npz.getvalue())
        self.status = RUN_COMPLETE
        if self.out_dir is not None:
            self._write_history()

    def record_failed_start(self, message: str) -> bool:
        """Record, in a directory that has no history.json yet, a run that failed before
        its first file (engine, data or folder missing): status failed with ``message``.
        Best effort (False when it cannot be written: the same cause may prevent it)."""
        if self.out_dir is None or (self.out_dir / "history.json").exists():
            return False
        self.status, self.message = RUN_FAILED, message
        try:
            self._write_history()
        except (OSError, OutputError):
            return False
        return True

    def _write_history(self) -> None:
        assert self.out_dir is not None
        records = [dataclasses.asdict(r) for r in self.history]
        atomic_write_json(
            self.out_dir / "history.json",
            {
                "preset": self.cfg.preset,
                "seed": self.cfg.train.seed,
                "status": self.status,
                "message": self.message,
                "epochs_planned": self.cfg.train.epochs,
                "history": records,
            },
        )
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[f.name for f in dataclasses.fields(EpochRecord)])
        writer.writeheader()
        writer.writerows(records)
        atomic_write_text(self.out_dir / "history.csv", out.getvalue())


# ---------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    """The parsed JSON at ``path``; None if the file is absent. Unreadable -> InputError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}.") from None
    try:
        return json.loads(text)
    except ValueError:
        raise InputError(
            f"{path} is not valid JSON (a half-written or edited file?); "
            "delete the run directory's files and train it again."
        ) from None


def _epoch_record(raw: Any, path: Path) -> EpochRecord:
    names = [f.name for f in dataclasses.fields(EpochRecord)]
    if not isinstance(raw, dict) or set(raw) != set(names):
        raise InputError(
            f"{path}: an epoch record is not {{{', '.join(names)}}}; the file was edited or comes from another program."
        )
    values = [raw[n] for n in names]
    if not isinstance(values[0], int) or not all(isinstance(v, (int, float)) for v in values[1:]):
        raise InputError(f"{path}: an epoch record holds a value that is not a number.")
    return EpochRecord(values[0], *(float(v) for v in values[1:]))


@dataclass
class RunData:
    """What one run directory holds, as read (and validated) from disk."""

    preset: str
    seed: int
    run_dir: Path
    status: str
    history: list[EpochRecord]
    message: str = ""
    epochs_planned: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def column(self, name: str) -> np.ndarray:
        import numpy as np

        return np.asarray([getattr(r, name) for r in self.history], dtype=np.float64)

    @property
    def complete(self) -> bool:
        return self.status == RUN_COMPLETE and bool(self.history)

    def bn_trace(self) -> dict[str, np.ndarray] | None:
        import numpy as np

        path = self.run_dir / "bn_trace.npz"
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as err:
            raise InputError(f"{path} is not a readable BN trace ({err}).") from None

    def run_config(self) -> RunConfig:
        try:
            return RunConfig.from_dict(self.config)
        except ValueError as err:
            raise InputError(f"{self.run_dir / 'config.json'}: {err}") from None


def read_run(run_dir: str | os.PathLike) -> RunData | None:
    """The run saved in ``run_dir``, validated; None if it has no history.json (a run that
    never started). A malformed or tampered file is an InputError naming it."""
    run_dir = Path(run_dir)
    path = run_dir / "history.json"
    if not run_dir.is_dir():  # absent, or a file standing where the folder should be
        return None
    saved = _read_json(path)
    if saved is None:
        return None
    if not isinstance(saved, dict):
        raise InputError(
            f"{path} does not hold a bnlab history (a JSON object); it was edited or comes from another program."
        )
    status = saved.get("status")
    if status not in RUN_STATUSES:
        raise InputError(f"{path}: unknown status {status!r} (one of {', '.join(RUN_STATUSES)}).")
    seed = saved.get("seed")
    if not isinstance(seed, int) or seed < 0:
        raise InputError(f"{path}: the seed {seed!r} is not a whole number >= 0.")
    records = saved.get("history", [])
    if not isinstance(records, list):
        raise InputError(f"{path}: 'history' is not a list of epochs.")
    planned = saved.get("epochs_planned")
    config = _read_json(run_dir / "config.json")
    environment = _read_json(run_dir / "environment.json")
    message = saved.get("message", "")
    try:
        preset = safe_name(saved.get("preset"), "preset name")
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    return RunData(
        preset,
        seed,
        run_dir,
        status,
        [_epoch_record(r, path) for r in records],
        message if isinstance(message, str) else "",
        planned if isinstance(planned, int) else None,
        config if isinstance(config, dict) else {},
        environment if isinstance(environment, dict) else {},
    )


def group_by_preset(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    """Runs by preset name, in the order presets first appear."""
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(run.preset, []).append(run)
    return groups


def load_checkpoint(path: str | os.PathLike) -> tuple[MLP, RunConfig]:
    """Rebuild a trained model from checkpoint.pt without unpickling arbitrary objects."""
    from bnlab.models import build_model
    from bnlab.safeload import read_torch_file

    payload = read_torch_file(
        path, fix="A complete run directory holds the checkpoint.pt that bnlab train wrote; train again."
    )
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise InputError(f"{path} is not a bnlab checkpoint (a dict with 'model' and 'config').")
    try:
        cfg = RunConfig.from_dict(payload["config"])
    except ValueError as err:
        raise InputError(f"{path}: {err}") from None
    model = build_model(cfg.model)
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, TypeError, AttributeError) as err:
        raise InputError(
            f"{path}: its weights do not fit the model its config describes ({quote_error(err)})."
        ) from None
    return model, cfg


def load_run(run_dir: str | os.PathLike) -> tuple[MLP, RunConfig]:
    """The trained model and its config from a run directory of any engine (torch, Chainer,
    TensorFlow: every engine saves the torch model's keys), in eval mode.

    >>> model, cfg = bnlab.load_run("runs/answer-seed1")

    Reads checkpoint.pt with ``weights_only=True`` (no code from the file runs); an InputError
    (one paragraph) for a folder that is not a run, a run that never finished, or a damaged file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is not a folder; give the run directory that bnlab train or compare wrote.")
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.exists():
        run = read_run(run_dir)
        state = f"its status is {run.status!r}" if run is not None else "it holds no history.json"
        raise InputError(
            f"{run_dir} has no checkpoint.pt ({state}): only a run that finished training saves its model. "
            "Train it to the end (bnlab train, or rerun the same bnlab compare) and load it again."
        )
    model, cfg = load_checkpoint(checkpoint)
    model.eval()
    return model, cfg
