"""Tests of the low-loss EELS forward model: physics, truth, noise, signal calibration and validation."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stemml_core.synthetic.lowloss import LowLossTruth, flake_sample, simulate_lowloss, single_spectrum


@pytest.fixture(scope="module")
def noise_free_flake():
    return flake_sample(dose=None)


@pytest.fixture(scope="module")
def noisy_flake():
    return flake_sample(random_state=0)


def _fwhm(energy, values):
    """FWHM of a single peak by linear interpolation of the half-maximum crossings."""
    half = values.max() / 2.0
    above = np.flatnonzero(values >= half)
    lo, hi = above[0], above[-1]
    left = np.interp(half, values[lo - 1 : lo + 1], energy[lo - 1 : lo + 1])
    right = np.interp(half, values[hi : hi + 2][::-1], energy[hi : hi + 2][::-1])
    return right - left


@settings(max_examples=20, deadline=None)
@given(
    fwhm=st.floats(0.01, 1.0),
    gain_tail=st.floats(0.0, 0.3),
    loss_tail=st.floats(0.0, 0.3),
)
def test_zlp_has_unit_area_and_the_requested_fwhm(fwhm, gain_tail, loss_tail):
    _, truth = simulate_lowloss(
        0.0, 1.5, 1.5, zlp_fwhm=fwhm, zlp_tail=(gain_tail, loss_tail), dispersion=fwhm / 20,
        energy_range=(-200 * fwhm, 200 * fwhm), dose=None,
    )
    # The Lorentzian wings beyond +-200 FWHM hold < 2e-4 of the area.
    np.testing.assert_allclose(truth.zlp.sum(), 1.0, rtol=1e-3)
    np.testing.assert_allclose(_fwhm(truth.energy, truth.zlp), fwhm, rtol=0.02)


def test_zlp_tail_is_heavier_on_the_loss_side():
    _, truth = simulate_lowloss(0.0, 1.5, 1.5, dose=None)
    at = {e: truth.zlp[np.argmin(np.abs(truth.energy - e))] for e in (-0.5, 0.5)}
    assert at[0.5] > 2.0 * at[-0.5]


def test_zlp_shift_moves_each_spectrum():
    _, truth = simulate_lowloss(
        np.full((3, 4), 30.0), 1.5, 1.5, zlp_shift_sigma=0.2, dispersion=0.005, energy_range=(-1.0, 5.0),
        dose=None, random_state=3,
    )
    peak = truth.energy[np.argmax(truth.zlp, axis=-1)]
    np.testing.assert_allclose(peak, truth.zlp_shift, atol=0.005)
    assert truth.zlp_shift.std() > 0.05


def test_components_add_up_to_the_noise_free_signal(noise_free_flake):
    signal, truth = noise_free_flake
    np.testing.assert_allclose(signal.data, truth.zlp + truth.inelastic, rtol=1e-6, atol=1e-12)


def test_log_ratio_on_noise_free_data_recovers_t_over_lambda(noise_free_flake):
    signal, truth = noise_free_flake
    material = ~truth.vacuum
    log_ratio = np.log(signal.data.sum(axis=-1, dtype=float) / truth.zlp.sum(axis=-1))
    np.testing.assert_allclose(log_ratio[material], truth.t_over_lambda[material], rtol=0.02)
    np.testing.assert_allclose(log_ratio[truth.vacuum], 0.0, atol=1e-6)


def test_single_scattering_integrates_to_t_over_lambda(noise_free_flake):
    _, truth = noise_free_flake
    material = ~truth.vacuum
    # Within the default recorded range (to 100 eV) J1 lacks only its high-energy tail ...
    np.testing.assert_allclose(
        truth.single_scattering.sum(axis=-1)[material], truth.t_over_lambda[material], rtol=5e-3
    )
    # ... which a range to 1 keV closes.
    _, wide = simulate_lowloss(
        [40.0, 120.0], [1.5, 1.9], [0.5, 1.5], energy_range=(-1.0, 1000.0), dispersion=0.1, dose=None
    )
    np.testing.assert_allclose(wide.single_scattering.sum(axis=-1), wide.t_over_lambda, rtol=2e-4)


def test_t_over_lambda_input_solves_for_the_thickness():
    tau = np.array([[0.0, 0.2], [0.9, 1.4]])
    _, truth = simulate_lowloss(None, 1.6, 1.5, t_over_lambda=tau, dose=None)
    np.testing.assert_allclose(truth.t_over_lambda, tau, rtol=1e-12)
    _, again = simulate_lowloss(truth.thickness, 1.6, 1.5, dose=None)
    np.testing.assert_allclose(again.t_over_lambda, tau, rtol=1e-12)
    # t/lambda is linear in t for a fixed loss function.
    np.testing.assert_allclose(truth.thickness[1, 1] / truth.thickness[0, 1], 1.4 / 0.2)


def test_vacuum_pixels_have_only_the_zlp(noise_free_flake):
    _, truth = noise_free_flake
    vacuum = truth.vacuum
    assert np.all(truth.inelastic[vacuum] == 0.0)
    assert np.all(truth.single_scattering[vacuum] == 0.0)
    assert np.all(truth.loss_function[vacuum] == 0.0)
    assert np.all(truth.thickness[vacuum] == 0.0) and np.all(truth.t_over_lambda[vacuum] == 0.0)
    assert np.all(np.isnan(truth.band_gap[vacuum])) and np.all(np.isnan(truth.gap_exponent[vacuum]))
    assert np.all(truth.inelastic[~vacuum].sum(axis=-1) > 0.0)


@pytest.mark.parametrize("gap_exponent", [0.5, 1.5])
def test_onset_term_is_a_power_law_near_the_gap(gap_exponent):
    band_gap = 1.6
    common = dict(dispersion=0.005, energy_range=(-1.0, 20.0), dose=None)
    _, with_onset = simulate_lowloss(50.0, band_gap, gap_exponent, **common)
    _, without = simulate_lowloss(50.0, band_gap, gap_exponent, onset_amplitude=0.0, **common)
    onset = with_onset.loss_function - without.loss_function
    energy = with_onset.energy
    assert np.all(onset[energy < band_gap] == 0.0)
    window = (energy > band_gap + 0.02) & (energy < band_gap + 0.3)
    slope, log_amplitude = np.polyfit(np.log(energy[window] - band_gap), np.log(onset[window]), 1)
    assert slope == pytest.approx(gap_exponent, abs=0.02)
    assert np.exp(log_amplitude) == pytest.approx(with_onset.params["onset_amplitude"], rel=0.02)


def test_drude_tail_puts_intensity_below_the_gap():
    _, truth = single_spectrum(dose=None, onset_amplitude=0.0)
    below = (truth.energy > 0.5) & (truth.energy < 1.5)
    assert np.all(truth.loss_function[below] > 0.0) and np.all(truth.inelastic[below] > 0.0)


def test_subgap_term_peaks_below_the_gap():
    common = dict(dispersion=0.01, energy_range=(-1.0, 20.0), dose=None)
    _, with_term = single_spectrum(band_gap=2.0, subgap_amplitude=0.05, **common)
    _, without = single_spectrum(band_gap=2.0, **common)
    added = with_term.loss_function - without.loss_function
    assert with_term.energy[np.argmax(added)] == pytest.approx(0.7 * 2.0, abs=0.01)
    assert added.max() == pytest.approx(0.05, rel=1e-3)


def test_peaks_follow_their_maps_and_shapes():
    amplitude = np.array([[0.0, 0.1], [0.2, 0.3]])
    thickness = np.array([[40.0, 40.0], [40.0, 0.0]])
    peaks = {
        "A": dict(energy=1.88, width=0.08, amplitude=amplitude),
        "C": dict(energy=2.9, width=0.3, amplitude=0.1, shape="lorentzian"),
    }
    common = dict(dispersion=0.01, energy_range=(-1.0, 20.0), dose=None)
    _, truth = simulate_lowloss(thickness, 1.5, 1.5, peaks=peaks, **common)
    _, bare = simulate_lowloss(thickness, 1.5, 1.5, **common)
    added = truth.loss_function - bare.loss_function
    at = {e: np.argmin(np.abs(truth.energy - e)) for e in (1.88, 2.9, 3.05)}
    material = ~truth.vacuum
    np.testing.assert_allclose(added[..., at[1.88]][material], amplitude[material], atol=0.02)
    # Half maximum of the Lorentzian C half a FWHM from its centre (the A Gaussian is negligible there).
    np.testing.assert_allclose(added[..., at[3.05]][material], 0.05, rtol=0.02)
    assert np.all(np.isnan(truth.peaks["A"]["energy"][truth.vacuum]))
    np.testing.assert_allclose(truth.peaks["A"]["amplitude"][material], amplitude[material])
    assert truth.peaks["C"]["shape"] == "lorentzian"


def test_drude_peak_is_a_unit_height_drude_term():
    # A surface-plasmon-like Drude peak: height `amplitude` at Ep, the Drude shape E Gamma Ep^2 /
    # ((E^2 - Ep^2)^2 + (E Gamma)^2) scaled by Gamma / Ep, so half height near Ep +- Gamma / 2.
    peaks = {"surface": dict(energy=14.0, width=3.0, amplitude=0.7, shape="drude")}
    common = dict(dispersion=0.01, energy_range=(-1.0, 30.0), dose=None)
    _, truth = simulate_lowloss(40.0, 1.5, 1.5, peaks=peaks, **common)
    _, bare = simulate_lowloss(40.0, 1.5, 1.5, **common)
    added = truth.loss_function - bare.loss_function
    e = truth.energy
    expected = 0.7 * e * 3.0**2 * 14.0 / ((e**2 - 14.0**2) ** 2 + (e * 3.0) ** 2)
    np.testing.assert_allclose(added[e > 0], expected[e > 0], rtol=1e-9, atol=1e-12)
    assert added[np.argmin(np.abs(e - 14.0))] == pytest.approx(0.7, rel=1e-6)
    assert truth.peaks["surface"]["shape"] == "drude"
    with pytest.raises(ValueError, match="shape.*expected one of"):
        simulate_lowloss(40.0, 1.5, 1.5, peaks={"x": dict(energy=14.0, width=3.0, amplitude=0.7, shape="voigt")},
                         **common)


def test_noise_is_poisson_plus_read_noise():
    read_noise = 3.0
    signal, truth = simulate_lowloss(
        np.full((40, 50), 50.0), 1.5, 1.5, dose=1e4, read_noise=read_noise, energy_range=(-1.0, 10.0),
        dispersion=0.05, random_state=7,
    )
    counts = signal.data.reshape(-1, truth.energy.size).astype(float)
    expected = (truth.zlp + truth.inelastic).reshape(-1, truth.energy.size)[0]
    n = counts.shape[0]
    variance = expected + read_noise**2
    assert np.all(np.abs(counts.mean(axis=0) - expected) < 5.0 * np.sqrt(variance / n))
    ratio = counts.var(axis=0, ddof=1) / variance
    assert ratio.mean() == pytest.approx(1.0, abs=0.02)
    assert np.all(np.abs(ratio - 1.0) < 5.0 * np.sqrt(2.0 / n))
    assert counts.min() < 0.0  # read noise makes empty channels slightly negative


def test_same_seed_same_data_other_seed_other_data():
    first, truth = flake_sample((6, 10), random_state=1)
    again, _ = flake_sample((6, 10), random_state=1)
    other, _ = flake_sample((6, 10), random_state=2)
    np.testing.assert_array_equal(first.data, again.data)
    assert not np.array_equal(first.data, other.data)
    spectrum, _ = single_spectrum(random_state=5)
    np.testing.assert_array_equal(spectrum.data, single_spectrum(random_state=5)[0].data)


def test_flake_layout(noise_free_flake):
    _, truth = noise_free_flake
    assert truth.t_over_lambda.shape == (24, 32)
    assert 0.20 <= truth.vacuum.mean() <= 0.25
    # Vacuum is a run of columns at the start of every row.
    first_flake_column = np.argmin(truth.vacuum, axis=1)
    assert np.array_equal(truth.vacuum, np.arange(32)[None, :] < first_flake_column[:, None])
    np.testing.assert_allclose(np.unique(truth.t_over_lambda[~truth.vacuum]), [0.3, 0.7, 1.1, 1.5])
    rows = np.arange(24)
    edge_gap = truth.band_gap[rows, first_flake_column]
    assert np.all(edge_gap > 1.75) and edge_gap.max() > 1.85
    np.testing.assert_allclose(truth.band_gap[:, -1], 1.5, atol=1e-3)
    thin = truth.t_over_lambda == 0.3
    assert np.all(truth.gap_exponent[thin] == 0.5) and np.all(truth.gap_exponent[~thin & ~truth.vacuum] == 1.5)
    assert truth.peaks == {}


def test_flake_excitons_sit_at_the_edge():
    _, truth = flake_sample((6, 12), dose=None, exciton_amplitude=0.1)
    a = truth.peaks["A"]["amplitude"]
    material = ~truth.vacuum
    edge = np.argmin(truth.vacuum, axis=1)
    assert np.all(a[np.arange(6), edge] > a[:, -1])
    assert set(truth.peaks) == {"A", "B", "C"}
    np.testing.assert_allclose(truth.peaks["C"]["amplitude"][material], 0.05)


def test_signal_calibration_and_metadata(noisy_flake):
    signal, truth = noisy_flake
    assert signal.data.dtype == np.float32
    assert signal.data.shape == (24, 32, truth.energy.size)
    y, x = signal.axes_manager.navigation_axes[::-1]
    assert (y.name, y.units, y.scale, y.size) == ("y", "nm", 1.0, 24)
    assert (x.name, x.units, x.scale, x.size) == ("x", "nm", 1.0, 32)
    energy_axis = signal.axes_manager.signal_axes[0]
    assert (energy_axis.name, energy_axis.units) == ("Energy loss", "eV")
    np.testing.assert_allclose(energy_axis.axis, truth.energy)
    assert energy_axis.scale == pytest.approx(0.025) and energy_axis.offset == pytest.approx(-1.0)
    tem = signal.metadata.Acquisition_instrument.TEM
    assert tem.beam_energy == 200.0 and tem.convergence_angle == 15.0
    assert tem.Detector.EELS.collection_angle == 20.0
    assert signal.metadata.General.title == "Synthetic MoS2-like flake, low-loss EELS"
    assert signal.metadata.Signal.signal_type == "EELS"
    assert isinstance(truth, LowLossTruth) and truth.dose == 1e6 and truth.zlp_fwhm == 0.1


def test_single_spectrum_and_line_scan_calibration():
    spectrum, truth = single_spectrum(pixel_size=2.0)
    assert spectrum.axes_manager.navigation_dimension == 0 and spectrum.data.ndim == 1
    assert truth.thickness.shape == () and truth.zlp.shape == truth.energy.shape
    line, _ = simulate_lowloss([0.0, 20.0, 40.0], 1.5, 1.5, pixel_size=2.0)
    (axis,) = line.axes_manager.navigation_axes
    assert (axis.name, axis.units, axis.scale) == ("x", "nm", 2.0)


def test_params_record_every_setting():
    _, truth = single_spectrum(dose=None, random_state=4)
    for key in ("energy_range", "dispersion", "zlp_fwhm", "zlp_tail", "beam_energy", "collection_angle",
                "plasmon_energy", "plasmon_width", "onset_amplitude", "read_noise", "random_state"):
        assert key in truth.params
    assert truth.params["incident_electrons"] == 1.0 and truth.params["random_state"] == 4
    json.dumps(truth.params)
    _, flake = flake_sample((4, 8), random_state=np.random.default_rng(0))
    assert isinstance(json.loads(json.dumps(flake.params))["random_state"], int)


def test_kramers_kronig_of_drude_ssd_gives_drude_epsilon2():
    # exspy does not correct the truncation of the Kramers-Kronig integral, so record to 300 eV
    # (to the default 100 eV eps2 is off by up to 8 % at 15 eV).
    signal, truth = single_spectrum(
        thickness=50.0, pi_plasmon_weight=0.0, onset_amplitude=0.0, energy_range=(-1.0, 300.0), dispersion=0.05,
    )
    ssd = signal._deepcopy_with_new_data(truth.single_scattering)
    eps = ssd.kramers_kronig_analysis(zlp=truth.dose, iterations=1, t=float(truth.thickness))
    energy = eps.axes_manager.signal_axes[0].axis
    plasmon, width = truth.params["plasmon_energy"], truth.params["plasmon_width"]
    drude_eps2 = plasmon**2 * width / (energy * (energy**2 + width**2))
    region = (energy > 15.0) & (energy < 30.0)
    np.testing.assert_allclose(eps.data.imag[region], drude_eps2[region], rtol=0.02)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(thickness=[[10.0, -1.0]]), r"thickness=-1\.0 at pixel \(0, 1\).*expected a finite value >= 0"),
        (dict(zlp_fwhm=2.0), r"zlp_fwhm=2\.0 eV is out of range; expected 0\.01 <= zlp_fwhm <= 1\.0 eV"),
        (dict(zlp_fwhm=0.005), r"zlp_fwhm=0\.005 eV is out of range"),
        (dict(thickness=np.ones((2, 3)), band_gap=np.ones((3, 2))), r"maps of different shapes: thickness \(2, 3\)"),
        (dict(dispersion=0.0), r"dispersion=0\.0 eV is out of range; expected dispersion > 0\.0 eV"),
        (dict(dispersion=-0.1), r"dispersion=-0\.1 eV"),
        (dict(energy_range=(0.5, 10.0)), r"energy_range=\(0\.5, 10\.0\) eV does not contain 0"),
        (dict(energy_range=(-5.0, -1.0)), r"energy_range=\(-5\.0, -1\.0\) eV does not contain 0"),
        (dict(gap_exponent=0.0), r"gap_exponent=0\.0 at pixel \(\).*expected > 0"),
        (dict(gap_exponent=-1.5), r"gap_exponent=-1\.5"),
        (dict(band_gap=np.nan), r"band_gap=nan at pixel \(\).*expected > 0 eV where the thickness is > 0"),
        (dict(dose=0.0), r"dose=0\.0 electrons is out of range; expected dose > 0\.0 electrons"),
        (dict(dose=-5), r"dose=-5 electrons"),
        (dict(read_noise=-1.0), r"read_noise=-1\.0 counts is out of range; expected read_noise >= 0\.0"),
        (dict(zlp_tail=(0.1, 1.5)), r"zlp_tail=\(0\.1, 1\.5\) is invalid; expected \(gain_side, loss_side\)"),
        (dict(t_over_lambda=0.5), r"thickness=30\.0 and t_over_lambda=0\.5: expected exactly one"),
        (dict(peaks={"A": dict(energy=1.9, width=0.1)}), r"peaks\['A'\]=.* lacks keys"),
        (dict(peaks={"A": dict(energy=1.9, width=0.1, amplitude=1, shape="voigt")}), r"'voigt' is unknown"),
        (dict(peaks={"A": dict(energy=150.0, width=0.1, amplitude=1)}),
         r"peaks\['A'\]\['energy'\]=150\.0 at pixel \(\).*expected an energy inside .* \(0, 100\.0\) eV"),
        (dict(peaks={"A": dict(energy=1.9, width=0.0, amplitude=1)}), r"peaks\['A'\]\['width'\]=0\.0 .*FWHM > 0"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
    maps = dict(thickness=30.0, band_gap=1.5, gap_exponent=1.5)
    arguments = {**maps, **kwargs}
    with pytest.raises(ValueError, match=match):
        simulate_lowloss(arguments.pop("thickness"), arguments.pop("band_gap"), arguments.pop("gap_exponent"),
                         **arguments)


def test_vacuum_pixels_accept_nan_band_gap():
    _, truth = simulate_lowloss([0.0, 30.0], [np.nan, 1.5], [np.nan, 1.5], dose=None)
    assert truth.vacuum.tolist() == [True, False]


def test_flake_rejects_a_small_navigation_shape():
    with pytest.raises(ValueError, match=r"nav_shape=\(4, 4\) is too small; expected \(rows, cols\)"):
        flake_sample((4, 4))
