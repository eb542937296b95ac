"""Registration of two maps and the line fit with errors in both variables."""

import numpy as np
import pytest
from scipy import ndimage

from stemml_core.registration import line_fit, register_maps


def _scene(shape=(60, 70), seed=0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.0)


@pytest.mark.parametrize("shift", [(2.0, 3.0), (-4.0, 1.0), (1.4, -2.7)])
def test_known_shift(shift):
    scene = _scene()
    reference = scene[10:50, 10:60]
    moving = ndimage.shift(scene, (-shift[0], -shift[1]), order=3)[10:50, 10:60]  # moving[r] = scene[r + shift]
    found = register_maps(reference, moving)
    np.testing.assert_allclose(found, shift, atol=0.15)


def test_different_contrast_and_nan():
    scene = _scene(seed=1)
    reference = scene[10:50, 10:60]
    moving = 5.0 * scene[12:52, 7:57] + 3.0
    moving[:3] = np.nan
    np.testing.assert_allclose(register_maps(reference, moving), (2.0, -3.0), atol=0.05)


def test_max_shift():
    scene = _scene(seed=2)
    found = register_maps(scene[10:50, 10:60], scene[11:51, 10:60], max_shift=3)
    np.testing.assert_allclose(found, (1.0, 0.0), atol=0.05)


def test_bad_input():
    with pytest.raises(ValueError):
        register_maps(np.zeros(5), np.zeros((5, 5)))


def test_line_fit_errors_in_both_variables():
    rng = np.random.default_rng(0)
    slopes, covered = [], 0
    for trial in range(20):
        x_true = rng.uniform(-0.02, 0.02, 300)
        x = x_true + rng.normal(0, 0.003, 300)
        y = 1.6 - 5.0 * x_true + rng.normal(0, 0.02, 300)
        fit = line_fit(x, y, 0.003, 0.02, n_boot=200, random_state=trial)
        slopes.append(fit["slope"])
        covered += fit["slope_low"] <= -5.0 <= fit["slope_high"]
        assert fit["n"] == 300
    # ordinary least squares would be attenuated by var(x)/(var(x)+0.003²) ≈ 0.93
    assert abs(np.mean(slopes) + 5.0) < 0.15
    assert 8 <= covered <= 19


def test_line_fit_blocks_and_nan():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (20, 20))
    y = 2.0 + 3.0 * x + rng.normal(0, 0.1, (20, 20))
    x[0, 0] = np.nan
    fit = line_fit(x, y, None, 0.1, block=3, n_boot=100, random_state=0)
    assert fit["n"] == 399
    assert fit["slope_low"] < fit["slope"] < fit["slope_high"]
    assert abs(fit["slope"] - 3.0) < 0.05
    with pytest.raises(ValueError):
        line_fit(x.ravel(), y.ravel(), block=3)


def test_line_fit_replicas_carry_a_shared_error():
    # Every replica's points share a slope error (sd 0.3, like the band gaps of one ZLP replica in
    # every pixel); y is the median over the replicas. Resampling points alone misses that error;
    # resampling the replicas too gives the sampling error of the median, about 1.25 x 0.3 / sqrt(20).
    rng = np.random.default_rng(2)
    x = rng.uniform(-0.02, 0.02, (20, 20))
    slope_errors = rng.normal(0, 0.3, 20)
    replicas = 1.6 + (-5.0 + slope_errors[:, None, None]) * x + rng.normal(0, 0.002, (20, 20, 20))
    replicas[3, :5] = np.nan  # a replica without values in some points
    y = np.nanmedian(replicas, axis=0)
    points_only = line_fit(x, y, None, 0.002, n_boot=300, block=3, random_state=0)
    both = line_fit(x, y, None, 0.002, y_replicas=replicas, n_boot=300, block=3, random_state=0)
    assert both["slope"] == points_only["slope"]
    half_points = (points_only["slope_high"] - points_only["slope_low"]) / 2
    half_both = (both["slope_high"] - both["slope_low"]) / 2
    assert half_points < 0.03
    assert 0.05 < half_both < 0.15
    with pytest.raises(ValueError, match="y_replicas"):
        line_fit(x, y, y_replicas=replicas[:, :5])
