"""Strain maps against the forward model's probe-averaged truth; conventions, bad input, lazy runs."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from stemml_core.diffraction import (
    FitStatus,
    StrainResult,
    friedel_dipole,
    plot_strain,
    reference_region,
    strain_components,
    strain_map,
)
from stemml_core.io import InputError
from stemml_core.segment import segment_patterns
from stemml_core.synthetic import simulate_4dstem, strained_flake
from stemml_core.synthetic.diffraction import hexagonal_reciprocal_basis

COMPONENTS = ("exx", "eyy", "exy", "theta")


def flake_reference(shape):
    """The strained flake's unstrained corner: x < 0.35 of the width, y > 0.7 of the height."""
    rows, cols = np.indices(shape)
    return (cols < 0.35 * shape[1]) & (rows > 0.7 * shape[0])


def scores(result, truth):
    """RMSE, slope and correlation of each component against the probe-averaged truth, over the
    crystal; theta's RMSE in degrees."""
    crystal = ~truth.vacuum
    out = {}
    for name in COMPONENTS:
        estimate, true = getattr(result, name).data[crystal], getattr(truth, name + "_avg")[crystal]
        rmse = np.sqrt(np.mean((estimate - true) ** 2)) * (np.degrees(1) if name == "theta" else 1)
        out[name] = (rmse, np.polyfit(true, estimate, 1)[0], np.corrcoef(true, estimate)[0, 1])
    return out


@pytest.fixture(scope="module")
def flake():
    """The default flake (32 x 32 scan, 128 x 128 px) at 1e6 electrons per pattern, seed 0."""
    signal, truth = strained_flake(dose=1e6, random_state=0)
    return signal, truth, strain_map(signal, reference=flake_reference(truth.vacuum.shape), progress=False)


