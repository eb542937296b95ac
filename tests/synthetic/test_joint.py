"""The joint strain + low-loss sample: truth consistent with the data and with itself."""

import numpy as np
import pytest

from stemml_core.synthetic.joint import strain_and_lowloss

SMALL = dict(scan_shape=(12, 16), detector_shape=(48, 48), energy_range=(-1.0, 9.0))


@pytest.fixture(scope="module")
def noise_free():
    return strain_and_lowloss(**SMALL, dose_4dstem=None, dose_eels=None)


def test_band_gap_follows_the_deformation_potential(noise_free):
    _, _, truth = noise_free
    specimen = ~truth.vacuum
    np.testing.assert_allclose(truth.band_gap[specimen] - truth.band_gap0,
                               truth.deformation_potential * (truth.exx + truth.eyy)[specimen], rtol=0, atol=1e-12)
    assert np.all(np.isnan(truth.band_gap[truth.vacuum]))
    np.testing.assert_array_equal(truth.lowloss.band_gap[specimen], truth.band_gap[specimen])


def test_gap_change_is_measurable():
    _, _, truth = strain_and_lowloss(dose_4dstem=None, dose_eels=None, detector_shape=(48, 48),
                                     energy_range=(-1.0, 9.0))
    assert np.nanmax(truth.band_gap) - np.nanmin(truth.band_gap) >= 0.1


def test_offset_is_what_the_data_show(noise_free):
    dp, eels, truth = noise_free
    dr, dc = (int(v) for v in truth.offset)
    rows, cols = truth.vacuum.shape
    # spectrum-image pixel (r, c) sees scan position (r + dr, c + dc)
    eels_vacuum = truth.vacuum[: rows - dr, : cols - dc]
    np.testing.assert_array_equal(eels_vacuum, truth.strain.vacuum[dr:, dc:])
    np.testing.assert_allclose(truth.exx[: rows - dr, : cols - dc], truth.strain.exx[dr:, dc:], atol=1e-12)
    # the data agree: direct beam only in the 4D scan's vacuum, no inelastic signal in the spectra's
    energy = eels.axes_manager.signal_axes[0].axis
    inelastic = eels.data[..., energy > 1.0].sum(-1)
    assert inelastic[truth.vacuum].max() < 0.2 * inelastic[~truth.vacuum].min()
    assert truth.vacuum.any() and not truth.vacuum.all()


def test_biaxial_and_scan_step(noise_free):
    dp, eels, truth = noise_free
    np.testing.assert_array_equal(truth.exx, truth.eyy)
    assert dp.axes_manager.navigation_axes[0].scale == eels.axes_manager.navigation_axes[0].scale


def test_deterministic():
    a = strain_and_lowloss(**SMALL, random_state=3)
    b = strain_and_lowloss(**SMALL, random_state=3)
    c = strain_and_lowloss(**SMALL, random_state=4)
    np.testing.assert_array_equal(a[0].data, b[0].data)
    np.testing.assert_array_equal(a[1].data, b[1].data)
    assert not np.array_equal(a[1].data, c[1].data)
