"""``--fix OUT``: the repaired model on disk.

OUT holds the weights (``Backend.WEIGHTS_NAME``: ``model.pt``, a state dict for
``torch.load(weights_only=True)``; Chainer: ``model.npz`` for
``chainer.serializers.load_npz``; Keras: ``model.keras``, the whole repaired model in
Keras's native format for ``keras.models.load_model``), ``repair.json`` (what changed,
before/after numbers) and ``HOW_TO_LOAD.txt``. The three appear together or not at all
(:func:`bnlab.rundir.write_file_set`): a full disk, a read-only file system or a Ctrl-C
leaves OUT as it was, so the same command can simply be run again. Existing files are never
overwritten unless asked (``--overwrite``), and then only once the new set is complete.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from bnlab.doctor.backend import Backend
from bnlab.doctor.errors import InputError
from bnlab.doctor.repair import RepairResult
from bnlab.errors import output_error

HOW_TO = "HOW_TO_LOAD.txt"
CHANGES = "repair.json"


def planned_files(out_dir: Path, backend: Backend) -> list[Path]:
    return [out_dir / name for name in (backend.WEIGHTS_NAME, CHANGES, HOW_TO)]


def check_writable(out_dir: Path, backend: Backend, overwrite: bool) -> None:
    """Refuse before any work is done: OUT must be a folder (or absent) without our files,
    on a file system where it can be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--fix {out_dir}: exists and is not a folder; give a folder for the repaired model.")
    existing = [p.name for p in planned_files(out_dir, backend) if p.exists()]
    if existing and not overwrite:
        raise InputError(
            f"--fix {out_dir}: {', '.join(existing)} already exist; bnlab doctor "
            "does not overwrite files. Give another folder, or add --overwrite."
        )
    _check_can_create(out_dir)


def _check_can_create(out_dir: Path) -> None:
    """OutputError (naming --fix) when OUT, or the folder it would be made in, cannot be
    written: found now, not after the probe and the repair have run."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():  # a file stands where a parent folder is needed
        raise output_error(out_dir, OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), "--fix")
    if not os.access(existing, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES
        raise output_error(out_dir, OSError(code, os.strerror(code)), "--fix")


def write(
    result: RepairResult,
    backend: Backend,
    out_dir: Path,
    *,
    target: str,
    report: dict[str, Any],
    overwrite: bool = False,
    mlp_config: Any = None,
) -> list[Path]:
    """Write OUT's three files (``result`` repaired by ``backend``) as one set; returns their paths."""
    from bnlab.rundir import write_file_set

    check_writable(out_dir, backend, overwrite)
    weights, changes, how_to = planned_files(out_dir, backend)
    record = {"target": target, "weights": weights.name, "load": HOW_TO, "repair": result.to_dict(), "doctor": report}
    files = {
        weights.name: backend.save_weights(result.model),
        changes.name: (json.dumps(record, indent=2, allow_nan=False) + "\n").encode(),
        how_to.name: backend.how_to_load(result.changes, weights, target, mlp_config).encode(),
    }
    return write_file_set(out_dir, files, option="--fix", replace=overwrite)
