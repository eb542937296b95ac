"""Direct beam, descan, template and Bragg disks against the forward model's known positions."""

import numpy as np
import pytest

from stemml_core.diffraction import disks
from stemml_core.diffraction.disks import (
    cross_correlate,
    direct_beam,
    disk_radius,
    find_disks,
    fit_descan,
    probe_template,
    refine_disks,
    template_shape,
)
from stemml_core.synthetic import simulate_4dstem
from stemml_core.synthetic.diffraction import electron_wavelength

RADIUS_INV_NM = 1.5e-3 / electron_wavelength(200.0)  # alpha / lambda at the generator's defaults
INDICES = np.array([(h, k) for h in range(-3, 4) for k in range(-3, 4) if (h, k) != (0, 0)])


def stretch_sweep(dose, k_pixel_size=0.125, **kwargs):
    """8 x 8 patterns whose lattice stretches from -2 % to +2 % along x and y: every disk sweeps
    several pixels, so the sub-pixel positions cover [0, 1) evenly."""
    ramp = np.linspace(-0.02, 0.02, 8)
    gradient = np.zeros((8, 8, 2, 2))
    gradient[..., 0, 0] = ramp[None, :]
    gradient[..., 1, 1] = ramp[:, None]
    signal, truth = simulate_4dstem(gradient, dose=dose, random_state=0, descan=2.5, k_pixel_size=k_pixel_size,
                                    **kwargs)
    return signal.data.reshape(64, *signal.data.shape[2:]), truth


@pytest.fixture(scope="module")
def noise_free():
    return stretch_sweep(None)


@pytest.fixture(scope="module")
def counted():
    return stretch_sweep(1e6)


def true_positions(truth):
    """(64, 1 + n, 2) true centres (row, col) px: the direct beam, then the Bragg disks."""
    bragg = truth.disk_positions(INDICES).reshape(64, -1, 2)
    return np.concatenate([truth.origin.reshape(64, 1, 2), bragg], axis=1)


def matched(found, truth):
    """True centre nearest to every found disk, and its distance, px."""
    true = true_positions(truth)[found.pattern]
    distance = np.linalg.norm(found.position[:, None, :] - true, axis=-1)
    nearest = distance.argmin(axis=1)
    return true[np.arange(len(nearest)), nearest], distance.min(axis=1)


def template_of(patterns):
    radius = disk_radius(patterns)
    return probe_template(patterns, direct_beam(patterns, radius).origin, radius)


@pytest.mark.parametrize("k_pixel_size", [(0.125, 0.125), (0.115, 0.13)])
def test_disk_radius_is_alpha_over_lambda(k_pixel_size):
    patterns, _ = stretch_sweep(None, k_pixel_size=k_pixel_size)
    # whole pixels above half the plateau: good to about 1 % at a radius of 5 px
    assert disk_radius(patterns, k_pixel_size) == pytest.approx(RADIUS_INV_NM, rel=0.015)
    assert disk_radius(patterns) == pytest.approx(RADIUS_INV_NM / np.sqrt(np.prod(k_pixel_size)), rel=0.015)


def test_direct_beam_matches_the_known_descan(noise_free, counted):
    """The pitfall of a centring step that shifts every pattern by half a pixel: the centres must
    match the generator's descan without any constant offset."""
    patterns, truth = noise_free
    beam = direct_beam(patterns, disk_radius(patterns))
    error = beam.origin - truth.origin.reshape(64, 2)
    assert np.abs(error).max() < 1e-3
    patterns, truth = counted
    beam = direct_beam(patterns, disk_radius(patterns))
    error = beam.origin - truth.origin.reshape(64, 2)
    # 8e5 counts in a disk of radius 4.8 px: sigma = R / (2 sqrt(N)) = 0.003 px per axis
    assert np.sqrt((error**2).mean()) < 0.006
    assert np.abs(error.mean(axis=0)).max() < 0.002
    v, u = np.meshgrid(np.linspace(-1, 1, 8), np.linspace(-1, 1, 8), indexing="ij")
    ramp = 1 - 0.2 * (u + v + 2) / 4  # the generator's intensity_variation=0.2
    # at most 1 - direct_fraction = 0.2 scattered, less the disks that miss the detector
    assert ((beam.scattered_fraction > 0.12) & (beam.scattered_fraction < 0.2)).all()
    assert np.corrcoef(beam.scattered_fraction, ramp.ravel())[0, 1] > 0.99


def test_direct_beam_ignores_a_hot_pixel(noise_free):
    patterns, truth = noise_free
    hot = patterns[:4].copy()
    hot[:, 5, 100] = 50 * hot.max()
    beam = direct_beam(hot, disk_radius(patterns))
    np.testing.assert_allclose(beam.origin, truth.origin.reshape(64, 2)[:4], atol=1e-3)


