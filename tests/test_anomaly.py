"""Anomaly detection (stemml_core.anomaly) on samples with planted anomalies.

Measured on this machine (seeds 0-3, defaults, ``false_alarm=1e-3``): low-loss flake (24 x 32,
4 contamination humps of 0.5 x the local counts at 6 eV and 1 spike x10): recall 1.0 (20/20),
false alarms 0 of 6124 clean spectra; 4D-STEM strained flake (24 x 24, 64 x 64 px, 4 patterns
rotated by 15 degrees and a 2 x 2 mis-tilted block): recall 1.0 (32/32), false alarms 0.9e-3
(4 of 4576 clean patterns, counting scans with and without planted anomalies). On EELS the
threshold is conservative: at ``false_alarm=1e-2`` the clean flake (seed 0) gets 0 of 768 flagged,
as the robust spread of the scores is widened by the vacuum/flake difference in noise level.
"""

import numpy as np
import pytest
from hyperspy.signals import BaseSignal, Signal1D
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from stemml_core.anomaly import AnomalyDetector, AnomalyMap, anomaly_map, spectrum_features
from stemml_core.synthetic.anomalies import diffraction_anomalies, lowloss_anomalies


@parametrize_with_checks([AnomalyDetector(random_state=0)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def lowloss():
    return lowloss_anomalies(random_state=0)


@pytest.fixture(scope="module")
def patterns():
    return diffraction_anomalies(random_state=1)


def test_lowloss_planted_anomalies_are_found(lowloss):
    signal, truth = lowloss
    result = anomaly_map(signal, false_alarm=1e-3)
    assert isinstance(result, AnomalyMap)
    flagged = result.anomalous.data
    assert flagged[truth.anomalous].all()  # measured scores 8.5-11.3, threshold 3.09
    assert flagged[~truth.anomalous].sum() <= 3  # 763 clean spectra, 0.76 expected; measured 0
    # The planted pixels head the ranking (measured: the four humps, then the spike).
    n_planted = int(truth.anomalous.sum())
    assert {tuple(ij) for ij in result.ranked[:n_planted]} == {tuple(ij) for ij in np.argwhere(truth.anomalous)}
    assert result.score.axes_manager.navigation_shape == signal.axes_manager.navigation_shape
    assert result.score.axes_manager[0].units == signal.axes_manager[0].units
    np.testing.assert_array_equal(result.ranked.shape, (flagged.sum(), 2))
    assert np.all(np.diff(result.score.data[tuple(result.ranked.T)]) <= 0)


def test_4dstem_planted_anomalies_are_found(patterns):
    signal, truth = patterns
    result = anomaly_map(signal, false_alarm=1e-3)
    flagged = result.anomalous.data
    assert flagged[truth.kind == 1].all()  # rotated grain: scores ~23
    assert flagged[truth.kind == 2].all()  # mis-tilted block: scores ~10
    assert flagged[~truth.anomalous].sum() <= 3  # 568 clean patterns; measured 0


@pytest.mark.parametrize("seed", [0, 1])
def test_false_alarm_rate_on_clean_scans(seed):
    # Clean 4D-STEM scans at a 1 % rate (enough events to count on 576 patterns): measured
    # 3 and 5 flagged (0.52 % and 0.87 %) for seeds 0 and 1; allow three times the rate.
    signal, _ = diffraction_anomalies(random_state=seed, n_rotated=0, tilted_block=(0, 0))
    result = anomaly_map(signal, false_alarm=1e-2)
    assert result.anomalous.data.mean() <= 3e-2


def test_threshold_is_robust_to_anomalies_in_training(patterns):
    signal, truth = patterns
    clean, _ = diffraction_anomalies(random_state=1, n_rotated=0, tilted_block=(0, 0))
    # Measured: location -0.917 vs -0.929, scale 0.249 vs 0.262, 8 components for both.
    with_anomalies = anomaly_map(signal).model
    without = anomaly_map(clean).model
    assert with_anomalies.n_components_ == pytest.approx(without.n_components_, abs=1)
    assert abs(with_anomalies.location_[0] - without.location_[0]) < 0.2 * without.scale_[0]
    assert with_anomalies.scale_[0] == pytest.approx(without.scale_[0], rel=0.1)


def test_eager_and_lazy_give_the_same_scores(patterns):
    signal, _ = patterns
    eager = anomaly_map(signal)
    lazy = anomaly_map(signal.as_lazy())  # computed inside: the model is fitted on every pattern
    np.testing.assert_allclose(lazy.score.data, eager.score.data, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(lazy.ranked, eager.ranked)


def test_mahalanobis_term_keeps_the_planted_anomalies(patterns):
    signal, truth = patterns
    result = anomaly_map(signal, density_components=1)
    assert result.anomalous.data[truth.anomalous].all()
    assert result.anomalous.data[~truth.anomalous].sum() <= 3  # measured 0


def test_detector_on_plain_arrays_estimates_the_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 3)) @ rng.normal(size=(3, 50)) + 0.1 * rng.normal(size=(600, 50))
    x[:5] += 0.5 * rng.normal(size=(5, 50))
    detector = AnomalyDetector(random_state=0).fit(x)
    assert detector.n_components_ == 3
    assert detector.noise_variance_ == pytest.approx(0.01, rel=0.15)
    np.testing.assert_array_equal(np.flatnonzero(detector.predict(x)), np.arange(5))
    refit = clone(detector).fit(x)
    np.testing.assert_allclose(refit.score_samples(x), detector.score_samples(x))
    assert refit.get_params()["false_alarm"] == 1e-3


def test_spectrum_features_have_poisson_variance():
    rng = np.random.default_rng(0)
    counts = rng.poisson(np.full((2000, 30), 50.0))
    features, noise = spectrum_features(counts)
    np.testing.assert_allclose(features.var(axis=0).mean() / noise.mean(), 1.0, rtol=0.05)


@pytest.mark.parametrize("false_alarm", [0, 1, 1.5, -1e-3, "0.01"])
def test_bad_false_alarm(patterns, false_alarm):
    with pytest.raises(ValueError, match=r"false_alarm=.*expected .* in \(0, 1\)"):
        anomaly_map(patterns[0], false_alarm=false_alarm)
    with pytest.raises(ValueError, match=r"false_alarm="):
        AnomalyDetector(false_alarm=false_alarm).fit(np.eye(5))


def test_bad_dimensions():
    with pytest.raises(ValueError, match="expected a HyperSpy spectrum image"):
        anomaly_map(Signal1D(np.ones(10)))  # no navigation axis
    with pytest.raises(ValueError, match="expected a HyperSpy spectrum image"):
        anomaly_map(BaseSignal(np.ones((2, 3, 4, 5))).transpose(signal_axes=3))
    with pytest.raises(ValueError, match="expected a HyperSpy spectrum image"):
        anomaly_map(np.ones((4, 4, 10)))


def test_nan_is_rejected():
    data = np.ones((4, 5, 20))
    data[2, 3, 7] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite .* navigation index \(2, 3\)"):
        anomaly_map(Signal1D(data))


def test_bad_detector_parameters():
    x = np.random.default_rng(0).normal(size=(20, 6))
    with pytest.raises(ValueError, match=r"n_components=6 .* expected an integer from 1 to 5"):
        AnomalyDetector(n_components=6).fit(x)
    with pytest.raises(ValueError, match="noise_variance"):
        AnomalyDetector().fit(x, noise_variance=-1.0)
    with pytest.raises(ValueError, match="min_support"):
        AnomalyDetector(min_support=1.0).fit(x)
    with pytest.raises(ValueError, match="density_components"):
        AnomalyDetector(density_components=-1).fit(x)
