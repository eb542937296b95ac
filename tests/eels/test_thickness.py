"""Log-ratio thickness and mean free path: truth on the synthetic flake, published λ, eager/lazy, bad input."""

import dask.array as da
import numpy as np
import pytest

from stemml_core.eels.thickness import ReplicaInterval, estimate_thickness, log_ratio, mean_free_path
from stemml_core.synthetic.lowloss import flake_sample


@pytest.fixture(scope="module")
def noise_free_flake():
    return flake_sample(dose=None)


@pytest.fixture(scope="module")
def noisy_flake():
    return flake_sample(random_state=0)


@pytest.fixture(scope="module")
def small_flake():
    return flake_sample((6, 10), random_state=1)


@pytest.mark.parametrize("sample", ["noise_free_flake", "noisy_flake"])
def test_t_over_lambda_within_5_percent_on_the_terraces(sample, request):
    signal, truth = request.getfixturevalue(sample)
    result = estimate_thickness(signal, truth.zlp)
    assert isinstance(result, ReplicaInterval)
    material = ~truth.vacuum
    # Measured: -1.7 % (noise-free; the loss beyond the recorded 100 eV) and -1.9 % to +0.7 % (dose 1e6).
    np.testing.assert_allclose(result.median.data[material], truth.t_over_lambda[material], rtol=0.05)
    # Vacuum: counting noise of 1e6 electrons and read noise give |t/λ| ~ 1e-3.
    np.testing.assert_allclose(result.median.data[truth.vacuum], 0.0, atol=0.01)
    # One model ZLP: the interval is empty.
    np.testing.assert_array_equal(result.low.data, result.median.data)
    np.testing.assert_array_equal(result.high.data, result.median.data)
    assert result.median.metadata.Signal.quantity == "t/λ"
    assert result.median.axes_manager.signal_dimension == 0
    axes = [(a.name, a.units, a.scale, a.size) for a in result.median.axes_manager.navigation_axes]
    assert axes == [("x", "nm", 1.0, 32), ("y", "nm", 1.0, 24)]


def test_absolute_thickness_with_the_true_mean_free_path(noisy_flake):
    signal, truth = noisy_flake
    material = ~truth.vacuum
    # The generator's λ follows from its loss function: 100.9-101.3 nm over the flake.
    true_mfp = float(np.median(truth.thickness[material] / truth.t_over_lambda[material]))
    result = estimate_thickness(signal, truth.zlp, mean_free_path=true_mfp)
    np.testing.assert_allclose(result.median.data[material], truth.thickness[material], rtol=0.05)
    assert result.median.metadata.Signal.quantity == "Thickness (nm)"


@pytest.mark.parametrize(
    ("options", "formula_kwargs"),
    [
        (dict(density=5.06), dict(density=5.06, formula="iakoubovskii")),
        (dict(z_eff=26.4), dict(z_eff=26.4, formula="malis")),
    ],
)
def test_formula_mean_free_path_takes_the_microscope_parameters_from_the_metadata(
    small_flake, options, formula_kwargs
):
    signal, truth = small_flake
    relative = estimate_thickness(signal, truth.zlp).median.data
    absolute = estimate_thickness(signal, truth.zlp, **options).median
    # flake_sample records E0 = 200 keV, alpha = 15 mrad, beta = 20 mrad.
    mfp = mean_free_path(200.0, 20.0, convergence_angle=15.0, **formula_kwargs)
    np.testing.assert_allclose(absolute.data, mfp * relative, rtol=1e-12)
    assert absolute.metadata.Signal.quantity == "Thickness (nm)"


def test_replicas_give_the_median_and_68_percent_interval(noise_free_flake):
    signal, truth = noise_free_flake
    scale = 1.0 + 0.03 * np.random.default_rng(2).standard_normal(25)
    result = estimate_thickness(signal, scale[:, None, None, None] * truth.zlp)
    single = estimate_thickness(signal, truth.zlp).median.data
    # ln(N_tot / (c N_ZLP)) = t/λ - ln c: percentiles of t/λ are those of -ln c, low and high swapped.
    log_scale = np.log(scale)
    np.testing.assert_allclose(result.median.data, single - np.percentile(log_scale, 50), atol=1e-12)
    np.testing.assert_allclose(result.low.data, single - np.percentile(log_scale, 84), atol=1e-12)
    np.testing.assert_allclose(result.high.data, single - np.percentile(log_scale, 16), atol=1e-12)


