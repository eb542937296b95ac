"""Gaussian pooling of spectrum images: averages within labels, variance carried, lazy = eager."""

import hyperspy.api as hs
import numpy as np
import pytest

from stemml_core.eels.denoise import gaussian_weights, pool_spectra


def _image(nav=(9, 12), n=20, seed=0):
    rng = np.random.default_rng(seed)
    s = hs.signals.Signal1D(rng.poisson(400.0, size=(*nav, n)).astype(np.float32))
    s.axes_manager.signal_axes[0].units = "eV"
    return s


def test_pooling_averages_and_divides_the_variance():
    s = _image()
    before = s.data.copy()
    pooled = pool_spectra(s, 1.5)
    np.testing.assert_array_equal(s.data, before)  # input untouched
    assert s.metadata.get_item("Signal.Noise_properties.variance") is None
    w = gaussian_weights(1.5, 2)
    inner = (slice(3, 6), slice(3, 9))  # the full neighbourhood lies inside the scan
    variance = pooled.metadata.Signal.Noise_properties.variance.data
    # each interior pixel is the weighted mean of its neighbourhood
    r = w.shape[0] // 2
    i, j = 4, 5
    patch = before[i - r:i + r + 1, j - r:j + r + 1]
    np.testing.assert_allclose(pooled.data[i, j], (w[..., None] * patch).sum((0, 1)) / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(variance[i, j], (w[..., None] ** 2 * patch).sum((0, 1)) / w.sum() ** 2, rtol=1e-6)
    # the scatter of pooled Poisson counts matches the carried variance (interior, many channels)
    ratio = pooled.data[inner].var() / variance[inner].mean()
    assert 0.6 < ratio < 1.6
    assert (w**2).sum() / w.sum() ** 2 < 0.1  # sigma 1.5 px pools more than 10 pixels


def test_labels_are_not_mixed_and_negative_labels_stay():
    s = _image()
    s.data[:, :6] += 1000.0
    labels = np.zeros((9, 12), dtype=int)
    labels[:, 6:] = 1
    labels[0, 0] = -1
    pooled = pool_spectra(s, 2.0, labels=labels)
    assert pooled.data[:, 1:6].min() > 1200 and pooled.data[:, 6:].max() < 600
    np.testing.assert_array_equal(pooled.data[0, 0], s.data[0, 0])


def test_lazy_equals_eager_and_a_given_variance_is_used():
    s = _image()
    s.metadata.set_item("Signal.Noise_properties.variance", 4.0)
    eager = pool_spectra(s, 1.0, labels=(np.arange(12) > 4).astype(int)[None].repeat(9, 0))
    lazy_input = s.as_lazy()
    lazy_input.data = lazy_input.data.rechunk((4, 5, -1))
    lazy = pool_spectra(lazy_input, 1.0, labels=(np.arange(12) > 4).astype(int)[None].repeat(9, 0))
    assert lazy._lazy
    lazy.compute()
    np.testing.assert_allclose(lazy.data, eager.data, rtol=1e-12)
    lazy_variance = lazy.metadata.Signal.Noise_properties.variance
    np.testing.assert_allclose(np.asarray(lazy_variance.data), eager.metadata.Signal.Noise_properties.variance.data)
    assert eager.metadata.Signal.Noise_properties.variance.data.max() < 4.0


@pytest.mark.parametrize("kwargs, match", [
    ({"sigma": 0.0}, "sigma=0.0 pixels is invalid"),
    ({"sigma": 1.0, "labels": np.zeros((3, 3), dtype=int)}, r"labels have shape \(3, 3\)"),
    ({"sigma": 1.0, "labels": np.zeros((9, 12))}, "expected integers"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pool_spectra(_image(), **kwargs)


def test_a_single_spectrum_is_refused():
    with pytest.raises(ValueError, match="single spectrum"):
        pool_spectra(_image().inav[0, 0], 1.0)
