"""The doctor's reading of :mod:`bnlab.bnstats`: thresholds and wording.

The distances themselves (mean shift in running SDs, variance ratio batch over running)
are defined once, in :mod:`bnlab.bnstats`; this module adds what the checks judge by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnlab import bnstats
from bnlab.bnstats import channel_stats
from bnlab.doctor import thresholds

__all__ = ["Distance", "channel_stats", "distance", "site_distance", "sites_alike"]


@dataclass(frozen=True)
class Distance(bnstats.BNDistance):
    """A :class:`bnlab.bnstats.BNDistance` with the doctor's verdict and wording."""

    def is_off(self) -> bool:
        """Beyond the stale-stats thresholds (see :mod:`bnlab.doctor.thresholds`)."""
        return (
            self.mean_shift > thresholds.MEAN_SHIFT_WARN
            or not thresholds.VAR_RATIO_LOW <= self.var_ratio <= thresholds.VAR_RATIO_HIGH
        )

    def describe(self) -> str:
        return (
            f"mean shift {self.mean_shift:.2f} SD (max {self.max_mean_shift:.2f}), "
            f"variance ratio {self.var_ratio:.2f} "
            f"(channels {self.min_var_ratio:.2f}..{self.max_var_ratio:.2f})"
        )


def _doctor(d: bnstats.BNDistance) -> Distance:
    return Distance(**d.as_dict())


def distance(mean: np.ndarray, var: np.ndarray, ref_mean: np.ndarray, ref_var: np.ndarray, eps: float) -> Distance:
    """Batch statistics (mean, var) vs running statistics (ref_*): see bnlab.bnstats."""
    return _doctor(bnstats.distance(mean, var, ref_mean, ref_var, eps))


def site_distance(mean_a: np.ndarray, var_a: np.ndarray, mean_b: np.ndarray, var_b: np.ndarray, eps: float) -> Distance:
    """Symmetric distance between two call sites' batch statistics (pooled SD)."""
    return _doctor(bnstats.site_distance(mean_a, var_a, mean_b, var_b, eps))


def sites_alike(dist: bnstats.BNDistance, values_per_channel: int | None = None) -> bool:
    """Whether two call sites see statistically the same activations.

    With few values per channel (a deep conv layer on a small batch: 8 images at 1x1)
    two samples of ONE distribution already differ by sampling noise alone: for n values,
    the mean of |mean_a - mean_b| / SD over channels is about 1.13 / sqrt(n), and the mean
    |log(var_a / var_b)| about 1.6 / sqrt(n - 1). Averaged over many channels the summary
    sits close to that expectation, so it is added to each bound: a siamese encoder probed
    with 8 images is not called two different activations, and at the question's 1000
    values per channel the bounds move by less than 0.05.
    """
    mean_bound = thresholds.SITES_ALIKE_MEAN
    log_ratio_bound = float(np.log(thresholds.SITES_ALIKE_VAR_RATIO))
    if values_per_channel is not None and values_per_channel >= 2:
        mean_bound += 1.13 / np.sqrt(values_per_channel)
        log_ratio_bound += 1.6 / np.sqrt(values_per_channel - 1)
    return dist.mean_shift < mean_bound and float(np.log(dist.var_ratio)) < log_ratio_bound
