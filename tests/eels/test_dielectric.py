"""Fourier-log deconvolution and Kramers–Kronig analysis against the forward model and analytic ε."""

import dask.array as da
import numpy as np
import pytest
from scipy import constants

from stemml_core.eels.dielectric import (
    DielectricResult,
    dielectric_function,
    fourier_log_deconvolution,
    kramers_kronig,
)
from stemml_core.eels.thickness import ReplicaInterval, estimate_thickness
from stemml_core.synthetic.lowloss import simulate_lowloss

PLASMON_ENERGY, PLASMON_WIDTH = 22.0, 5.0  # the generator's defaults
DRUDE_ONLY = dict(pi_plasmon_weight=0.0, onset_amplitude=0.0)


def _drude_eps(energy):
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - PLASMON_ENERGY**2 / (energy**2 + 1j * PLASMON_WIDTH * energy)


def _expected_ssd(truth):
    """Fourier-log SSD of the forward model: J1 attenuated by exp(-t/λ) and broadened by the unit-area ZLP."""
    resolution = truth.zlp / truth.zlp.sum(axis=-1, keepdims=True)
    zero = int(np.argmin(np.abs(truth.energy)))
    n = truth.energy.size
    return np.stack([
        np.convolve(j1, r)[zero : zero + n] * np.exp(-tau)
        for j1, r, tau in zip(truth.single_scattering, resolution, truth.t_over_lambda)
    ])


@pytest.fixture(scope="module")
def drude():
    """Noise-free Drude-only spectra, t/λ about 0.36, 0.72 and 1.08, recorded to 100 eV."""
    return simulate_lowloss([40.0, 80.0, 120.0], 1.5, 1.5, dose=None, **DRUDE_ONLY)


@pytest.fixture(scope="module")
def noisy_drude():
    return simulate_lowloss([40.0, 80.0, 120.0], 1.5, 1.5, dose=1e6, random_state=4, **DRUDE_ONLY)


def test_ssd_matches_the_attenuated_broadened_single_scattering():
    signal, truth = simulate_lowloss(None, 1.5, 1.5, t_over_lambda=[0.3, 0.7, 1.1, 1.5], dose=None)
    ssd = fourier_log_deconvolution(signal.data, truth.zlp)
    expected = _expected_ssd(truth)
    energy = truth.energy
    # Measured: 0.07 % of the peak everywhere above 0.5 eV; pointwise 1.6 % at 0.5-2 eV, 3.9 % where the
    # SSD of t/λ = 1.5 is small (50-90 eV). The last 2 eV lack the ZLP tail of losses beyond the range.
    above = energy > 0.5
    assert np.max(np.abs(ssd - expected)[:, above]) < 2e-3 * expected.max()
    inside = (energy > 0.5) & (energy < 98.0)
    np.testing.assert_allclose(ssd[:, inside], expected[:, inside], rtol=0.05)
    # Egerton's normalisation: the SSD sums to N_ZLP t/λ (minus the loss beyond 100 eV).
    np.testing.assert_allclose(ssd.sum(axis=-1), truth.zlp.sum(axis=-1) * truth.t_over_lambda, rtol=0.02)


def test_noisy_ssd_deviates_from_truth_by_counting_noise_only():
    signal, truth = simulate_lowloss(None, 1.5, 1.5, t_over_lambda=[0.3, 0.7, 1.1, 1.5], random_state=3)
    ssd = fourier_log_deconvolution(signal.data, truth.zlp)
    expected = _expected_ssd(truth)
    edges = np.arange(2.0, 42.0, 2.0)
    for low, high in zip(edges[:-1], edges[1:]):
        window = (truth.energy >= low) & (truth.energy < high)
        # Poisson variance of the recorded counts plus read noise (1 count) per channel.
        sigma = np.sqrt((signal.data[:, window] + 1.0).sum(axis=-1))
        z = (ssd[:, window].sum(axis=-1) - expected[:, window].sum(axis=-1)) / sigma
        assert np.all(np.abs(z) < 4.0), (low, z)


def test_eps2_of_drude_data_matches_the_drude_input_with_known_thickness(drude):
    signal, truth = drude
    result = dielectric_function(signal, truth.zlp, thickness=truth.thickness)
    assert isinstance(result, DielectricResult) and isinstance(result.eps2, ReplicaInterval)
    energy = truth.energy
    eps = _drude_eps(energy)
    plasmon = (energy > 15.0) & (energy < 30.0)
    with np.errstate(invalid="ignore"):
        loss = np.imag(-1.0 / eps)
    # Measured: 0.45 % for ε2 (the ZLP broadening of the SSD).
    for name, expected, tolerance in (
        ("eps2", eps.imag, dict(rtol=0.05)),
        ("eps1", eps.real, dict(atol=0.02)),
        ("loss_function", loss, dict(rtol=0.05)),
    ):
        measured = getattr(result, name).median.data[:, plasmon]
        np.testing.assert_allclose(measured, np.broadcast_to(expected[plasmon], measured.shape), **tolerance)
    assert np.all(np.isnan(result.eps2.median.data[:, energy <= 0.0125]))
    median = result.eps2.median
    assert median.metadata.Signal.quantity == "ε2"
    assert median.axes_manager.signal_axes[0].units == "eV" and median.axes_manager.navigation_shape == (3,)