def test_direct_beam_at_the_edge_is_nan():
    signal, _ = simulate_4dstem(np.zeros((1, 2, 2, 2)), dose=None, detector_shape=(64, 64),
                                descan=np.array([[[0.0, 0.0], [0.0, 29.0]]]))
    beam = direct_beam(signal.data[0], 4.8)
    assert np.isfinite(beam.origin[0]).all() and np.isnan(beam.origin[1]).all() and np.isnan(beam.intensity[1])


def test_fit_descan_recovers_a_quadratic_and_ignores_outliers():
    v, u = np.meshgrid(np.linspace(-1, 1, 10), np.linspace(-1, 1, 12), indexing="ij")
    truth = np.stack([60 + 2 * v - u**2 + 0.5 * u * v, 70 + 3 * u + 0.3 * v**2], axis=-1)
    noisy = truth + np.random.default_rng(0).normal(scale=0.01, size=truth.shape)
    noisy[3, 4] += (29.0, 0.0)  # a pattern whose brightest disk was a Bragg disk
    noisy[7, 1] = np.nan
    fitted = fit_descan(noisy, order=2)
    assert np.abs(fitted - truth).max() < 0.01


def test_fit_descan_without_reweighting_is_one_least_squares_fit():
    v, u = np.meshgrid(np.linspace(-1, 1, 6), np.linspace(-1, 1, 8), indexing="ij")
    plane = np.stack([64 + 0.5 * v, 64 - 0.2 * u], axis=-1)
    noisy = plane + np.random.default_rng(1).normal(scale=0.01, size=plane.shape)
    for n_iterations in (0, 1):
        fitted = fit_descan(noisy, order=1, n_iterations=n_iterations)
        residual = noisy - fitted
        np.testing.assert_allclose(residual.reshape(-1, 2).mean(axis=0), 0.0, atol=1e-9)  # least squares
        assert np.abs(fitted - plane).max() < 0.01


def test_fit_descan_needs_enough_points():
    origins = np.full((3, 3, 2), np.nan)
    origins[0, :2] = 64.0
    with pytest.raises(ValueError, match=r"2 finite origins for a polynomial of order 2 \(6 terms\)"):
        fit_descan(origins)
    with pytest.raises(ValueError, match=r"expected \(rows, cols, 2\)"):
        fit_descan(np.zeros((3, 3)))


def test_probe_template_is_centred_and_normalised(counted):
    """Refined with the template, the direct beams land on the known centres: no offset."""
    patterns, truth = counted
    template = template_of(patterns)
    assert template.shape == template_shape(disk_radius(patterns))
    assert template.sum() == pytest.approx(1.0)
    origin = truth.origin.reshape(64, 2)
    position, _, valid = refine_disks(patterns, np.arange(64), np.rint(origin).astype(int), template)
    assert valid.all()
    assert np.abs((position - origin).mean(axis=0)).max() < 0.002
    assert np.abs(position - origin).max() < 0.02


def test_refined_positions_do_not_pixel_lock(noise_free):
    """Recovered against true sub-pixel positions: slope 1, no pull toward pixel centres."""
    patterns, truth = noise_free
    found = find_disks(patterns, template_of(patterns))
    true, distance = matched(found, truth)
    assert (distance < 0.01).all()
    fraction = true - np.round(true)
    recovered = found.position - np.round(true)
    for axis in (0, 1):
        slope = np.polyfit(fraction[:, axis], recovered[:, axis], 1)[0]
        assert slope == pytest.approx(1.0, abs=0.005)
    assert np.ptp(fraction) > 0.9  # the sweep covers the whole pixel


def test_counted_positions_are_unbiased(counted):
    patterns, truth = counted
    found = find_disks(patterns, template_of(patterns))
    true, distance = matched(found, truth)
    error = found.position - true
    assert (distance < 0.3).all()
    # Poisson: sigma ~ R / (2 sqrt(N)) ~ 0.03 px for the weakest (~6000 count) disks
    assert np.sqrt((error**2).mean()) < 0.03
    assert np.abs(error.mean(axis=0)).max() < 0.003
    fraction = true - np.round(true)
    for axis in (0, 1):
        assert np.polyfit(fraction[:, axis], error[:, axis], 1)[0] == pytest.approx(0.0, abs=0.02)


def test_refine_disks_recovers_a_known_shift(noise_free):
    patterns, truth = noise_free
    template = template_of(patterns)
    true = truth.disk_positions([(1, 0)])[:, :, 0].reshape(64, 2)  # one Bragg disk per pattern
    guess = np.rint(true + np.array([0.6, -0.8])).astype(int)  # up to a pixel away
    position, intensity, valid = refine_disks(patterns, np.arange(64), guess, template)
    assert valid.all() and (intensity > 0).all()
    np.testing.assert_allclose(position, true, atol=0.01)


