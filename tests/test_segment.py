import hyperspy.api as hs
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.utils.estimator_checks import parametrize_with_checks

from stemml_core.segment import (
    PatternSegmentation,
    SortedKMeans,
    log_total_intensity,
    pattern_features,
    segment_by_intensity,
    segment_patterns,
)
from stemml_core.synthetic import simulate_4dstem, strained_flake


# k-means++ draws its seeds from the samples, so repeating a sample is not the
# same as doubling its weight; sklearn's own KMeans fails these two checks too
# (scikit-learn meta-issue #16298).
_KMEANS_SAMPLE_WEIGHT = "sample_weight is not equivalent to removing/repeating samples"


@parametrize_with_checks(
    [SortedKMeans(n_clusters=2, n_init=2, max_iter=5, random_state=0)],
    expected_failed_checks=lambda estimator: {
        "check_sample_weight_equivalence_on_dense_data": _KMEANS_SAMPLE_WEIGHT,
        "check_sample_weight_equivalence_on_sparse_data": _KMEANS_SAMPLE_WEIGHT,
    },
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_labels_ascend_with_centres_for_any_seed():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(m, 0.1, 30) for m in (4.0, 1.0, 7.0, 2.5)])[:, None]
    for seed in range(5):
        model = SortedKMeans(n_clusters=4, n_init=1, random_state=seed).fit(x)
        np.testing.assert_array_equal(np.diff(model.cluster_centers_[:, 0]) > 0, True)
        np.testing.assert_array_equal(model.predict(x), model.labels_)
        means = [x[model.labels_ == k, 0].mean() for k in range(4)]
        np.testing.assert_allclose(means, [1.0, 2.5, 4.0, 7.0], atol=0.1)


def test_segment_by_intensity_separates_vacuum_from_specimen():
    rng = np.random.default_rng(1)
    counts = np.full((6, 8, 50), 20.0)
    counts[:, :3] *= 5.0  # three bright columns
    counts = rng.poisson(counts).astype(np.float32)
    labels = segment_by_intensity(counts, n_clusters=2, random_state=0)
    assert labels.shape == (6, 8)
    np.testing.assert_array_equal(labels[:, :3], 1)
    np.testing.assert_array_equal(labels[:, 3:], 0)


def test_segment_by_intensity_sums_several_signal_axes():
    patterns = np.ones((4, 5, 3, 3))
    patterns[2:] *= 10.0
    labels = segment_by_intensity(patterns, n_clusters=2, axis=(-2, -1), random_state=0)
    np.testing.assert_array_equal(labels, np.repeat([[0], [0], [1], [1]], 5, axis=1))
    np.testing.assert_allclose(log_total_intensity(patterns, axis=(-2, -1))[0, 0], np.log(9.0))


def test_empty_pixel_is_rejected_with_its_index():
    counts = np.ones((3, 4, 10))
    counts[1, 2] = 0.0
    with pytest.raises(ValueError, match=r"first at index \(1, 2\)"):
        segment_by_intensity(counts, n_clusters=2)


def test_more_clusters_than_pixels_is_rejected():
    with pytest.raises(ValueError, match="n_clusters=5 exceeds the number of pixels"):
        segment_by_intensity(np.ones((2, 2, 10)), n_clusters=5)


# --- diffraction patterns -------------------------------------------------------------------


