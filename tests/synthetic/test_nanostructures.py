"""Tests of the 1D MoS2 nanostructure sample: geometry, truth maps, and the truth's imprint on the spectra."""

import numpy as np
import pytest
from scipy.signal import find_peaks

from stemml_core.synthetic import NanostructureTruth, nanostructure_sample, simulate_lowloss

SHORT = dict(energy_range=(-1.0, 12.0))


@pytest.fixture(scope="module")
def noise_free():
    return nanostructure_sample(dose=None, **SHORT)


def test_geometry_and_regions(noise_free):
    signal, truth = noise_free
    low = truth.lowloss
    assert isinstance(truth, NanostructureTruth) and signal.data.shape == (32, 48, low.energy.size)
    assert 0.7 <= low.vacuum.mean() <= 0.85
    assert truth.region_names == ("vacuum", "end", "side", "inner", "curved")
    # Disjoint by construction (one label per pixel); together they cover exactly the specimen.
    np.testing.assert_array_equal(truth.mask("vacuum"), low.vacuum)
    for name in truth.region_names[1:]:
        assert truth.mask(name).sum() >= 10, name
    # Both ends: the end region holds the caps at arc length 0 and at the full length.
    ends = truth.arc_length[truth.mask("end")]
    assert ends.min() == pytest.approx(0.0, abs=0.01) and ends.max() == pytest.approx(truth.length, abs=0.01)
    assert np.all((ends <= truth.half_width + 0.01) | (ends >= truth.length - truth.half_width - 0.01))
    # The curved region is where the arc strains the structure; straight sections are unstrained.
    curved = truth.mask("curved")
    assert np.all(truth.strain[curved] > 0.0) and np.all(truth.strain[~curved & ~low.vacuum] == 0.0)
    assert np.all(truth.distance[~low.vacuum] <= truth.half_width)
    for name in ("strain", "arc_length", "distance"):
        assert np.all(np.isnan(getattr(truth, name)[low.vacuum])), name
    with pytest.raises(ValueError, match=r"name='edge' is not a region"):
        truth.mask("edge")


def test_thickness_is_a_round_wire(noise_free):
    _, truth = noise_free
    low, material = truth.lowloss, ~truth.lowloss.vacuum
    chord = np.sqrt(1.0 - (truth.distance[material] / truth.half_width) ** 2)
    np.testing.assert_allclose(low.t_over_lambda[material], 0.3 + 0.7 * chord, rtol=1e-9)
    assert low.t_over_lambda[material].min() >= 0.3 and low.t_over_lambda.max() <= 1.0
    assert low.t_over_lambda[truth.mask("inner")].mean() > low.t_over_lambda[truth.mask("side")].mean() + 0.2


def test_excitons_sit_at_ends_and_sides(noise_free):
    _, truth = noise_free
    peaks, material = truth.lowloss.peaks, ~truth.lowloss.vacuum
    assert set(peaks) == {"A", "B", "C", "plasmon"}
    for name, relative in (("A", 1.0), ("B", 0.8), ("C", 0.5)):
        amplitude = peaks[name]["amplitude"]
        assert np.all(amplitude[truth.mask("inner")] == 0.0), name  # no exciton at all there
        assert np.all(np.isnan(amplitude[truth.lowloss.vacuum])), name
        # Weight 1 at the tips (A, B) and at the rims (C); the default scale is 0.1.
        assert np.nanmax(amplitude[truth.mask("end" if name != "C" else "side")]) == pytest.approx(0.1 * relative)
        assert np.all(amplitude[truth.mask("side")] > 0.0), name
    np.testing.assert_allclose(peaks["B"]["amplitude"][material], 0.8 * peaks["A"]["amplitude"][material])
    # A smooth shift of +20 meV at the first end to -20 meV at the second.
    shift = peaks["A"]["energy"] - 1.88
    first = truth.arc_length == 0.0
    np.testing.assert_allclose(shift[first], 0.02, atol=1e-12)
    np.testing.assert_allclose(shift[truth.arc_length == np.nanmax(truth.arc_length)], -0.02, atol=1e-12)
    np.testing.assert_allclose(peaks["C"]["energy"][material] - 2.90, shift[material], atol=1e-12)
    np.testing.assert_allclose(peaks["A"]["width"][material], 0.08)


