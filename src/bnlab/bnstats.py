"""How far batch statistics are from running statistics: the ONE definition in bnlab.

numpy only. Both quantities compare a batch's per-channel statistics (``batch_mean``,
``batch_var``: what train mode normalizes with) with the running statistics
(``running_mean``, ``running_var``: what eval mode normalizes with):

- **mean shift**, in running standard deviations:
  ``|batch_mean - running_mean| / sqrt(running_var + eps)``.
- **variance ratio**, batch over running (the batch's variance is the numerator):
  ``(batch_var + eps) / (running_var + eps)``. Above 1: the batch varies more than the
  running statistics say; below 1: less.

Read together they say what eval mode does to this batch: before gamma and beta, the
eval-mode output of the layer has (per channel) mean ``±mean shift`` and variance
``variance ratio``, where train mode gives mean 0 and variance 1. Identical statistics
give shift 0 and ratio 1. ``eps`` is added on both sides of the ratio so that a dead
channel (variance 0 in both) reads as ratio 1, not 0/0.

Per-layer summaries average the shift over channels (arithmetic mean, with the maximum)
and the ratio geometrically (a ratio of 2 and one of 1/2 average to 1), with the
smallest and largest channel ratio alongside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as64(*arrays: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(a, np.float64) for a in arrays]


def channel_mean_shift(
    batch_mean: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray, eps: float
) -> np.ndarray:
    """Per channel ``|batch_mean - running_mean| / sqrt(running_var + eps)``."""
    batch_mean, running_mean, running_var = _as64(batch_mean, running_mean, running_var)
    return np.abs(batch_mean - running_mean) / np.sqrt(np.maximum(running_var, 0.0) + eps)


def channel_var_ratio(batch_var: np.ndarray, running_var: np.ndarray, eps: float) -> np.ndarray:
    """Per channel ``(batch_var + eps) / (running_var + eps)``: batch over running."""
    batch_var, running_var = _as64(batch_var, running_var)
    return (np.maximum(batch_var, 0.0) + eps) / (np.maximum(running_var, 0.0) + eps)


@dataclass(frozen=True)
class BNDistance:
    """A per-layer summary of :func:`channel_mean_shift` and :func:`channel_var_ratio`."""

    mean_shift: float  # mean over channels
    max_mean_shift: float
    var_ratio: float  # geometric mean over channels, batch / running
    min_var_ratio: float
    max_var_ratio: float

    def as_dict(self) -> dict[str, float]:
        return {
            "mean_shift": self.mean_shift,
            "max_mean_shift": self.max_mean_shift,
            "var_ratio": self.var_ratio,
            "min_var_ratio": self.min_var_ratio,
            "max_var_ratio": self.max_var_ratio,
        }


def summarise(shift: np.ndarray, ratio: np.ndarray) -> dict[str, float]:
    """The per-layer summary fields of per-channel shifts and ratios."""
    log_ratio = np.log(ratio)
    return {
        "mean_shift": float(shift.mean()),
        "max_mean_shift": float(shift.max()),
        "var_ratio": float(np.exp(log_ratio.mean())),
        "min_var_ratio": float(ratio.min()),
        "max_var_ratio": float(ratio.max()),
    }


def distance(
    batch_mean: np.ndarray,
    batch_var: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float,
) -> BNDistance:
    """Batch statistics vs running statistics, summarised over channels."""
    shift = channel_mean_shift(batch_mean, running_mean, running_var, eps)
    ratio = channel_var_ratio(batch_var, running_var, eps)
    return BNDistance(**summarise(shift, ratio))


def site_distance(
    mean_a: np.ndarray, var_a: np.ndarray, mean_b: np.ndarray, var_b: np.ndarray, eps: float
) -> BNDistance:
    """Two batches' statistics compared symmetrically (two call sites of one layer).

    The shift is in pooled standard deviations ``sqrt((var_a + var_b) / 2 + eps)``; each
    channel's ratio is folded to ``>= 1`` (which site varies more does not matter).
    """
    mean_a, var_a, mean_b, var_b = _as64(mean_a, var_a, mean_b, var_b)
    pooled = np.sqrt((np.maximum(var_a, 0.0) + np.maximum(var_b, 0.0)) / 2.0 + eps)
    shift = np.abs(mean_a - mean_b) / pooled
    ratio = channel_var_ratio(var_a, var_b, eps)
    return BNDistance(**summarise(shift, np.maximum(ratio, 1.0 / ratio)))


def channel_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and unbiased variance of a (channels, values) array.

    Unbiased, because that is what running variances estimate in PyTorch and Chainer.
    """
    values = np.asarray(values, np.float64)
    mean = values.mean(axis=1)
    if values.shape[1] < 2:
        return mean, np.zeros_like(mean)
    return mean, values.var(axis=1, ddof=1)
