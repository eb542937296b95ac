"""Tests of the nanobeam 4D-STEM forward model: geometry, sign conventions, probe average, noise."""

import ast
import inspect

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.optimize import curve_fit
from scipy.special import erfc, j1

from stemml_core.synthetic import diffraction
from stemml_core.synthetic.diffraction import (
    electron_wavelength,
    hexagonal_reciprocal_basis,
    simulate_4dstem,
    strained_flake,
    twisted_bilayer,
)

G_FIRST = 2 / (np.sqrt(3) * 0.316)  # |g| of MoS2 {1 0}, 1/nm
CENTRE = np.array([64.0, 64.0])  # optical axis of a 128 x 128 detector, (row, col) px


def single_pattern(gradient, **kwargs):
    """One noise-free pattern without descan or intensity ramp for a uniform F - I."""
    options = dict(dose=None, descan=0.0, intensity_variation=0.0) | kwargs
    signal, truth = simulate_4dstem(np.asarray(gradient, dtype=float).reshape(1, 1, 2, 2), **options)
    return signal.data[0, 0].astype(float), truth


def centroid(pattern, centre, radius):
    """Intensity-weighted centre (row, col) px of the pixels within ``radius`` px of ``centre``."""
    rows, cols = np.indices(pattern.shape)
    weights = pattern * (np.hypot(rows - centre[0], cols - centre[1]) <= radius)
    return np.array([(weights * rows).sum(), (weights * cols).sum()]) / weights.sum()


def disk_radius_px(k_pixel=0.125):
    return 1.5e-3 / electron_wavelength(200.0) / k_pixel


def test_electron_wavelength_matches_tables():
    # Williams & Carter, Transmission Electron Microscopy, Table 1.2: 0.00251 nm at 200 kV, 0.00197 nm at
    # 300 kV; the extra digits are the relativistic formula with CODATA 2018 constants.
    assert electron_wavelength(200.0) * 1e3 == pytest.approx(2.5079, abs=1e-4)
    assert electron_wavelength(300.0) * 1e3 == pytest.approx(1.9687, abs=1e-4)


def test_reference_basis_is_reciprocal_to_the_hexagonal_lattice():
    basis = hexagonal_reciprocal_basis(0.316, orientation=10.0)
    angle = np.deg2rad(10.0)
    a1 = 0.316 * np.array([np.cos(angle - np.pi / 6), -np.sin(angle - np.pi / 6)])
    a2 = 0.316 * np.array([np.cos(angle + np.pi / 2), -np.sin(angle + np.pi / 2)])
    np.testing.assert_allclose(np.stack([a1, a2]) @ basis, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(basis, axis=0), G_FIRST)


def edge_profile(x, amplitude, centre, radius, sigma):
    return amplitude * 0.5 * erfc((np.abs(x - centre) - radius) / (np.sqrt(2) * sigma))


@pytest.mark.parametrize("k_pixel", [(0.125, 0.125), (0.1, 0.125)])
def test_disk_radius_matches_alpha_over_lambda_per_axis(k_pixel):
    pattern, _ = single_pattern(np.zeros((2, 2)), k_pixel_size=k_pixel)
    pixels = np.arange(50, 79)  # the direct beam only
    for profile, scale in [(pattern[pixels, 64], k_pixel[0]), (pattern[64, pixels], k_pixel[1])]:
        (_, centre, radius, _), _ = curve_fit(edge_profile, pixels, profile, p0=(profile.max(), 64, 5, 0.5))
        assert centre == pytest.approx(64, abs=1e-3)
        assert radius == pytest.approx(disk_radius_px(scale), abs=0.01)


