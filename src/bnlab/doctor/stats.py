"""Distances between per-channel statistics (numpy only, framework-neutral)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnlab.doctor import thresholds


@dataclass(frozen=True)
class Distance:
    """How far one set of per-channel (mean, var) is from a reference set.

    ``mean_shift`` averages |mu - mu_ref| / sqrt(var_ref + eps) over channels;
    ``var_ratio`` is the geometric mean of (var + eps) / (var_ref + eps), with the
    smallest and largest channel ratio alongside.
    """

    mean_shift: float
    max_mean_shift: float
    var_ratio: float
    min_var_ratio: float
    max_var_ratio: float

    def is_off(self) -> bool:
        """Beyond the check-2 thresholds (see :mod:`bnlab.doctor.thresholds`)."""
        return (
            self.mean_shift > thresholds.MEAN_SHIFT_WARN
            or not thresholds.VAR_RATIO_LOW <= self.var_ratio <= thresholds.VAR_RATIO_HIGH
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "mean_shift": self.mean_shift,
            "max_mean_shift": self.max_mean_shift,
            "var_ratio": self.var_ratio,
            "min_var_ratio": self.min_var_ratio,
            "max_var_ratio": self.max_var_ratio,
        }

    def describe(self) -> str:
        return (
            f"mean shift {self.mean_shift:.2f} SD (max {self.max_mean_shift:.2f}), "
            f"variance ratio {self.var_ratio:.2f} "
            f"(channels {self.min_var_ratio:.2f}..{self.max_var_ratio:.2f})"
        )


def distance(
    mean: np.ndarray, var: np.ndarray, ref_mean: np.ndarray, ref_var: np.ndarray, eps: float
) -> Distance:
    """Distance of batch statistics (mean, var) from reference (running) statistics."""
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    ref_mean, ref_var = np.asarray(ref_mean, np.float64), np.asarray(ref_var, np.float64)
    # eps on both sides: a dead ReLU channel has var 0 in both and must read as ratio 1.
    shift = np.abs(mean - ref_mean) / np.sqrt(np.maximum(ref_var, 0.0) + eps)
    ratio = (np.maximum(var, 0.0) + eps) / (np.maximum(ref_var, 0.0) + eps)
    return _summarise(shift, ratio)


def site_distance(
    mean_a: np.ndarray, var_a: np.ndarray, mean_b: np.ndarray, var_b: np.ndarray, eps: float
) -> Distance:
    """Symmetric distance between two call sites' batch statistics (pooled SD)."""
    mean_a, var_a = np.asarray(mean_a, np.float64), np.asarray(var_a, np.float64)
    mean_b, var_b = np.asarray(mean_b, np.float64), np.asarray(var_b, np.float64)
    pooled = np.sqrt((np.maximum(var_a, 0.0) + np.maximum(var_b, 0.0)) / 2.0 + eps)
    shift = np.abs(mean_a - mean_b) / pooled
    ratio = (np.maximum(var_a, 0.0) + eps) / (np.maximum(var_b, 0.0) + eps)
    # Direction doesn't matter between sites: fold every ratio to >= 1.
    return _summarise(shift, np.maximum(ratio, 1.0 / ratio))


def _summarise(shift: np.ndarray, ratio: np.ndarray) -> Distance:
    log_ratio = np.log(ratio)
    return Distance(
        mean_shift=float(shift.mean()),
        max_mean_shift=float(shift.max()),
        var_ratio=float(np.exp(log_ratio.mean())),
        min_var_ratio=float(ratio.min()),
        max_var_ratio=float(ratio.max()),
    )


def sites_alike(dist: Distance) -> bool:
    """Whether two call sites see statistically the same activations."""
    return (
        dist.mean_shift < thresholds.SITES_ALIKE_MEAN
        and dist.var_ratio < thresholds.SITES_ALIKE_VAR_RATIO
    )


def channel_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and unbiased variance of a (channels, values) array.

    Unbiased, because that is what running variances estimate in PyTorch and Chainer.
    """
    values = np.asarray(values, np.float64)
    mean = values.mean(axis=1)
    if values.shape[1] < 2:
        return mean, np.zeros_like(mean)
    return mean, values.var(axis=1, ddof=1)
