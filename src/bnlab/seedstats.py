"""Statistics of one metric over seeds: mean, sample standard deviation, min, max and the
Student-t confidence interval of the mean -- the one t-interval in bnlab, used by the
report's tables (``describe``) and by its figures' bands (``t_half_width`` per epoch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
from scipy import stats as scipy_stats

from bnlab.jsonsafe import json_safe

CONFIDENCE = 0.95


@overload
def t_half_width(std: float, n: int, confidence: float = CONFIDENCE) -> float: ...


@overload
def t_half_width(std: np.ndarray, n: int, confidence: float = CONFIDENCE) -> np.ndarray: ...


def t_half_width(std: float | np.ndarray, n: int, confidence: float = CONFIDENCE) -> float | np.ndarray:
    """Half the width of the Student-t confidence interval of a mean of ``n`` values whose
    sample standard deviation is ``std`` (a number, or an array of them elementwise). NaN
    for fewer than two values (one value has no spread) and where ``std`` is not finite."""
    if n < 2:
        return np.full_like(std, math.nan) if isinstance(std, np.ndarray) else math.nan
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    if isinstance(std, np.ndarray):
        return np.where(np.isfinite(std), half, math.nan)
    return half if math.isfinite(std) else math.nan


@dataclass(frozen=True)
class Stats:
    """Summary of one metric over seeds; std is the sample one (ddof=1) and the interval
    is Student-t, so both are NaN for a single value."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    min: float
    max: float

    def to_dict(self) -> dict[str, float | int | None]:
        return json_safe(dict(self.__dict__))  # an undefined number is null


def describe(
    values: Sequence[float], confidence: float = CONFIDENCE, bounds: tuple[float, float] = (-math.inf, math.inf)
) -> Stats:
    """Summary of ``values``; the interval's ends are clipped to ``bounds`` (the range the
    metric can take, see ``bnlab.report.METRIC_RANGE``)."""
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return Stats(0, *(math.nan,) * 6)
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    half = t_half_width(std, n, confidence)
    low, high = bounds
    # NaN stays NaN (min/max would turn it into a bound).
    ci_low = mean - half if math.isnan(half) else max(low, mean - half)
    ci_high = mean + half if math.isnan(half) else min(high, mean + half)
    return Stats(n, mean, std, ci_low, ci_high, float(x.min()), float(x.max()))
