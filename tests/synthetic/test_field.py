"""Tests of the phase-object 4D-STEM forward model: the CoM identity, conventions, descan, noise, domains."""

import ast
import inspect

import numpy as np
import pytest

from stemml_core.synthetic import FieldTruth, atomic_monolayer, field, polar_bilayer, simulate_field_4dstem
from stemml_core.synthetic.field import interaction_constant, vacuum_scan


def pattern_com(signal):
    """CoM ``(kx, ky)`` 1/nm of every pattern, straight from the calibrated axes (no analysis code)."""
    data = signal.data.astype(np.float64)
    ky, kx = signal.axes_manager["ky"].axis, signal.axes_manager["kx"].axis
    total = data.sum(axis=(2, 3))
    return np.stack([data.sum(axis=2) @ kx, data.sum(axis=3) @ ky], axis=-1) / total[..., None]


def ramp(gradient_x, gradient_y):
    """``V = gx x + gy y`` (V nm), a uniform projected field."""

    def potential(y, x):
        return gradient_x * x + gradient_y * y, np.full(np.shape(x), gradient_x), np.full(np.shape(x), gradient_y)

    return potential


def test_interaction_constant_matches_holography_tables():
    # C_E of electron holography: 7.29e-3 rad/(V nm) at 200 kV, 6.53e-3 at 300 kV (e.g. Lichte & Lehmann,
    # Rep. Prog. Phys. 71, 016102, 2008), and an independent implementation in the analysis.
    from stemml_core.diffraction import interaction_constant as analysis_constant

    assert interaction_constant(200.0) == pytest.approx(7.29e-3, abs=5e-6)
    assert interaction_constant(300.0) == pytest.approx(6.53e-3, abs=5e-6)
    for energy in (60.0, 80.0, 200.0, 300.0):
        # the generator's wavelength uses CODATA 2018, scipy.constants CODATA 2022: 1e-9 apart
        assert interaction_constant(energy) == pytest.approx(analysis_constant(energy), rel=1e-8)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("sample", ["atomic_monolayer", "polar_bilayer"])
def test_com_of_noise_free_patterns_is_the_probe_weighted_potential_gradient(sample, flip):
    """Müller-Caspary 2017 / Lazić 2016: <k> = (sigma / 2 pi) <grad V>_|P|^2 for a phase object. Measured
    largest deviation: 2e-8 (monolayer, |CoM| up to 1.25) and 6e-8 1/nm (bilayer, up to 0.03)."""
    make = {"atomic_monolayer": lambda: atomic_monolayer((10, 10), dose=None, flip=flip),
            "polar_bilayer": lambda: polar_bilayer((16, 16), dose=None, flip=flip)}[sample]
    signal, truth = make()
    measured = pattern_com(signal)
    np.testing.assert_allclose(measured, truth.detector_com(), rtol=0, atol=1e-6)
    assert np.abs(truth.com).max() > 0.02  # a real field, not a trivial zero


def test_a_uniform_field_deflects_by_sigma_gradient_over_two_pi():
    signal, truth = simulate_field_4dstem(ramp(10.0, -4.0), scan_shape=(2, 3), dose=None, descan=0.0)
    sigma = interaction_constant(200.0)
    expected = sigma / (2 * np.pi) * np.array([10.0, -4.0])
    np.testing.assert_allclose(truth.com, np.broadcast_to(expected, (2, 3, 2)), rtol=1e-12)
    np.testing.assert_allclose(pattern_com(signal), truth.com, atol=1e-7)
    np.testing.assert_allclose(truth.field(), np.broadcast_to([-10.0, 4.0], (2, 3, 2)), rtol=1e-12)  # E = -grad V, V


@pytest.mark.parametrize(
    "rotation, flip, expected",
    [
        (0.0, False, [1.0, 0.0]),
        (90.0, False, [0.0, -1.0]),  # +x turned counter-clockwise looking down the beam: up the detector (-ky)
        (0.0, True, [1.0, 0.0]),
        (30.0, False, [np.cos(np.pi / 6), -np.sin(np.pi / 6)]),
    ],
)
def test_scan_rotation_and_flip_turn_the_deflection(rotation, flip, expected):
    """k_det = R(rotation) S v with R counter-clockwise as in simulate_4dstem and S = diag(1, -1) for a flip."""
    signal, truth = simulate_field_4dstem(ramp(20.0, 0.0), scan_shape=(2, 2), dose=None, descan=0.0,
                                          scan_rotation=rotation, flip=flip)
    direction = pattern_com(signal)[0, 0]
    np.testing.assert_allclose(direction / np.linalg.norm(direction), expected, atol=1e-6)
    np.testing.assert_allclose(truth.com[0, 0] / np.linalg.norm(truth.com[0, 0]), [1.0, 0.0], atol=1e-12)


