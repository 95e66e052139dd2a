"""The distances behind checks 1 and 2."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab.doctor.stats import (
    channel_stats,
    distance,
    expected_site_shift,
    site_distance,
    sites_alike,
    variances_comparable,
)

channels = st.integers(min_value=1, max_value=16)


@settings(max_examples=40, deadline=None)
@given(channels, st.integers(0, 2**31 - 1))
def test_identical_statistics_are_zero_distance(c: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    mean, var = rng.normal(size=c), rng.uniform(0.01, 5, size=c)
    d = distance(mean, var, mean, var, eps=1e-5)
    assert d.mean_shift == 0 and d.max_mean_shift == 0
    assert np.isclose(d.var_ratio, 1.0) and not d.is_off()


@settings(max_examples=40, deadline=None)
@given(channels, st.integers(0, 2**31 - 1), st.floats(0.1, 100))
def test_distance_is_scale_free(c: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    m1, m2 = rng.normal(size=c), rng.normal(size=c)
    v1, v2 = rng.uniform(0.5, 2, size=c), rng.uniform(0.5, 2, size=c)
    a = distance(m1, v1, m2, v2, eps=0.0)
    b = distance(m1 * scale, v1 * scale**2, m2 * scale, v2 * scale**2, eps=0.0)
    assert np.isclose(a.mean_shift, b.mean_shift) and np.isclose(a.var_ratio, b.var_ratio)


@settings(max_examples=40, deadline=None)
@given(channels, st.integers(0, 2**31 - 1))
def test_site_distance_is_symmetric(c: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    m1, m2 = rng.normal(size=c), rng.normal(size=c)
    v1, v2 = rng.uniform(0.1, 3, size=c), rng.uniform(0.1, 3, size=c)
    ab, ba = site_distance(m1, v1, m2, v2, 1e-5), site_distance(m2, v2, m1, v1, 1e-5)
    assert np.isclose(ab.mean_shift, ba.mean_shift) and np.isclose(ab.var_ratio, ba.var_ratio)
    assert ab.var_ratio >= 1.0


def test_thresholds() -> None:
    ones, zeros = np.ones(4), np.zeros(4)
    assert distance(zeros + 0.6, ones, zeros, ones, 0.0).is_off()  # mean 0.6 SD away
    assert not distance(zeros + 0.4, ones, zeros, ones, 0.0).is_off()
    assert distance(zeros, ones * 2.5, zeros, ones, 0.0).is_off()  # variance x2.5
    assert distance(zeros, ones * 0.4, zeros, ones, 0.0).is_off()
    assert sites_alike(site_distance(zeros, ones, zeros + 0.1, ones * 1.1, 0.0))
    assert not sites_alike(site_distance(zeros, ones, zeros + 1.0, ones, 0.0))


def test_channel_stats_unbiased() -> None:
    values = np.array([[1.0, 3.0], [2.0, 2.0]])
    mean, var = channel_stats(values)
    assert mean.tolist() == [2.0, 2.0] and var.tolist() == [2.0, 0.0]
    mean, var = channel_stats(np.array([[5.0]]))
    assert var.tolist() == [0.0]


def test_sites_alike_allows_for_sampling_noise_with_few_values_per_channel():
    rng = np.random.default_rng(0)
    # Two samples of one distribution, 8 values per channel, 512 channels (a deep conv layer).
    a, b = rng.normal(size=(512, 8)), rng.normal(size=(512, 8))
    (ma, va), (mb, vb) = channel_stats(a), channel_stats(b)
    noisy = site_distance(ma, va, mb, vb, 0.0)
    assert not sites_alike(noisy)  # read without the noise allowance: "different"
    assert sites_alike(noisy, values_per_channel=8)
    # A real difference (means 1 SD apart) stays different at 8 values, and at 1000 the
    # allowance is small: 0.3 SD apart is different.
    shifted = site_distance(ma, va, mb + 1.0, vb, 0.0)
    assert not sites_alike(shifted, values_per_channel=8)
    zeros, ones = np.zeros(100), np.ones(100)
    assert not sites_alike(site_distance(zeros, ones, zeros + 0.35, ones, 0.0), values_per_channel=1000)


def test_the_expected_site_shift_is_what_two_samples_of_one_distribution_give():
    rng = np.random.default_rng(1)
    for n in (4, 8, 32, 256):
        a, b = rng.normal(size=(20000, n)), rng.normal(size=(20000, n))
        (ma, va), (mb, vb) = channel_stats(a), channel_stats(b)
        simulated = site_distance(ma, va, mb, vb, 0.0).mean_shift
        assert expected_site_shift(n) == pytest.approx(simulated, rel=0.02), n


def test_below_32_values_per_channel_the_sites_are_judged_on_their_means():
    zeros, ones = np.zeros(512), np.ones(512)
    wider = site_distance(zeros, ones, zeros, ones * 3.0, 0.0)  # variances 3x apart, same means
    assert not variances_comparable(8) and variances_comparable(32) and variances_comparable(None)
    assert sites_alike(wider, values_per_channel=8)  # 8 values cannot tell 3x from heavy tails
    assert not sites_alike(wider, values_per_channel=64)
    assert not sites_alike(site_distance(zeros, ones, zeros + 1.0, ones, 0.0), values_per_channel=8)
