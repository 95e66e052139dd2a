"""The study "when does sharing one BN hurt?": the question's shared BN against the
answer's per-layer BNs over the running-average rate and the batch size, with the
doctor's repair of every shared run beside it.

The grid is Chainer decay 0.5 / 0.9 / 0.99 (PyTorch momentum 0.5 / 0.1 / 0.01) x batch
size 100 / 1000; ``bnlab study sharing`` is ``bnlab compare --presets question,answer``
with these two ``--grid`` axes, plus, for each complete shared run, the val acc after
``bnlab.doctor.repair`` (the shared BN split per call site, running statistics
re-estimated over one pass of the training set, no gradient step): the same batches as
``bnlab doctor RUN --data mnist --fix OUT`` (batches of 1000, seed 0, the whole test set
for the evaluation). Repairs are cached in OUT/repairs/ under the checkpoint's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bnlab.errors import BnlabError, InputError, MissingExtra, OutputError
from bnlab.grid_report import GridResult
from bnlab.rundir import RUN_COMPLETE, atomic_write_json

if typing.TYPE_CHECKING:
    from bnlab.sweep import RunOutcome, RunSpec

SHARING_PRESETS = ("question", "answer")
SHARING_SEEDS = "0-2"
REPAIRED_SERIES = "question, repaired by the doctor"
# The doctor's defaults for --data mnist: re-estimation and evaluation batches, seed.
REPAIR_BATCH, REPAIR_SEED = 1000, 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def repair_run(run_dir: Path, data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Repair one trained run's model with the doctor and evaluate it before and after on
    the test set: ``{"before": {...}, "after": {...}, "changes": [...]}``."""
    from bnlab.doctor import sources
    from bnlab.doctor.backends import detect
    from bnlab.doctor.repair import repair_report
    from bnlab.rundir import load_checkpoint

    model, cfg = load_checkpoint(run_dir / "checkpoint.pt")
    backend = detect(model)
    try:
        src = sources.builtin_source(
            cfg.dataset, model, backend, str(data_dir) if data_dir else None, REPAIR_BATCH, REPAIR_SEED
        )
        assert src.fit_batches is not None and src.held_out is not None  # a built-in data set has both
        result = repair_report(model, src.fit_batches(), src.held_out, framework=backend)
    except (MissingExtra, OutputError):
        raise
    except BnlabError as err:  # the model or the data did not let the doctor repair it
        raise InputError(f"the doctor could not repair {run_dir}: {err}") from None
    return {"before": result.before, "after": result.after, "changes": result.changes}


def _cached_repair(spec: RunSpec, out: Path, data_dir: str | os.PathLike | None) -> dict[str, Any]:
    """The repair of ``spec``'s run, from OUT/repairs when its checkpoint is unchanged."""
    checkpoint = spec.run_dir / "checkpoint.pt"
    digest = _sha256(checkpoint)
    cache = out / "repairs" / spec.run_dir.relative_to(out / "runs").with_suffix(".json")
    try:
        saved = json.loads(cache.read_text())
        if isinstance(saved, dict) and saved.get("checkpoint_sha256") == digest and "after" in saved:
            return saved
    except (OSError, ValueError):
        pass  # absent or unreadable: repair again
    repaired = {"checkpoint_sha256": digest, **repair_run(spec.run_dir, data_dir)}
    atomic_write_json(cache, repaired)
    return repaired


def repaired_results(
    specs: Sequence[RunSpec],
    outcomes: Sequence[RunOutcome],
    out: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> list[GridResult]:
    """The doctor's repair of every complete shared-BN run, as grid results of the series
    ``REPAIRED_SERIES`` (final val acc and loss after the repair)."""
    out = Path(out)
    shared = [(s, o) for s, o in zip(specs, outcomes, strict=True) if s.config.model.norm == "shared"]
    results = []
    for i, (spec, outcome) in enumerate(shared):
        if outcome.status != RUN_COMPLETE:
            results.append(
                GridResult(
                    REPAIRED_SERIES,
                    spec.grid,
                    spec.seed,
                    outcome.status,
                    {},
                    spec.run_dir,
                    "the run did not complete: nothing to repair",
                )
            )
            continue
        if on_stage is not None:
            on_stage(f"repairing {spec.label} with the doctor ({i + 1}/{len(shared)})")
        repaired = _cached_repair(spec, out, data_dir)
        after, before = repaired["after"], repaired["before"]
        results.append(
            GridResult(
                REPAIRED_SERIES,
                spec.grid,
                spec.seed,
                RUN_COMPLETE,
                {"final_val_acc": after["val_acc"], "final_val_loss": after["val_loss"]},
                spec.run_dir,
                f"val acc before the repair {before['val_acc']:.4f}",
            )
        )
    return results


def repair_table(
    specs: Sequence[RunSpec], outcomes: Sequence[RunOutcome], results: Sequence[GridResult]
) -> list[dict[str, Any]]:
    """Per shared run: its final val acc, the val acc after the repair, and the answer's
    on the same grid point and seed (the rows of the study's table)."""
    answer = {(s.grid, s.seed): o.final_val_acc for s, o in zip(specs, outcomes, strict=True) if s.preset == "answer"}
    mine = {(s.grid, s.seed): o.final_val_acc for s, o in zip(specs, outcomes, strict=True) if s.preset == "question"}
    rows = []
    for r in results:
        rows.append(
            {
                "point": dict(r.point),
                "seed": r.seed,
                "shared": mine.get((r.point, r.seed)),
                "repaired": r.metrics.get("final_val_acc"),
                "per_layer": answer.get((r.point, r.seed)),
            }
        )
    return rows