def test_refractive_index_of_a_metal_normalises_drude_data(drude):
    signal, truth = drude
    result = dielectric_function(signal, truth.zlp, refractive_index=np.inf)
    energy = truth.energy
    plasmon = (energy > 15.0) & (energy < 30.0)
    expected = np.broadcast_to(_drude_eps(energy).imag, (3, energy.size))
    np.testing.assert_allclose(result.eps2.median.data[:, plasmon], expected[:, plasmon], rtol=0.05)


def test_refractive_index_normalises_an_insulator():
    # Lorentz oscillator eps = 1 + Ep^2 / (E0^2 - E^2 - i Gamma E): n = sqrt(1 + Ep^2 / E0^2) = 3.162.
    energy = -1.0 + 0.025 * np.arange(4041)
    centre, strength, width = 5.0, 15.0, 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = 1.0 + strength**2 / (centre**2 - energy**2 - 1j * width * energy)
        # Egerton eq. 4.26 for t = 50 nm, 1e6 electrons, E0 = 200 keV, beta = 20 mrad.
        m0c2 = constants.physical_constants["electron mass energy equivalent in MeV"][0] * 1e6
        gamma = 1.0 + 200e3 / m0c2
        m0v2 = m0c2 * (1.0 - 1.0 / gamma**2)
        a0 = constants.physical_constants["Bohr radius"][0] * 1e9
        ssd = np.where(
            energy > 0.0,
            1e6 * 50.0 / (np.pi * a0 * m0v2) * np.imag(-1.0 / eps) * 0.025
            * np.log1p((20e-3 * gamma * m0v2 / energy) ** 2),
            0.0,
        )
    n = np.sqrt(1.0 + strength**2 / centre**2)
    result = kramers_kronig(ssd, energy, beam_energy=200.0, collection_angle=20.0, refractive_index=n)
    region = (energy > 3.0) & (energy < 30.0)
    # Measured: 0.19 %.
    np.testing.assert_allclose(result.imag[region], eps.imag[region], rtol=0.01)
    by_thickness = kramers_kronig(
        ssd, energy, beam_energy=200.0, collection_angle=20.0, thickness=50.0, zlp_integral=1e6
    )
    np.testing.assert_allclose(by_thickness[region], eps[region], rtol=1e-3, atol=1e-3)


def test_power_law_tail_helps_when_the_range_ends_early():
    _, truth = simulate_lowloss(50.0, 1.5, 1.5, energy_range=(-1.0, 40.0), dose=None, **DRUDE_ONLY)
    energy = truth.energy
    settings = dict(beam_energy=200.0, collection_angle=20.0, zlp_integral=1.0, thickness=float(truth.thickness))
    region = (energy > 5.0) & (energy < 36.0)
    expected = _drude_eps(energy).imag[region]
    errors = {
        tail: np.max(np.abs(kramers_kronig(truth.single_scattering, energy, tail=tail, **settings).imag[region]
                            / expected - 1.0))
        for tail in ("power_law", None)
    }
    # Measured: 23 % without the tail, 6 % with it.
    assert errors["power_law"] < 0.10
    assert errors[None] > 3.0 * errors["power_law"]


# At dose 1e6 the 80-100 eV window of the thinnest spectrum is too noisy for the power-law fit.
@pytest.mark.filterwarnings("ignore:the power-law tail:RuntimeWarning")
def test_replicas_give_an_ordered_interval(noisy_drude):
    signal, truth = noisy_drude
    scale = 1.0 + 0.02 * np.random.default_rng(0).standard_normal(12)
    result = dielectric_function(signal, scale[:, None, None] * truth.zlp, thickness=truth.thickness)
    single = dielectric_function(signal, truth.zlp, thickness=truth.thickness)
    energy = truth.energy
    plasmon = (energy > 15.0) & (energy < 30.0)
    for name in ("eps1", "eps2", "loss_function", "single_scattering"):
        band = getattr(result, name)
        low, median, high = (getattr(band, k).data[:, plasmon] for k in ("low", "median", "high"))
        assert np.all(low <= median) and np.all(median <= high)
        assert np.all(high > low)
    # A ZLP scaled by c changes the SSD and its normalisation together: ε2 moves by far less than 2 %.
    np.testing.assert_allclose(result.eps2.median.data[:, plasmon], single.eps2.median.data[:, plasmon], rtol=0.01)
    # At dose 1e6, ε2 averaged over 1 eV stays within 5 % of the Drude input in the plasmon region.
    centres = np.arange(16.0, 30.0)
    expected = _drude_eps(centres).imag
    measured = np.stack([single.eps2.median.data[:, np.abs(energy - c) < 0.5].mean(axis=-1) for c in centres], -1)
    np.testing.assert_allclose(measured, np.broadcast_to(expected, measured.shape), rtol=0.05)


