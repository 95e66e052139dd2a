"""Trained weights for the doctor: ``--checkpoint PATH`` and bnlab run directories.

``--checkpoint``: a PyTorch state dict, a Chainer ``save_npz`` file, or a Keras
``.weights.h5`` / ``.keras`` file (weights only).

Every file read here is untrusted: state dicts load with ``torch.load(weights_only=True)``
(plain tensors and containers, never arbitrary objects), a run directory's config is
validated field by field, and every failure is one paragraph naming the file and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bnlab.doctor.errors import InputError

# How many missing / unexpected keys a message names.
KEYS_NAMED = 4
# Containers other tools wrap a state dict in (bnlab's own checkpoint.pt, Lightning...).
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")


def _unsafe_global(message: str) -> str | None:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    return found.group(1) if found else None


def read_state_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with the failures explained."""
    import torch

    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        name = _unsafe_global(str(err))
        if name is not None:
            raise InputError(
                f"{path} needs arbitrary Python objects to load (it pickles {name}); bnlab loads "
                "checkpoints with torch.load(weights_only=True), which only reads tensors and "
                "plain containers, because unpickling runs code from the file. Save the weights "
                "alone: torch.save(model.state_dict(), PATH)."
            ) from err
        raise InputError(
            f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160]}). The file is corrupt, truncated or of another "
            "format; save it again with torch.save(model.state_dict(), PATH)."
        ) from err


def state_dict_of(payload: Any, path: Path) -> dict[str, Any]:
    """The tensor mapping inside ``payload``: a state dict, or one wrapped under a known key."""
    import torch

    if isinstance(payload, dict):
        for key in WRAPPER_KEYS:
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not payload:
        raise InputError(
            f"{path} holds a {type(payload).__name__}, not a state dict (a mapping of names to "
            "tensors); save it with torch.save(model.state_dict(), PATH)."
        )
    bad = [str(key) for key, value in payload.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise InputError(
            f"{path}: entries {', '.join(bad[:KEYS_NAMED])} are not tensors; a state dict maps "
            "parameter and buffer names to tensors (torch.save(model.state_dict(), PATH))."
        )
    return payload


def _named(keys: list[str]) -> str:
    more = f" and {len(keys) - KEYS_NAMED} more" if len(keys) > KEYS_NAMED else ""
    return ", ".join(keys[:KEYS_NAMED]) + more


def check_keys(model: Any, state: dict[str, Any], path: Path) -> None:
    """InputError unless ``state`` has exactly the model's keys, with the model's shapes."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    problems = []
    if missing:
        problems.append(f"missing keys: {_named(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_named(unexpected)}")
    shapes = [
        f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
        for key in own
        if key in state and tuple(state[key].shape) != tuple(own[key].shape)
    ]
    if shapes:
        problems.append(f"shapes differ (checkpoint vs model): {_named(shapes)}")
    if problems:
        raise InputError(
            f"{path} does not fit {type(model).__name__}: {'; '.join(problems)}. Give the "
            "checkpoint saved from this model class (with the same constructor arguments)."
        )


def load_torch_checkpoint(model: Any, path: Path) -> None:
    """Load the state dict in ``path`` into ``model`` (freshly built by the doctor)."""
    state = state_dict_of(read_state_file(path), path)
    check_keys(model, state, path)
    model.load_state_dict(state)


def load_chainer_checkpoint(model: Any, path: Path) -> None:
    """Load a Chainer ``save_npz`` file into ``model`` (numpy, no pickles)."""
    import chainer
    import numpy as np

    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            chainer.serializers.NpzDeserializer(npz, strict=True).load(model)
    except Exception as err:
        raise InputError(
            f"{path} does not load into {type(model).__name__} ({type(err).__name__}: "
            f"{str(err)[:200]}). Give a file written by chainer.serializers.save_npz from this "
            "model."
        ) from err


KERAS_SUFFIXES = (".weights.h5", ".keras")


def load_keras_checkpoint(model: Any, path: Path) -> None:
    """Load the weights of a Keras ``model.save_weights`` (``.weights.h5``) or ``model.save``
    (``.keras``) file into ``model``; only the weights are read (no layer config, no code)."""
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
            f"({type(err).__name__}: {str(err)[:200]}). Give a file saved from this model, built "
            "the same way (a subclassed model must be built before its weights can load)."
        ) from err


def load_checkpoint_into(model: Any, framework: str, path: str) -> None:
    if framework == "chainer":
        load_chainer_checkpoint(model, Path(path))
    elif framework == "keras":
        load_keras_checkpoint(model, Path(path))
    else:
        load_torch_checkpoint(model, Path(path))


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
        raise InputError(f"{path} holds an invalid configuration ({err}).") from err
    if saved.model != cfg.model:
        raise InputError(
            f"{path} was saved from another model than {run_dir / 'config.json'} "
            "describes; the run directory mixes two runs. Train it again."
        )
    check_keys(build_model(cfg.model), state_dict_of(payload, path), path)
    model, _ = load_checkpoint(path)
    return model, cfg
