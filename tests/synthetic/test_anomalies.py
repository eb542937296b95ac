import numpy as np
import pytest

from stemml_core.synthetic import flake_sample
from stemml_core.synthetic.anomalies import diffraction_anomalies, lowloss_anomalies


def test_lowloss_anomalies_change_only_the_planted_pixels():
    signal, truth = lowloss_anomalies((12, 16), n_contaminated=3, n_spikes=2, random_state=4)
    seed = int(np.random.default_rng(4).integers(2**31))
    clean, _ = flake_sample((12, 16), random_state=seed)
    changed = np.any(signal.data != clean.data, axis=-1)
    np.testing.assert_array_equal(changed, truth.anomalous)
    assert (truth.kind == 1).sum() == 3 and (truth.kind == 2).sum() == 2
    assert not truth.sample.vacuum[truth.anomalous].any()
    energy = signal.axes_manager[-1].axis
    hump = (signal.data - clean.data)[truth.kind == 1].mean(axis=0)
    assert abs(energy[np.argmax(np.convolve(hump, np.ones(41) / 41, "same"))] - 6.0) < 0.5


def test_diffraction_anomalies_plant_on_crystal():
    signal, truth = diffraction_anomalies((12, 12), detector_shape=(32, 32), n_rotated=3,
                                          tilted_block=(2, 3), random_state=2)
    assert signal.data.shape == (12, 12, 32, 32)
    assert (truth.kind == 1).sum() == 3 and (truth.kind == 2).sum() == 6
    assert not truth.sample.vacuum[truth.anomalous].any()
    assert truth.kinds == ("rotated", "tilted")
    rows, cols = np.nonzero(truth.kind == 2)
    assert np.ptp(rows) == 1 and np.ptp(cols) == 2


def test_bad_parameters():
    with pytest.raises(ValueError, match="tilt_strength"):
        diffraction_anomalies((8, 8), detector_shape=(32, 32), tilt_strength=1.5)
    with pytest.raises(ValueError, match="n_rotated=1000"):
        diffraction_anomalies((8, 8), detector_shape=(32, 32), n_rotated=1000)