def test_noise_free_spectrum_shows_the_true_exciton_energies(noise_free):
    signal, truth = noise_free
    low = truth.lowloss
    amplitude = np.where(truth.mask("end"), low.peaks["A"]["amplitude"], -1.0)
    pixel = np.unravel_index(np.argmax(amplitude), amplitude.shape)
    here = {name: {**{key: float(spec[key][pixel]) for key in ("energy", "width", "amplitude")},
                   "shape": spec["shape"]} for name, spec in low.peaks.items()}
    without_excitons = {name: spec | ({} if name == "plasmon" else {"amplitude": 0.0}) for name, spec in here.items()}
    # The same pixel (same thickness, band gap and plasmon) without excitons.
    _, bare = simulate_lowloss(
        float(low.thickness[pixel]), float(low.band_gap[pixel]), 1.5, peaks=without_excitons, dose=None,
        pi_plasmon_weight=0.0, **SHORT,
    )
    excitons = signal.data[pixel] - (bare.zlp + bare.inelastic)
    found, properties = find_peaks(excitons, height=0.0)
    strongest = found[np.argsort(properties["peak_heights"])[-3:]]
    dispersion = low.params["dispersion"]
    np.testing.assert_allclose(
        np.sort(low.energy[strongest]), [here[name]["energy"] for name in "ABC"], atol=dispersion
    )


def test_band_gap_follows_the_strain_through_the_deformation_potential(noise_free):
    _, truth = noise_free
    low, material = truth.lowloss, ~truth.lowloss.vacuum
    assert truth.deformation_potential == -10.0 and truth.unstrained_band_gap == 1.2
    np.testing.assert_allclose(
        low.band_gap[material], 1.2 + truth.deformation_potential * truth.strain[material], rtol=0, atol=1e-12
    )
    assert np.all(low.band_gap[material & ~truth.mask("curved")] == 1.2)
    assert np.all(low.gap_exponent[material] == 1.5)
    # The default 1.5 % peak strain narrows the gap by up to 0.15 eV in the arc.
    assert np.nanmax(truth.strain) <= 0.015 and np.nanmax(truth.strain) > 0.0149
    reduction = 1.2 - low.band_gap[truth.mask("curved")].min()
    assert reduction == pytest.approx(0.15, abs=0.002)
    _, other = nanostructure_sample((16, 24), dose=None, deformation_potential=-5.0, max_strain=0.03, **SHORT)
    on = ~other.lowloss.vacuum
    np.testing.assert_allclose(other.lowloss.band_gap[on], 1.2 - 5.0 * other.strain[on], rtol=0, atol=1e-12)


def test_plasmon_is_strongest_in_the_inner_region(noise_free):
    signal, truth = noise_free
    low = truth.lowloss
    channel = np.argmin(np.abs(low.energy - 8.3))
    inner, side = truth.mask("inner"), truth.mask("side")
    loss = low.loss_function[..., channel]
    assert loss[inner].mean() > 1.2 * loss[side].mean()
    counts = signal.data[..., channel]
    assert counts[inner].mean() > 1.2 * counts[side].mean()
    assert low.peaks["plasmon"]["shape"] == "lorentzian" and low.params["pi_plasmon_weight"] == 0.0


def test_seed_fixes_the_noise_and_pixel_size_the_scale():
    first, truth = nanostructure_sample((16, 24), random_state=1, **SHORT)
    again, _ = nanostructure_sample((16, 24), random_state=1, **SHORT)
    other, other_truth = nanostructure_sample((16, 24), random_state=2, **SHORT)
    np.testing.assert_array_equal(first.data, again.data)
    assert not np.array_equal(first.data, other.data)
    np.testing.assert_array_equal(truth.regions, other_truth.regions)  # the structure itself is fixed
    _, half = nanostructure_sample((16, 24), dose=None, pixel_size=0.5, **SHORT)
    assert half.length == pytest.approx(0.5 * truth.length)
    np.testing.assert_allclose(half.arc_length, 0.5 * truth.arc_length)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(nav_shape=(8, 48)), r"nav_shape=\(8, 48\) is too small; expected \(rows, cols\) with rows >= 16"),
        (dict(nav_shape=(32,)), r"nav_shape=\(32,\) is too small"),
        (dict(exciton_amplitude=-0.1), r"exciton_amplitude=-0\.1 is out of range; expected exciton_amplitude >= 0"),
        (dict(max_strain=-0.01), r"max_strain=-0\.01 is out of range; expected 0\.0 <= max_strain <= 0\.1"),
        (dict(max_strain=0.2), r"max_strain=0\.2 is out of range"),
        (dict(deformation_potential=-100.0, max_strain=0.02),
         r"deformation_potential=-100\.0 eV with max_strain=0\.02 gives a band gap of -0\.8 eV"),
        (dict(deformation_potential=np.nan), r"deformation_potential=nan eV .* expected a finite"),
        (dict(peaks={}), r"peaks= is set by nanostructure_sample itself"),
        (dict(t_over_lambda=0.5), r"t_over_lambda= is set by nanostructure_sample"),
        (dict(energy_range=(-1.0, 5.0)), r"peaks\['plasmon'\]\['energy'\]=8\.3 .* \(0, 5\.0\) eV"),
        (dict(dose=0.0), r"dose=0\.0 electrons is out of range"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nanostructure_sample(**kwargs)
