"""The pinned 3-epoch histories: which runs, how one is produced, and which machine a pin
belongs to (shared by the test and tests/golden/make_histories.py).

A pin is exact for one machine only: two CPUs with other ISA extensions take other kernels in
MKL, OpenBLAS and PyTorch and round differently. Measured on two machines of this project
with the same code and packages: the question's first-epoch loss 0.29950684 against
0.29950911 (7.6e-6 relative), growing to 1.6e-2 in a value after 3 epochs; the no-BN presets
differ by 1e-8 at most.
"""

import json
from pathlib import Path

GOLDEN_FILE = Path(__file__).resolve().parent / "golden" / "histories_3_epochs.json"
EPOCHS = 3
TORCH_PRESETS = ("question", "question-first-snippet", "answer", "no-bn", "tensorflow", "tensorflow-no-bn")
CHAINER_PRESETS = ("question", "question-first-snippet", "answer", "no-bn")


def golden_cases() -> list[tuple[str, str]]:
    return [("torch", p) for p in TORCH_PRESETS] + [("chainer", p) for p in CHAINER_PRESETS]


def machine() -> str:
    """This machine as far as rounding goes: the CPU and the kernels PyTorch picks for it."""
    import torch

    from bnlab.engines.common import cpu_description

    return f"{cpu_description()}; torch kernels {torch.backends.cpu.get_cpu_capability()}"


def read_pins() -> list[dict]:
    return json.loads(GOLDEN_FILE.read_text())["pins"]


def run_case(engine: str, preset: str, data) -> list[list[float]]:
    """The (train_loss, val_loss, train_acc, val_acc) rows of one 3-epoch run, seed 0."""
    from bnlab.config import apply_overrides
    from bnlab.engines import train
    from bnlab.presets import get_preset

    cfg = apply_overrides(
        get_preset(preset).config, {"epochs": str(EPOCHS), "engine": engine, "seed": "0", "threads": "1"}
    )
    result = train(cfg, data, echo=None)
    return [[r.train_loss, r.val_loss, r.train_acc, r.val_acc] for r in result.history]
