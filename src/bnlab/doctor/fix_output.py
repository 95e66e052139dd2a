"""``--fix OUT``: the repaired model on disk.

OUT holds the weights (``Backend.WEIGHTS_NAME``: ``model.pt``, a state dict for
``torch.load(weights_only=True)``; Chainer: ``model.npz`` for
``chainer.serializers.load_npz``; Keras: ``model.keras``, the whole repaired model in
Keras's native format for ``keras.models.load_model``), ``repair.json`` (what changed,
before/after numbers) and ``HOW_TO_LOAD.txt``. Each file is written to a temporary name
and renamed; existing files are never overwritten unless asked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bnlab.doctor.backend import Backend
from bnlab.doctor.errors import InputError
from bnlab.doctor.repair import RepairResult

HOW_TO = "HOW_TO_LOAD.txt"
CHANGES = "repair.json"


def planned_files(out_dir: Path, backend: Backend) -> list[Path]:
    return [out_dir / name for name in (backend.WEIGHTS_NAME, CHANGES, HOW_TO)]


def check_writable(out_dir: Path, backend: Backend, overwrite: bool) -> None:
    """Refuse before any work is done: OUT must be a folder (or absent) without our files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--fix {out_dir}: exists and is not a folder; give a folder for the repaired model.")
    existing = [p.name for p in planned_files(out_dir, backend) if p.exists()]
    if existing and not overwrite:
        raise InputError(
            f"--fix {out_dir}: {', '.join(existing)} already exist; bnlab doctor "
            "does not overwrite files. Give another folder, or add --overwrite."
        )


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
    """Write OUT's three files (``result`` repaired by ``backend``); returns their paths."""
    from bnlab.rundir import atomic_write_bytes, atomic_write_text

    check_writable(out_dir, backend, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, changes, how_to = planned_files(out_dir, backend)
    atomic_write_bytes(weights, backend.save_weights(result.model))
    record = {"target": target, "weights": weights.name, "load": HOW_TO, "repair": result.to_dict(), "doctor": report}
    atomic_write_text(changes, json.dumps(record, indent=2, allow_nan=False) + "\n")
    atomic_write_text(how_to, backend.how_to_load(result.changes, weights, target, mlp_config))
    return [weights, changes, how_to]
