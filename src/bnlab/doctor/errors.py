"""Errors the doctor reports to the user (their messages are written for people)."""


class ProbeError(RuntimeError):
    """The model could not be run on the probe input."""


class UsageError(ValueError):
    """The arguments don't allow the requested check (e.g. training without labels)."""


def forward_failed(err: Exception) -> ProbeError:
    """The error for a model whose forward pass raised ``err`` on the probe input."""
    return ProbeError(
        f"the model's forward pass failed on the probe input: {type(err).__name__}: {err}"
    )


def training_step_failed(step: int, err: Exception) -> ProbeError:
    """The error for a training step (``step`` counted from 0) that raised ``err``."""
    return ProbeError(f"training step {step + 1} failed: {type(err).__name__}: {err}")
