"""The doctor's reading of :mod:`bnlab.bnstats`: thresholds and wording.

The distances themselves (mean shift in running SDs, variance ratio batch over running)
are defined once, in :mod:`bnlab.bnstats`; this module adds what the checks judge by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bnlab import bnstats
from bnlab.bnstats import channel_stats
from bnlab.doctor import thresholds

__all__ = [
    "Distance",
    "channel_stats",
    "distance",
    "expected_site_shift",
    "site_distance",
    "sites_alike",
    "variances_comparable",
]


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


def expected_site_shift(values_per_channel: int) -> float:
    """The mean over channels of ``|mean_a - mean_b| / pooled SD`` between two samples of
    ONE normal distribution, n values each: ``sqrt(2/n) * E|T|`` with T Student-t on
    2(n - 1) degrees of freedom (the pooled SD is itself estimated). Exact; the large-n
    form 1.13 / sqrt(n) is 6 % low at n = 8 (simulated: 0.424 against 0.400)."""
    n = values_per_channel
    dof = 2.0 * (n - 1)
    abs_t = 2.0 * math.sqrt(dof) * math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2))
    abs_t /= math.sqrt(math.pi) * (dof - 1)
    return math.sqrt(2.0 / n) * abs_t


def variances_comparable(values_per_channel: int | None) -> bool:
    """Whether two sites' variances can be compared at all. The noise of a sample variance
    depends on the activations' tails (``Var(s^2) / sigma^4 = 2/(n-1) + excess kurtosis/n``),
    which a few values cannot tell; below ``MIN_VALUES_FOR_STATS`` the sites are judged on
    their means alone. Measured: resnet18's layer4 on 8 images (8 values per channel) after
    5 training steps, two views of the same images, variances 2.32x apart where normal data
    gives 1.9x; the means 0.21 SD apart, well inside their noise (0.42)."""
    return values_per_channel is None or values_per_channel >= thresholds.MIN_VALUES_FOR_STATS


def sites_alike(dist: bnstats.BNDistance, values_per_channel: int | None = None) -> bool:
    """Whether two call sites see statistically the same activations.

    With few values per channel (a deep conv layer on a small batch: 8 images at 1x1)
    two samples of ONE distribution already differ by sampling noise alone, so its
    expectation is added to each bound: the means' (``expected_site_shift``, exact) and,
    from ``MIN_VALUES_FOR_STATS`` values up, the variances' (the mean ``|log(var_a /
    var_b)|`` is about 1.6 / sqrt(n - 1): 0.290 simulated against 0.287 at n = 32).
    Averaged over many channels the summary sits close to that expectation. Below
    ``MIN_VALUES_FOR_STATS`` the variances are not compared (``variances_comparable``).
    At the question's 1000 values per channel the bounds move by less than 0.05.
    """
    mean_bound = thresholds.SITES_ALIKE_MEAN
    log_ratio_bound = float(np.log(thresholds.SITES_ALIKE_VAR_RATIO))
    if values_per_channel is not None and values_per_channel >= 2:
        mean_bound += expected_site_shift(values_per_channel)
        log_ratio_bound += 1.6 / np.sqrt(values_per_channel - 1)
    means_alike = dist.mean_shift < mean_bound
    if not variances_comparable(values_per_channel):
        return means_alike
    return means_alike and float(np.log(dist.var_ratio)) < log_ratio_bound
