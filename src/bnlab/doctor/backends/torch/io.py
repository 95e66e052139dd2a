"""PyTorch weights on disk: ``--checkpoint`` state dicts, ``--fix``'s ``model.pt`` and how
to load it back, and the checkpoint of a bnlab run directory.

Every file read here is untrusted: state dicts load with ``torch.load(weights_only=True)``
(plain tensors and containers, never arbitrary objects), and every failure is one
paragraph naming the file and the fix.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.nn.parameter import is_lazy

from bnlab.doctor.backend import Change
from bnlab.doctor.backends import sketch
from bnlab.doctor.errors import InputError, a_type
from bnlab.doctor.state_fit import KEYS_NAMED, in_words
from bnlab.safeload import read_torch_file

# Containers other tools wrap a state dict in (bnlab's own checkpoint.pt, Lightning...).
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
# The key prefixes of a state dict saved from a wrapped model, and the wrapper.
WRAPPER_PREFIXES = {"module.": "DistributedDataParallel or DataParallel", "_orig_mod.": "torch.compile"}


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


def fit_state(model: Any, state: dict[str, Any], path: Path, prefix: str = "") -> None:
    """Load ``state`` into ``model`` (freshly built by the doctor, or a throwaway) exactly as
    ``model.load_state_dict(state, strict=True)`` takes it, or an InputError naming what
    does not fit (``model`` is then half-loaded). ``prefix``: the wrapper's key prefix
    ``state`` was read without, named in the error."""
    problems = _refusal(model, state)
    if problems:
        raise _misfit(model, path, problems, prefix)


def _misfit(model: Any, path: Path, problems: list[str], prefix: str = "") -> InputError:
    how = f", even read without the `{prefix}` prefix of a model wrapped in {_wrappers(prefix)}" if prefix else ""
    return InputError(
        f"{path} does not fit {type(model).__name__}{how}: {'; '.join(problems)}. Give the "
        "checkpoint saved from this model class (with the same constructor arguments)."
    )


def _refusal(model: Any, state: dict[str, Any]) -> list[str]:
    """Why PyTorch refuses to load ``state`` into ``model``, in bnlab's words; empty when it
    took it. PyTorch decides (a BatchNorm fills in a missing ``num_batches_tracked`` of an
    old state, a module's own load hooks rename keys...); bnlab only words the refusal."""
    own = {key: tuple(value.shape) for key, value in model.state_dict().items() if not is_lazy(value)}
    seen: list[Any] = []  # the root's post hook runs last: it sees the final missing/unexpected lists
    handle = model.register_load_state_dict_post_hook(lambda _module, keys: seen.append(keys))
    try:
        model.load_state_dict(state, strict=True)
        return []
    except RuntimeError as err:
        refusal = str(err).split("\n\t")[1:]  # PyTorch's lines after "Error(s) in loading ..."
    finally:
        handle.remove()
    missing, unexpected = (list(seen[-1].missing_keys), list(seen[-1].unexpected_keys)) if seen else ([], [])
    shapes = [
        (key, tuple(value.shape), own[key])
        for key, value in state.items()
        if key in own and own[key] != tuple(value.shape)
    ]
    ours = ("Missing key(s)", "Unexpected key(s)") + (("size mismatch for",) if shapes else ())
    others = [line.strip() for line in refusal if not line.startswith(ours)]
    return in_words(missing, unexpected, shapes) + others


def wrapper_prefix(state: dict[str, Any]) -> str:
    """The wrappers' prefixes every key of ``state`` carries, outermost first (e.g.
    ``_orig_mod.module.``); "" when none."""
    prefix = ""
    while state:  # an empty mapping would carry every prefix
        step = next((p for p in WRAPPER_PREFIXES if all(k.startswith(prefix + p) for k in state)), None)
        if step is None:
            return prefix
        prefix += step
    return prefix


def without_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A copy of ``state`` (its ``_metadata`` included) with ``prefix`` taken off every key."""
    copy: Any = OrderedDict(state)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        copy._metadata = OrderedDict(metadata)
    for step in _steps(prefix):  # one wrapper at a time: the metadata's keys lack the final dot
        consume_prefix_in_state_dict_if_present(copy, step)
    return copy


def _steps(prefix: str) -> list[str]:
    return [part + "." for part in prefix.split(".")[:-1]]


def _wrappers(prefix: str) -> str:
    """The wrappers behind ``prefix``, in the order they were put on."""
    return ", then ".join(WRAPPER_PREFIXES[step] for step in reversed(_steps(prefix)))


def load_checkpoint(model: Any, path: Path, notes: list[str]) -> None:
    """Load the state dict in ``path`` into ``model`` (freshly built by the doctor). A state
    saved from a wrapped model (DDP's ``module.``, torch.compile's ``_orig_mod.``) loads
    without the prefix where the state as saved does not fit; a line in ``notes`` says so."""
    state = state_dict_of(read_state_file(path), path)
    problems = _refusal(model, state)  # the state as saved first: a model may own a `module`
    prefix = wrapper_prefix(state)
    if problems and prefix:
        fit_state(model, without_prefix(state, prefix), path, prefix)
        notes.append(
            f"read {path.name} without its `{prefix}` prefix (saved from a model wrapped in {_wrappers(prefix)})"
        )
    elif problems:
        raise _misfit(model, path, problems)


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
