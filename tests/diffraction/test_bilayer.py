"""Twisted bilayers: the joint fit against the forward model, twist and per-layer strain, small
twists whose disks overlap, eager and lazy, bad input."""

import dask
import numpy as np
import pytest

from stemml_core.diffraction import (
    BilayerResult,
    FitStatus,
    bilayer_strain_map,
    direct_beam,
    disk_radius,
    fit_lattices,
    probe_template,
    twist_angle,
)
from stemml_core.metrics import regression
from stemml_core.segment import segment_patterns
from stemml_core.synthetic import simulate_4dstem, twisted_bilayer
from stemml_core.synthetic.diffraction import hexagonal_reciprocal_basis

COMPONENTS = ("exx", "eyy", "exy", "theta")
TO_DETECTOR = np.array([[0.0, 8.0], [8.0, 0.0]])  # (row, col) px per (kx, ky) 1/nm: 0.125 1/nm pixels


def rotation(degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, s], [-s, c]])


def lattice_points(basis_px, reach=96.0):
    """Every disk within ``reach`` px of the direct beam: all that reach the 128 x 128 detector."""
    hk = np.array([(h, k) for h in range(-6, 7) for k in range(-6, 7) if h or k])
    return hk[np.linalg.norm(hk @ basis_px.T, axis=1) <= reach]


def test_twist_angle_is_the_rotation_of_the_polar_decomposition():
    g0 = hexagonal_reciprocal_basis(0.316)
    stretch = np.array([[1.01, 0.003], [0.003, 0.995]])  # a heterostrain does not change the twist
    assert float(twist_angle(g0, rotation(25.0) @ stretch @ g0)) == pytest.approx(25.0, abs=1e-12)
    assert float(twist_angle(g0, rotation(-3.0) @ g0)) == pytest.approx(-3.0, abs=1e-12)
    stack = np.stack([rotation(a) @ g0 for a in (1.0, 2.0, 3.0)])
    np.testing.assert_allclose(twist_angle(g0, stack), [1.0, 2.0, 3.0], atol=1e-12)
    assert twist_angle(np.broadcast_to(g0, (4, 5, 2, 2)), rotation(7.0) @ g0).shape == (4, 5)


@pytest.mark.parametrize("twist", [None, 25.0, 10.0, 3.0])
def test_joint_fit_recovers_noise_free_lattices(twist):
    """Both lattices of noise-free patterns (one half of the scan strained) within 2e-4 of the
    forward model (largest element, relative), the twist within 0.005 degrees: also at 3 degrees,
    where each first-order disk overlaps its partner of the other layer (1.5 px apart, radius
    4.8 px). The floor is the Fourier-shifted template's mismatch with the undersampled disk edges
    (a few thousandths of a pixel per disk; the strain tests of strain_map allow 1.5e-4 alike).
    Every disk sits on its lattice (misfit in px)."""
    gradient = np.zeros((2, 4, 2, 2))
    gradient[:, 2:] = [[0.01, 0.002], [0.0, -0.005]]
    signal, truth = simulate_4dstem(gradient, twist=twist, dose=None, descan=1.0)
    vacuum, _ = simulate_4dstem(np.zeros((1, 2, 2, 2)), vacuum=np.ones((1, 2), bool), dose=None, descan=1.0)
    patterns, direct = signal.data.reshape(-1, 128, 128), vacuum.data.reshape(-1, 128, 128)
    radius = disk_radius(direct)
    template = probe_template(direct, direct_beam(direct, radius).origin, radius)
    layers = (1,) if twist is None else (1, 2)
    references = [truth.reference_basis] + ([truth.second_layer.reference_basis] if twist else [])
    start = np.stack([TO_DETECTOR @ basis for basis in references])
    fit = fit_lattices(patterns, template, direct_beam(patterns, radius).origin, start,
                       [lattice_points(basis) for basis in start])
    bases = np.linalg.inv(TO_DETECTOR) @ fit.bases
    for index, layer in enumerate(layers):
        expected = truth.reciprocal_basis(layer=layer).reshape(-1, 2, 2)
        assert np.abs(bases[:, index] - expected).max() / np.linalg.norm(expected[0, :, 0]) < 2e-4
    np.testing.assert_allclose(fit.origin, truth.origin.reshape(-1, 2), atol=0.01)
    if twist is not None:
        expected = truth.twist_angle().ravel()
        np.testing.assert_allclose(twist_angle(bases[:, 0], bases[:, 1]), expected, atol=0.005)
    assert (fit.n_iterations <= 6).all()
    misfit = np.linalg.norm(fit.misfit, axis=-1)  # px; measured: weighted RMS 0.003, largest 0.02
    assert np.sqrt(np.nansum(fit.amplitude * misfit**2) / fit.amplitude[fit.valid].sum()) < 0.005
    bragg = fit.amplitude[:, 1:]
    assert misfit[:, 1:][bragg > 0.1 * bragg.max()].max() < 0.03  # not slivers at the detector's edge


