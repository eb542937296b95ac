"""Primitive basis choice, indexing and the batched per-pattern basis fit."""

import numpy as np
import pytest

from stemml_core.diffraction.lattice import FitStatus, fit_basis, index_vectors, lattice_basis, reduce_basis
from stemml_core.synthetic.diffraction import hexagonal_reciprocal_basis

HEXAGONAL = hexagonal_reciprocal_basis(0.316)  # MoS2, 1/nm
RECTANGULAR = np.array([[2.5, 0.0], [0.0, -4.0]])  # g1 along +kx, g2 up the display (counter-clockwise)


def lattice_points(basis, reach, *, exclude_origin=True):
    """Every lattice vector within ``reach`` (units of ``basis``), (m, 2), and its indices."""
    n = 8
    hk = np.array([(h, k) for h in range(-n, n + 1) for k in range(-n, n + 1)])
    vectors = hk @ basis.T
    keep = np.linalg.norm(vectors, axis=1) <= reach
    if exclude_origin:
        keep &= (hk != 0).any(axis=1)
    return vectors[keep], hk[keep]


def cross(a, b):
    return a[0] * b[1] - a[1] * b[0]


@pytest.mark.parametrize("orientation", [0.0, 17.0, 45.0, -100.0])
def test_reduce_basis_gives_the_canonical_hexagonal_pair(orientation):
    basis = hexagonal_reciprocal_basis(0.316, orientation)
    for mix in ([[2, 1], [-1, -1]], [[1, 0], [-3, 1]], [[0, 1], [1, 0]], [[-1, 0], [0, -1]]):
        reduced = reduce_basis(basis @ np.array(mix))
        g1, g2 = reduced[:, 0], reduced[:, 1]
        assert abs(np.linalg.det(reduced)) == pytest.approx(abs(np.linalg.det(basis)))
        assert np.linalg.norm(g1) == pytest.approx(np.linalg.norm(g2))
        assert np.degrees(np.arccos(g1 @ g2 / (g1 @ g1))) == pytest.approx(60.0)
        assert cross(g1, g2) < 0  # g2 counter-clockwise of g1 looking down the beam (ky points down)
        angle = np.degrees(np.arctan2(-g1[1], g1[0]))
        assert abs(angle) <= 30.0 + 1e-9  # the shortest vector closest to +kx
    if orientation == 0.0:
        np.testing.assert_allclose(reduce_basis(basis @ np.array([[2, 1], [-1, -1]])), basis, atol=1e-12)


def test_reduce_basis_gives_the_canonical_rectangular_pair():
    reduced = reduce_basis(RECTANGULAR @ np.array([[1, 3], [1, 4]]))
    np.testing.assert_allclose(reduced, RECTANGULAR, atol=1e-12)
    flipped = reduce_basis(np.array([[0.0, -2.5], [4.0, 0.0]]))  # same lattice, other order and signs
    np.testing.assert_allclose(flipped, RECTANGULAR, atol=1e-12)


def test_reduce_basis_rejects_a_singular_basis():
    with pytest.raises(ValueError, match="is not a non-singular"):
        reduce_basis([[1.0, 2.0], [2.0, 4.0]])


@pytest.mark.parametrize("basis", [HEXAGONAL, RECTANGULAR, hexagonal_reciprocal_basis(0.315, 23.0)],
                         ids=["hexagonal", "rectangular", "hexagonal-23deg"])
def test_lattice_basis_is_primitive(basis):
    """All orders, noisy positions and intensities that fall with |g|: the primitive pair wins."""
    vectors, _ = lattice_points(basis, 3.2 * np.linalg.norm(basis, axis=0).max())
    rng = np.random.default_rng(0)
    noisy = vectors + rng.normal(scale=0.01, size=vectors.shape)
    weights = np.exp(-(np.linalg.norm(vectors, axis=1) / 6) ** 2)
    found = lattice_basis(noisy, weights)
    np.testing.assert_allclose(found, reduce_basis(basis), atol=0.01)
    assert abs(np.linalg.det(found)) == pytest.approx(abs(np.linalg.det(basis)), rel=0.01)


def test_lattice_basis_picks_the_primitive_cell_of_a_centred_lattice():
    """A centred rectangular lattice: the conventional rectangle is not primitive (half the
    points have half-integer indices on it); the rhombic primitive pair has half its area."""
    conventional = np.array([[3.0, 0.0], [0.0, -5.0]])
    primitive = conventional @ np.array([[1, 0.5], [0, 0.5]])
    vectors, _ = lattice_points(primitive, 12.0)
    found = lattice_basis(vectors)
    assert abs(np.linalg.det(found)) == pytest.approx(abs(np.linalg.det(conventional)) / 2)
    _, on_lattice = index_vectors(vectors, found)
    assert on_lattice.all()