def test_lazy_signal_gives_the_eager_spectra(drude):
    signal, truth = drude
    replicas = np.stack([truth.zlp, 1.01 * truth.zlp])
    eager = dielectric_function(signal, replicas, thickness=truth.thickness)
    lazy_signal = signal.as_lazy()
    lazy_signal.data = lazy_signal.data.rechunk((2, -1))
    lazy = dielectric_function(lazy_signal, da.from_array(replicas), thickness=truth.thickness)
    out = lazy.eps2.high
    assert out._lazy
    out.compute()
    np.testing.assert_allclose(out.data, eager.eps2.high.data, rtol=1e-9, equal_nan=True)


def test_float32_and_float64_give_the_same_spectra(drude):
    signal, truth = drude
    as_float64 = signal.deepcopy()
    as_float64.change_dtype("float64")
    first = dielectric_function(signal, truth.zlp.astype(np.float32), thickness=truth.thickness)
    second = dielectric_function(as_float64, truth.zlp, thickness=truth.thickness)
    plasmon = (truth.energy > 5.0) & (truth.energy < 50.0)
    np.testing.assert_allclose(first.eps2.median.data[:, plasmon], second.eps2.median.data[:, plasmon], rtol=1e-4)


def test_thickness_map_as_a_signal_or_a_lazy_array(drude):
    signal, truth = drude
    from_array = dielectric_function(signal, truth.zlp, thickness=truth.thickness)
    from_signal = dielectric_function(signal, truth.zlp, thickness=signal._get_navigation_signal(data=truth.thickness))
    np.testing.assert_array_equal(from_signal.eps1.median.data, from_array.eps1.median.data)
    lazy = dielectric_function(signal, truth.zlp, thickness=da.from_array(truth.thickness)).eps1.median
    assert lazy._lazy
    lazy.compute()
    np.testing.assert_allclose(lazy.data, from_array.eps1.median.data, rtol=1e-12, equal_nan=True)


def test_pipeline_from_log_ratio_thickness_to_eps2(drude):
    signal, truth = drude
    spectrum, zlp = signal.inav[1], truth.zlp[1]
    true_mfp = float(truth.thickness[1] / truth.t_over_lambda[1])
    thickness = estimate_thickness(spectrum, zlp, mean_free_path=true_mfp).median
    eps2 = dielectric_function(spectrum, zlp, thickness=thickness).eps2.median.data
    plasmon = (truth.energy > 15.0) & (truth.energy < 30.0)
    # Measured: the log-ratio t is 0.6 % low (the loss beyond 100 eV); ε2 within 1.7 %.
    np.testing.assert_allclose(eps2[plasmon], _drude_eps(truth.energy).imag[plasmon], rtol=0.05)


def test_fourier_log_warns_for_thick_specimens():
    signal, truth = simulate_lowloss(None, 1.5, 1.5, t_over_lambda=2.5, dose=None)
    with pytest.warns(RuntimeWarning, match=r"1 spectrum/spectra have t/λ > 2\.0"):
        fourier_log_deconvolution(signal.data, truth.zlp)


def test_failed_tail_fit_warns_and_leaves_the_tail_out(drude):
    _, truth = drude
    ssd = truth.single_scattering[0].copy()
    ssd[truth.energy > 85.0] = 0.0
    settings = dict(beam_energy=200.0, collection_angle=20.0, zlp_integral=1.0, thickness=float(truth.thickness[0]))
    with pytest.warns(RuntimeWarning, match=r"the power-law tail A E\^-r failed for 1 spectrum"):
        with_tail = kramers_kronig(ssd, truth.energy, **settings)
    np.testing.assert_array_equal(with_tail, kramers_kronig(ssd, truth.energy, tail=None, **settings))


def test_empty_spectrum_with_refractive_index_is_nan_with_a_warning(drude):
    _, truth = drude
    ssd = np.stack([truth.single_scattering[0], np.zeros(truth.energy.size)])
    with pytest.warns(RuntimeWarning) as record:
        eps = kramers_kronig(ssd, truth.energy, beam_energy=200.0, collection_angle=20.0, refractive_index=3.0)
    assert any("sum-rule integral <= 0" in str(w.message) for w in record)
    assert np.all(np.isnan(eps[1])) and np.isfinite(eps[0, -1])


