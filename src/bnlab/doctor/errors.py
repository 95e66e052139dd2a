"""Errors the doctor reports to the user (their messages are written for people).

They are bnlab's errors (``bnlab.errors``): each carries its exit code, and a caller that
catches ``BnlabError`` catches the doctor's too. ``UsageError`` (bad flags) and
``InputError`` (an input that cannot be produced or read) are bnlab's own, re-exported here
so the doctor's modules import their errors from one place.
"""

from bnlab.errors import EXIT_USAGE, BnlabError, InputError, UsageError

__all__ = [
    "InputError",
    "ProbeError",
    "RepairError",
    "UnsupportedModel",
    "UsageError",
    "forward_failed",
    "training_step_failed",
]


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


def _text(err: BaseException) -> str:
    message = str(err)
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def forward_failed(err: BaseException) -> ProbeError:
    """The error for a model whose forward pass raised ``err`` on the probe input."""
    return ProbeError(f"the model's forward pass failed on the probe input: {_text(err)}", SHAPE_HINT)


def training_step_failed(step: int, err: BaseException) -> ProbeError:
    """The error for a training step (``step`` counted from 0) that raised ``err``."""
    return ProbeError(
        f"training step {step + 1} failed: {_text(err)}",
        "The forward pass worked; the loss or the backward pass did not. Check that the "
        "labels fit the model's output (class indices for cross-entropy), or use "
        "--train-steps 0.",
    )
