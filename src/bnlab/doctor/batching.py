"""Feeding training batches to the doctor's training steps (framework-neutral)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from bnlab.doctor.errors import UsageError


def cycle(batches: Iterable[Any]) -> Iterator[Any]:
    """Cycle through batches, replaying those already seen when a one-shot iterator ends.

    Only batches actually consumed are kept, so an endless generator costs nothing.
    """
    seen = []
    for batch in batches:
        seen.append(batch)
        yield batch
    if not seen:
        raise UsageError("train_batches is empty")
    yield from itertools.cycle(seen)
