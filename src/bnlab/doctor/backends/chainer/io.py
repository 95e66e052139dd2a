"""Chainer weights on disk: ``--checkpoint`` ``save_npz`` files, ``--fix``'s ``model.npz``
and how to load it back (numpy archives, never pickles)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import chainer
import numpy as np

from bnlab.doctor.backend import Change
from bnlab.doctor.backends import sketch
from bnlab.doctor.errors import InputError, quote_error


def load_checkpoint(model: Any, path: Path, notes: list[str]) -> None:
    """Load a Chainer ``save_npz`` file into ``model`` (numpy, no pickles). Nothing for ``notes``."""
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            chainer.serializers.NpzDeserializer(npz, strict=True).load(model)
    except Exception as err:
        raise InputError(
            f"{path} does not load into {type(model).__name__} ("
            f"{quote_error(err)}). Give a file written by chainer.serializers.save_npz from this "
            "model."
        ) from err


def save_weights(model: Any) -> bytes:
    """A compressed ``save_npz`` archive of ``model``."""
    buffer = io.BytesIO()
    chainer.serializers.save_npz(buffer, model, compression=True)
    return buffer.getvalue()


def how_to_load(changes: list[Change], weights: Path, target: str, mlp_config: Any) -> str:
    return sketch.rebuild_and_load(changes, target, "chainer", f"chainer.serializers.load_npz({str(weights)!r}, model)")
