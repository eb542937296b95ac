"""The feature sample: planted features, their truth maps and masks, and the feature-free pixels."""

import numpy as np
import pytest

from stemml_core.synthetic.features import FEATURES, FeatureTruth, feature_sample


@pytest.fixture(scope="module")
def sample():
    return feature_sample((8, 12), random_state=0)


def test_layout_and_truth(sample):
    signal, truth = sample
    assert isinstance(truth, FeatureTruth)
    assert signal.data.shape == (8, 12, truth.lowloss.energy.size)
    assert set(truth.features) == set(FEATURES)
    vacuum = truth.vacuum
    assert vacuum[:, :2].all() and not vacuum[:, 2:].any()  # 20 % of the columns
    for name, feature in truth.features.items():
        mask = feature["mask"]
        assert mask.any() and not mask[vacuum].any(), name
        assert np.all(np.isnan(feature["energy"][~mask])) and np.all(np.isfinite(feature["energy"][mask]))
        assert np.all(feature["snr"][mask] > 0) and np.all(feature["snr"][~mask] == 0)
    # the defect state: a 3 x 3 patch plus two single pixels, in the middle of the 1.5 eV gap
    assert truth.features["defect"]["mask"].sum() == 11
    np.testing.assert_allclose(truth.features["defect"]["energy"][truth.features["defect"]["mask"]], 0.8)
    # the surface plasmon at Ep / sqrt 2 within 4 pixels of the edge; the bulk plasmon everywhere on the flake
    surface = truth.features["surface"]
    np.testing.assert_allclose(surface["energy"][surface["mask"]], 20.0 / np.sqrt(2.0))
    assert surface["mask"][:, 2:6].all() and not surface["mask"][:, 6:].any()
    assert truth.features["bulk"]["mask"].sum() == (~vacuum).sum()
    # excitons in the upper half, shifting by up to 20 meV
    a = truth.features["A"]
    assert a["mask"][:4, 2:].all() and not a["mask"][4:].any()
    assert 0.015 < np.nanmax(a["energy"]) - np.nanmin(a["energy"]) <= 0.02 + 1e-9
    # feature-free: vacuum and the lower half away from the edge and the defects
    free = truth.feature_free
    for name in ("defect", "A", "B", "interband", "surface"):
        assert not (free & truth.features[name]["mask"]).any(), name
    assert free[vacuum].all() and free[~vacuum].any()


def test_planted_features_are_in_the_loss_function(sample):
    _, truth = sample
    energy = truth.lowloss.energy
    r, c = np.argwhere(truth.features["defect"]["mask"] & ~truth.features["A"]["mask"])[0]
    free = np.argwhere(truth.feature_free & ~truth.vacuum)[0]
    at = np.argmin(np.abs(energy - 0.8))
    # at 0.8 eV, below the gap, the defect state stands above the Drude tail of a feature-free pixel
    added = truth.lowloss.loss_function[r, c, at] - truth.lowloss.loss_function[free[0], free[1], at]
    assert added == pytest.approx(0.15, rel=0.02)


def test_snr_of_the_default_sample_is_above_five():
    # Measured on (16, 24), seed 0: smallest snr defect 8.3, A 21, B 20, interband 19, surface 33, bulk 267.
    _, truth = feature_sample((8, 12), random_state=0)
    for name, feature in truth.features.items():
        assert feature["snr"][feature["mask"]].min() > 5, name


def test_noise_free_and_seeded():
    s1, t1 = feature_sample((6, 10), random_state=3)
    s2, _ = feature_sample((6, 10), random_state=3)
    np.testing.assert_array_equal(s1.data, s2.data)
    quiet, truth = feature_sample((6, 10), dose=None)
    assert np.isinf(truth.features["A"]["snr"][truth.features["A"]["mask"]]).all()
    np.testing.assert_allclose(quiet.data, (truth.lowloss.zlp + truth.lowloss.inelastic).astype(np.float32))


@pytest.mark.parametrize("kwargs, match", [
    (dict(nav_shape=(4, 12)), "nav_shape"),
    (dict(exciton_amplitude=-1.0), "exciton_amplitude"),
    (dict(plasmon_energy=2.0), "plasmon_energy"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        feature_sample(**kwargs)