def halves(gradient, rows=4, cols=8, **kwargs):
    """Noise-free scan: left half unstrained, right half deformed by ``gradient``.

    The probe spreads each half into the other (and, periodically, round the scan's edge), so no
    region is exactly unstrained in the probe-averaged truth: the analysis gets the unstrained
    basis as its reference, and every component is compared with the truth."""
    field = np.zeros((rows, cols, 2, 2))
    field[:, cols // 2 :] = gradient
    return simulate_4dstem(field, dose=None, **kwargs)


def test_flake_at_1e6_electrons_meets_the_accuracy_goal(flake):
    """Issue 7: RMSE at most 5e-4 per strain component and 0.02 degrees of rotation, slope
    0.97-1.03, against the probe-averaged truth. Measured with seed 0 (RMSE, slope,
    correlation): exx 2.3e-4, 0.999, 0.995; eyy 1.8e-4, 0.990, 0.986; exy 1.4e-4, 1.009, 0.968;
    theta 0.008 degrees, 0.998, 0.989."""
    _, truth, result = flake
    for name, (rmse, slope, correlation) in scores(result, truth).items():
        report = f"{name}: RMSE {rmse:.2e}, slope {slope:.3f}, correlation {correlation:.3f}"
        assert rmse <= (0.02 if name == "theta" else 5e-4), report
        assert 0.97 <= slope <= 1.03, report
        assert correlation >= 0.95, report


def coverage(result, truth):
    """Fraction of crystal positions whose truth lies within one standard deviation of the map."""
    crystal = ~truth.vacuum
    return {name: float(np.mean(np.abs(getattr(result, name).data - getattr(truth, name + "_avg"))[crystal]
                                <= getattr(result, name + "_std").data[crystal])) for name in COMPONENTS}


def test_uncertainty_maps_cover_the_truth_at_1e6_electrons(flake):
    """Measured with seed 0: 63, 69, 69, 69 % of positions within one standard deviation."""
    _, truth, result = flake
    for name, fraction in coverage(result, truth).items():
        assert 0.55 <= fraction <= 0.85, f"{name}: {fraction:.2f}"
    assert np.all(np.isnan(result.exx_std.data[truth.vacuum]))


def test_flake_at_2e4_electrons_meets_the_low_dose_goal():
    """Issue 7 at 2e4 electrons per pattern: RMSE at most 0.2 % per strain component, slope
    0.8-1.2, and an uncertainty map whose one-sigma interval covers the truth in 55-85 % of the
    positions. Measured with seed 0 (RMSE, slope; coverage): exx 0.16 %, 1.01; 0.69; eyy
    0.17 %, 1.01; 0.59; exy 0.11 %, 0.90; 0.66; theta 0.11 % (0.063 degrees); 0.67. The
    truth's own RMS is 0.22, 0.11, 0.05 %: eyy and exy are below the noise of one pattern."""
    signal, truth = strained_flake(dose=2e4, random_state=0)
    result = strain_map(signal, reference=segment_patterns(signal, n_clusters=3, random_state=0, progress=False),
                        progress=False)
    fitted = ~truth.vacuum & (result.status.data == FitStatus.OK)
    assert fitted.sum() >= 0.95 * (~truth.vacuum).sum()
    for name, (rmse, slope, _) in scores(result, truth).items():
        if name != "theta":
            assert rmse <= 2e-3 and 0.8 <= slope <= 1.2, f"{name}: RMSE {rmse:.2e}, slope {slope:.3f}"
    for name, fraction in coverage(result, truth).items():
        assert 0.55 <= fraction <= 0.85, f"{name}: {fraction:.2f}"


def tilted_patch(shape, mrad, direction_deg):
    """A tilt map (rows, cols, 2) in mrad: ``mrad`` along ``direction_deg`` (counter-clockwise
    from +x looking down the beam) in a rectangle left of the centre, zero elsewhere."""
    rows, cols = shape
    patch = np.zeros(shape, bool)
    patch[rows // 2 - 3 : rows // 2 + 3, cols // 4 - 2 : cols // 4 + 4] = True
    angle = np.radians(direction_deg)
    tilt = np.zeros(shape + (2,))
    tilt[patch] = mrad * np.array([np.cos(angle), -np.sin(angle)])  # ky points down
    return tilt, patch


def test_a_tilted_patch_is_flagged_not_fitted_silently():
    """A 1 mrad tilt (10 nm thick, the generator's excitation-error model) in a 6 x 6 patch of a
    24 x 24 flake at 1e5 electrons per pattern, seed 0: flagged at 1 % false alarm in at least
    90 % of the patch and at most 5 % of the rest of the crystal; the dipole points along -tau
    (the disks with g . tau < 0 brighten). Measured: 100 % of the patch (36 positions), 0.5 %
    (2 of 444) elsewhere; chi-square of the untilted positions averages 1.9 (2 expected). At
    50 mrad the patch's exx carries the projection's apparent compression cos(0.05) - 1 =
    -0.125 % (measured -0.124 %), and is flagged alike."""
    tilt, patch = tilted_patch((24, 24), 1.0, 30.0)
    signal, truth = strained_flake((24, 24), dose=1e5, random_state=0, tilt=tilt)
    result = strain_map(signal, progress=False)
    crystal = ~truth.vacuum
    flagged = result.tilted.data
    report = f"patch {flagged[patch & crystal].mean():.3f}, elsewhere {flagged[~patch & crystal].mean():.3f}"
    assert flagged[patch & crystal].mean() >= 0.9, report
    assert flagged[~patch & crystal].mean() <= 0.05, report
    assert not flagged[truth.vacuum].any()
    assert 1.5 <= np.nanmean(result.tilt_chi2.data[~patch & crystal]) <= 2.5  # chi-square, 2 degrees of freedom
    direction = result.tilt_direction.data[patch & crystal]
    assert np.abs((direction - (30.0 + 180.0) + 180) % 360 - 180).max() < 20, direction
    assert result.tilted.metadata.Signal.quantity == "Flagged"


def test_the_untilted_flake_is_rarely_flagged(flake):
    """Seed 0 at 1e6 electrons: measured 1.9 % of the crystal flagged (16 of 853; 1 % expected
    from noise alone, the chi-square averages 2.2 where 2 is expected)."""
    _, truth, result = flake
    assert result.tilted.data[~truth.vacuum].mean() <= 0.05
    assert np.isnan(result.tilt_dipole.data[truth.vacuum]).all()


def test_friedel_dipole_of_a_known_asymmetry():
    """A dipole r_g = d . g is recovered; a three-fold asymmetry (cos 3 psi, whose vector sum
    over a complete family vanishes) is not read as one even with disks missing."""
    g0 = hexagonal_reciprocal_basis(0.316)
    hk = np.array([(h, k) for h in range(-3, 4) for k in range(-3, 4) if (h or k) and abs(h + k) <= 3])
    g = hk @ g0.T
    psi = np.arctan2(g[:, 1], g[:, 0])
    dipole = np.array([0.01, -0.004])
    counts = 1e9 * (1 + g @ dipole + 0.3 * np.cos(3 * psi))
    keep = ~((hk[:, 0] == 2) & (hk[:, 1] == -1)) & ~((hk[:, 0] == -2) & (hk[:, 1] == 1))  # an incomplete family
    found, chi2, pairs = friedel_dipole(np.tile(g[keep], (2, 1)), np.concatenate([counts[keep], 1e9 * (
        1 + 0.3 * np.cos(3 * psi[keep]))]), np.tile(hk[keep], (2, 1)), np.repeat([0, 1], keep.sum()), 3)
    np.testing.assert_allclose(found[0], dipole, rtol=0.05)
    np.testing.assert_allclose(found[1], 0.0, atol=1e-6)
    assert chi2[0] > 1e3 and chi2[1] < 1e-3 and pairs.tolist() == [keep.sum() // 2] * 2 + [0]
    assert np.isnan(found[2]).all() and np.isnan(chi2[2])


def test_vacuum_is_nan_with_its_reason(flake):
    _, truth, result = flake
    status = result.status.data
    np.testing.assert_array_equal(status == FitStatus.NO_DISKS, truth.vacuum)
    assert (status[~truth.vacuum] == FitStatus.OK).all()
    for name in COMPONENTS + ("residual",):
        data = getattr(result, name).data
        assert np.isnan(data[truth.vacuum]).all() and np.isfinite(data[~truth.vacuum]).all()
    assert (result.n_disks.data[~truth.vacuum] >= 15).all()


def test_origins_and_descan_match_the_generator(flake):
    """No constant (half-pixel) shift of the direct beam; the smooth fit follows the known descan."""
    _, truth, result = flake
    error = result.origin - truth.origin
    assert np.abs(error.mean(axis=(0, 1))).max() < 0.002
    assert np.abs(error).max() < 0.03
    assert np.abs(result.descan - truth.origin).max() < 0.01


def test_reference_is_the_median_over_the_mask(flake):
    _, truth, result = flake
    mask = flake_reference(truth.vacuum.shape)
    np.testing.assert_array_equal(result.reference, mask)
    np.testing.assert_allclose(result.reference_basis, np.median(result.basis[mask], axis=0))
    np.testing.assert_allclose(result.reference_basis, truth.reference_basis, rtol=2e-4, atol=2e-4)


def test_strain_components_reproduce_the_forward_model(flake):
    _, truth, _ = flake
    components = strain_components(truth.reciprocal_basis(), truth.reference_basis)
    for name, values in zip(COMPONENTS, components):
        np.testing.assert_allclose(values, getattr(truth, name + "_avg"), atol=1e-12)


def test_segmentation_chooses_a_reference_that_meets_the_accuracy_goal(flake):
    """Specimen and vacuum clusters, then reference_region: the reference avoids the vacuum, the
    flake's border and its strained features, and the maps meet the goal of the hand-picked
    corner. Measured with seed 0: exx 2.2e-4, eyy 1.8e-4, exy 1.4e-4, theta 0.008 degrees."""
    signal, truth, _ = flake
    segmentation = segment_patterns(signal, n_clusters=2, random_state=0, progress=False)
    result = strain_map(signal, reference=segmentation, progress=False)
    reference = result.reference
    assert not (reference & truth.vacuum).any()
    assert 0.3 * (~truth.vacuum).sum() < reference.sum() <= 0.5 * (~truth.vacuum).sum()
    strained = np.abs([truth.exx_avg, truth.eyy_avg, truth.exy_avg, truth.theta_avg]).max(axis=0)  # NaN in vacuum
    assert np.median(strained[reference]) < 1e-4 and strained[reference].max() < 2e-3
    np.testing.assert_allclose(result.reference_basis, truth.reference_basis, rtol=1e-4, atol=2e-4)
    for name, (rmse, slope, correlation) in scores(result, truth).items():
        report = f"{name}: RMSE {rmse:.2e}, slope {slope:.3f}, correlation {correlation:.3f}"
        assert rmse <= (0.02 if name == "theta" else 5e-4), report
        assert 0.97 <= slope <= 1.03, report
    labels = strain_map(signal, reference=segmentation.labels.data, progress=False)  # labels work alike
    np.testing.assert_array_equal(labels.reference, reference)


def test_reference_region_rule():
    """Vacuum skipped, the largest crystal cluster taken, its border eroded, its most uniform half kept."""
    labels = np.zeros((6, 8), int)
    labels[:, 3:] = 1  # cluster 1: 30 positions, cluster 0: 18
    labels[:2] = 2  # cluster 2: 16 positions, vacuum
    basis = np.broadcast_to(np.eye(2), (6, 8, 2, 2)).copy()
    rows, cols = np.indices((6, 8))
    basis *= (1 + 1e-4 * (rows + cols))[..., None, None]  # a gentle gradient, strain up to 0.1 %
    status = np.where(labels == 2, FitStatus.NO_DISKS, FitStatus.OK)
    region = reference_region(labels, basis, status)
    inner = np.zeros((6, 8), bool)
    inner[3:, 4:] = True  # cluster 1 less its border with the other clusters (not the scan's edge)
    np.testing.assert_array_equal(region, inner & np.isin(rows + cols, [9, 10]))  # closest to the median
    whole = reference_region(labels, basis, status, erosion=0)
    assert 10 <= whole.sum() <= 12 and not whole[labels != 1].any()  # half of the 20 positions, ties kept
    status[labels == 1] = FitStatus.TOO_FEW_INDEXED  # cluster 1 off the lattice: cluster 0 instead
    assert reference_region(labels, basis, status)[labels == 0].any()
    status[:] = FitStatus.NO_DISKS
    with pytest.raises(ValueError, match=r"no cluster of \[0, 1, 2\] has at least half of its patterns fitted"):
        reference_region(labels, basis, status)
    with pytest.raises(ValueError, match=r"labels \(6, 8\), basis \(6, 8, 2, 2\) and status \(3, 4\) differ"):
        reference_region(labels, basis, status[:3, :4])


THETA = np.deg2rad(0.5)
CASES = {
    "rotation": ([[np.cos(THETA) - 1, np.sin(THETA)], [-np.sin(THETA), np.cos(THETA) - 1]], "theta", THETA),
    "shear": ([[0.0, 0.005], [0.005, 0.0]], "exy", 0.005),
    "tensile_x": ([[0.01, 0.0], [0.0, 0.0]], "exx", 0.01),
    "compressive_y": ([[0.0, 0.0], [0.0, -0.01]], "eyy", -0.01),
}


@pytest.mark.parametrize("case", CASES)
def test_pure_deformations_have_the_right_signs(case):
    """Counter-clockwise rotation (looking down the beam) is positive, tensile is positive,
    exy is the tensor shear; every component against the forward model."""
    gradient, component, value = CASES[case]
    signal, truth = halves(gradient)
    result = strain_map(signal, reference_basis=truth.reference_basis, progress=False)
    assert np.median(getattr(result, component).data[:, -2:]) == pytest.approx(value, rel=0.05)  # sign, size
    for name in COMPONENTS:
        np.testing.assert_allclose(getattr(result, name).data, getattr(truth, name + "_avg"), atol=1.5e-4)


@pytest.mark.parametrize("k_pixel_size", [(0.115, 0.13), (0.13, 0.115)])
def test_non_square_pixels_use_each_axis_calibration(k_pixel_size):
    gradient = [[0.01, 0.004], [0.002, -0.005]]
    signal, truth = halves(gradient, k_pixel_size=k_pixel_size)
    result = strain_map(signal, reference_basis=truth.reference_basis, progress=False)
    for name in COMPONENTS:
        np.testing.assert_allclose(getattr(result, name).data, getattr(truth, name + "_avg"), atol=1.5e-4)


def test_scan_rotation_is_undone():
    gradient = [[0.01, 0.0], [0.0, 0.0]]
    signal, truth = halves(gradient, scan_rotation=30.0)
    result = strain_map(signal, reference_basis=truth.reference_basis, scan_rotation=30.0, progress=False)
    assert result.scan_rotation == 30.0
    for name in COMPONENTS:
        np.testing.assert_allclose(getattr(result, name).data, getattr(truth, name + "_avg"), atol=1.5e-4)
    reference = np.zeros(truth.vacuum.shape, dtype=bool)
    reference[:, :2] = True
    ignored = strain_map(signal, reference=reference, progress=False)  # the detector frame instead
    assert np.abs(ignored.exy.data[:, -2:]).min() > 0.003  # exx = 1 % turned by 30 degrees


def test_unstrained_lattice_under_descan_drift_has_no_strain():
    """Issue 7: zero within 0.02 % under descan: noise-free the largest value over the map,
    at 1e6 electrons the mean (the per-pattern noise, RMS about 2e-4, is the accuracy test's)."""
    signal, truth = simulate_4dstem(np.zeros((12, 12, 2, 2)), descan=4.0, dose=None)
    assert np.ptp(truth.origin[..., 1]) > 5  # pixels of drift across the scan
    result = strain_map(signal, progress=False)
    for name in COMPONENTS:
        assert np.abs(getattr(result, name).data).max() < 2e-4
    signal, _ = simulate_4dstem(np.zeros((12, 12, 2, 2)), descan=4.0, dose=1e6, random_state=3)
    result = strain_map(signal, progress=False)
    for name in COMPONENTS:
        assert abs(np.mean(getattr(result, name).data)) < 2e-5


def test_given_reference_basis_indexes_and_references():
    signal, truth = halves([[0.01, 0.0], [0.0, 0.0]])
    result = strain_map(signal, reference_basis=truth.reference_basis, progress=False)
    np.testing.assert_array_equal(result.reference_basis, truth.reference_basis)
    assert not result.reference.any()
    reference = np.zeros(truth.vacuum.shape, dtype=bool)
    reference[:, :2] = True
    masked = strain_map(signal, reference=reference, progress=False)
    offset = np.median(truth.exx_avg[reference])  # the probe's reach into the left half
    np.testing.assert_allclose(masked.exx.data, truth.exx_avg - offset, atol=1.5e-4)


def test_a_pattern_off_the_lattice_is_nan_with_its_reason():
    """A grain turned by 30 degrees: its disks are found but none indexes on the lattice."""
    gradient = np.zeros((4, 4, 2, 2))
    turn = np.deg2rad(30.0)
    gradient[1, 2] = [[np.cos(turn) - 1, np.sin(turn)], [-np.sin(turn), np.cos(turn) - 1]]
    signal, _ = simulate_4dstem(gradient, detector_shape=(96, 96), dose=1e6, random_state=0)
    result = strain_map(signal, progress=False)
    expected = np.zeros((4, 4), dtype=np.uint8)
    expected[1, 2] = FitStatus.TOO_FEW_INDEXED
    np.testing.assert_array_equal(result.status.data, expected)
    assert np.isnan(result.exx.data[1, 2]) and np.isfinite(result.exx.data[0, 0])


@pytest.fixture(scope="module")
def small():
    return simulate_4dstem(np.zeros((4, 4, 2, 2)), detector_shape=(96, 96), dose=1e6, random_state=0)[0]


def clipped(signal):
    """Counts clipped at an integer ceiling below the direct beam's plateau."""
    out = signal.deepcopy()
    out.data = np.minimum(out.data, np.round(0.9 * np.median(out.data.max(axis=(2, 3)))))
    return out


def uint16_saturated(signal):
    out = signal.deepcopy()
    out.data = np.minimum(out.data, 65535).astype(np.uint16)
    out.data[..., 48, 48] = 65535
    return out


def uncalibrated(signal):
    out = signal.deepcopy()
    out.axes_manager["kx"].units = "<undefined>"
    return out


BAD_INPUT = {
    "not 4D": (lambda s: s.inav[0], InputError, "has 1 navigation and 2 signal axes; expected a 4D-STEM"),
    "one position": (lambda s: s.inav[:1, :1], InputError, "is a scan of one position"),
    "uncalibrated": (uncalibrated, InputError, r"detector axis 'kx' has units '<undefined>'; expected '1/nm'"),
    "saturated": (clipped, InputError, "the direct beam is saturated: in the median pattern 100%"),
    "uint16 ceiling": (uint16_saturated, InputError, "reaches 65535, the largest value of the data's uint16"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_refused_with_a_clear_error(small, case):
    make, error, message = BAD_INPUT[case]
    with pytest.raises(error, match=message):
        strain_map(make(small), progress=False)


def test_a_bare_array_is_refused():
    with pytest.raises(InputError, match="expected a file path or a HyperSpy signal"):
        strain_map(np.zeros((4, 4, 96, 96)), progress=False)


def test_all_vacuum_is_refused():
    signal, _ = simulate_4dstem(np.zeros((4, 4, 2, 2)), vacuum=np.ones((4, 4), bool), detector_shape=(96, 96),
                                dose=1e6, random_state=0)
    with pytest.raises(ValueError, match=r"no Bragg disks in the mean of .* sampled patterns .* All vacuum"):
        strain_map(signal, progress=False)


def test_disks_too_close_for_their_windows_are_refused():
    """A disk radius of 10 px: neighbours 29 px apart would enter each other's 30 px window."""
    signal, truth = simulate_4dstem(np.zeros((2, 2, 2, 2)), convergence_angle=3.2, dose=None)
    with pytest.raises(ValueError, match=r"spans 29.2 px, less than the \(30, 30\) px window"):
        strain_map(signal, reference_basis=truth.reference_basis, progress=False)


def test_bad_tilt_false_alarm_is_refused(small):
    with pytest.raises(ValueError, match=r"tilt_false_alarm=1.5; expected a probability in \(0, 1\)"):
        strain_map(small, tilt_false_alarm=1.5, progress=False)


def test_bad_reference_arguments(small):
    basis = np.eye(2)
    with pytest.raises(ValueError, match="reference and reference_basis were both given"):
        strain_map(small, reference=np.ones((4, 4), bool), reference_basis=basis, progress=False)
    with pytest.raises(ValueError, match=r"reference is a float64 array of shape \(3, 4\); expected a bool mask"):
        strain_map(small, reference=np.ones((3, 4)), progress=False)
    with pytest.raises(ValueError, match=r"reference is a int64 array of shape \(4, 3\); expected a bool mask"):
        strain_map(small, reference=np.ones((4, 3), int), progress=False)
    with pytest.raises(ValueError, match=r"reference_basis \[\[1.0, 2.0\], \[2.0, 4.0\]\] is not a non-singular"):
        strain_map(small, reference_basis=[[1.0, 2.0], [2.0, 4.0]], progress=False)
    with pytest.raises(ValueError, match="reference selects 0 scan positions, none of them fitted"):
        strain_map(small, reference=np.zeros((4, 4), bool), progress=False)


def test_maps_carry_the_scan_calibration_and_input_is_untouched(small):
    before = small.data.copy()
    result = strain_map(small, progress=False)
    np.testing.assert_array_equal(small.data, before)
    assert isinstance(result, StrainResult)
    for name in COMPONENTS + ("residual", "n_disks", "status"):
        signal = getattr(result, name)
        assert signal.axes_manager.navigation_dimension == 2 and signal.axes_manager.signal_dimension == 0
        assert [(a.name, a.units, a.scale) for a in signal.axes_manager.navigation_axes] == [
            (a.name, a.units, a.scale) for a in small.axes_manager.navigation_axes
        ]
    assert result.theta.metadata.Signal.quantity == "Rotation (rad)"
    with pytest.raises(ValueError, match="read-only"):
        result.basis[0, 0, 0, 0] = 1.0


def test_float32_and_float64_input_agree(small):
    wide = small.deepcopy()
    wide.data = wide.data.astype(np.float64)
    narrow, double = strain_map(small, progress=False), strain_map(wide, progress=False)
    for name in COMPONENTS:
        np.testing.assert_allclose(getattr(narrow, name).data, getattr(double, name).data, atol=1e-9)


def test_eager_lazy_and_distributed_give_the_same_maps():
    distributed = pytest.importorskip("distributed")
    signal, _ = strained_flake((12, 12), detector_shape=(96, 96), dose=1e6, random_state=1)
    eager = strain_map(signal, block_pixels=32, workers=1, progress=False)
    threads = strain_map(signal, block_pixels=32, workers=3, progress=False)  # blocks side by side
    lazy_signal = signal.as_lazy()
    lazy_signal.data = lazy_signal.data.rechunk((5, 7, -1, -1))
    lazy = strain_map(lazy_signal, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        on_cluster = strain_map(lazy_signal, progress=False)
    for name in COMPONENTS + ("residual",):
        np.testing.assert_array_equal(getattr(lazy, name).data, getattr(eager, name).data)
        np.testing.assert_array_equal(getattr(on_cluster, name).data, getattr(eager, name).data)
        np.testing.assert_array_equal(getattr(threads, name).data, getattr(eager, name).data)
    np.testing.assert_array_equal(lazy.origin, eager.origin)
    with pytest.raises(ValueError, match="workers=0"):
        strain_map(signal, workers=0, progress=False)


def test_plot_strain_draws_four_maps(flake):
    _, _, result = flake
    figure, axes = plt.subplots(2, 2)
    images = plot_strain(result, axes, strain_limit=2.0)
    assert len(images) == 4
    assert images[0].get_clim() == (-2.0, 2.0)
    assert images[3].get_array().max() == pytest.approx(np.degrees(np.nanmax(result.theta.data)))
    with pytest.raises(ValueError, match="needs 4 axes"):
        plot_strain(result, axes[0])
    plt.close(figure)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("options", [dict(), dict(scan_rotation=25.0, k_pixel_size=(0.12, 0.13)),
                                     dict(lattice="WS2", orientation=17.0)], ids=["default", "rotated", "WS2"])
def test_flake_accuracy_holds_across_seeds_and_geometries(seed, options):
    signal, truth = strained_flake(dose=1e6, random_state=seed, **options)
    result = strain_map(signal, reference=flake_reference(truth.vacuum.shape),
                        scan_rotation=options.get("scan_rotation", 0.0), progress=False)
    for name, (rmse, slope, correlation) in scores(result, truth).items():
        report = f"{name}: RMSE {rmse:.2e}, slope {slope:.3f}, correlation {correlation:.3f}"
        assert rmse <= (0.02 if name == "theta" else 5e-4), report
        assert 0.97 <= slope <= 1.03, report