def two_grains(rows=16, cols=16, dose=1e6):
    """Vacuum in the top quarter; below it a grain of MoS2 on the left and the same crystal turned
    by 20 degrees on the right (two generated scans joined at the middle column). Truth classes:
    0 vacuum, 1 left grain, 2 right grain."""
    vacuum = np.zeros((rows, cols), bool)
    vacuum[: rows // 4] = True
    common = dict(vacuum=vacuum, detector_shape=(96, 96), dose=dose, descan=3.0)
    left, _ = simulate_4dstem(np.zeros((rows, cols, 2, 2)), random_state=1, **common)
    right, _ = simulate_4dstem(np.zeros((rows, cols, 2, 2)), orientation=20.0, random_state=2, **common)
    left.data[:, cols // 2:] = right.data[:, cols // 2:]
    truth = np.where(vacuum, 0, np.where(np.arange(cols) < cols // 2, 1, 2))
    return left, truth


def agreement(labels, truth):
    """Fraction of positions whose cluster is their truth class, under the best one-to-one match."""
    confusion = np.zeros((labels.max() + 1, truth.max() + 1))
    np.add.at(confusion, (labels.ravel(), truth.ravel()), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return confusion[rows, cols].sum() / labels.size


@pytest.fixture(scope="module")
def grains():
    return two_grains()


def test_features_ignore_descan_and_dose():
    """Centred on the direct beam and normalised: 3.3 px of descan changes the features by less
    than a quarter of what a 5 degree turn of the lattice does (unbinned and uncentred: 4 times
    more than the turn); another dose changes nothing."""
    def features(**kwargs):
        signal, _ = simulate_4dstem(np.zeros((1, 1, 2, 2)), detector_shape=(96, 96), dose=None, **kwargs)
        return signal.data[0]

    still = features(descan=0.0)
    base = pattern_features(still)
    moved = np.linalg.norm(pattern_features(features(descan=np.full((1, 1, 2), [2.4, -2.3]))) - base)
    turned = np.linalg.norm(pattern_features(features(descan=0.0, orientation=5.0)) - base)
    assert moved < 0.25 * turned
    np.testing.assert_allclose(pattern_features(250.0 * still), base, atol=1e-4)  # float32 FFT
    np.testing.assert_allclose(np.linalg.norm(base, axis=1), 1.0, atol=0.02)
    assert base.shape == (1, 24 * 24)


def test_bad_patterns_are_named():
    with pytest.raises(ValueError, match=r"patterns has shape \(4, 4\); expected \(n, H, W\)"):
        pattern_features(np.ones((4, 4)))
    with pytest.raises(ValueError, match="bin_factor=0; expected an integer from 1"):
        pattern_features(np.ones((2, 8, 8)), bin_factor=0)
    empty = np.ones((3, 8, 8))
    empty[1] = 0.0
    with pytest.raises(ValueError, match="1 pattern\\(s\\) have no positive counts, the first at index 1"):
        pattern_features(empty)


def test_vacuum_and_two_grains_are_separated(grains):
    """Issue 7: the clusters agree with the truth (vacuum, two orientations) on at least 90 % of the
    scan; here on every position, under descan of 3 px."""
    signal, truth = grains
    segmentation = segment_patterns(signal, n_clusters=3, random_state=0, progress=False)
    assert isinstance(segmentation, PatternSegmentation)
    labels = segmentation.labels.data
    assert agreement(labels, truth) >= 0.9
    assert agreement(labels, truth) == 1.0
    assert segmentation.n_clusters == 3 and segmentation.mean_patterns.data.shape == (3, 96, 96)
    vacuum_cluster = np.bincount(labels[truth == 0]).argmax()
    crystal = [k for k in range(3) if k != vacuum_cluster]
    # the vacuum cluster's mean pattern holds (nearly) only the direct beam: the least spread intensity
    spread = [np.sum(pattern > 0.01 * pattern.max()) for pattern in segmentation.mean_patterns.data]
    assert spread[vacuum_cluster] < min(spread[k] for k in crystal)


def test_labels_do_not_depend_on_the_seed(grains):
    signal, _ = grains
    runs = [segment_patterns(signal, n_clusters=3, random_state=seed, progress=False).labels.data
            for seed in range(3)]
    for labels in runs[1:]:
        np.testing.assert_array_equal(labels, runs[0])


def test_eager_and_lazy_give_the_same_segmentation(grains):
    signal, _ = grains
    eager = segment_patterns(signal, n_clusters=3, random_state=0, progress=False)
    lazy_signal = signal.as_lazy()
    lazy_signal.data = lazy_signal.data.rechunk((5, 7, -1, -1))
    lazy = segment_patterns(lazy_signal, n_clusters=3, random_state=0, progress=False)
    np.testing.assert_array_equal(lazy.labels.data, eager.labels.data)
    np.testing.assert_allclose(lazy.scores.data, eager.scores.data, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(lazy.mean_patterns.data, eager.mean_patterns.data)


def test_maps_carry_the_scan_calibration_and_the_model_predicts(grains):
    signal, _ = grains
    segmentation = segment_patterns(signal, n_clusters=3, n_components=4, max_fit_patterns=64,
                                    random_state=0, progress=False)
    for result in (segmentation.labels, segmentation.scores):
        assert [(a.name, a.units, a.scale) for a in result.axes_manager.navigation_axes] == [
            (a.name, a.units, a.scale) for a in signal.axes_manager.navigation_axes]
    assert [(a.name, a.units, a.scale, a.offset) for a in segmentation.mean_patterns.axes_manager.signal_axes] == [
        (a.name, a.units, a.scale, a.offset) for a in signal.axes_manager.signal_axes]
    assert segmentation.mean_patterns.axes_manager.navigation_axes[0].name == "cluster"
    assert segmentation.scores.axes_manager.signal_shape == (4,)
    assert len(segmentation.fit_positions) == 64  # every second row and column of the 16 x 16 scan
    np.testing.assert_array_equal(segmentation.fit_positions[:2], [[0, 0], [0, 2]])
    patterns = signal.data[3:5, 6]
    np.testing.assert_array_equal(segmentation.model.predict(patterns), segmentation.labels.data[3:5, 6])
    with pytest.raises(ValueError, match="read-only"):
        segmentation.fit_positions[0, 0] = 1


def test_flake_segments_into_specimen_and_vacuum():
    signal, truth = strained_flake((16, 16), detector_shape=(96, 96), dose=1e6, random_state=0)
    labels = segment_patterns(signal, n_clusters=2, random_state=0, progress=False).labels.data
    assert agreement(labels, (~truth.vacuum).astype(int)) >= 0.97


def test_bad_segmentation_arguments(grains):
    signal, _ = grains
    with pytest.raises(ValueError, match="segment_patterns got ndarray; expected a HyperSpy signal"):
        segment_patterns(signal.data)
    with pytest.raises(ValueError, match="Signal1D with 1 signal axes; expected a HyperSpy signal of diffraction"):
        segment_patterns(hs.signals.Signal1D(np.ones((4, 4, 10))))
    with pytest.raises(ValueError, match=r"n_clusters=9 .* for 4 fitted patterns .* expected 1 <= n_clusters <= 4"):
        segment_patterns(signal, n_clusters=9, n_components=2, max_fit_patterns=4, progress=False)
    with pytest.raises(ValueError, match=r"expected 1 <= n_clusters <= 256 and 1 <= n_components <= 36"):
        segment_patterns(signal, n_components=40, bin_factor=16, progress=False)
    with pytest.raises(ValueError, match="bin_factor=0; expected an integer from 1"):
        segment_patterns(signal, bin_factor=0, progress=False)
    with pytest.raises(ValueError, match="got a single pattern; expected a scan"):
        segment_patterns(signal.inav[0, 0])
