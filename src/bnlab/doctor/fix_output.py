"""``--fix OUT``: the repaired model on disk.

OUT holds the weights (``model.pt``, a state dict for ``torch.load(weights_only=True)``;
Chainer: ``model.npz`` for ``chainer.serializers.load_npz``; Keras: ``model.keras``, the
whole repaired model in Keras's native format for ``keras.models.load_model``),
``repair.json`` (what changed, before/after numbers) and ``HOW_TO_LOAD.txt``. Each file is written to a
temporary name and renamed; existing files are never overwritten unless asked.
"""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path
from typing import Any

from bnlab.doctor.errors import InputError
from bnlab.doctor.repair import RepairResult

HOW_TO = "HOW_TO_LOAD.txt"
CHANGES = "repair.json"


def weights_name(framework: str) -> str:
    return {"chainer": "model.npz", "keras": "model.keras"}.get(framework, "model.pt")


def planned_files(out_dir: Path, framework: str) -> list[Path]:
    return [out_dir / name for name in (weights_name(framework), CHANGES, HOW_TO)]


def check_writable(out_dir: Path, framework: str, overwrite: bool) -> None:
    """Refuse before any work is done: OUT must be a folder (or absent) without our files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--fix {out_dir}: exists and is not a folder; give a folder for the repaired model.")
    existing = [p.name for p in planned_files(out_dir, framework) if p.exists()]
    if existing and not overwrite:
        raise InputError(
            f"--fix {out_dir}: {', '.join(existing)} already exist; bnlab doctor "
            "does not overwrite files. Give another folder, or add --overwrite."
        )


def _keras_bytes(model: Any) -> bytes:
    """The ``.keras`` archive of ``model``: Keras saves to a path ending in ``.keras``, so it
    goes to a private temporary folder first, then to OUT through the atomic writer."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bnlab-fix-") as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        return path.read_bytes()


def _weights(result: RepairResult) -> bytes:
    if result.framework == "keras":
        return _keras_bytes(result.model)
    buffer = io.BytesIO()
    if result.framework == "chainer":
        import chainer

        chainer.serializers.save_npz(buffer, result.model, compression=True)
    else:
        import torch

        state = {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()}
        torch.save(state, buffer)
    return buffer.getvalue()


def _keras_how_to(result: RepairResult, path: Path) -> str:
    def paragraph(text: str) -> str:
        return textwrap.fill(text, width=88) + "\n\n"

    renamed = [f"{c['where']} -> {', '.join(c['into'])}" for c in result.changes if c["change"] == "split"]
    text = paragraph(
        "model.keras is the whole repaired model (architecture and weights) in Keras's native "
        "format: it loads without the code that built the original."
    )
    if renamed:
        text += paragraph(
            "Each shared BatchNormalization is now one layer per call site (gamma and beta "
            f"copied, moving statistics re-estimated): {'; '.join(renamed)}."
        )
    text += f"    import keras\n    model = keras.models.load_model({str(path)!r})  # safe_mode stays True\n\n"
    text += paragraph(
        "It is not compiled: compile it again to train it further. Custom layers must be "
        "importable and registered (keras.saving.register_keras_serializable), or passed as "
        "custom_objects={...}."
    )
    return text.rstrip("\n") + "\n"


def _how_to(result: RepairResult, out_dir: Path, target: str, mlp_config: Any) -> str:
    weights = out_dir / weights_name(result.framework)
    if result.framework == "keras":
        return _keras_how_to(result, weights)
    if mlp_config is not None:
        return (
            "The repaired model is bnlab's MLP with one BN per hidden layer (the answer's "
            "layout).\n\n"
            "    import torch\n"
            "    from bnlab.models import ModelConfig, build_model\n"
            f"    model = build_model(ModelConfig(**{mlp_config!r}))\n"
            f"    model.load_state_dict(torch.load({str(weights)!r}, weights_only=True))\n"
            "    model.eval()\n"
        )
    splits = result.splits
    build = f"model = ...  # your model, built as for {target}\n"
    if splits:
        build += f"    model = split_shared(model, {splits!r})  # one BN per call site\n"
    if result.framework == "chainer":
        load = f"chainer.serializers.load_npz({str(weights)!r}, model)\n"
        head = "    import chainer\n    from bnlab.doctor.repair import split_shared\n"
    else:
        load = f"model.load_state_dict(torch.load({str(weights)!r}, weights_only=True))\n"
        head = "    import torch\n    from bnlab.doctor.repair import split_shared\n"
    note = (
        "Each shared BN is now one BN per call site (chosen by call order within a forward "
        "pass); give your own model class one BN per call site to drop the wrapper.\n\n"
        if splits
        else ""
    )
    return note + head + "    " + build + "    " + load


def write(
    result: RepairResult,
    out_dir: Path,
    *,
    target: str,
    report: dict[str, Any],
    overwrite: bool = False,
    mlp_config: Any = None,
) -> list[Path]:
    """Write OUT's three files; returns their paths."""
    from bnlab.rundir import atomic_write_bytes, atomic_write_text

    check_writable(out_dir, result.framework, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, changes, how_to = planned_files(out_dir, result.framework)
    atomic_write_bytes(weights, _weights(result))
    record = {"target": target, "weights": weights.name, "load": HOW_TO, "repair": result.to_dict(), "doctor": report}
    atomic_write_text(changes, json.dumps(record, indent=2, allow_nan=False) + "\n")
    atomic_write_text(how_to, _how_to(result, out_dir, target, mlp_config))
    return [weights, changes, how_to]