def test_lattice_basis_ignores_a_spurious_vector():
    vectors, _ = lattice_points(HEXAGONAL, 12.0)
    with_spurious = np.vstack([vectors, HEXAGONAL[:, 0] * 0.45])  # shorter than any reflection
    np.testing.assert_allclose(lattice_basis(with_spurious), HEXAGONAL, atol=1e-9)


def test_lattice_basis_needs_two_directions():
    with pytest.raises(ValueError, match="without two non-collinear ones"):
        lattice_basis(np.array([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]]))


def test_index_vectors():
    vectors = np.array([[0.0, 0.0], [1.0, 1.0], [2.1, -0.9], [0.5, 0.0]]) @ HEXAGONAL.T
    indices, on_lattice = index_vectors(vectors, HEXAGONAL, tolerance=0.2)
    np.testing.assert_array_equal(indices, [[0, 0], [1, 1], [2, -1], [0, 0]])
    np.testing.assert_array_equal(on_lattice, [True, True, True, False])


def test_fit_basis_recovers_every_pattern_in_one_batch():
    rng = np.random.default_rng(1)
    n = 50
    bases = HEXAGONAL + rng.normal(scale=0.05, size=(n, 2, 2))
    offsets = rng.normal(scale=0.3, size=(n, 2))
    _, all_hk = lattice_points(HEXAGONAL, 12.0, exclude_origin=False)
    vectors, indices, weights, pattern = [], [], [], []
    for p in range(n):  # a different subset of disks in each pattern
        hk = all_hk[rng.random(len(all_hk)) < 0.6]
        vectors.append(offsets[p] + hk @ bases[p].T)
        indices.append(hk)
        weights.append(rng.uniform(1, 100, len(hk)))
        pattern.append(np.full(len(hk), p))
    fit = fit_basis(np.vstack(vectors), np.vstack(indices), np.concatenate(weights), np.concatenate(pattern), n)
    assert (fit.status == FitStatus.OK).all()
    np.testing.assert_allclose(fit.basis, bases, atol=1e-10)
    np.testing.assert_allclose(fit.offset, offsets, atol=1e-10)
    np.testing.assert_allclose(fit.residual, 0.0, atol=1e-10)
    np.testing.assert_array_equal(fit.n_disks, [len(i) for i in indices])


def test_fit_basis_weights_follow_the_intensities():
    """A misplaced weak disk moves the basis in proportion to its weight."""
    vectors, hk = lattice_points(HEXAGONAL, 8.0, exclude_origin=False)
    moved = vectors.copy()
    moved[np.flatnonzero((hk == [1, 0]).all(axis=1))] += [0.05, 0.0]
    pattern = np.zeros(len(vectors), dtype=int)
    weak = np.where((hk == [1, 0]).all(axis=1), 1e-6, 1.0)
    fit = fit_basis(moved, hk, weak, pattern, 1)
    np.testing.assert_allclose(fit.basis[0], HEXAGONAL, atol=1e-6)
    fit = fit_basis(moved, hk, np.ones(len(vectors)), pattern, 1)
    assert np.abs(fit.basis[0] - HEXAGONAL).max() > 1e-3
    assert fit.residual[0] > 0


def test_unfittable_patterns_are_nan_with_a_reason():
    g1, g2 = HEXAGONAL[:, 0], HEXAGONAL[:, 1]
    vectors = np.array([[0, 0], g1, -g1, [0, 0], [0, 0], g1, g2])
    indices = np.array([[0, 0], [1, 0], [-1, 0], [0, 0], [0, 0], [1, 0], [0, 1]])
    pattern = np.array([0, 0, 0, 1, 3, 3, 3])  # collinear, direct beam only, nothing, exactly determined
    fit = fit_basis(vectors, indices, np.ones(7), pattern, 4)
    np.testing.assert_array_equal(
        fit.status, [FitStatus.TOO_FEW_INDEXED, FitStatus.NO_DISKS, FitStatus.NO_DISKS, FitStatus.OK]
    )
    assert np.isnan(fit.basis[:3]).all() and np.isnan(fit.residual[:3]).all()
    np.testing.assert_allclose(fit.basis[3], HEXAGONAL, atol=1e-12)
    np.testing.assert_array_equal(fit.n_disks, [3, 1, 0, 3])
    with pytest.raises(ValueError, match="read-only"):
        fit.basis[0, 0, 0] = 1.0
