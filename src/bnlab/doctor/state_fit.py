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
    shapes = [(key, saved[key], own[key]) for key in own if key in saved and saved[key] != own[key]]
    return in_words(missing, unexpected, shapes)


def in_words(
    missing: list[str], unexpected: list[str], shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
) -> list[str]:
    """The misfits of a checkpoint, one phrase per kind: ``shapes`` holds (name, shape in the
    checkpoint, shape in the model). For a backend whose framework finds them itself."""
    problems = []
    if missing:
        problems.append(f"missing keys: {_named(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_named(unexpected)}")
    if shapes:
        named = [f"{key} {saved} vs {own}" for key, saved, own in shapes]
        problems.append(f"shapes differ (checkpoint vs model): {_named(named)}")
    return problems
