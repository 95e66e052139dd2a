"""Keras weights on disk: ``--checkpoint`` ``.weights.h5`` / ``.keras`` files, ``--fix``'s
``model.keras`` (the whole repaired model in Keras's native format) and how to load it."""

from __future__ import annotations

import tempfile
import textwrap
from pathlib import Path
from typing import Any

from bnlab.doctor.backend import Change
from bnlab.doctor.errors import InputError, quote_error

KERAS_SUFFIXES = (".weights.h5", ".keras")


def load_checkpoint(model: Any, path: Path, notes: list[str]) -> None:
    """Load the weights of a Keras ``model.save_weights`` (``.weights.h5``) or ``model.save``
    (``.keras``) file into ``model``; only the weights are read (no layer config, no code). Nothing for ``notes``."""
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file.")
    if not path.name.endswith(KERAS_SUFFIXES):
        raise InputError(
            f"{path}: a Keras checkpoint is a file written by model.save_weights(PATH.weights.h5) "
            "or model.save(PATH.keras); give one of those."
        )
    try:
        model.load_weights(path)
    except Exception as err:
        raise InputError(
            f"{path} does not load into the Keras model {getattr(model, 'name', type(model).__name__)!r} "
            f"({quote_error(err)}). Give a file saved from this model, built "
            "the same way (a subclassed model must be built before its weights can load)."
        ) from err


def save_weights(model: Any) -> bytes:
    """The ``.keras`` archive of ``model``: Keras saves to a path ending in ``.keras``, so it
    goes to a private temporary folder first, then to OUT through the atomic writer."""
    with tempfile.TemporaryDirectory(prefix="bnlab-fix-") as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        return path.read_bytes()


def how_to_load(changes: list[Change], path: Path, target: str, mlp_config: Any) -> str:
    def paragraph(text: str) -> str:
        return textwrap.fill(text, width=88) + "\n\n"

    renamed = [f"{c['where']} -> {', '.join(c['into'])}" for c in changes if c["change"] == "split"]
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