# Expected g1 = (G_FIRST, 0) after F, written out by hand from G = F^{-T} G0, (kx, ky) in 1/nm.
THETA = np.deg2rad(3.0)
CASES = {
    "rotation": (
        [[np.cos(THETA) - 1, np.sin(THETA)], [-np.sin(THETA), np.cos(THETA) - 1]],
        G_FIRST * np.array([np.cos(THETA), -np.sin(THETA)]),  # counter-clockwise: up on the display
        dict(theta=np.sin(THETA), exx=np.cos(THETA) - 1, eyy=np.cos(THETA) - 1, exy=0.0),
    ),
    "tensile_x": ([[0.02, 0], [0, 0]], G_FIRST * np.array([1 / 1.02, 0]), dict(exx=0.02, eyy=0, exy=0, theta=0)),
    "compressive_y": ([[0, 0], [0, -0.02]], G_FIRST * np.array([1.0, 0]), dict(exx=0, eyy=-0.02, exy=0, theta=0)),
    "shear": (
        [[0, 0.01], [0.01, 0]],
        G_FIRST * np.array([1.0, -0.01]) / (1 - 0.01**2),
        dict(exx=0, eyy=0, exy=0.01, theta=0),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_disk_centres_follow_the_deformation(case):
    gradient, g1, components = CASES[case]
    pattern, truth = single_pattern(gradient)
    expected = CENTRE + g1[::-1] / 0.125
    assert np.abs(centroid(pattern, expected, disk_radius_px() + 2) - expected).max() < 0.01
    for name, value in components.items():
        assert getattr(truth, name)[0, 0] == pytest.approx(value, abs=1e-12)
    np.testing.assert_allclose(truth.disk_positions([(1, 0)])[0, 0, 0], expected, atol=1e-9)


def test_disk_g2_under_eyy_uses_the_ky_axis():
    # g2 = |g| (1/2, -sqrt(3)/2); eyy = -2 % stretches its ky component by 1/0.98.
    pattern, _ = single_pattern([[0, 0], [0, -0.02]])
    expected = CENTRE + np.array([-G_FIRST * np.sqrt(3) / 2 / 0.98, G_FIRST / 2]) / 0.125
    assert np.abs(centroid(pattern, expected, disk_radius_px() + 2) - expected).max() < 0.01


def test_non_square_pixels_use_each_axis_scale():
    k_pixel = (0.1, 0.125)  # (ky, kx) 1/nm
    pattern, truth = single_pattern(np.zeros((2, 2)), k_pixel_size=k_pixel)
    for g in hexagonal_reciprocal_basis(0.316).T:
        expected = CENTRE + g[::-1] / np.array(k_pixel)
        assert np.abs(centroid(pattern, expected, disk_radius_px(0.1) + 2) - expected).max() < 0.01
    assert truth.params["k_pixel_size_inv_nm"] == k_pixel


def test_scan_rotation_turns_the_pattern_counter_clockwise():
    pattern, truth = single_pattern(np.zeros((2, 2)), scan_rotation=10.0)  # not a symmetry of the lattice
    angle = np.deg2rad(10.0)
    expected = CENTRE + G_FIRST * np.array([-np.sin(angle), np.cos(angle)]) / 0.125  # g1 moves up
    assert np.abs(centroid(pattern, expected, disk_radius_px() + 2) - expected).max() < 0.01
    np.testing.assert_allclose(truth.disk_positions([(1, 0)])[0, 0, 0], expected, atol=1e-9)
    assert truth.theta[0, 0] == 0  # the truth stays in the scan frame


def test_truth_obeys_f_from_reciprocal_bases():
    # F = (G0 G^{-1})^T reproduces exx, eyy, exy, theta of the truth.
    _, truth = strained_flake((12, 12), detector_shape=(48, 48), dose=None)
    basis = truth.reciprocal_basis(averaged=False)
    gradient = np.swapaxes(truth.reference_basis @ np.linalg.inv(basis), -1, -2) - np.eye(2)
    crystal = ~truth.vacuum
    d = {(i, j): gradient[..., i, j][crystal] for i in range(2) for j in range(2)}
    np.testing.assert_allclose(d[0, 0], truth.exx[crystal], atol=1e-12)
    np.testing.assert_allclose(d[1, 1], truth.eyy[crystal], atol=1e-12)
    np.testing.assert_allclose((d[0, 1] + d[1, 0]) / 2, truth.exy[crystal], atol=1e-12)
    np.testing.assert_allclose((d[0, 1] - d[1, 0]) / 2, truth.theta[crystal], atol=1e-12)
    assert np.isnan(basis[truth.vacuum]).all()


def test_origin_is_the_direct_beam_centroid():
    signal, truth = strained_flake((8, 8), detector_shape=(64, 64), dose=None, descan=2.5)
    assert np.ptp(truth.origin[..., 1]) > 3  # the descan really moves the beam
    for row, col in [(0, 0), (0, 7), (7, 0), (5, 3)]:
        found = centroid(signal.data[row, col].astype(float), truth.origin[row, col], disk_radius_px() + 2)
        assert np.abs(found - truth.origin[row, col]).max() < 0.01


def test_vacuum_patterns_hold_only_the_direct_beam():
    signal, truth = strained_flake((16, 16), detector_shape=(64, 64), dose=None)
    rows, cols = np.indices((64, 64))
    outside = disk_radius_px() + 4
    assert truth.vacuum.any() and (~truth.vacuum).any()
    for (row, col), in_vacuum in np.ndenumerate(truth.vacuum):
        far = np.hypot(rows - truth.origin[row, col, 0], cols - truth.origin[row, col, 1]) > outside
        assert (signal.data[row, col][far].sum() < 1e-6) == in_vacuum
    for name in ("exx", "eyy", "exy", "theta", "exx_avg", "eyy_avg", "exy_avg", "theta_avg"):
        assert np.array_equal(np.isnan(getattr(truth, name)), truth.vacuum)
    assert np.isnan(truth.disk_positions([(1, 0)])[truth.vacuum]).all()


def airy_average(sigma_nm, beam_energy=200.0, convergence_angle=1.5):
    """Gaussian bump exp(-r^2 / 2 sigma^2) averaged over the Airy probe intensity, by quadrature."""
    sigma_v = 2 * np.pi * convergence_angle * 1e-3 * sigma_nm / electron_wavelength(beam_energy)

    def airy(v):
        return (2 * j1(v) / v) ** 2 * v if v > 0 else 0.0

    weighted, _ = quad(lambda v: airy(v) * np.exp(-(v**2) / (2 * sigma_v**2)), 0, 12 * sigma_v, limit=400)
    return weighted / 2.0  # the integral of airy(v) over (0, inf) is 2


def test_airy_average_of_a_2nm_bump():
    # The brief quotes "about 0.88"; the exact value for a Gaussian with sigma = 2 nm is 0.894.
    assert airy_average(2.0) == pytest.approx(0.894, abs=0.001)


@pytest.mark.parametrize("as_array", [False, True])
def test_probe_average_of_a_narrow_bump(as_array):
    step, size, sigma = 0.25, 33, 2.0  # nm; the bump sits on scan position (16, 16)

    def bump(y, x):
        value = 0.01 * np.exp(-((x - 4.0) ** 2 + (y - 4.0) ** 2) / (2 * sigma**2))
        gradient = np.zeros(np.shape(x) + (2, 2))
        gradient[..., 0, 0] = value
        gradient[..., 0, 1] = value  # exy = theta = value / 2
        return gradient

    if as_array:  # constant over each 0.25 nm scan pixel
        y, x = np.meshgrid(np.arange(size) * step, np.arange(size) * step, indexing="ij")
        field, scan_shape = bump(y, x), None
    else:
        field, scan_shape = bump, (size, size)
    _, truth = simulate_4dstem(field, scan_shape=scan_shape, scan_step=step, detector_shape=(32, 32), dose=None)
    expected = airy_average(sigma)
    assert truth.exx[16, 16] == pytest.approx(0.01)
    for name in ("exx", "exy", "theta"):
        ratio = getattr(truth, name + "_avg")[16, 16] / getattr(truth, name)[16, 16]
        assert ratio == pytest.approx(expected, abs=0.003 if not as_array else 0.01)


def test_probe_average_ignores_vacuum_under_the_probe():
    gradient = np.zeros((6, 6, 2, 2))
    gradient[..., 0, 0] = 0.01
    vacuum = np.zeros((6, 6), dtype=bool)
    vacuum[:, :3] = True
    _, truth = simulate_4dstem(gradient, vacuum=vacuum, scan_step=0.5, detector_shape=(32, 32), dose=None)
    np.testing.assert_allclose(truth.exx_avg[:, 3:], 0.01, atol=1e-12)


def test_counts_follow_poisson_statistics_at_the_dose():
    dose = 1e4
    kwargs = dict(detector_shape=(48, 48), intensity_variation=0.0)
    signal, _ = strained_flake((20, 20), dose=dose, random_state=1, **kwargs)
    clean, _ = strained_flake((20, 20), dose=None, **kwargs)
    np.testing.assert_allclose(clean.data.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    totals = signal.data.sum(axis=(2, 3), dtype=np.float64).ravel()
    assert np.array_equal(signal.data, np.round(signal.data))
    assert abs(totals.mean() - dose) < 4 * np.sqrt(dose / totals.size)
    assert 0.7 < totals.var(ddof=1) / dose < 1.3  # sample variance of 400 Poisson sums: +-7 % (1 sigma)


def test_noise_is_determined_by_the_seed():
    kwargs = dict(detector_shape=(48, 48), dose=1e5)
    first, _ = strained_flake((6, 6), random_state=3, **kwargs)
    again, _ = strained_flake((6, 6), random_state=3, **kwargs)
    other, _ = strained_flake((6, 6), random_state=4, **kwargs)
    assert np.array_equal(first.data, again.data)
    assert not np.array_equal(first.data, other.data)


def test_twisted_layer_disks_at_the_twist_angle():
    # 25 degrees: not a symmetry of the lattice, and the layers' disks stay 12.6 px apart.
    pattern, truth = single_pattern(np.zeros((2, 2)), twist=25.0)
    angle = np.deg2rad(25.0)
    g1_second = G_FIRST * np.array([np.cos(angle), -np.sin(angle)])
    expected = CENTRE + g1_second[::-1] / 0.125
    # The first layer's nearest disk edge adds a 0.005 px bias to this centroid.
    assert np.abs(centroid(pattern, expected, disk_radius_px() + 1) - expected).max() < 0.02
    np.testing.assert_allclose(truth.second_layer.reference_basis[:, 0], g1_second, atol=1e-12)
    np.testing.assert_allclose(truth.disk_positions([(1, 0)], layer=2)[0, 0, 0], expected, atol=1e-9)
    assert truth.twist_deg == 25.0


def test_small_twist_disks_add():
    # At 1 degree the disks of the layers overlap; the bilayer is a sum of direct beam and both lattices.
    bilayer, _ = single_pattern(np.zeros((2, 2)), twist=1.0)
    first, _ = single_pattern(np.zeros((2, 2)))
    second, _ = single_pattern(np.zeros((2, 2)), orientation=1.0)
    direct, _ = single_pattern(np.zeros((2, 2)), vacuum=np.ones((1, 1), dtype=bool))
    basis = np.stack([first.ravel(), second.ravel(), direct.ravel()], axis=1)
    coefficients, *_ = np.linalg.lstsq(basis, bilayer.ravel(), rcond=None)
    residual = bilayer.ravel() - basis @ coefficients
    assert np.abs(residual).max() < 1e-5 * bilayer.max()
    assert coefficients[0] == pytest.approx(coefficients[1], rel=1e-4)


def test_heterostrain_of_the_second_layer():
    heterostrain = np.array([[0.004, 0.0], [0.0, -0.002]])
    _, truth = strained_flake((8, 8), detector_shape=(48, 48), dose=None, twist=2.0, heterostrain=heterostrain)
    crystal = ~truth.vacuum
    np.testing.assert_allclose((truth.second_layer.exx - truth.exx)[crystal], 0.004, atol=1e-12)
    np.testing.assert_allclose((truth.second_layer.eyy_avg - truth.eyy_avg)[crystal], -0.002, atol=1e-9)
    np.testing.assert_allclose(truth.second_layer.theta[crystal], truth.theta[crystal])


def test_twist_angle_of_the_truth():
    """The exact polar rotation of G2 G1^-1 agrees with the first-order twist + theta2 - theta1."""
    heterostrain = np.array([[0.003, 0.002], [-0.002, -0.001]])  # theta2 - theta1 = 0.002 rad
    _, truth = strained_flake((8, 8), detector_shape=(48, 48), dose=None, twist=25.0, heterostrain=heterostrain)
    first_order = 25.0 + np.degrees(truth.second_layer.theta_avg - truth.theta_avg)
    np.testing.assert_allclose(truth.twist_angle(), first_order, atol=2e-3)
    assert np.isnan(truth.twist_angle()[truth.vacuum]).all()
    _, single = strained_flake((4, 4), detector_shape=(48, 48), dose=None)
    with pytest.raises(ValueError, match="layer=2 does not exist"):
        single.twist_angle()


def test_twisted_bilayer_layout():
    """Both layers share the flake's features; the second adds +0.3 degrees of twist at (0.5, 0.6)
    and exx = +0.5 % at (0.8, 0.3) of the field; the reference corner is unstrained in both."""
    signal, truth = twisted_bilayer((24, 24), detector_shape=(48, 48), dose=None)
    rows, cols = truth.vacuum.shape
    twist = truth.twist_angle(averaged=False)
    assert np.nanmax(twist) - 25.0 == pytest.approx(0.3, abs=0.015)  # sampled 0.4 nm off its centre
    assert np.unravel_index(np.nanargmax(twist), twist.shape) == (round(0.6 * rows), round(0.5 * cols))
    difference = truth.second_layer.exx - truth.exx
    assert np.nanmax(difference) == pytest.approx(0.005, abs=2e-4)
    assert np.unravel_index(np.nanargmax(difference), difference.shape) == (round(0.3 * rows), round(0.8 * cols))
    np.testing.assert_allclose(truth.eyy, truth.second_layer.eyy)
    reference = (slice(int(0.7 * rows) + 1, None), slice(0, int(0.35 * cols)))
    for layer in (truth, truth.second_layer):
        for name in ("exx_avg", "eyy_avg", "exy_avg", "theta_avg"):
            assert np.abs(getattr(layer, name)[reference]).max() < 1e-4
    np.testing.assert_allclose(truth.twist_angle()[reference], 25.0, atol=0.005)
    assert truth.params["sample"] == "twisted_bilayer" and truth.twist_deg == 25.0
    assert signal.metadata.General.title == "Synthetic twisted MoS2 bilayer (4D-STEM)"


def test_default_flake_layout():
    signal, truth = strained_flake(detector_shape=(48, 48), dose=None)
    rows, cols = truth.vacuum.shape
    assert truth.vacuum[0].all() and not truth.vacuum[rows // 3 :].any()  # vacuum along the top edge
    reference = (slice(int(0.7 * rows) + 1, None), slice(0, int(0.35 * cols)))
    for name in ("exx", "eyy", "exy", "theta", "exx_avg", "eyy_avg", "exy_avg", "theta_avg"):
        assert np.abs(getattr(truth, name)[reference]).max() < 1e-4
    assert np.nanmax(truth.exx) == pytest.approx(0.02, abs=1e-3)
    assert np.nanmin(truth.eyy) == pytest.approx(-0.01, abs=1e-3)
    assert np.nanmax(truth.exy) == pytest.approx(0.005, abs=3e-4)
    assert np.rad2deg(np.nanmax(truth.theta)) == pytest.approx(0.5, abs=0.03)
    assert 0.85 < np.nanmax(truth.exx_avg) / np.nanmax(truth.exx) < 0.93
    assert truth.second_layer is None and truth.twist_deg is None
    assert truth.params["sample"] == "strained_flake"
    with pytest.raises(ValueError, match="read-only"):
        truth.exx[0, 0] = 1.0


def test_axes_and_metadata():
    signal, truth = strained_flake((6, 7), detector_shape=(40, 50), dose=None, scan_step=2.0, k_pixel_size=(0.2, 0.25))
    assert signal.data.shape == (6, 7, 40, 50) and signal.data.dtype == np.float32
    axes = {axis.name: axis for axis in signal.axes_manager._axes}
    assert [a.name for a in signal.axes_manager.navigation_axes] == ["x", "y"]
    assert [a.name for a in signal.axes_manager.signal_axes] == ["kx", "ky"]
    for name, scale, units in [("y", 2.0, "nm"), ("x", 2.0, "nm"), ("ky", 0.2, "1/nm"), ("kx", 0.25, "1/nm")]:
        assert axes[name].scale == scale and axes[name].units == units
    assert axes["ky"].index2value(20) == 0 and axes["kx"].index2value(25) == 0
    tem = signal.metadata.Acquisition_instrument.TEM
    assert tem.beam_energy == 200.0 and tem.convergence_angle == 1.5
    assert "MoS2" in signal.metadata.General.title
    assert truth.origin.shape == (6, 7, 2) and truth.reference_basis.shape == (2, 2)


def test_default_flake_shape():
    signal, _ = strained_flake()
    assert signal.data.shape == (32, 32, 128, 128)


UNIFORM = np.zeros((2, 2, 2, 2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lattice="graphene"), r"lattice='graphene' is unknown"),
        (dict(lattice=-0.3), r"lattice=-0.3 nm"),
        (dict(beam_energy=0.0), r"beam_energy=0.0 keV"),
        (dict(convergence_angle=-1.0), r"convergence_angle=-1.0 mrad"),
        (dict(scan_step=0.0), r"scan_step=0.0 nm"),
        (dict(dose=0.0), r"dose=0.0 electrons"),
        (dict(k_pixel_size=(0.1, 0.1, 0.1)), r"k_pixel_size=\(0.1, 0.1, 0.1\)"),
        (dict(k_pixel_size=-0.1), r"k_pixel_size=-0.1"),
        (dict(detector_shape=(0, 5)), r"detector_shape=\(0, 5\)"),
        (dict(detector_shape=(16, 16)), r"detector_shape=\(16, 16\) is smaller than one disk"),
        (dict(direct_fraction=0.0), r"direct_fraction=0.0"),
        (dict(asymmetry=1.0), r"asymmetry=1.0"),
        (dict(intensity_variation=-0.1), r"intensity_variation=-0.1"),
        (dict(edge_width=0.0), r"edge_width=0.0 px"),
        (dict(descan=-1.0), r"descan=-1.0 px"),
        (dict(descan=np.zeros((3, 2, 2))), r"descan has shape \(3, 2, 2\); expected \(2, 2, 2\)"),
        (dict(vacuum=np.zeros((3, 3), dtype=bool)), r"vacuum is a bool array of shape \(3, 3\)"),
        (dict(vacuum=np.zeros((2, 2))), r"vacuum is a float64 array"),
        (dict(heterostrain=np.zeros((2, 2))), r"heterostrain was given with twist=None"),
        (dict(twist=2.0, heterostrain=np.zeros((3, 3))), r"heterostrain has shape \(3, 3\)"),
        (dict(twist=float("nan")), r"twist=nan degrees"),
        (dict(scan_shape=(3, 3)), r"scan_shape=\(3, 3\) differs"),
        (dict(tilt=[600.0, 0.0]), r"tilt reaches 600 mrad"),
        (dict(tilt=np.zeros((3, 2))), r"tilt has shape \(3, 2\)"),
        (dict(thickness=0.0), r"thickness=0.0 nm"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_4dstem(UNIFORM, **kwargs)


def disk_sum(pattern, centre, radius):
    rows, cols = np.indices(pattern.shape)
    return pattern[np.hypot(rows - centre[0], cols - centre[1]) <= radius].sum()


def test_tilt_unbalances_friedel_pairs_by_the_excitation_error():
    """A tilt vector tau along +x: the (1, 0) disk (g along +kx) moves off the Ewald sphere,
    (-1, 0) towards it; their intensity ratio is L(s+) / L(s-), L(s) = 1 / (1 + (pi t s)^2),
    s = -(g . tau + lambda g^2 / 2). An untilted pattern is the one without ``tilt``."""
    tau, thickness = 2e-3, 10.0  # rad, nm
    pattern, truth = single_pattern(np.zeros((2, 2)), asymmetry=0.0, tilt=[1e3 * tau, 0.0], thickness=thickness)
    g1 = np.array([G_FIRST, 0.0]) / 0.125  # (kx, ky) px
    bright = disk_sum(pattern, CENTRE - g1[::-1], disk_radius_px() + 3)
    dim = disk_sum(pattern, CENTRE + g1[::-1], disk_radius_px() + 3)
    wavelength = electron_wavelength(200.0)

    def profile(s):
        return 1 / (1 + (np.pi * thickness * s) ** 2)

    expected = profile(-(G_FIRST * tau + wavelength * G_FIRST**2 / 2)) / profile(-(-G_FIRST * tau + wavelength
                                                                                     * G_FIRST**2 / 2))
    assert dim / bright == pytest.approx(expected, rel=1e-3)
    assert expected < 0.8  # a clear asymmetry at 2 mrad and 10 nm
    np.testing.assert_allclose(truth.tilt[0, 0], [tau, 0.0])
    assert truth.params["tilt_max_mrad"] == pytest.approx(2.0)
    flat, flat_truth = single_pattern(np.zeros((2, 2)), asymmetry=0.0)
    zero, _ = single_pattern(np.zeros((2, 2)), asymmetry=0.0, tilt=np.zeros((1, 1, 2)))
    np.testing.assert_allclose(zero, flat, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(flat_truth.tilt, 0.0)


def test_tilt_foreshortens_the_projected_lattice():
    """100 mrad about the y axis (tau along +x): the disks spread by 1 / cos(0.1) along kx only,
    the truth's strain stays zero (the lattice is not strained) and disk_positions follows."""
    pattern, truth = single_pattern(np.zeros((2, 2)), tilt=np.array([100.0, 0.0]))
    for g in hexagonal_reciprocal_basis(0.316).T:
        expected = CENTRE + (g * [1 / np.cos(0.1), 1.0])[::-1] / 0.125
        assert np.abs(centroid(pattern, expected, disk_radius_px() + 2) - expected).max() < 0.01
    np.testing.assert_allclose(truth.disk_positions([(1, 0)])[0, 0, 0], CENTRE + [0, G_FIRST / np.cos(0.1) / 0.125],
                               atol=1e-9)
    assert truth.exx[0, 0] == 0 and truth.eyy[0, 0] == 0


def test_a_tilt_callable_is_taken_at_the_probe_centre():
    _, truth = strained_flake((8, 8), detector_shape=(48, 48), dose=None,
                              tilt=lambda y, x: np.stack([np.where(x > 4.0, 1.0, 0.0), np.zeros_like(x)], -1))
    crystal = ~truth.vacuum
    np.testing.assert_array_equal(truth.tilt[..., 0][crystal], np.where(np.arange(8) > 4, 1e-3, 0.0)[None, :]
                                  .repeat(8, 0)[crystal])
    assert np.isnan(truth.tilt[truth.vacuum]).all()


def test_bad_displacement_gradients_raise():
    with pytest.raises(ValueError, match=r"displacement_gradient has shape \(2, 2, 3, 3\)"):
        simulate_4dstem(np.zeros((2, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"scan_shape=None with a callable"):
        simulate_4dstem(lambda y, x: np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"displacement_gradient returned an array of shape \(3,\)"):
        simulate_4dstem(lambda y, x: np.zeros(3), scan_shape=(2, 2))
    with pytest.raises(ValueError, match=r"near-singular"):
        simulate_4dstem(np.full((2, 2, 2, 2), -0.5))
    _, truth = simulate_4dstem(UNIFORM, detector_shape=(32, 32), dose=None)
    with pytest.raises(ValueError, match=r"layer=2 does not exist"):
        truth.disk_positions([(1, 0)], layer=2)


def test_forward_model_imports_no_analysis():
    tree = ast.parse(inspect.getsource(diffraction))
    modules = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in modules if m.startswith(("stemml_core.eels", "stemml_core.diffraction"))]
