import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from stemml_core.segment import SortedKMeans, log_total_intensity, segment_by_intensity


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