@pytest.mark.parametrize("lazy_zlp", [False, True])
def test_lazy_signal_gives_the_eager_maps(small_flake, lazy_zlp):
    signal, truth = small_flake
    replicas = np.stack([truth.zlp, 1.02 * truth.zlp, 0.97 * truth.zlp])
    eager = estimate_thickness(signal, replicas, mean_free_path=100.0)
    lazy_signal = signal.as_lazy()
    lazy_signal.data = lazy_signal.data.rechunk((3, 4, -1))
    lazy = estimate_thickness(lazy_signal, da.from_array(replicas) if lazy_zlp else replicas, mean_free_path=100.0)
    for name in ("median", "low", "high"):
        out = getattr(lazy, name)
        assert out._lazy
        out.compute()
        np.testing.assert_allclose(out.data, getattr(eager, name).data, rtol=1e-12)


def test_lazy_zlp_makes_an_eager_signal_lazy(small_flake):
    signal, truth = small_flake
    result = estimate_thickness(signal, da.from_array(truth.zlp))
    assert result.median._lazy


def test_float32_and_float64_give_the_same_map(small_flake):
    signal, truth = small_flake
    assert signal.data.dtype == np.float32
    as_float64 = signal.deepcopy()
    as_float64.change_dtype("float64")
    np.testing.assert_allclose(
        estimate_thickness(signal, truth.zlp.astype(np.float32)).median.data,
        estimate_thickness(as_float64, truth.zlp).median.data,
        rtol=1e-5, atol=1e-7,
    )


def test_single_spectrum(small_flake):
    signal, truth = small_flake
    spectrum = signal.inav[8, 2]
    result = estimate_thickness(spectrum, truth.zlp[2, 8])
    np.testing.assert_allclose(result.median.data, truth.t_over_lambda[2, 8], rtol=0.05)


def test_log_ratio_broadcasts_replicas_and_flags_empty_spectra():
    spectra = np.array([[1.0, 4.0, 3.0], [0.0, 0.0, 0.0]])
    zlp = np.array([[[1.0, 1.0, 0.0]] * 2, [[2.0, 2.0, 0.0]] * 2])  # 2 replicas
    with pytest.warns(RuntimeWarning, match=r"1 spectrum/spectra have a total <= 0 counts"):
        values = log_ratio(spectra, zlp)
    np.testing.assert_allclose(values[:, 0], [np.log(4.0), np.log(2.0)])
    assert np.all(np.isnan(values[:, 1]))


# Published values. Iakoubovskii et al. with large collection angles (100 mrad: the formula has saturated):
# Al at 150 keV measured 119 +- 5 nm without objective aperture (Bardal & Lie, Mater. Charact. 44, 329
# (2000)); Si at 200 keV measured 121-160 nm (survey in MRS Proc. 982, KK07-13 (2007)).
def test_iakoubovskii_formula_matches_measured_mean_free_paths():
    assert mean_free_path(150.0, 100.0, density=2.70) == pytest.approx(119.0, rel=0.10)
    assert 121.0 <= mean_free_path(200.0, 100.0, density=2.33) <= 160.0


def test_malis_formula_by_hand():
    # Malis et al. (1988), Si (Z = 14), E0 = 200 keV, beta = 10 mrad, alpha = 0: F = 1.19569 / 1.93596 =
    # 0.61762, E_m = 7.6 * 14^0.36 = 19.6526 eV, ln(2 * 10 * 200 / 19.6526) = 5.31584,
    # lambda = 106 * 0.61762 * 200 / (19.6526 * 5.31584) = 125.33 nm.
    silicon = dict(z_eff=14.0, formula="malis")
    assert mean_free_path(200.0, 10.0, **silicon) == pytest.approx(125.33, abs=0.01)
    assert mean_free_path(200.0, 10.0, convergence_angle=0.0, **silicon) == pytest.approx(125.33, abs=0.01)
    # A convergence angle lowers the effective collection angle, so lambda grows.
    assert mean_free_path(200.0, 10.0, convergence_angle=8.0, **silicon) > 126.0


def test_mean_free_path_falls_with_the_collection_angle_and_saturates():
    values = [mean_free_path(200.0, beta, density=5.06) for beta in (5.0, 10.0, 20.0, 100.0, 1000.0)]
    assert np.all(np.diff(values) < 0.0)
    assert values[-1] == pytest.approx(values[-2], rel=0.01)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(density=5.0, formula="tpp2m"), r"formula='tpp2m' is unknown; expected one of \('iakoubovskii', 'malis"),
        (dict(), r"formula='iakoubovskii' takes density and not z_eff"),
        (dict(density=5.0, z_eff=20.0), r"formula='iakoubovskii' takes density and not z_eff"),
        (dict(density=5.0, formula="malis"), r"formula='malis' takes z_eff and not density"),
        (dict(density=-1.0), r"density=-1\.0 g/cm³ is invalid; expected a finite value > 0"),
        (dict(density=5.0, beam_energy=0.0), r"beam_energy=0\.0 keV is invalid"),
        (dict(density=5.0, collection_angle=np.nan), r"collection_angle=nan mrad is invalid"),
        (dict(density=5.0, convergence_angle=-2.0), r"convergence_angle=-2\.0 mrad is invalid; expected >= 0"),
    ],
)
def test_mean_free_path_rejects_bad_arguments(kwargs, match):
    arguments = dict(beam_energy=200.0, collection_angle=20.0) | kwargs
    with pytest.raises(ValueError, match=match):
        mean_free_path(arguments.pop("beam_energy"), arguments.pop("collection_angle"), **arguments)


