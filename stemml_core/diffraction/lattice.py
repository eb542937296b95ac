"""Reciprocal lattice of the disks: primitive basis, indexing and a batched per-pattern fit.

Conventions, shared with :mod:`stemml_core.synthetic.diffraction`: reciprocal vectors are in
``(kx, ky)`` components of the scan frame, 1/nm (no factor 2 pi), with ``ky`` growing downwards
as the detector rows do; a basis ``G`` holds the basis vectors as *columns*, ``G = [g1 g2]``,
so a disk of indices ``(h, k)`` lies at ``h g1 + k g2`` from the direct beam. Counter-clockwise
looking down the beam is counter-clockwise on an ``imshow`` display; with ``ky`` pointing down,
``g2`` counter-clockwise of ``g1`` means ``g1x g2y - g1y g2x < 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from itertools import combinations

import numpy as np

from stemml_core._frozen import ReadOnlyArrays

__all__ = ["FitStatus", "LatticeFit", "fit_basis", "index_vectors", "lattice_basis", "reduce_basis"]


class FitStatus(IntEnum):
    """Why a pattern's basis is (or is not) fitted; the reason code of every NaN in the maps."""

    OK = 0
    """Fitted."""
    NO_DISKS = 1
    """No Bragg disk found beside the brightest disk: vacuum, or disks too weak for the thresholds."""
    TOO_FEW_INDEXED = 2
    """Bragg disks found, but fewer than two non-collinear ones lie on the lattice."""


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a_x b_y - a_y b_x``: negative when ``b`` is counter-clockwise of ``a`` looking down the beam."""
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _display_angle(vector: np.ndarray) -> np.ndarray:
    """Angle counter-clockwise from +kx looking down the beam, rad in (-pi, pi]."""
    return np.arctan2(-vector[..., 1], vector[..., 0])


def reduce_basis(basis, *, length_tolerance: float = 0.05) -> np.ndarray:
    """The reduced, canonically oriented basis of the lattice that ``basis`` spans.

    Parameters
    ----------
    basis : array_like
        ``(2, 2)`` columns ``g1``, ``g2``, any units.
    length_tolerance : float
        Vectors whose lengths differ by less than this fraction count as equally short (strain
        of a few % must not change the choice).

    Returns
    -------
    numpy.ndarray
        ``(2, 2)`` basis of the same lattice (same ``|det|``): ``g1`` is, among the shortest
        lattice vectors, the one closest in angle to +kx; ``g2`` is the shortest vector
        counter-clockwise of ``g1`` that forms a primitive pair with it, the one at the smaller
        angle when two are equally short. Hexagonal: ``g2`` at 60 degrees from ``g1``;
        rectangular: at 90 degrees.

    Raises
    ------
    ValueError
        ``basis`` is singular.

    Examples
    --------
    >>> from stemml_core.synthetic.diffraction import hexagonal_reciprocal_basis
    >>> g0 = hexagonal_reciprocal_basis(0.316)
    >>> mixed = g0 @ np.array([[2, 1], [-1, -1]])  # (2g1 - g2, g1 - g2): same lattice
    >>> bool(np.allclose(reduce_basis(mixed), g0))
    True
    """
    basis = np.asarray(basis, dtype=float)
    if basis.shape != (2, 2) or not abs(np.linalg.det(basis)) > 0 or not np.isfinite(basis).all():
        raise ValueError(f"basis {basis.tolist()} is not a non-singular (2, 2) array of columns g1, g2.")
    g1, g2 = basis[:, 0], basis[:, 1]
    if g1 @ g1 > g2 @ g2:
        g1, g2 = g2, g1
    while True:  # Lagrange-Gauss reduction
        g2 = g2 - np.rint(g1 @ g2 / (g1 @ g1)) * g1
        if g2 @ g2 >= g1 @ g1:
            break
        g1, g2 = g2, g1
    area = abs(_cross(g1, g2))
    combos = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1) if i or j], dtype=float)
    short = combos @ np.stack([g1, g2])  # the lattice's 8 shortest candidates, (8, 2)
    length = np.linalg.norm(short, axis=1)
    shortest = length <= (1 + length_tolerance) * length.min()
    first = short[shortest][np.argmin(np.abs(_display_angle(short[shortest])))]
    partner = np.isclose(np.abs(_cross(first, short)), area, rtol=1e-6) & (_cross(first, short) < 0)
    candidates = short[partner]
    lengths = np.linalg.norm(candidates, axis=1)
    near = lengths <= (1 + length_tolerance) * lengths.min()
    angle = np.arccos(np.clip(candidates[near] @ first / (lengths[near] * np.linalg.norm(first)), -1, 1))
    second = candidates[near][np.argmin(angle)]
    return np.stack([first, second], axis=1)


def index_vectors(vectors, basis, *, tolerance: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Integer indices ``(h, k)`` of reciprocal vectors on a basis.

    Parameters
    ----------
    vectors : array_like
        ``(m, 2)`` vectors ``(kx, ky)`` from the direct beam, units of ``basis``.
    basis : array_like
        ``(2, 2)`` columns ``g1``, ``g2``.
    tolerance : float
        Largest distance of ``G^-1 v`` from the nearest integer pair, per index.

    Returns
    -------
    indices : numpy.ndarray
        ``(m, 2)`` int, the nearest ``(h, k)``.
    on_lattice : numpy.ndarray
        ``(m,)`` bool, True where both indices are within ``tolerance`` of integers.
    """
    fractional = np.linalg.solve(np.asarray(basis, dtype=float), np.asarray(vectors, dtype=float).reshape(-1, 2).T).T
    indices = np.rint(fractional)
    on_lattice = (np.abs(fractional - indices) <= tolerance).all(axis=1)
    return indices.astype(int), on_lattice


