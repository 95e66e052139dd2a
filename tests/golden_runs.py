"""The pinned 3-epoch histories: which runs, and how one is produced (shared by the test
and tests/golden/make_histories.py)."""

from pathlib import Path

GOLDEN_FILE = Path(__file__).resolve().parent / "golden" / "histories_3_epochs.json"
EPOCHS = 3
TORCH_PRESETS = ("question", "question-first-snippet", "answer", "no-bn", "tensorflow", "tensorflow-no-bn")
CHAINER_PRESETS = ("question", "question-first-snippet", "answer", "no-bn")


def golden_cases() -> list[tuple[str, str]]:
    return [("torch", p) for p in TORCH_PRESETS] + [("chainer", p) for p in CHAINER_PRESETS]


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