@pytest.fixture(scope="module")
def bilayer():
    """The registry's twisted bilayer (24 x 24 scan, 25 degrees, 1e6 electrons, seed 0), its
    segmentation into specimen and vacuum, and the joint fit with the automatic reference."""
    signal, truth = twisted_bilayer(dose=1e6, random_state=0)
    segmentation = segment_patterns(signal, n_clusters=2, random_state=0, progress=False)
    return signal, truth, bilayer_strain_map(signal, reference=segmentation, progress=False)


def test_twist_map_meets_the_goal(bilayer):
    """Issue 7: the twist within 0.05 degrees of the truth (probe-averaged), here as an RMSE of
    at most 0.025 degrees and 98 % of the positions within 0.05 degrees; the local twist
    feature (+0.3 degrees) is recovered with slope and correlation near 1. Measured with seed 0:
    RMSE 0.0125 degrees, largest error 0.041, slope 0.976, correlation 0.92."""
    _, truth, result = bilayer
    assert isinstance(result, BilayerResult)
    crystal = ~truth.vacuum
    estimate, expected = result.twist_angle.data[crystal], truth.twist_angle()[crystal]
    scores = regression(estimate, expected)
    report = f"twist: {scores}"
    assert scores["rmse"] <= 0.025, report
    assert np.mean(np.abs(estimate - expected) <= 0.05) >= 0.98, report
    assert 0.9 <= scores["slope"] <= 1.1 and scores["correlation"] >= 0.85, report
    assert result.reference_twist == pytest.approx(25.0, abs=0.01)
    assert result.twist_angle.metadata.Signal.quantity == "Twist angle (deg)"


def test_each_layer_meets_the_strain_goal(bilayer):
    """Each layer against its own probe-averaged truth (the second carries a heterostrain and a
    local twist of its own): RMSE at most 5e-4 (0.02 degrees of rotation), slope 0.97-1.03.
    Measured with seed 0: RMSE 1.6-2.7e-4, rotation 0.009-0.010 degrees, slopes 0.991-1.005."""
    _, truth, result = bilayer
    crystal = ~truth.vacuum
    for layer, layer_truth in zip(result.layers, (truth, truth.second_layer)):
        for name in COMPONENTS:
            scores = regression(getattr(layer, name).data[crystal], getattr(layer_truth, name + "_avg")[crystal])
            rmse = scores["rmse"] * (np.degrees(1) if name == "theta" else 1)
            report = f"{getattr(layer, name).metadata.General.title}: {scores}"
            assert rmse <= (0.02 if name == "theta" else 5e-4), report
            assert 0.97 <= scores["slope"] <= 1.03, report


def test_uncertainty_maps_cover_the_truth():
    """One standard deviation from the joint fit's covariance (Poisson counts, N^-1 J^T diag(M)
    J N^-1) against the probe-averaged truth, over the crystal of the registry's bilayer (seed
    0), the reference being the generator's unstrained corner. Measured (fraction of positions
    within one sigma): layer 1 exx 0.67, eyy 0.64, exy 0.67, theta 0.63; layer 2 0.64, 0.69,
    0.65, 0.61; twist 0.64 (median sigma 0.0113 degrees, RMSE 0.0125). 15 s on 2 cores.

    The maps take the reference basis as exact. With the segmentation's reference (the module
    fixture) the twist still has 0.64, but layer 2's exx and theta fall to 0.55 and 0.54: that
    reference is chosen on layer 1 and the median of layer 2 over it is off by about 0.6 sigma,
    an offset common to the whole map that no per-pattern covariance holds."""
    signal, truth = twisted_bilayer(dose=1e6, random_state=0)
    rows, cols = np.indices(truth.vacuum.shape)
    corner = (cols < 0.35 * cols.shape[1]) & (rows > 0.7 * rows.shape[0])
    result = bilayer_strain_map(signal, twist=25.0, reference=corner, progress=False)
    crystal = ~truth.vacuum
    report = {}
    for number, (layer, layer_truth) in enumerate(zip(result.layers, (truth, truth.second_layer)), 1):
        for name in COMPONENTS:
            error = np.abs(getattr(layer, name).data - getattr(layer_truth, name + "_avg"))[crystal]
            std = getattr(layer, name + "_std")
            report[f"layer {number} {name}"] = float(np.mean(error <= std.data[crystal]))
            assert np.isnan(std.data[truth.vacuum]).all() and (std.data[crystal] > 0).all()
    twist_error = np.abs(result.twist_angle.data - truth.twist_angle())[crystal]
    report["twist"] = float(np.mean(twist_error <= result.twist_angle_std.data[crystal]))
    assert all(0.55 <= fraction <= 0.85 for fraction in report.values()), report
    assert result.twist_angle_std.metadata.Signal.quantity == "Twist angle (deg)"
    assert result.layers[0].tilted is None


