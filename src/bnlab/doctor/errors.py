"""Errors the doctor reports to the user (their messages are written for people).

They are bnlab's errors (``bnlab.errors``): each carries its exit code, and a caller that
catches ``BnlabError`` catches the doctor's too. ``UsageError`` (bad flags) and
``InputError`` (an input that cannot be produced or read) are bnlab's own, re-exported here
so the doctor's modules import their errors from one place.
"""

import math
from typing import Literal

from bnlab.errors import EXIT_USAGE, BnlabError, InputError, UsageError, quote_error

__all__ = [
    "InputError",
    "ProbeError",
    "RepairError",
    "UnsupportedModel",
    "UsageError",
    "a_type",
    "forward_failed",
    "quote_error",
    "training_step_failed",
]


def a_type(value: object) -> str:
    """``"an int"``, ``"a str"``: the type of ``value`` with its article, for messages."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


class ProbeError(BnlabError, RuntimeError):
    """The model could not be run on the probe input (the model and the input disagree).

    ``hint`` says what to try; the command line prints it after the message.
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class UnsupportedModel(UsageError, TypeError):
    """Not a model the doctor can check (a TorchScript module, a Keras model, an object)."""


class RepairError(UsageError):
    """The model cannot be repaired as asked (message is for the user)."""


SHAPE_HINT = "Check that the input matches the model (--input-shape, or --data)."


def forward_failed(err: BaseException) -> ProbeError:
    """The error for a model whose forward pass raised ``err`` on the probe input."""
    return ProbeError(f"the model's forward pass failed on the probe input: {quote_error(err)}", SHAPE_HINT)


# Where in a training step the failure happened; "step" when the framework does it all in
# one call (Keras's train_on_batch) and the stage is not known.
Stage = Literal["forward", "loss", "update", "step"]

_STEP_HINTS: dict[Stage, str] = {
    "forward": "The forward pass in training mode failed. Check that the input matches the model "
    "(--input-shape, or --data), or use --train-steps 0.",
    "loss": "The forward pass worked; the loss (cross-entropy) did not. Check that the labels fit the "
    "model's output (class indices for cross-entropy), or use --train-steps 0.",
    "update": "The forward pass and the loss worked; the backward pass or the optimizer's update did "
    "not. Lower --lr, or use --train-steps 0.",
    "step": "The forward pass, the loss, the backward pass or the optimizer's update failed. Check "
    "that the labels fit the model's output (class indices for cross-entropy) and that --lr is "
    "moderate, or use --train-steps 0.",
}


def training_step_failed(step: int, err: BaseException, stage: Stage = "step", loss: float | None = None) -> ProbeError:
    """The error for a training step (``step`` counted from 0) that raised ``err`` in ``stage``;
    ``loss`` is the step's loss when it was computed (a non-finite one means divergence, not
    bad labels)."""
    hint = _STEP_HINTS[stage]
    if loss is not None and not math.isfinite(loss):
        hint = (
            f"The loss was already {loss}: the doctor's training diverged before this step failed. "
            "Lower --lr, or use --train-steps 0."
        )
    return ProbeError(f"training step {step + 1} failed: {quote_error(err)}", hint)
