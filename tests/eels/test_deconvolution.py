"""Richardson–Lucy by the ZLP (exspy) and Fourier-log deconvolution against the generator's truth."""

import hyperspy.api as hs
import numpy as np
import pytest

from stemml_core.eels.deconvolution import convolve, richardson_lucy, unbroadened_inelastic
from stemml_core.eels.dielectric import fourier_log_deconvolution
from stemml_core.synthetic.lowloss import single_spectrum


def _relative_rms(values, truth, energy, lo, hi):
    inside = (energy >= lo) & (energy <= hi)
    return float(np.sqrt(np.mean((values[..., inside] - truth[..., inside]) ** 2) / np.mean(truth[..., inside] ** 2)))


def test_richardson_lucy_undoes_a_known_convolution():
    n = 301
    x = np.arange(n, dtype=float)
    truth = 5.0 + 400.0 * np.exp(-0.5 * ((x - 100) / 1.5) ** 2) + 300.0 * np.exp(-0.5 * ((x - 112) / 1.5) ** 2)
    psf = np.exp(-0.5 * ((x - 40) / 4.0) ** 2)  # maximum off-centre: the maximum marks zero shift
    blurred = convolve(truth, psf)
    assert blurred.sum() == pytest.approx(truth.sum(), rel=1e-2)  # a little of the baseline leaves at the ends
    s = hs.signals.Signal1D(blurred)
    sharp = richardson_lucy(s, psf, iterations=300).data
    assert sharp.sum() == pytest.approx(blurred.sum(), rel=1e-2)  # counts conserved (unit-area PSF)
    assert np.abs(sharp - truth).max() < 0.3 * np.abs(blurred - truth).max()
    assert abs(int(np.argmax(sharp)) - 100) <= 1
    # the PSF's scale does not matter (it is normalised), and the input is untouched
    np.testing.assert_allclose(richardson_lucy(s, 7.0 * psf, iterations=5).data,
                               richardson_lucy(s, psf, iterations=5).data)
    np.testing.assert_array_equal(s.data, blurred)


def test_unbroadened_inelastic_broadened_by_the_zlp_is_the_generators_inelastic():
    s, truth = single_spectrum(dose=None, energy_range=(-1.0, 60.0))
    plural = unbroadened_inelastic(truth.single_scattering, truth.t_over_lambda, 1.0, truth.energy)
    broadened = convolve(plural, truth.zlp)
    assert np.abs(broadened - truth.inelastic).max() < 0.01 * truth.inelastic.max()
    # single scattering alone carries exp(-t/λ) t/λ of the counts, plural scattering more
    assert plural.sum() > np.exp(-truth.t_over_lambda) * truth.single_scattering.sum()


def test_richardson_lucy_and_fourier_log_recover_the_truth():
    # noise-free spectrum to 60 eV, true ZLP as the PSF; relative RMS over 1-4 eV (onset) and 4-40 eV:
    # RL 15 iterations vs unbroadened plural scattering: 0.6 % and 0.06 % (the broadened data: 0.6 %, 0.3 %);
    # Fourier-log vs exp(-t/λ) R ⊛ J1: 0.2 %, 0.06 %; Fourier-log + RL vs exp(-t/λ) J1: 0.2 %, 0.07 %
    s, truth = single_spectrum(dose=None, energy_range=(-1.0, 60.0))
    e = truth.energy
    attenuation = np.exp(-truth.t_over_lambda)
    plural = unbroadened_inelastic(truth.single_scattering, truth.t_over_lambda, 1.0, e)
    rl = richardson_lucy(s, truth.zlp, iterations=50).data
    assert _relative_rms(rl, plural, e, 1, 4) < 0.005
    assert _relative_rms(rl, plural, e, 1, 4) < _relative_rms(s.data, plural, e, 1, 4)
    assert _relative_rms(rl, plural, e, 4, 40) < 0.002
    ssd = fourier_log_deconvolution(s.data, truth.zlp)
    assert _relative_rms(ssd, attenuation * convolve(truth.single_scattering, truth.zlp), e, 1, 40) < 0.005
    sharp_ssd = richardson_lucy(s._deepcopy_with_new_data(ssd), truth.zlp, iterations=15).data
    assert _relative_rms(sharp_ssd, attenuation * truth.single_scattering, e, 1, 4) < 0.005
    assert _relative_rms(sharp_ssd, attenuation * truth.single_scattering, e, 4, 40) < 0.002


def test_richardson_lucy_with_one_psf_per_spectrum_and_noisy_counts():
    s, truth = single_spectrum(dose=1e6, energy_range=(-1.0, 20.0), random_state=0)
    stack = hs.stack([s, s])
    stack.set_signal_type("EELS")
    out = richardson_lucy(stack, np.stack([truth.zlp, truth.zlp]), iterations=10)
    assert out.data.shape == stack.data.shape and out.data.min() >= 0
    np.testing.assert_allclose(out.data[0], richardson_lucy(s, truth.zlp, iterations=10).data)


@pytest.mark.parametrize("psf, kwargs, match", [
    (np.ones(10), {}, r"psf has shape \(10,\); expected the spectra's 50 channels"),
    (np.ones((3, 50)), {}, r"psf has navigation shape \(3,\); expected one PSF of 50 channels or one per spectrum"),
    (np.zeros(50), {}, "no positive values"),
    (np.ones(50), {"iterations": 0}, "iterations=0; expected an integer >= 1"),
])
def test_richardson_lucy_bad_input(psf, kwargs, match):
    s = hs.signals.Signal1D(np.ones((2, 50)))
    with pytest.raises(ValueError, match=match):
        richardson_lucy(s, psf, **kwargs)


def test_richardson_lucy_refuses_lazy_signals():
    with pytest.raises(NotImplementedError, match="compute"):
        richardson_lucy(hs.signals.Signal1D(np.ones((2, 50))).as_lazy(), np.ones(50))