def test_vacuum_reference_and_shared_maps(bilayer):
    signal, truth, result = bilayer
    first, second = result.layers
    for layer in result.layers:
        np.testing.assert_array_equal(layer.status.data == FitStatus.NO_DISKS, truth.vacuum)
        assert np.isnan(layer.exx.data[truth.vacuum]).all() and np.isfinite(layer.exx.data[~truth.vacuum]).all()
        assert (layer.n_disks.data[~truth.vacuum] >= 15).all()
        assert np.nanmedian(layer.residual.data) < 0.01  # 1/nm: the disks sit on their lattices
    assert np.isnan(result.twist_angle.data[truth.vacuum]).all()
    assert not (first.reference & truth.vacuum).any() and first.reference.sum() > 0.3 * (~truth.vacuum).sum()
    assert np.shares_memory(first.origin, second.origin) and np.shares_memory(first.reference, second.reference)
    np.testing.assert_allclose(first.origin[~truth.vacuum], truth.origin[~truth.vacuum], atol=0.02)
    assert [(a.name, a.units) for a in result.twist_angle.axes_manager.navigation_axes] == [
        (a.name, a.units) for a in signal.axes_manager.navigation_axes]
    assert 1 < np.nanmedian(result.residual.data[~truth.vacuum]) < 5  # Poisson noise plus template ringing


@pytest.mark.parametrize("twist", [10.0, 3.0])
def test_small_twists_are_found_without_a_guess(twist):
    """Overlapping disks: at 10 degrees the first orders are 5.1 px apart, at 3 degrees 1.5 px
    (radius 4.8 px). The mean pattern's fit finds the twist on its own; at 1e6 electrons each
    pattern's twist is within a few hundredths of a degree. Measured (6 x 6, seed 1): RMSE
    0.011 degrees at 10, 0.015 at 3."""
    signal, truth = simulate_4dstem(np.zeros((6, 6, 2, 2)), twist=twist, dose=1e6, random_state=1)
    result = bilayer_strain_map(signal, progress=False)
    assert result.reference_twist == pytest.approx(twist, abs=0.01)
    error = result.twist_angle.data - truth.twist_angle()
    assert np.sqrt(np.mean(error**2)) <= 0.03 and np.abs(error).max() <= 0.08


def test_a_guess_gives_the_same_result():
    signal, _ = simulate_4dstem(np.zeros((4, 4, 2, 2)), twist=3.0, dose=1e6, random_state=2)
    searched = bilayer_strain_map(signal, progress=False)
    guessed = bilayer_strain_map(signal, twist=5.0, progress=False)
    np.testing.assert_allclose(guessed.twist_angle.data, searched.twist_angle.data, atol=1e-6)


@pytest.fixture(scope="module")
def small_bilayer():
    """An 8 x 8 bilayer on a 96 x 96 detector (seed 1), a reference mask, the eager fit (blocks
    of 16 patterns) and the signal as lazy chunks of 3 x 5 positions."""
    signal, truth = twisted_bilayer((8, 8), detector_shape=(96, 96), dose=1e6, random_state=1)
    mask = np.zeros((8, 8), bool)
    mask[5:, :3] = True
    eager = bilayer_strain_map(signal, reference=mask, block_pixels=16, progress=False)
    lazy_signal = signal.as_lazy()
    lazy_signal.data = lazy_signal.data.rechunk((3, 5, -1, -1))
    return truth, mask, eager, lazy_signal