def _signal(make):
    def build(signal, truth):
        return make(signal.deepcopy(), truth)
    return build


def _energy_in_kev(signal, truth):
    axis = signal.axes_manager.signal_axes[0]
    axis.units, axis.scale, axis.offset = "keV", axis.scale / 1e3, axis.offset / 1e3
    return signal, truth.zlp, dict(thickness=50.0)


def _without_collection_angle(signal, truth):
    del signal.metadata.Acquisition_instrument.TEM.Detector.EELS.collection_angle
    return signal, truth.zlp, dict(thickness=50.0)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda s, t: (s, t.zlp, {}), r"thickness=None and refractive_index=None: expected exactly one"),
        (lambda s, t: (s, t.zlp, dict(thickness=50.0, refractive_index=3.0)), r"expected exactly one of them"),
        (lambda s, t: (s, t.zlp, dict(thickness=-50.0)), r"thickness=-50\.0 nm \(in 1 spectrum/spectra\) is invalid"),
        (lambda s, t: (s, t.zlp, dict(thickness=[50.0, 0.0, 60.0])), r"thickness=0\.0 nm"),
        (lambda s, t: (s, t.zlp, dict(thickness=[50.0, 60.0])), r"thickness has shape \(2,\); expected one value or"),
        (lambda s, t: (s, t.zlp, dict(refractive_index=-2.0)), r"refractive_index=-2\.0 is invalid; expected n > 1"),
        (lambda s, t: (s, t.zlp, dict(refractive_index=1.0)), r"refractive_index=1\.0 is invalid"),
        (lambda s, t: (s, t.zlp, dict(refractive_index=[2.0, 3.0, 4.0])), r"refractive_index has shape \(3,\)"),
        (lambda s, t: (s, t.zlp[:2], dict(thickness=50.0)), r"zlp has shape \(2, 4041\) and the signal's data \(3,"),
        (lambda s, t: (s, np.zeros_like(t.zlp), dict(thickness=50.0)), r"a ZLP integral is 0\.0; expected a ZLP model"),
        (_signal(_energy_in_kev), r"has units 'keV'; expected 'eV'"),
        (_signal(_without_collection_angle), r"collection_angle \(mrad\) is missing; set it with s\.set_microscope"),
        (lambda s, t: (s, t.zlp, dict(thickness=50.0, tail="exponential")), r"tail='exponential' is unknown"),
        (lambda s, t: (s, t.zlp, dict(thickness=50.0, tail_window=1.5)), r"tail_window=1\.5 is out of range"),
    ],
)
def test_dielectric_function_rejects_bad_input(drude, make, match):
    signal, zlp, kwargs = make(*drude)
    with pytest.raises(ValueError, match=match):
        dielectric_function(signal, zlp, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(thickness=50.0), r"thickness normalisation needs zlp_integral"),
        (dict(thickness=50.0, zlp_integral=0.0), r"zlp_integral=0\.0 counts .* is invalid"),
        (dict(refractive_index=2.0, beam_energy=-200.0), r"beam_energy=-200\.0 keV .* is invalid"),
        (dict(refractive_index=2.0, energy=np.linspace(-100.0, 0.1, 4041)), r"fewer than 10 channels above 0 eV"),
        (dict(refractive_index=2.0, energy=np.geomspace(1.0, 100.0, 4041)), r"not uniform and increasing"),
        (dict(refractive_index=2.0, energy=np.arange(10.0)), r"energy has shape \(10,\); expected \(4041,\)"),
    ],
)
def test_kramers_kronig_rejects_bad_arguments(drude, kwargs, match):
    _, truth = drude
    arguments = dict(energy=truth.energy, beam_energy=200.0, collection_angle=20.0) | kwargs
    with pytest.raises(ValueError, match=match):
        kramers_kronig(truth.single_scattering, arguments.pop("energy"), **arguments)


@pytest.mark.filterwarnings("ignore:the power-law tail")  # noisy spectra: the tail fit fails in some replicas
def test_a_zlp_ensemble_gives_the_same_result_as_its_replicas(flake_and_low_loss_model):
    signal, truth, model = flake_and_low_loss_model
    pixels = signal.inav[6:8, 4]  # two pixels on a terrace
    low = pixels.isig[-1.0:9.0]
    replicas = np.zeros((int(model.kept_.sum()), *pixels.data.shape))
    replicas[..., : low.data.shape[-1]] = model.predict_replicas(low)
    thickness = truth.thickness[4, 6:8]
    from_model = dielectric_function(pixels, model, thickness=thickness)
    from_array = dielectric_function(pixels, replicas, thickness=thickness)
    for name in ("eps1", "eps2", "single_scattering"):
        np.testing.assert_allclose(getattr(from_model, name).median.data, getattr(from_array, name).median.data,
                                   rtol=1e-6, atol=1e-9)
