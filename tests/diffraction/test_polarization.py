"""Polar domains, signs with dose uncertainties and walls against the polar-bilayer truth."""

import numpy as np
import pytest
from scipy import ndimage

from stemml_core.diffraction import PolarizationResult, domain_walls, field_map, polarization_map
from stemml_core.synthetic import polar_bilayer
from stemml_core.synthetic.field import vacuum_scan


@pytest.fixture(scope="module")
def bilayer():
    """Default polar bilayer (32 x 32 at 0.5 nm, 1e6 electrons) with a flip, seed 0, rotation found."""
    signal, truth = polar_bilayer(flip=True, random_state=0)
    fields = field_map(signal, vacuum=truth.vacuum, progress=False)
    return truth, fields, polarization_map(fields, vacuum=truth.vacuum, random_state=0)


def test_signs_and_walls_meet_the_accuracy_targets(bilayer):
    """Issue targets: sign right in at least 95 % of the domain positions; walls within one scan step.
    Measured (seed 0): 100 % right over the 94 % of domain positions outside the hole's 1 nm margin; every
    detected wall position within 0.48 nm (one step is 0.5 nm) of a wall line, and every true wall position
    within one step of a detected one."""
    truth, _, polar = bilayer
    sign = polar.sign.data
    inside = (truth.domains != 0) & ~truth.walls
    assigned = sign != 0
    assert assigned[inside].mean() > 0.9
    assert (sign[inside & assigned] == truth.domains[inside & assigned]).mean() >= 0.95
    walls = polar.walls.data
    step = truth.params["scan_step_nm"]
    assert (truth.wall_distance[walls] <= step).mean() >= 0.95
    to_detected = ndimage.distance_transform_edt(~walls)  # in steps
    assert (to_detected[truth.walls & assigned] <= 1).mean() >= 0.95


def test_every_large_domain_has_a_confident_sign(bilayer):
    _, _, polar = bilayer
    large = polar.size >= 10
    assert large.sum() >= 5
    assert (polar.confidence[large] == 1.0).all()
    assert (np.abs(polar.level[large]) > 10 * polar.level_error[large]).all()
    np.testing.assert_array_equal(np.sign(polar.level[large]), polar.domain_sign[large])
    assert polar.separation > 20 * polar.potential_noise
    assert polar.mean_field.shape == polar.mean_field_error.shape == (len(polar.level), 2)
    assert (polar.mean_field_error[large] > 0).all() and np.isfinite(polar.mean_field).all()


def test_maps_ids_and_arrays_are_consistent(bilayer):
    truth, fields, polar = bilayer
    assert isinstance(polar, PolarizationResult)
    ids = polar.domains.data
    assert set(np.unique(ids)) == set(range(len(polar.level) + 1))
    for k in range(1, len(polar.level) + 1):
        assert (polar.sign.data[ids == k] == polar.domain_sign[k - 1]).all()
        assert polar.size[k - 1] == (ids == k).sum()
    assert (polar.sign.data[truth.vacuum] == 0).all() and not polar.walls.data[truth.vacuum].any()
    for name in ("sign", "domains", "walls"):
        out = getattr(polar, name)
        assert out.data.shape == (32, 32)
        assert [(a.name, a.units, a.scale) for a in out.axes_manager.navigation_axes] == [
            ("x", "nm", 0.5), ("y", "nm", 0.5)]
    with pytest.raises(ValueError, match="read-only"):
        polar.level[0] = 0.0


def test_level_error_matches_the_scatter_over_dose_redraws():
    """The predicted error of one domain's level against its scatter over 6 independent noise seeds (each
    with its own descan fit and rotation). Measured: predicted 0.127 V nm, scatter 0.135 over 8 seeds."""
    levels, predicted = [], []
    for seed in range(6):
        signal, truth = polar_bilayer(random_state=seed)
        fields = field_map(signal, vacuum=truth.vacuum, progress=False)
        polar = polarization_map(fields, vacuum=truth.vacuum, n_draws=40, random_state=seed)
        k = polar.domains.data[10, 4] - 1  # a fixed - domain of about 78 positions, away from nodes
        levels.append(polar.level[k])
        predicted.append(polar.level_error[k])
    scatter = np.std(levels, ddof=1)
    assert 0.5 < scatter / np.mean(predicted) < 2.0


def test_same_seed_same_result(bilayer):
    truth, fields, polar = bilayer
    again = polarization_map(fields, vacuum=truth.vacuum, random_state=0)
    np.testing.assert_array_equal(again.level_error, polar.level_error)
    np.testing.assert_array_equal(again.sign.data, polar.sign.data)


def test_domain_walls_mark_both_sides():
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [-1, -1, 1, 1]])
    np.testing.assert_array_equal(domain_walls(labels).astype(int), [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])


def test_no_domain_contrast_is_refused():
    _, truth = polar_bilayer((12, 12), scan_step=1.0, dose=None)
    fields = field_map(vacuum_scan(truth, dose=1e6, random_state=0), scan_rotation=-25.0, progress=False)
    with pytest.raises(ValueError, match=r"no domain contrast: the two potential levels are .* expected at least 4"):
        polarization_map(fields, random_state=0, n_draws=10)


def test_bad_arguments_are_named(bilayer):
    truth, fields, _ = bilayer
    with pytest.raises(ValueError, match="result is a ndarray; expected the FieldResult of field_map"):
        polarization_map(np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"n_draws=1; expected an integer of at least 2"):
        polarization_map(fields, n_draws=1)
    with pytest.raises(ValueError, match=r"vacuum is a bool array of shape \(4, 4\); expected a bool mask"):
        polarization_map(fields, vacuum=np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match=r"margin=-1.0 nm; expected a non-negative distance"):
        polarization_map(fields, margin=-1.0)
    with pytest.raises(ValueError, match=r"0 scan positions lie outside the vacuum and its 1.0 nm margin"):
        polarization_map(fields, vacuum=np.ones((32, 32), bool), n_draws=2)
