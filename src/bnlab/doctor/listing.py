"""Lists of layer names in the text report, short enough to read at a glance.

A ResNet has 53 BN layers: the text report names the few that matter and counts the
rest. The JSON report and each finding's ``data`` keep every name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LONGEST = 8  # names listed in full up to this many
SHOWN = 4  # names shown before "and N more" in a longer list


def name_list(names: Sequence[str]) -> str:
    """``"a, b, c"``; past ``LONGEST`` names the first few and ``"and N more"``."""
    if len(names) <= LONGEST:
        return ", ".join(names)
    return f"{', '.join(names[:SHOWN])} and {len(names) - SHOWN} more"


def layer_calls(layers: Sequence[dict[str, Any]]) -> str:
    """The report header's layers: ``"bn1 x1, bn2 x2"``; for many layers the count,
    every layer not called exactly once by name, and the ones called once summarised
    (``"53, each called once: conv1_bn, ... and 49 more"``)."""
    named = [
        f"{layer['path']} x{layer['calls']}" if layer.get("calls") is not None else layer["path"] for layer in layers
    ]
    if len(layers) <= LONGEST:
        return ", ".join(named)
    once = [layer["path"] for layer in layers if layer.get("calls") == 1]
    if len(once) == len(layers):
        return f"{len(layers)}, each called once: {name_list(once)}"
    # called several times (what the reader needs), then never called (or uncounted)
    shared = [text for layer, text in zip(layers, named, strict=True) if (layer.get("calls") or 0) > 1]
    other = [text for layer, text in zip(layers, named, strict=True) if layer.get("calls") in (0, None)]
    parts = shared + ([name_list(other)] if other else [])
    if once:
        parts.append(f"{len(once)} more called once: {name_list(once)}")
    return f"{len(layers)}: " + "; ".join(parts)


def grouped_places(places: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(file:line, what)`` pairs for the text report, one per line of code: the layers a
    library builds from one line of the user's (``keras.applications.ResNet50()``) share
    it, and are named once there (``"bn1, bn2 and 51 more created"``); past ``LONGEST``
    lines, the first few and a count."""
    merged: dict[str, list[str]] = {}
    for place, what in places:
        merged.setdefault(place, []).append(what)
    lines = [(place, _joined(whats)) for place, whats in merged.items()]
    if len(lines) <= LONGEST:
        return lines
    return [*lines[:SHOWN], ("...", f"and {len(lines) - SHOWN} more lines (the JSON lists each)")]


def _joined(whats: list[str]) -> str:
    """``["bn1 created", "bn2 created"]`` -> ``"bn1, bn2 created"``."""
    if len(whats) == 1:
        return whats[0]
    suffix = " created"
    if all(what.endswith(suffix) for what in whats):
        return name_list([what[: -len(suffix)] for what in whats]) + suffix
    return name_list(whats)