def _without_metadata(signal, truth):
    del signal.metadata.Acquisition_instrument
    return signal, truth.zlp, dict(density=5.06)


def _energy_in_kev(signal, truth):
    axis = signal.axes_manager.signal_axes[0]
    axis.units, axis.scale, axis.offset = "keV", axis.scale / 1e3, axis.offset / 1e3
    return signal, truth.zlp, {}


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda s, t: (s, t.zlp[..., :-1], {}), r"zlp has shape \(6, 10, 4040\) and the signal's data \(6, 10, 4041\)"),
        (lambda s, t: (s, t.zlp[:, :5], {}), r"zlp has shape \(6, 5, 4041\)"),
        (lambda s, t: (s, np.zeros_like(t.zlp), {}), r"the ZLP integral is 0\.0 in 60 spectrum/spectra"),
        (lambda s, t: (s, -t.zlp, {}), r"the ZLP integral is -"),
        (_without_metadata, r"metadata Acquisition_instrument\.TEM\.beam_energy \(keV\) is missing; set it with "
                            r"s\.set_microscope_parameters\(beam_energy=\.\.\.\)"),
        (lambda s, t: (s, t.zlp, dict(mean_free_path=-1.0)), r"mean_free_path=-1\.0 nm is invalid"),
        (lambda s, t: (s, t.zlp, dict(mean_free_path=100.0, z_eff=20.0)), r"mean_free_path and z_eff were given"),
        (lambda s, t: (s, t.zlp, dict(density=-5.0)), r"density=-5\.0 g/cm³ is invalid"),
        (_energy_in_kev, r"the energy axis 'Energy loss' has units 'keV'; expected 'eV'"),
    ],
)
def test_estimate_thickness_rejects_bad_input(small_flake, make, match):
    signal, zlp, kwargs = make(small_flake[0].deepcopy(), small_flake[1])
    with pytest.raises(ValueError, match=match):
        estimate_thickness(signal, zlp, **kwargs)


def test_missing_collection_angle_names_its_key(small_flake):
    signal = small_flake[0].deepcopy()
    del signal.metadata.Acquisition_instrument.TEM.Detector.EELS.collection_angle
    with pytest.raises(ValueError, match=r"Detector\.EELS\.collection_angle \(mrad\) is missing.*collection_angle="):
        estimate_thickness(signal, small_flake[1].zlp, z_eff=26.4)


def test_zlp_signal_with_another_energy_axis_is_rejected(small_flake):
    signal, truth = small_flake
    zlp = signal._deepcopy_with_new_data(truth.zlp)
    zlp.axes_manager.signal_axes[0].offset = -0.5
    with pytest.raises(ValueError, match=r"the ZLP's energy axis \(-0\.5 to .* differs from the signal's \(-1 to"):
        estimate_thickness(signal, zlp)


def test_a_zlp_ensemble_fitted_on_the_low_loss_window_gives_t_over_lambda(flake_and_low_loss_model):
    signal, truth, model = flake_and_low_loss_model
    result = estimate_thickness(signal, model)  # recorded to 100 eV, model fitted to 9 eV
    material = ~truth.vacuum
    # Measured: -2.2 % to +0.3 % on the terraces, |t/λ| < 1e-3 in vacuum.
    np.testing.assert_allclose(result.median.data[material], truth.t_over_lambda[material], rtol=0.05)
    np.testing.assert_allclose(result.median.data[truth.vacuum], 0.0, atol=0.01)
    assert np.all(result.low.data <= result.median.data) and np.all(result.median.data <= result.high.data)
    assert np.any(result.high.data > result.low.data)
    lazy = estimate_thickness(signal.as_lazy(), model)
    lazy.median.compute()
    np.testing.assert_allclose(lazy.median.data, result.median.data, rtol=1e-10)


def test_a_zlp_ensemble_on_other_channels_is_refused(flake_and_low_loss_model):
    signal, _, model = flake_and_low_loss_model
    with pytest.raises(ValueError, match="not channels of the signal's energy axis"):
        estimate_thickness(signal.isig[2.0:], model)
    rebinned = signal.rebin(scale=(1, 1, 2))
    with pytest.raises(ValueError, match="expected the same dispersion"):
        estimate_thickness(rebinned, model)