def test_flip_reverses_the_y_component_before_the_rotation():
    signal, _ = simulate_field_4dstem(ramp(0.0, 20.0), scan_shape=(2, 2), dose=None, descan=0.0, flip=True)
    direction = pattern_com(signal)[0, 0]
    np.testing.assert_allclose(direction / np.linalg.norm(direction), [0.0, -1.0], atol=1e-6)


def test_descan_is_the_vacuum_com_and_linear_in_the_scan_position():
    signal, truth = polar_bilayer((8, 10), dose=None, descan=3.0)
    reference = vacuum_scan(truth, dose=None)
    np.testing.assert_allclose(pattern_com(reference), truth.descan, atol=1e-7)
    rows, cols = np.indices((8, 10))
    design = np.column_stack([np.ones(80), rows.ravel(), cols.ravel()])
    descan = truth.descan.reshape(-1, 2)
    residual = descan - design @ np.linalg.lstsq(design, descan, rcond=None)[0]
    assert np.abs(residual).max() < 1e-7
    assert truth.params["descan_max_px"] == pytest.approx(np.abs(truth.descan).max() / 0.125, rel=1e-6)
    still = polar_bilayer((4, 4), dose=None, descan=0.0)[1]
    assert np.abs(still.descan).max() < 1e-9


def test_calibration_and_metadata_follow_the_4d_generator():
    signal, truth = polar_bilayer((6, 7), dose=None)
    am = signal.axes_manager
    assert signal.data.shape == (6, 7, 64, 64) and signal.data.dtype == np.float32
    assert [(a.name, a.units, a.scale) for a in am.navigation_axes[::-1]] == [("y", "nm", 0.5), ("x", "nm", 0.5)]
    assert [(a.name, a.units, a.scale, a.offset) for a in am.signal_axes[::-1]] == [
        ("ky", "1/nm", 0.125, -4.0), ("kx", "1/nm", 0.125, -4.0)]
    assert signal.metadata.Acquisition_instrument.TEM.beam_energy == 200.0
    assert signal.metadata.Acquisition_instrument.TEM.convergence_angle == 3.0
    np.testing.assert_allclose(signal.data.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    assert isinstance(truth, FieldTruth) and truth.scan_rotation == -25.0 and truth.flip is False


def test_same_seed_same_data_other_seed_other_noise():
    first, _ = polar_bilayer((6, 6), random_state=3)
    second, _ = polar_bilayer((6, 6), random_state=3)
    other, _ = polar_bilayer((6, 6), random_state=4)
    np.testing.assert_array_equal(first.data, second.data)
    assert not np.array_equal(first.data, other.data)


def test_counts_are_poisson_at_the_dose():
    dose = 1e5
    noisy, _ = polar_bilayer((16, 16), dose=dose, random_state=0)
    clean, _ = polar_bilayer((16, 16), dose=None)
    counts = noisy.data.astype(np.float64)
    assert np.array_equal(counts, np.round(counts))
    totals = counts.sum(axis=(2, 3))  # a sum of independent Poisson counts: Poisson(dose)
    assert abs(totals.mean() - dose) < 5 * np.sqrt(dose / totals.size)
    assert totals.var(ddof=1) / dose == pytest.approx(1.0, abs=0.3)  # 256 patterns: +-0.09 standard error
    expected = dose * clean.data.astype(np.float64)
    bright = expected > 50
    z = (counts[bright] - expected[bright]) / np.sqrt(expected[bright])
    assert abs(z.mean()) < 0.01 and z.var() == pytest.approx(1.0, abs=0.02)


def test_bilayer_truth_domains_walls_and_potential_agree():
    signal, truth = polar_bilayer(dose=None)
    params = truth.params
    specimen = ~truth.vacuum
    assert set(np.unique(truth.domains[specimen])) == {-1, 1} and (truth.domains[truth.vacuum] == 0).all()
    # every wall position lies within one scan step of a wall line, and walls separate the signs
    assert (truth.wall_distance[truth.walls] <= params["scan_step_nm"]).all()
    # deep inside a domain, far from the hole, the potential is V_mip + sign V_dom
    rows, cols = np.indices(truth.domains.shape)
    hole = np.hypot(cols * 0.5 - params["hole_centre_xy_nm"][0], rows * 0.5 - params["hole_centre_xy_nm"][1])
    inside = (truth.wall_distance > 2.0) & (hole > params["hole_radius_nm"] + 2.0)
    assert inside.sum() > 50
    expected = params["mean_inner_potential_V_nm"] + truth.domains[inside] * params["domain_potential_V_nm"]
    np.testing.assert_allclose(truth.potential[inside], expected, rtol=0.02)
    deep_hole = hole < params["hole_radius_nm"] - 1.0  # the edge's tanh is below 2 % there
    assert deep_hole.sum() > 5 and np.abs(truth.potential[deep_hole]).max() < 0.02 * expected.max()
    # the field crosses each wall from the + domain to the - domain: E . (r- - r+) > 0
    field = truth.field()
    pairs = 0
    for axis, unit in ((0, np.array([0.0, 1.0])), (1, np.array([1.0, 0.0]))):
        a = np.take(truth.domains, np.arange(truth.domains.shape[axis] - 1), axis=axis)
        b = np.take(truth.domains, np.arange(1, truth.domains.shape[axis]), axis=axis)
        fa = np.take(field, np.arange(field.shape[axis] - 1), axis=axis)
        fb = np.take(field, np.arange(1, field.shape[axis]), axis=axis)
        mean = (fa + fb) @ unit / 2  # field along +row / +col between the two positions
        crossing = a * b < 0
        downhill = np.where(a > b, mean, -mean)[crossing]  # positive: pointing from + to -
        pairs += crossing.sum()
        assert (downhill > 0).mean() > 0.95
    assert pairs > 50


def test_monolayer_potential_peaks_at_the_columns():
    _, truth = atomic_monolayer((24, 24), dose=None)
    # the probe-blurred potential is positively skewed (sharp column peaks over a low floor)
    centred = truth.potential_avg - truth.potential_avg.mean()
    assert np.mean(centred**3) / np.mean(centred**2) ** 1.5 > 0.5
    assert truth.potential.max() == pytest.approx(110.0, rel=0.05)  # a Mo column under a scan position
    assert not truth.vacuum.any() and not truth.walls.any() and np.isinf(truth.wall_distance).all()


def test_truth_is_read_only():
    _, truth = polar_bilayer((4, 4), dose=None)
    with pytest.raises(ValueError, match="read-only"):
        truth.com[0, 0, 0] = 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dose=-1.0), r"dose=-1.0 electrons per pattern; expected a positive number"),
        (dict(descan=np.zeros((3, 3, 2))), r"descan has shape \(3, 3, 2\); expected \(4, 4, 2\)"),
        (dict(descan=-1.0), r"descan=-1.0 px; expected a non-negative amplitude"),
        (dict(convergence_angle=30.0), r"the aperture .* reaches beyond 0.45 of the detector's half-width"),
        (dict(scan_rotation=np.nan), r"scan_rotation=nan degrees; expected a finite angle"),
        (dict(scan_step=0.0), r"scan_step=0.0 nm; expected a positive number"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        simulate_field_4dstem(ramp(1.0, 0.0), scan_shape=(4, 4), **kwargs)


def test_bad_samples_are_named():
    with pytest.raises(ValueError, match=r"period=0.0 nm; expected a positive number"):
        polar_bilayer((4, 4), period=0.0)
    with pytest.raises(ValueError, match=r"scan_shape=\(4, 0\); expected two positive integers"):
        polar_bilayer((4, 0))
    with pytest.raises(ValueError, match=r"potential must return \(V, dV_dx, dV_dy\)"):
        simulate_field_4dstem(lambda y, x: (x, x), scan_shape=(2, 2))


def test_forward_model_imports_no_analysis():
    tree = ast.parse(inspect.getsource(field))
    modules = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in modules if m.startswith(("stemml_core.eels", "stemml_core.diffraction"))]