def assert_same_maps(mine, theirs):
    np.testing.assert_array_equal(mine.twist_angle.data, theirs.twist_angle.data)
    np.testing.assert_array_equal(mine.twist_angle_std.data, theirs.twist_angle_std.data)
    for layer, other in zip(mine.layers, theirs.layers):
        for name in COMPONENTS + tuple(f"{c}_std" for c in COMPONENTS) + ("residual",):
            np.testing.assert_array_equal(getattr(layer, name).data, getattr(other, name).data)
        np.testing.assert_array_equal(layer.origin, other.origin)


def test_eager_and_lazy_give_the_same_maps(small_bilayer):
    """Also a given reference mask: the median over its positions fitted in both layers."""
    truth, mask, eager, lazy_signal = small_bilayer
    np.testing.assert_array_equal(eager.layers[0].reference, mask & ~truth.vacuum)
    for layer in eager.layers:
        np.testing.assert_allclose(layer.reference_basis, np.median(layer.basis[mask], axis=0))
    assert_same_maps(bilayer_strain_map(lazy_signal, reference=mask, progress=False), eager)


def test_dask_distributed_gives_the_same_maps(small_bilayer):
    """The lazy signal's chunks fitted by a dask.distributed worker (one, threads in this process,
    to stay light) give the eager maps bit for bit."""
    distributed = pytest.importorskip("distributed")
    _, mask, eager, lazy_signal = small_bilayer
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        on_cluster = bilayer_strain_map(lazy_signal, reference=mask, progress=False)
        assert dask.base.get_scheduler() == client.get  # the chunks went to the cluster
    assert_same_maps(on_cluster, eager)


def test_a_single_layer_is_refused():
    signal, _ = simulate_4dstem(np.zeros((4, 4, 2, 2)), detector_shape=(96, 96), dose=1e6, random_state=0)
    with pytest.raises(ValueError, match=r"Bragg intensity is shared .* expected two layers .* Use strain_map"):
        bilayer_strain_map(signal, progress=False)


def test_bad_arguments_are_named():
    signal, _ = simulate_4dstem(np.zeros((2, 2, 2, 2)), twist=25.0, detector_shape=(96, 96), dose=None)
    with pytest.raises(ValueError, match="twist=0.0 degrees; expected the approximate twist angle"):
        bilayer_strain_map(signal, twist=0.0, progress=False)
    with pytest.raises(ValueError, match=r"reference is a float64 array of shape \(2, 3\)"):
        bilayer_strain_map(signal, reference=np.ones((2, 3)), progress=False)
    patterns, template = signal.data[0], np.ones((18, 18))
    with pytest.raises(ValueError, match=r"patterns has shape \(96, 96\); expected \(n, H, W\)"):
        fit_lattices(patterns[0], template, [[48, 48]], np.eye(2)[None], [[(1, 0)]])
    with pytest.raises(ValueError, match=r"origin \(1, 2\) and bases \(1, 2, 2\) for 2 patterns and 1 layers"):
        fit_lattices(patterns, template, [[48, 48]], np.eye(2)[None], [[(1, 0)]])
    with pytest.raises(ValueError, match=r"indices hold \(0, 0\)"):
        fit_lattices(patterns, template, [[48, 48]] * 2, np.eye(2)[None], [[(1, 0), (0, 0)]])


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("twist", [25.0, 10.0, 3.0])
def test_twisted_bilayer_accuracy_across_seeds_and_twists(seed, twist):
    """The registry sample at other seeds and twists, the reference chosen by segmentation."""
    signal, truth = twisted_bilayer(twist=twist, dose=1e6, random_state=seed)
    segmentation = segment_patterns(signal, n_clusters=2, random_state=0, progress=False)
    result = bilayer_strain_map(signal, reference=segmentation, progress=False)
    crystal = ~truth.vacuum
    scores = regression(result.twist_angle.data[crystal], truth.twist_angle()[crystal])
    assert scores["rmse"] <= 0.03 and scores["correlation"] >= 0.8, scores
    for layer, layer_truth in zip(result.layers, (truth, truth.second_layer)):
        for name in COMPONENTS:
            scores = regression(getattr(layer, name).data[crystal], getattr(layer_truth, name + "_avg")[crystal])
            rmse = scores["rmse"] * (np.degrees(1) if name == "theta" else 1)
            assert rmse <= (0.02 if name == "theta" else 6e-4), (name, scores)
            assert 0.95 <= scores["slope"] <= 1.05, (name, scores)
