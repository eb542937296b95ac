"""Gain/loss forward model: peak areas, positions and shapes against the formulas, noise, the sample, bad input."""

import subprocess
import sys

import numpy as np
import pytest

from stemml_core.synthetic.gain import BOLTZMANN_EV, gain_loss_sample, simulate_gain_loss


def test_noise_free_peaks_follow_the_model():
    ev, p, kelvin = 0.15, 0.01, 900.0
    s, truth = simulate_gain_loss([0.0, ev], [0.0, p], temperature=[np.nan, kelvin], dose=None)
    e = truth.energy
    r = np.exp(-ev / (BOLTZMANN_EV * kelvin))
    assert truth.ratio[1] == pytest.approx(r)
    assert truth.temperature[1] == kelvin and np.isnan(truth.ratio[0]) and truth.vacuum.tolist() == [True, False]
    # areas: the Lorentzian line's tails beyond the recorded range hold < 2 % (FWHM 5 meV, 0.35 eV away)
    assert truth.loss[1].sum() == pytest.approx(p, rel=0.02)
    assert truth.gain[1].sum() == pytest.approx(p * r, rel=0.02)
    assert truth.loss_intensity[1] == p and truth.gain_intensity[1] == pytest.approx(p * r)
    # the ZLP keeps 1 - P (1 + r) of the electrons; vacuum holds the ZLP alone
    assert truth.zlp[1].sum() == pytest.approx((1 - p * (1 + r)) * truth.zlp[0].sum(), rel=1e-9)
    assert not truth.gain[0].any() and not truth.loss[0].any()
    np.testing.assert_allclose(s.data, (truth.zlp + truth.gain + truth.loss).astype(np.float32))
    # both peaks are the same kernel: gain(E) = r loss(E + 2 Ev) (2 Ev = 75 channels here)
    shift = int(round(2 * ev / 0.004))
    np.testing.assert_allclose(truth.gain[1][: e.size - shift], r * truth.loss[1][shift:], rtol=1e-9, atol=1e-15)
    # maxima within one channel of -+Ev
    assert abs(e[np.argmax(truth.loss[1])] - ev) <= 0.004 and abs(e[np.argmax(truth.gain[1])] + ev) <= 0.004


def test_ratio_given_directly_and_axis_metadata():
    s, truth = simulate_gain_loss(0.2, 0.005, ratio=1.0, dose=None, energy_range=(-0.3, 0.3), dispersion=0.002)
    assert s.data.shape == (301,) and truth.ratio == 1.0 and np.isnan(truth.temperature)
    assert truth.gain.sum() == pytest.approx(truth.loss.sum(), rel=0.01)  # the split ZLP tails are cut unevenly
    axis = s.axes_manager.signal_axes[0]
    assert (axis.units, axis.scale, axis.offset) == ("eV", pytest.approx(0.002), pytest.approx(-0.3))


def test_noise_is_seeded_and_scales_with_the_dose():
    a, truth = simulate_gain_loss(0.15, 0.01, temperature=800.0, dose=1e6, random_state=1)
    b, _ = simulate_gain_loss(0.15, 0.01, temperature=800.0, dose=1e6, random_state=1)
    c, _ = simulate_gain_loss(0.15, 0.01, temperature=800.0, dose=1e6, random_state=2)
    np.testing.assert_array_equal(a.data, b.data)
    assert not np.array_equal(a.data, c.data)
    clean = truth.zlp + truth.gain + truth.loss
    assert clean.sum() == pytest.approx(1e6, rel=0.01)
    assert float(a.data.sum()) == pytest.approx(clean.sum(), rel=0.01)


def test_sample_layout_and_truth():
    s, truth = gain_loss_sample(random_state=0)
    spec = ~truth.vacuum
    assert s.data.shape == (16, 24, 251) and 0.2 < truth.vacuum.mean() < 0.35
    assert np.all(np.isnan(truth.excitation_energy[truth.vacuum])) and np.all(truth.loss_intensity[truth.vacuum] == 0)
    assert 0.11 <= np.nanmin(truth.excitation_energy) and np.nanmax(truth.excitation_energy) <= 0.21
    assert 0.03 < np.nanmin(truth.ratio) < np.nanmax(truth.ratio) < 0.35
    kt = BOLTZMANN_EV * truth.temperature[spec]
    np.testing.assert_allclose(truth.ratio[spec], np.exp(-truth.excitation_energy[spec] / kt))
    np.testing.assert_allclose(truth.loss_intensity[spec], 1e7 * truth.loss_probability[spec])
    again, _ = gain_loss_sample(random_state=0)
    np.testing.assert_array_equal(s.data, again.data)
    _, photon = gain_loss_sample((4, 10), mode="photon", dose=None)
    assert np.all(photon.ratio[~photon.vacuum] == 1.0) and np.all(np.isnan(photon.temperature))


def test_synthetic_does_not_import_the_analyses():
    code = "import sys, stemml_core.synthetic.gain; print(any(m.startswith('stemml_core.eels') for m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(energy_range=(0.0, 0.5)), r"does not contain 0; expected \(first, last\) with first < 0 < last"),
        (dict(excitation_energy=0.6),
         r"excitation_energy=0.6 .* expected an energy in \(0, 0.5\) eV, so that the gain peak at -Ev"),
        (dict(ratio=0.5), "exactly one of them"),
        (dict(temperature=None), "exactly one of them"),
        (dict(loss_probability=0.6, ratio=1.0, temperature=None), r"P \(1 \+ r\) < 1"),
        (dict(loss_probability=[0.01, 0.02], excitation_energy=[0.1, 0.1, 0.1]), "maps of different shapes"),
        (dict(temperature=-5.0), "a temperature > 0 K"),
        (dict(zlp_fwhm=0.0), r"zlp_fwhm=0.0 eV is out of range"),
        (dict(dispersion=-1.0), "dispersion=-1.0 eV is out of range"),
    ],
)
def test_bad_input_names_what_was_expected(kwargs, message):
    args = dict(excitation_energy=0.15, loss_probability=0.01, temperature=800.0) | kwargs
    with pytest.raises(ValueError, match=message):
        simulate_gain_loss(args.pop("excitation_energy"), args.pop("loss_probability"), **args)


def test_bad_sample_settings():
    with pytest.raises(ValueError, match="nav_shape"):
        gain_loss_sample((1, 4))
    with pytest.raises(ValueError, match="mode='thermal' is unknown"):
        gain_loss_sample(mode="thermal")
