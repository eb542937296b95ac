"""Scores against truth: analytic cases."""

import numpy as np
import pytest

from stemml_core import metrics


def test_band_coverage_counts_inside_and_skips_nan():
    truth = np.array([0.0, 1.0, 2.0, np.nan])
    assert metrics.band_coverage(truth, truth - 0.5, np.array([0.5, 0.9, 2.5, 1.0])) == pytest.approx(2 / 3)


def test_gaussian_band_covers_68_percent():
    rng = np.random.default_rng(0)
    truth = np.zeros(100_000)
    estimate = rng.normal(size=truth.size)
    assert metrics.band_coverage(truth, estimate - 1, estimate + 1) == pytest.approx(0.6827, abs=0.005)


def test_chi2():
    assert metrics.chi2_per_point([1.0, 3.0], [0.0, 0.0], [1.0, 3.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sigma must be positive"):
        metrics.chi2_per_point([1.0], [0.0], [0.0])


def test_regression_detects_shrinkage():
    truth = np.linspace(-0.01, 0.01, 101)
    shrunk = 0.5 * truth
    scores = metrics.regression(shrunk, truth)
    assert scores["slope"] == pytest.approx(0.5)
    assert scores["correlation"] == pytest.approx(1.0)
    assert scores["rmse"] == pytest.approx(np.sqrt(np.mean((0.5 * truth) ** 2)))
    assert scores["n"] == 101


def test_regression_of_too_little():
    assert np.isnan(metrics.regression([np.nan, 1.0], [1.0, np.nan])["rmse"])
