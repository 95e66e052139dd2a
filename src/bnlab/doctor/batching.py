"""Feeding training batches to the doctor's training steps (framework-neutral)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from bnlab.doctor.errors import UsageError, training_step_failed


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


def staged_step(
    step: int,
    forward: Callable[[], Any],
    loss_of: Callable[[Any], Any],
    update: Callable[[Any], None],
    as_number: Callable[[Any], float | None],
) -> Any:
    """One training step (``step`` counted from 0) in its three stages, returning the loss: a
    failure names its stage, so the message blames the labels only when the loss failed, and
    an update that fails after a non-finite loss is called divergence (``as_number(loss)``)."""
    try:
        output = forward()
    except Exception as err:  # noqa: BLE001 - the user's model: reported as a probe failure
        raise training_step_failed(step, err, "forward") from err
    try:
        loss = loss_of(output)
    except Exception as err:  # noqa: BLE001 - the user's loss or labels
        raise training_step_failed(step, err, "loss") from err
    try:
        update(loss)
    except Exception as err:  # noqa: BLE001 - backward pass and optimizer
        raise training_step_failed(step, err, "update", as_number(loss)) from err
    return loss
