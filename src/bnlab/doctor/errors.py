"""Errors the doctor reports to the user (their messages are written for people)."""


class ProbeError(RuntimeError):
    """The model could not be run on the probe input."""


class UsageError(ValueError):
    """The arguments don't allow the requested check (e.g. training without labels)."""