def test_every_disk_is_found_once_and_cut_disks_are_left_out(counted):
    patterns, truth = counted
    found = find_disks(patterns, template_of(patterns))
    true, distance = matched(found, truth)
    reach = disks._support_reach(template_of(patterns)) - 0.5  # from the nearest pixel
    inside = ((true >= reach) & (true <= np.array(patterns.shape[1:]) - 1 - reach)).all(axis=1)
    assert inside.all()  # nothing cut by the detector edge
    keys = np.column_stack([found.pattern, np.rint(true).astype(int)])
    assert len(np.unique(keys, axis=0)) == len(keys)  # no disk twice
    assert (found.counts >= 17).all()
    first = np.unique(found.pattern, return_index=True)[1]
    np.testing.assert_allclose(found.position[first], truth.origin.reshape(64, 2), atol=0.02)  # brightest first


def test_thresholds_follow_the_data_not_its_units(counted):
    """Rescaling the counts (another detector gain) finds the same disks: no absolute threshold."""
    patterns, _ = counted
    template = template_of(patterns)
    found = find_disks(patterns[:8], template)
    scaled = find_disks(patterns[:8] * 1e-4, template)
    np.testing.assert_array_equal(found.counts, scaled.counts)
    np.testing.assert_allclose(found.position, scaled.position, atol=1e-6)


def test_low_dose_still_finds_the_first_order():
    """2e4 electrons per pattern: about 400 counts per first-order disk, each found in every pattern."""
    patterns, truth = stretch_sweep(2e4)
    found = find_disks(patterns, template_of(patterns))
    first_order = truth.disk_positions([(1, 0), (0, 1), (-1, 1), (-1, 0), (0, -1), (1, -1)]).reshape(64, 6, 2)
    distance = np.linalg.norm(found.position[:, None, :] - first_order[found.pattern], axis=-1)
    hits = np.zeros((64, 6), dtype=int)
    np.add.at(hits, (found.pattern[:, None] * np.ones((1, 6), int), np.arange(6)[None]), distance < 1.0)
    assert (hits == 1).all()


def test_empty_patterns_are_reported_not_dropped(counted):
    patterns, _ = counted
    template = template_of(patterns)
    vacuum, _ = simulate_4dstem(np.zeros((1, 1, 2, 2)), vacuum=np.ones((1, 1), bool), dose=1e6, random_state=1)
    stack = np.stack([patterns[0], np.zeros_like(patterns[0]), vacuum.data[0, 0]])
    found = find_disks(stack, template)
    assert found.n_patterns == 3
    assert found.counts[0] >= 17 and found.counts[1] == 0 and found.counts[2] == 1


def test_torch_correlation_matches_scipy(counted):
    """The GPU path (device="cuda") runs the same torch code; here on torch's CPU device."""
    pytest.importorskip("torch")
    patterns, _ = counted
    template = template_of(patterns)
    expected = cross_correlate(patterns[:4], template)
    kernel = disks._correlation_kernel(template, patterns.shape[1:])
    result = disks._torch_correlation(patterns[:4].astype(np.float32), kernel, "cpu")
    np.testing.assert_allclose(result, expected, atol=1e-5 * expected.max())


def test_correlation_peak_is_the_disk_intensity(noise_free):
    patterns, truth = noise_free
    template = template_of(patterns)
    correlation = cross_correlate(patterns[:1], template)[0]
    row, col = np.rint(truth.origin.reshape(64, 2)[0]).astype(int)
    assert correlation.max() == correlation[row, col]
    beam = direct_beam(patterns[:1], disk_radius(patterns))
    assert correlation.max() == pytest.approx(beam.intensity[0], rel=0.02)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint32])
def test_input_dtypes_give_the_same_disks(counted, dtype):
    patterns, _ = counted
    template = template_of(patterns)
    reference = find_disks(patterns[:4], template)
    found = find_disks(patterns[:4].astype(dtype), template)
    np.testing.assert_allclose(found.position, reference.position, atol=1e-6)


def test_bad_arrays_are_named():
    with pytest.raises(ValueError, match=r"patterns has shape \(64, 64\); expected \(n, H, W\)"):
        find_disks(np.zeros((64, 64)), np.ones((8, 8)))
    with pytest.raises(ValueError, match=r"template has shape \(8,\) and sum 8; expected an image"):
        find_disks(np.zeros((1, 64, 64)), np.ones(8))
    with pytest.raises(ValueError, match=r"radius=-1.0 px; expected a positive number"):
        direct_beam(np.zeros((1, 64, 64)), -1.0)
    with pytest.raises(ValueError, match="no direct beam whose"):
        probe_template(np.zeros((1, 64, 64)), np.full((1, 2), np.nan), 4.0)
