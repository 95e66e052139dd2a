"""Trained models for the doctor: bnlab run directories (``bnlab doctor runs/NAME``).

A run directory holds bnlab's own PyTorch MLP: its config is validated field by field,
its ``checkpoint.pt`` is read by the PyTorch backend's :mod:`~bnlab.doctor.backends.torch.io`
(``torch.load(weights_only=True)``), and every failure is one paragraph naming the file
and the fix. ``--checkpoint PATH`` for other targets is ``Backend.load_checkpoint``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnlab.doctor.errors import InputError, quote_error

# -- bnlab run directories ------------------------------------------------------------


def is_run_dir(target: str) -> bool:
    return Path(target).is_dir()


def _run_config(run_dir: Path) -> Any:
    """The run's RunConfig, read and validated by :func:`bnlab.rundir.read_run`."""
    from bnlab.rundir import read_run

    if not (run_dir / "config.json").is_file():
        raise InputError(
            f"{run_dir} is a folder without config.json: give a bnlab run directory "
            "(written by bnlab train) or FILE.py:NAME."
        )
    run = read_run(run_dir)  # InputError for a damaged file
    if run is None:
        raise InputError(
            f"{run_dir} has no history.json: the run never started, or this is not "
            "a bnlab run directory; train it with bnlab train."
        )
    if not isinstance(run.config.get("model"), dict) or not isinstance(run.config.get("train"), dict):
        raise InputError(
            f"{run_dir / 'config.json'} has no 'model' and 'train' sections; it was not written by bnlab train."
        )
    return run.run_config()


def load_run_dir(target: str) -> tuple[Any, Any]:
    """The trained MLP of a bnlab run directory and its RunConfig.

    The model is built from config.json and must match checkpoint.pt, which is read with
    ``weights_only=True``.
    """
    from bnlab.config import RunConfig
    from bnlab.doctor.backends.torch.io import fit_state, read_state_file, state_dict_of
    from bnlab.models import build_model
    from bnlab.rundir import load_checkpoint

    run_dir = Path(target)
    cfg = _run_config(run_dir)
    path = run_dir / "checkpoint.pt"
    payload = read_state_file(path)
    if not isinstance(payload, dict) or "config" not in payload:
        raise InputError(f"{path} is not a bnlab checkpoint (no 'config' entry).")
    try:
        saved = RunConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path} holds an invalid configuration ({quote_error(err)}).") from err
    if saved.model != cfg.model:
        raise InputError(
            f"{path} was saved from another model than {run_dir / 'config.json'} "
            "describes; the run directory mixes two runs. Train it again."
        )
    fit_state(build_model(cfg.model), state_dict_of(payload, path), path)  # a throwaway: a misfit in our words
    model, _ = load_checkpoint(path)
    return model, cfg
