"""Lists of layer names in the text report, short enough to read at a glance.

A ResNet has 53 BN layers: the text report names the few that matter and counts the
rest. The JSON report and each finding's ``data`` keep every name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LONGEST = 8  # names listed in full up to this many
SHOWN = 4  # names shown before "and N more" in a longer list


def name_list(names: Sequence[str], longest: int = LONGEST) -> str:
    """``"a, b, c"``; past ``longest`` names the first few and ``"and N more"``."""
    if len(names) <= longest:
        return ", ".join(names)
    return f"{', '.join(names[:SHOWN])} and {len(names) - SHOWN} more"


def _called(layer: dict[str, Any]) -> str:
    """``"bn (called 4 times)"``: one layer and its calls per forward pass (a count after
    the name would read as that many layers)."""
    calls = layer.get("calls")
    if calls is None:
        return str(layer["path"])
    times = {0: "never called", 1: "called once"}.get(calls, f"called {calls} times")
    return f"{layer['path']} ({times})"


def layer_calls(layers: Sequence[dict[str, Any]]) -> str:
    """The report header's layers: ``"bn1 (called once), bn2 (called 2 times)"``; for many
    layers the count, every layer not called exactly once by name, and the ones called
    once summarised (``"53, each called once: conv1_bn, ... and 49 more"``)."""
    once = [layer["path"] for layer in layers if layer.get("calls") == 1]
    if len(layers) <= LONGEST:
        if len(once) == len(layers) > 1:
            return f"{', '.join(once)} (each called once)"
        return ", ".join(_called(layer) for layer in layers)
    if len(once) == len(layers):
        return f"{len(layers)}, each called once: {name_list(once)}"
    # called several times (what the reader needs), then never called (or uncounted)
    shared = [_called(layer) for layer in layers if (layer.get("calls") or 0) > 1]
    other = [_called(layer) for layer in layers if layer.get("calls") in (0, None)]
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
    """``["bn1 created (in torchvision, not your files)", "bn2 created (in ...)"]`` ->
    ``"bn1, bn2 created (in torchvision, not your files)"``: what follows the names is said
    once. A code line is not wrapped, so past ``SHOWN`` names the rest are counted."""
    if len(whats) == 1:
        return whats[0]
    heads, tails = zip(*(what.partition(" ")[::2] for what in whats), strict=True)
    if len(set(tails)) == 1 and tails[0].startswith("created"):  # layers, not call sites
        return f"{name_list(heads, SHOWN)} {tails[0]}"
    return name_list(whats, SHOWN)