def lattice_basis(vectors, weights=None, *, tolerance: float = 0.2, n_shortest: int = 12) -> np.ndarray:
    """Primitive reciprocal basis of a set of disk vectors, chosen from the lattice geometry.

    Parameters
    ----------
    vectors : array_like
        ``(m, 2)`` Bragg-disk vectors ``(kx, ky)`` from the direct beam (the direct beam itself
        left out), e.g. the disks of a mean pattern, 1/nm.
    weights : array_like, optional
        ``(m,)`` disk intensities; default equal weights.
    tolerance : float
        Indexing tolerance, as in :func:`index_vectors`.
    n_shortest : int
        Number of shortest vectors whose pairs are tried.

    Returns
    -------
    numpy.ndarray
        ``(2, 2)`` basis, columns ``g1``, ``g2``, reduced and oriented by :func:`reduce_basis`,
        then refined by weighted least squares on every vector it indexes.

    Raises
    ------
    ValueError
        Fewer than two non-collinear vectors.

    Notes
    -----
    Every non-collinear pair of the ``n_shortest`` shortest vectors is a candidate basis; the
    winner indexes the most intensity and, among those that index as much, has the largest cell
    ``|det G|``. A pair that is not primitive (such as ``g1`` and ``2 g2``) leaves disks with
    fractional indices and loses; a basis of a finer lattice (from a spurious short vector)
    indexes everything too but has a smaller cell and loses. Choosing a non-primitive pair for a
    hexagonal lattice is a known source of a wrong strain.

    Examples
    --------
    >>> from stemml_core.synthetic.diffraction import hexagonal_reciprocal_basis
    >>> g0 = hexagonal_reciprocal_basis(0.316)
    >>> hk = np.array([(h, k) for h in range(-2, 3) for k in range(-2, 3) if h or k])
    >>> bool(np.allclose(lattice_basis(hk @ g0.T), g0))
    True
    """
    vectors = np.asarray(vectors, dtype=float).reshape(-1, 2)
    weights = np.ones(len(vectors)) if weights is None else np.asarray(weights, dtype=float)
    length = np.linalg.norm(vectors, axis=1)
    shortest = vectors[np.argsort(length)[:n_shortest]]
    best, best_score = None, (-np.inf, -np.inf)
    for a, b in combinations(shortest, 2):
        area = abs(_cross(a, b))
        if area < 0.2 * np.linalg.norm(a) * np.linalg.norm(b):  # closer than ~12 degrees to collinear
            continue
        _, on_lattice = index_vectors(vectors, np.stack([a, b], axis=1), tolerance=tolerance)
        score = (round(weights[on_lattice].sum() / weights.sum(), 6), area)
        if score > best_score:
            best, best_score = np.stack([a, b], axis=1), score
    if best is None:
        raise ValueError(
            f"lattice_basis got {len(vectors)} vectors without two non-collinear ones; expected the Bragg "
            "disks of a crystal (at least two non-collinear reflections)."
        )
    basis = reduce_basis(best)
    indices, on_lattice = index_vectors(vectors, basis, tolerance=tolerance)
    h, v, w = indices[on_lattice].astype(float), vectors[on_lattice], weights[on_lattice]
    return np.linalg.solve((h * w[:, None]).T @ h, (h * w[:, None]).T @ v).T


