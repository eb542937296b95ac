"""Band-gap onset fit: analytic onsets on a background, with and without resolution and noise."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.signal import fftconvolve

from stemml_core.eels.bandgap import fit_onset

ENERGY = np.arange(-1.0, 6.0, 0.025)  # eV, as the synthetic flake's dispersion


def _resolution(fwhm=0.1):
    k = np.arange(-20, 21) * 0.025
    kernel = np.exp(-4 * np.log(2) * k**2 / fwhm**2)
    return kernel / kernel.sum()


def _onsets(gaps, exponents, amplitude=20.0, resolution=None):
    """Linear background plus A (E - Eg)_+^b, optionally broadened."""
    clean = 5 + 4 * ENERGY[None] + amplitude * np.clip(ENERGY[None] - gaps[:, None], 0, None) ** exponents[:, None]
    if resolution is not None:
        clean = fftconvolve(clean, resolution[None], mode="same", axes=-1)
    return clean


@pytest.fixture(scope="module")
def truth():
    rng = np.random.default_rng(0)
    n = 300
    return rng.uniform(1.2, 1.9, n), rng.choice([0.5, 1.5], n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noise_free_onsets_recovered(truth, dtype):
    gaps, exponents = truth
    fit = fit_onset(_onsets(gaps, exponents).astype(dtype), ENERGY, window=(0.8, 2.6))
    assert fit.found.all()
    np.testing.assert_allclose(fit.band_gap, gaps, atol=0.03)
    assert np.mean(np.abs(fit.band_gap - gaps)) < 0.012
    np.testing.assert_allclose(fit.exponent, exponents, atol=0.1)
    np.testing.assert_allclose(fit.amplitude, 20.0, rtol=0.2)


def test_resolution_removes_the_broadening_bias(truth):
    gaps, exponents = truth
    blurred = _onsets(gaps, exponents, resolution=_resolution())
    plain = fit_onset(blurred, ENERGY, window=(0.8, 2.6))
    aware = fit_onset(blurred, ENERGY, window=(0.8, 2.6), resolution=_resolution())
    assert abs(np.median(aware.band_gap - gaps)) < 0.003
    assert abs(np.median(aware.band_gap - gaps)) < abs(np.median(plain.band_gap - gaps))
    assert np.mean(np.abs(aware.band_gap - gaps)) < 0.012


def test_noisy_onsets_unbiased_and_classified(truth):
    """At 10x the counts of the per-pixel flake data (about 100-300 counts per channel
    near the onset) the error stays well inside the project's 0.05 eV budget."""
    gaps, exponents = truth
    rng = np.random.default_rng(1)
    noisy = rng.poisson(10 * _onsets(gaps, exponents, resolution=_resolution())) / 10
    fit = fit_onset(noisy, ENERGY, window=(0.8, 2.6), resolution=_resolution())
    err = fit.band_gap - gaps
    assert fit.found.mean() > 0.95
    assert abs(np.nanmedian(err)) < 0.01
    assert np.nanmedian(np.abs(err[exponents == 0.5])) < 0.02
    assert np.nanmedian(np.abs(err[exponents == 1.5])) < 0.1  # an indirect onset rises softly
    assert np.mean((fit.exponent < 1) == (exponents < 1)) > 0.9


def test_no_onset_is_reported_not_invented():
    rng = np.random.default_rng(2)
    flat = rng.poisson(np.broadcast_to(50 + 2 * ENERGY, (200, ENERGY.size))).astype(float)
    falling = np.broadcast_to(400 * np.exp(-ENERGY), (5, ENERGY.size))
    fit = fit_onset(np.vstack([flat, falling]), ENERGY, window=(0.8, 2.6))
    assert not fit.found[-5:].any()
    assert np.isnan(fit.band_gap[-5:]).all()
    # pure counting noise on a line: significant onsets only at the rate of chance
    assert fit.found[:200].mean() <= 0.02


@pytest.mark.parametrize("kwargs, match", [
    (dict(window=(0.8, 9.0)), r"window=\(0.8, 9.0\) eV is not inside the energy axis"),
    (dict(window=(2.0, 1.0)), "is not increasing"),
    (dict(window=(1.0, 1.2)), "holds 8 channels; expected at least 9 and a width above 0.3 eV"),
    (dict(window=(0.8, 2.6), exponents=[0.5, 1.5]), "uniform increasing grid of at least 9 positive"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_onset(np.ones((2, ENERGY.size)), ENERGY, **kwargs)


def test_bad_spectra():
    with pytest.raises(ValueError, match=r"spectra has shape \(2, 10\); expected \(n_spectra, 280\)"):
        fit_onset(np.ones((2, 10)), ENERGY, window=(0.8, 2.6))
    bad = np.ones((2, ENERGY.size))
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_onset(bad, ENERGY, window=(0.8, 2.6))


@settings(max_examples=25, deadline=None)
@given(gap=st.floats(1.0, 2.2), exponent=st.sampled_from([0.5, 1.0, 1.5, 2.0]), amplitude=st.floats(1.0, 1e4))
def test_any_clean_onset_in_the_window(gap, exponent, amplitude):
    spectrum = _onsets(np.array([gap]), np.array([exponent]), amplitude=amplitude)
    fit = fit_onset(spectrum, ENERGY, window=(0.8, 2.6))
    assert fit.found[0]
    assert abs(fit.band_gap[0] - gap) < 0.03
