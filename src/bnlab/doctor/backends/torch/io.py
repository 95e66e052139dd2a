"""PyTorch weights on disk: ``--checkpoint`` state dicts, ``--fix``'s ``model.pt`` and how
to load it back, and the checkpoint of a bnlab run directory.

Every file read here is untrusted: state dicts load with ``torch.load(weights_only=True)``
(plain tensors and containers, never arbitrary objects), and every failure is one
paragraph naming the file and the fix.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from bnlab.doctor.backend import Change
from bnlab.doctor.backends import sketch
from bnlab.doctor.errors import InputError, a_type
from bnlab.doctor.state_fit import KEYS_NAMED, misfits
from bnlab.safeload import read_torch_file

# Containers other tools wrap a state dict in (bnlab's own checkpoint.pt, Lightning...).
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")


def read_state_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with the failures explained (bnlab.safeload)."""
    return read_torch_file(path, fix="Save the weights alone: torch.save(model.state_dict(), PATH).")


def state_dict_of(payload: Any, path: Path) -> dict[str, Any]:
    """The tensor mapping inside ``payload``: a state dict, or one wrapped under a known key."""
    if isinstance(payload, dict):
        for key in WRAPPER_KEYS:
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not payload:
        raise InputError(
            f"{path} holds {a_type(payload)}, not a state dict (a mapping of names to "
            "tensors); save it with torch.save(model.state_dict(), PATH)."
        )
    bad = [str(key) for key, value in payload.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise InputError(
            f"{path}: entries {', '.join(bad[:KEYS_NAMED])} are not tensors; a state dict maps "
            "parameter and buffer names to tensors (torch.save(model.state_dict(), PATH))."
        )
    return payload


def check_keys(model: Any, state: dict[str, Any], path: Path) -> None:
    """InputError unless ``state`` has exactly the model's keys, with the model's shapes."""
    own = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    problems = misfits(own, {key: tuple(value.shape) for key, value in state.items()})
    if problems:
        raise InputError(
            f"{path} does not fit {type(model).__name__}: {'; '.join(problems)}. Give the "
            "checkpoint saved from this model class (with the same constructor arguments)."
        )


def load_checkpoint(model: Any, path: Path) -> None:
    """Load the state dict in ``path`` into ``model`` (freshly built by the doctor)."""
    state = state_dict_of(read_state_file(path), path)
    check_keys(model, state, path)
    model.load_state_dict(state)


def save_weights(model: Any) -> bytes:
    """A state dict (tensors copied to the CPU) for ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def how_to_load(changes: list[Change], weights: Path, target: str, mlp_config: Any) -> str:
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
    return sketch.rebuild_and_load(
        changes,
        target,
        "torch",
        f"model.load_state_dict(torch.load({str(weights)!r}, weights_only=True))",
    )
