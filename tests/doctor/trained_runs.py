"""Short real trainings for the doctor's repair and run-directory tests (bnlab's own MLP)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bnlab.engines import RunResult, train
from bnlab.presets import get_preset


def train_preset(preset: str, epochs: int, out_dir: Path, seed: int = 0) -> RunResult:
    """``bnlab train --preset PRESET --epochs EPOCHS --seed SEED --out OUT_DIR``, in process."""
    cfg = get_preset(preset).config
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs, seed=seed))
    return train(cfg, echo=None, out_dir=out_dir)
