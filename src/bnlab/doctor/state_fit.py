"""Whether saved weights fit a model: the keys and shapes a checkpoint has against the
model's, in words. Framework-free: each backend's ``io`` reads its own file format and
passes plain ``name -> shape`` mappings here."""

from __future__ import annotations

from collections.abc import Mapping

KEYS_NAMED = 4  # how many missing / unexpected / misshapen keys a message names


def _named(keys: list[str]) -> str:
    more = f" and {len(keys) - KEYS_NAMED} more" if len(keys) > KEYS_NAMED else ""
    return ", ".join(keys[:KEYS_NAMED]) + more


def misfits(own: Mapping[str, tuple[int, ...]], saved: Mapping[str, tuple[int, ...]]) -> list[str]:
    """What keeps ``saved`` (checkpoint name -> shape) from loading into ``own`` (the
    model's): missing keys, unexpected keys, shapes that differ; empty when it fits."""
    missing = [key for key in own if key not in saved]
    unexpected = [key for key in saved if key not in own]
    shapes = [f"{key} {saved[key]} vs {own[key]}" for key in own if key in saved and saved[key] != own[key]]
    problems = []
    if missing:
        problems.append(f"missing keys: {_named(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_named(unexpected)}")
    if shapes:
        problems.append(f"shapes differ (checkpoint vs model): {_named(shapes)}")
    return problems