@dataclass(frozen=True)
class LatticeFit(ReadOnlyArrays):
    """Per-pattern least-squares bases from :func:`fit_basis`.

    Attributes
    ----------
    basis : numpy.ndarray
        ``(n, 2, 2)`` columns ``g1``, ``g2`` (units of the vectors); NaN where not ``OK``.
    offset : numpy.ndarray
        ``(n, 2)`` fitted position of the ``(0, 0)`` lattice point, units of the vectors; NaN
        where not ``OK``.
    residual : numpy.ndarray
        ``(n,)`` intensity-weighted root-mean-square distance of the disks from the fitted
        lattice points, units of the vectors; NaN where not ``OK``.
    n_disks : numpy.ndarray
        ``(n,)`` int, disks used (the ``(0, 0)`` disk included).
    status : numpy.ndarray
        ``(n,)`` uint8 :class:`FitStatus` codes.
    covariance : numpy.ndarray
        ``(n, 2, 2)`` covariance of ``(G[c, 0], G[c, 1])``, the same for both components ``c``
        (units of the vectors squared; the two components are uncorrelated): ``s² (X^T W X)^-1``
        of the weighted least squares, with the weights' scale ``s²`` estimated from the
        residuals; NaN where not ``OK`` or with fewer than four disks.
    """

    basis: np.ndarray
    offset: np.ndarray
    residual: np.ndarray
    n_disks: np.ndarray
    status: np.ndarray
    covariance: np.ndarray


def fit_basis(vectors, indices, weights, pattern, n_patterns: int) -> LatticeFit:
    """Weighted least-squares basis and offset of every pattern, in one batched solve.

    Parameters
    ----------
    vectors : array_like
        ``(m, 2)`` disk vectors ``(kx, ky)`` of all patterns, 1/nm (any origin: the offset is
        fitted).
    indices : array_like
        ``(m, 2)`` int indices ``(h, k)`` of each disk (each ``(pattern, h, k)`` at most once).
    weights : array_like
        ``(m,)`` positive weights, e.g. disk intensities (inverse position variance of a disk
        whose noise is Poisson).
    pattern : array_like
        ``(m,)`` int pattern of each disk, in ``[0, n_patterns)``.
    n_patterns : int
        Number of patterns.

    Returns
    -------
    LatticeFit
        Basis, offset, residual, number of disks, status and basis covariance per pattern.

    Notes
    -----
    Each pattern's model is ``v_i = o + h_i g1 + k_i g2``: six unknowns (``o``, ``G``) from all
    its disks, every order, weighted by ``w_i``. The normal equations of all patterns are summed
    with ``numpy.bincount`` and solved as one ``(n, 3, 3)`` batch, no loop over patterns. The
    free offset ``o`` makes ``G`` independent of where the direct beam was put (descan, or a
    pattern shifted as a whole by a specimen field). A pattern is ``OK`` when its indexed disks
    other than ``(0, 0)`` span two dimensions.
    """
    vectors = np.asarray(vectors, dtype=float).reshape(-1, 2)
    indices = np.asarray(indices, dtype=float).reshape(-1, 2)
    weights = np.asarray(weights, dtype=float)
    pattern = np.asarray(pattern, dtype=int)
    design = np.column_stack([np.ones(len(vectors)), indices])  # (m, 3): 1, h, k

    def total(values):
        return np.bincount(pattern, weights=values, minlength=n_patterns)

    normal = np.empty((n_patterns, 3, 3))
    right = np.empty((n_patterns, 3, 2))
    for i in range(3):
        for j in range(3):
            normal[:, i, j] = total(weights * design[:, i] * design[:, j])
        for j in range(2):
            right[:, i, j] = total(weights * design[:, i] * vectors[:, j])
    bragg = total(((indices != 0).any(axis=1)).astype(float))
    # spread of the indices about their weighted mean: zero determinant when collinear
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = normal[:, 0, 1:] / normal[:, 0, :1]
        spread = normal[:, 1:, 1:] / normal[:, :1, :1] - mean[:, :, None] * mean[:, None, :]
        spans = np.linalg.det(spread) > 1e-6 * np.trace(spread, axis1=1, axis2=2) ** 2
    status = np.where(bragg == 0, FitStatus.NO_DISKS, np.where(spans, FitStatus.OK, FitStatus.TOO_FEW_INDEXED))
    ok = status == FitStatus.OK
    solution = np.full((n_patterns, 3, 2), np.nan)
    solution[ok] = np.linalg.solve(normal[ok], right[ok])
    offset, basis = solution[:, 0], np.swapaxes(solution[:, 1:], 1, 2)  # G[:, c] = g_c
    misfit = vectors - offset[pattern] - np.einsum("mij,mj->mi", basis[pattern], indices)
    n_disks = np.bincount(pattern, minlength=n_patterns)
    weighted_squares = total(weights * (misfit**2).sum(axis=1))
    covariance = np.full((n_patterns, 2, 2), np.nan)
    determined = ok & (n_disks > 3)
    # two coordinates per disk, three unknowns (offset, g1, g2) per coordinate
    scale = weighted_squares[determined] / (2 * (n_disks[determined] - 3))
    covariance[determined] = scale[:, None, None] * np.linalg.inv(normal[determined])[:, 1:, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        residual = np.sqrt(weighted_squares / normal[:, 0, 0])
    return LatticeFit(
        basis=basis,
        offset=offset,
        residual=np.where(ok, residual, np.nan),
        n_disks=n_disks,
        status=status.astype(np.uint8),
        covariance=covariance,
    )
