"""Strain and rotation maps from nanobeam 4D-STEM: signal → origins → disks → basis → strain.

Conventions (those of :mod:`stemml_core.synthetic.diffraction`, which the tests check every
component against):

- **Frames.** The scan frame has x along the fast scan axis (columns) and y along the rows,
  ``(x, y, beam)`` right-handed when the scan is displayed with ``imshow`` as seen looking down
  the beam. Vectors and tensors are in ``(x, y)`` component order; detector positions are
  ``(row, col)`` px. A reciprocal vector ``g`` of the scan frame appears on the detector at
  ``k_det = R(scan_rotation) g``, ``R(phi) = [[cos phi, sin phi], [-sin phi, cos phi]]``
  (counter-clockwise); the analysis undoes it with the ``scan_rotation`` it is given. Each
  detector axis uses its own calibration (non-square pixels).
- **Bases.** ``G = [g1 g2]`` holds the reciprocal basis vectors as columns, 1/nm, no factor
  2 pi. The deformation relative to the reference basis ``G0`` is ``F = (G0 G^-1)^T`` (from
  ``G = F^-T G0``).
- **Strain** ``eps = sym(F) - I``: ``exx = F[0, 0] - 1``, ``eyy = F[1, 1] - 1``,
  ``exy = (F[0, 1] + F[1, 0]) / 2``; dimensionless (0.01 = 1 %), tensile positive, ``exy`` the
  tensor shear (half the engineering shear).
- **Rotation** ``theta = (F[0, 1] - F[1, 0]) / 2``, radians, counter-clockwise looking down the
  beam (counter-clockwise on the ``imshow`` display), in the scan frame.
- **Tilt.** A pattern taken off the zone axis is flagged from the intensities of its Friedel
  pairs (:func:`friedel_dipole`), not fitted as strain: see ``StrainResult.tilted``.
- **Reference.** ``G0`` is the element-wise median of the fitted bases over a reference region
  (all fitted patterns by default, a mask, or the region :func:`reference_region` chooses from a
  segmentation of the patterns), or a basis given by the caller.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from hyperspy.signal import BaseSignal
from scipy import ndimage

from stemml_core._frozen import ReadOnlyArrays
from stemml_core.blocks import check_workers, compute_map, map_pixels, navigation_map
from stemml_core.diffraction.disks import direct_beam, disk_radius, find_disks, fit_descan, probe_template
from stemml_core.diffraction.lattice import FitStatus, fit_basis, index_vectors, lattice_basis
from stemml_core.io import InputError, load_4dstem
from stemml_core.segment import PatternSegmentation

__all__ = [
    "StrainResult",
    "friedel_dipole",
    "plot_strain",
    "reference_region",
    "strain_components",
    "strain_map",
    "strain_uncertainty",
]

_SAMPLE_SIDE = 16
"""The global steps (disk radius, template, lattice) read a grid of at most 16 x 16 patterns."""

_N_OUTPUTS = 16  # per pattern: G (4), origin (2), residual, n_disks, status, covariance of G's rows (3),
# Friedel dipole (2), its chi-square, Friedel pairs


def _rotation(angle_deg: float) -> np.ndarray:
    """``R(phi)`` of the module docstring, counter-clockwise looking down the beam."""
    c, s = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    return np.array([[c, s], [-s, c]])


def strain_components(basis, reference_basis) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Strain and rotation of reciprocal bases relative to a reference basis.

    Parameters
    ----------
    basis : array_like
        ``(..., 2, 2)`` bases, columns ``g1``, ``g2`` in ``(kx, ky)`` of the scan frame, 1/nm.
    reference_basis : array_like
        ``(2, 2)`` basis of the unstrained reference, same convention and indexing.

    Returns
    -------
    exx, eyy, exy : numpy.ndarray
        ``(...)`` strain, dimensionless (0.01 = 1 %), tensile positive, ``exy`` the tensor shear.
    theta : numpy.ndarray
        ``(...)`` rotation, rad, counter-clockwise looking down the beam.

    Notes
    -----
    ``F = (G0 G^-1)^T``, ``eps = sym(F) - I``, ``theta = (F[0, 1] - F[1, 0]) / 2`` (see the
    module docstring). The result does not depend on which primitive basis indexes the disks
    as long as ``basis`` and ``reference_basis`` use the same one.

    Examples
    --------
    >>> from stemml_core.synthetic.diffraction import hexagonal_reciprocal_basis
    >>> g0 = hexagonal_reciprocal_basis(0.316)
    >>> stretched = np.linalg.inv(np.diag([1.01, 1.0])).T @ g0  # G = F^-T G0, exx = 1 %
    >>> [round(float(c), 6) + 0.0 for c in strain_components(stretched, g0)]
    [0.01, 0.0, 0.0, 0.0]
    """
    basis = np.asarray(basis, dtype=float)
    deformation = np.swapaxes(np.asarray(reference_basis, dtype=float) @ np.linalg.inv(basis), -1, -2)
    exx = deformation[..., 0, 0] - 1
    eyy = deformation[..., 1, 1] - 1
    exy = (deformation[..., 0, 1] + deformation[..., 1, 0]) / 2
    theta = (deformation[..., 0, 1] - deformation[..., 1, 0]) / 2
    return exx, eyy, exy, theta


def strain_uncertainty(basis, covariance, reference_basis) -> tuple[np.ndarray, ...]:
    """Standard deviations of exx, eyy, exy and theta from the covariance of the fitted bases.

    Parameters
    ----------
    basis : array_like
        ``(..., 2, 2)`` fitted bases ``G`` (1/nm), as for :func:`strain_components`.
    covariance : array_like
        ``(..., 2, 2)`` covariance of each row ``(G[c, 0], G[c, 1])`` of ``G`` (1/nm²), the rows
        uncorrelated (:attr:`~stemml_core.diffraction.lattice.LatticeFit.covariance`); or
        ``(..., 4, 4)``, the full covariance of ``G`` row-major (``G[0, 0], G[0, 1], G[1, 0],
        G[1, 1]``), as the joint bilayer fit gives.
    reference_basis : array_like
        ``(2, 2)`` reference ``G0``, taken as exact (a median over many patterns).

    Returns
    -------
    tuple of numpy.ndarray
        ``(...)`` standard deviations of exx, eyy, exy (dimensionless) and theta (rad), to first
        order: with ``F^T = G0 G^-1``, ``dF^T = -G0 G^-1 dG G^-1``.
    """
    basis = np.asarray(basis, dtype=float)
    covariance = np.asarray(covariance, dtype=float)
    inverse = np.linalg.inv(basis)
    left = np.asarray(reference_basis, dtype=float) @ inverse  # G0 G^-1
    # gradient of every component with respect to every element G[c, j]: (..., 4 components, 2, 2)
    gradient = np.empty(basis.shape[:-2] + (4, 2, 2))
    for c in range(2):
        for j in range(2):
            # dF^T for dG = E_cj (1 at (c, j)): -(G0 G^-1)[:, c] (G^-1)[j, :]
            d_ft = -left[..., :, c, None] * inverse[..., None, j, :]
            gradient[..., :, c, j] = np.stack([d_ft[..., 0, 0], d_ft[..., 1, 1],
                                              (d_ft[..., 1, 0] + d_ft[..., 0, 1]) / 2,
                                              (d_ft[..., 1, 0] - d_ft[..., 0, 1]) / 2], axis=-1)
    if covariance.shape[-2:] == (4, 4):
        flat = gradient.reshape(gradient.shape[:-2] + (4,))  # element (c, j) at 2 c + j
        variance = np.einsum("...oa,...ab,...ob->...o", flat, covariance, flat)
    else:
        variance = np.einsum("...ocj,...jk,...ock->...o", gradient, covariance, gradient)
    return tuple(np.sqrt(variance[..., k]) for k in range(4))


def friedel_dipole(g, intensity, indices, pattern, n_patterns: int, *,
                   noise_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intensity dipole of the Friedel pairs of every pattern: the sign of a specimen tilt.

    Parameters
    ----------
    g : array_like
        ``(m, 2)`` reciprocal vector ``(kx, ky)`` of each disk, 1/nm (e.g. its indices on the
        reference basis).
    intensity : array_like
        ``(m,)`` integrated disk intensity, electron counts (their Poisson noise sets the noise
        level).
    indices : array_like
        ``(m, 2)`` int ``(h, k)`` of each disk; ``(h, k)`` and ``(-h, -k)`` of one pattern form
        a Friedel pair. Each ``(pattern, h, k)`` at most once; ``(0, 0)`` is ignored.
    pattern : array_like
        ``(m,)`` int pattern of each disk, in ``[0, n_patterns)``.
    n_patterns : int
        Number of patterns.
    noise_factor : float
        ``var(I) = noise_factor * I`` (counts²): 1 for a plain sum of counts, a little more for
        an amplitude fitted with a template (about 1.1 for the probe template of
        :func:`strain_map`, which computes it from the template).

    Returns
    -------
    dipole : numpy.ndarray
        ``(n, 2)`` dipole ``d`` (nm), ``(x, y)`` components: the asymmetry of a pair is
        ``r_g = (I_g - I_-g) / (I_g + I_-g) ~ d . g``. NaN with fewer than six pairs.
    chi2 : numpy.ndarray
        ``(n,)`` ``d^T C^-1 d`` with ``C`` the covariance of ``d`` from Poisson counts:
        chi-square with 2 degrees of freedom for an untilted pattern, so that
        ``exp(-chi2 / 2)`` is the probability of a dipole at least this large from noise alone.
        NaN where ``dipole`` is.
    n_pairs : numpy.ndarray
        ``(n,)`` int, Friedel pairs of each pattern.

    Notes
    -----
    On the zone axis a thin crystal's Friedel pairs are about equally bright; a tilt ``tau``
    moves the Ewald sphere by ``g . tau`` at ``g`` and by ``-g . tau`` at ``-g``, so one member
    of each pair brightens and the other dims, in proportion to ``g . tau`` for small tilts: a
    dipole along ``tau``. Per pattern a weighted least-squares fit ``r_g = d . g + c cos 3 psi +
    s sin 3 psi`` (``psi`` the angle of ``g``) over its pairs gives ``d``; the three-fold terms
    take up the Friedel asymmetry of a non-centrosymmetric layer (a three-fold pattern whose
    vector sum vanishes only over complete families of disks), so that it does not leak into
    ``d`` where some disks are missing. Weights ``1 / var(r_g)``, ``var(r_g) = 4 kappa I_g
    I_-g / (I_g + I_-g)^3`` from Poisson counts (``kappa`` the ``noise_factor``; a background
    under the disks adds noise that is not counted: the chi-square then comes out too large).
    For the generator's tilt model the brighter member of a pair is the one with ``g . tau <
    0``: ``d`` points about along ``-tau`` while ``|g . tau|`` stays below ``lambda |g|^2 / 2``
    (small tilts); for larger tilts ``r_g`` is no longer linear in ``g`` and only the size of the
    chi-square, not the direction, is to be relied on.

    Examples
    --------
    >>> hk = np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (2, 0), (-2, 0), (1, -1),
    ...                (-1, 1), (0, 2), (0, -2)])
    >>> g = hk.astype(float)
    >>> counts = 1e4 * (1 + 0.05 * g[:, 0])  # brighter towards +kx
    >>> dipole, chi2, pairs = friedel_dipole(g, counts, hk, np.zeros(12, int), 1)
    >>> np.round(dipole, 3), int(pairs[0]), bool(chi2[0] > 20)
    (array([[0.05, 0.  ]]), 6, True)
    """
    g = np.asarray(g, dtype=float).reshape(-1, 2)
    intensity = np.asarray(intensity, dtype=float)
    indices = np.asarray(indices, dtype=int).reshape(-1, 2)
    pattern = np.asarray(pattern, dtype=int)
    reach = int(np.abs(indices).max(initial=0)) + 1
    width = 2 * reach + 1

    def key(p, h, k):
        return (p * width + h + reach) * width + k + reach

    keys = key(pattern, indices[:, 0], indices[:, 1])
    order = np.argsort(keys)
    positive = np.flatnonzero((indices[:, 0] > 0) | ((indices[:, 0] == 0) & (indices[:, 1] > 0)))
    partner_key = key(pattern[positive], -indices[positive, 0], -indices[positive, 1])
    where = np.clip(np.searchsorted(keys[order], partner_key), 0, max(len(keys) - 1, 0))
    found = (keys[order][where] == partner_key) if len(keys) else np.zeros(0, bool)
    plus, minus = positive[found], order[where[found]]
    total = intensity[plus] + intensity[minus]
    usable = (intensity[plus] > 0) & (intensity[minus] > 0)
    plus, minus, total = plus[usable], minus[usable], total[usable]
    ratio = (intensity[plus] - intensity[minus]) / total
    weight = total**3 / (4 * noise_factor * intensity[plus] * intensity[minus])
    psi = np.arctan2(g[plus, 1], g[plus, 0])
    design = np.column_stack([g[plus], np.cos(3 * psi), np.sin(3 * psi)])
    owner = pattern[plus]

    def summed(values):
        return np.bincount(owner, weights=values, minlength=n_patterns)

    normal = np.empty((n_patterns, 4, 4))
    right = np.empty((n_patterns, 4))
    for i in range(4):
        right[:, i] = summed(weight * design[:, i] * ratio)
        for j in range(4):
            normal[:, i, j] = summed(weight * design[:, i] * design[:, j])
    n_pairs = np.bincount(owner, minlength=n_patterns)
    dipole = np.full((n_patterns, 2), np.nan)
    chi2 = np.full(n_patterns, np.nan)
    enough = n_pairs >= 6
    enough[enough] = np.linalg.cond(normal[enough]) < 1e12
    if enough.any():
        covariance = np.linalg.inv(normal[enough])[:, :2, :2]
        dipole[enough] = np.linalg.solve(normal[enough], right[enough][..., None])[:, :2, 0]
        chi2[enough] = np.einsum("ni,nij,nj->n", dipole[enough], np.linalg.inv(covariance), dipole[enough])
    return dipole, chi2, n_pairs


def _template_noise_factor(template: np.ndarray) -> float:
    """``var(a) / a`` of a disk intensity ``a`` (counts) fitted as the amplitude of ``template``
    with the constant left out (as :func:`~stemml_core.diffraction.disks.refine_disks` does),
    for Poisson counts: ``sum T'^2 T / (sum T'^2)^2``, ``T`` at unit sum, ``T' = T - mean T``."""
    unit = np.asarray(template, dtype=float) / np.sum(template)
    centred = unit - unit.mean()
    return float((centred**2 * unit).sum() / (centred**2).sum() ** 2)


def _fit_block(
    patterns,
    *,
    template,
    approximate_basis,
    pixel_size,
    scan_rotation,
    min_snr,
    min_relative,
    index_tolerance,
    device,
) -> np.ndarray:
    """Disks, indices and basis of a block of patterns (n, H, W): (n, 16) per-pattern numbers.

    Columns: ``G[0, 0], G[0, 1], G[1, 0], G[1, 1]`` (1/nm, scan frame), direct-beam centre
    ``(row, col)`` px (the brightest disk), residual (1/nm), disks used, status code, the
    covariance ``C[0, 0], C[0, 1], C[1, 1]`` of each row ``(G[c, 0], G[c, 1])`` (1/nm²), the
    Friedel dipole ``(x, y)`` (nm), its chi-square and the number of Friedel pairs.
    """
    n = len(patterns)
    disks = find_disks(patterns, template, min_snr=min_snr, min_relative=min_relative, device=device)
    present, first = np.unique(disks.pattern, return_index=True)
    origin = np.full((n, 2), np.nan)
    origin[present] = disks.position[first]
    offset_px = disks.position - origin[disks.pattern]
    detector = offset_px[:, ::-1] * np.asarray(pixel_size)[::-1]  # (kx, ky), 1/nm
    vectors = detector @ _rotation(scan_rotation)  # k_scan = R^T k_det, as rows
    indices, on_lattice = index_vectors(vectors, approximate_basis, tolerance=index_tolerance)
    keys = np.column_stack([disks.pattern, indices])
    _, unique = np.unique(keys[on_lattice], axis=0, return_index=True)  # the brightest of duplicates
    keep = np.flatnonzero(on_lattice)[unique]
    fit = fit_basis(vectors[keep], indices[keep], disks.intensity[keep], disks.pattern[keep], n)
    status = np.where(
        disks.counts <= 1,
        FitStatus.NO_DISKS,
        np.where(fit.status == FitStatus.NO_DISKS, FitStatus.TOO_FEW_INDEXED, fit.status),
    )
    covariance = fit.covariance.reshape(n, 4)[:, [0, 1, 3]]
    dipole, chi2, n_pairs = friedel_dipole(indices[keep] @ approximate_basis.T, disks.intensity[keep], indices[keep],
                                           disks.pattern[keep], n, noise_factor=_template_noise_factor(template))
    return np.column_stack([fit.basis.reshape(n, 4), origin, fit.residual, fit.n_disks, status, covariance,
                            dipole, chi2, n_pairs])


@dataclass(frozen=True)
class StrainResult(ReadOnlyArrays):
    """Strain, rotation and lattice maps from :func:`strain_map`.

    Conventions as in the module docstring. The maps are HyperSpy signals with the input's two
    scan (navigation) axes and no signal axis; they are NaN where ``status`` is not 0.

    Attributes
    ----------
    exx, eyy, exy : hyperspy.signal.BaseSignal
        Strain, dimensionless (0.01 = 1 %), tensile positive; ``exy`` the tensor shear (half
        the engineering shear).
    theta : hyperspy.signal.BaseSignal
        Rotation, rad, counter-clockwise looking down the beam, in the scan frame.
    residual : hyperspy.signal.BaseSignal
        Intensity-weighted RMS distance of the disks from the fitted lattice, 1/nm.
    n_disks : hyperspy.signal.BaseSignal
        Disks in each pattern's fit (direct beam included).
    status : hyperspy.signal.BaseSignal
        uint8 reason code per pattern, :class:`~stemml_core.diffraction.lattice.FitStatus`:
        0 fitted, 1 no Bragg disk found (vacuum), 2 fewer than two non-collinear indexed disks.
    basis : numpy.ndarray
        ``(rows, cols, 2, 2)`` fitted bases, columns ``g1``, ``g2`` in ``(kx, ky)`` of the scan
        frame, 1/nm.
    reference_basis : numpy.ndarray
        ``(2, 2)`` reference basis ``G0``, same convention.
    reference : numpy.ndarray
        ``(rows, cols)`` bool, the scan positions whose median basis is ``G0`` (all False when
        ``G0`` was given); the region :func:`reference_region` chose when the reference was a
        segmentation.
    origin : numpy.ndarray
        ``(rows, cols, 2)`` measured direct-beam centre ``(row, col)``, detector px.
    descan : numpy.ndarray
        ``(rows, cols, 2)`` robust polynomial fit of ``origin`` over the scan, px.
    template : numpy.ndarray
        ``(rows, cols)`` probe image used for the cross-correlation, unit sum.
    disk_radius : float
        Disk radius (convergence semi-angle over wavelength), 1/nm.
    scan_rotation : float
        Scan-diffraction rotation that was undone, degrees.
    exx_std, eyy_std, exy_std, theta_std : hyperspy.signal.BaseSignal
        One standard deviation of each map from the lattice fit's covariance
        (:func:`strain_uncertainty`), same units; NaN also where a pattern has fewer than
        four disks.
    tilt_dipole : hyperspy.signal.BaseSignal or None
        Length ``|d|`` of the Friedel-pair intensity dipole (:func:`friedel_dipole`), nm: a pair
        ``g, -g`` differs in intensity by about ``(I_g - I_-g) / (I_g + I_-g) = d . g``. A tilt
        (or bending) of the specimen away from the zone axis makes it; NaN where not fitted or
        with fewer than six Friedel pairs. None for the layers of a bilayer fit.
    tilt_direction : hyperspy.signal.BaseSignal or None
        Direction of ``d``, degrees counter-clockwise from +x looking down the beam, in the scan
        frame: towards the brighter members of the pairs, perpendicular to the tilt axis (along
        ``-tau`` for the generator's ``tilt``) while the tilt is small, below about
        ``lambda |g| / 2`` (5 mrad for MoS2's first order at 200 kV); beyond, the asymmetry is no
        longer linear in ``g`` and the direction is unreliable (the flag is not). None for the
        layers of a bilayer fit.
    tilt_chi2 : hyperspy.signal.BaseSignal or None
        ``d^T C^-1 d`` (``C`` the covariance of ``d`` from Poisson counts), chi-square with two
        degrees of freedom where the pattern is on the zone axis. None for a bilayer's layers.
    tilted : hyperspy.signal.BaseSignal or None
        bool, True where ``exp(-tilt_chi2 / 2)`` is below ``tilt_false_alarm`` of
        :func:`strain_map` (a dipole that noise alone gives that rarely): the pattern is off the
        zone axis, and its strain may hold an apparent compression by the projection; read it
        with suspicion rather than as strain. False where not fitted. None for a bilayer's layers.
    """

    exx: BaseSignal
    eyy: BaseSignal
    exy: BaseSignal
    theta: BaseSignal
    residual: BaseSignal
    n_disks: BaseSignal
    status: BaseSignal
    basis: np.ndarray
    reference_basis: np.ndarray
    reference: np.ndarray
    origin: np.ndarray
    descan: np.ndarray
    template: np.ndarray
    disk_radius: float
    scan_rotation: float
    exx_std: BaseSignal | None = None
    eyy_std: BaseSignal | None = None
    exy_std: BaseSignal | None = None
    theta_std: BaseSignal | None = None
    tilt_dipole: BaseSignal | None = None
    tilt_direction: BaseSignal | None = None
    tilt_chi2: BaseSignal | None = None
    tilted: BaseSignal | None = None


def _workers(workers, device: str) -> int:
    """Threads for the per-pattern pass: as given, else one per available core on the CPU."""
    if workers is None:
        if device != "cpu":
            return 1
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return check_workers(workers)


def _sample_indices(size: int) -> np.ndarray:
    return np.unique(np.linspace(0, size - 1, min(size, _SAMPLE_SIDE)).round().astype(int))


def _sample(signal: BaseSignal) -> np.ndarray:
    """Patterns on a regular grid of at most 16 x 16 scan positions, (n, H, W)."""
    rows, cols = signal.axes_manager.navigation_shape[::-1]
    data = signal.data[_sample_indices(rows)][:, _sample_indices(cols)]
    data = data.compute() if signal._lazy else data
    return np.asarray(data).reshape(-1, *data.shape[2:])


def _check_saturation(sample: np.ndarray, origins: np.ndarray, radius_px: np.ndarray) -> None:
    """Raise when the direct beam is clipped at a detector ceiling."""
    if np.issubdtype(sample.dtype, np.integer) and sample.max() == np.iinfo(sample.dtype).max:
        raise InputError(
            f"the direct beam reaches {sample.max()}, the largest value of the data's {sample.dtype}: the "
            "detector saturated. Saturated disks have no reliable centre; expected unclipped counts "
            "(record with a shorter dwell time or a lower beam current)."
        )
    if not np.array_equal(sample, np.round(sample)):
        return  # not counts: no Poisson noise to miss (noise-free simulations have flat disks)
    rows, cols = np.indices(sample.shape[1:])
    valid = np.isfinite(origins).all(axis=1)
    inner = (((rows - origins[valid, 0, None, None]) / radius_px[0]) ** 2
             + ((cols - origins[valid, 1, None, None]) / radius_px[1]) ** 2) <= 0.8**2
    at_max = (sample[valid] == sample[valid].max(axis=(1, 2), keepdims=True)) & inner
    fraction = float(np.median(at_max.sum(axis=(1, 2)) / inner.sum(axis=(1, 2))))
    if fraction > 0.25:
        raise InputError(
            f"the direct beam is saturated: in the median pattern {fraction:.0%} of its central pixels share "
            "the pattern's maximum count, where Poisson noise would make them differ. Saturated disks have "
            "no reliable centre; expected unclipped counts (shorter dwell time or lower beam current)."
        )


def _mean_aligned(patterns: np.ndarray, origins: np.ndarray) -> np.ndarray:
    """Mean of ``patterns`` (n, H, W) moved by whole pixels so their direct beams coincide."""
    height, width = patterns.shape[1:]
    shift = np.rint(np.array([height // 2, width // 2]) - origins).astype(int)
    rows = (np.arange(height) - shift[:, :1]) % height
    cols = (np.arange(width) - shift[:, 1:]) % width
    return patterns[np.arange(len(patterns))[:, None, None], rows[:, :, None], cols[:, None, :]].mean(axis=0)


def _feasible_order(order: int, n_points: int) -> int:
    """The highest polynomial degree up to ``order`` with no more terms than ``n_points``."""
    while order > 0 and (order + 1) * (order + 2) // 2 > n_points:
        order -= 1
    return order


def _checked_reference(reference, reference_basis, scan_shape):
    """The reference mask (rows, cols) or cluster labels (rows, cols), and the given reference
    basis (or None), validated: ``(mask, labels, basis)`` with ``labels`` None unless clusters
    were given."""
    if reference is not None and reference_basis is not None:
        raise ValueError("reference and reference_basis were both given; pass one (a mask or a basis), or neither.")
    if reference_basis is not None:
        basis = np.asarray(reference_basis, dtype=float)
        if basis.shape != (2, 2) or not np.isfinite(basis).all() or not abs(np.linalg.det(basis)) > 0:
            raise ValueError(
                f"reference_basis {np.asarray(reference_basis).tolist()} is not a non-singular (2, 2) array; "
                "expected columns g1, g2 in (kx, ky) of the scan frame, 1/nm."
            )
        return np.zeros(scan_shape, dtype=bool), None, basis
    if reference is None:
        return np.ones(scan_shape, dtype=bool), None, None
    array = np.asarray(reference.labels.data if isinstance(reference, PatternSegmentation) else reference)
    if array.shape == scan_shape and array.dtype == bool:
        return array, None, None
    if array.shape == scan_shape and np.issubdtype(array.dtype, np.integer):
        return np.ones(scan_shape, dtype=bool), array, None
    raise ValueError(
        f"reference is a {array.dtype} array of shape {array.shape}; expected a bool mask of the scan shape "
        f"{scan_shape} (True where the lattice is the unstrained reference), a segmentation (segment_patterns) "
        "or integer cluster labels of that shape, or None."
    )


def reference_region(labels, basis, status, *, erosion: int = 1) -> np.ndarray:
    """The unstrained reference region chosen from a segmentation of the scan.

    Parameters
    ----------
    labels : array_like
        ``(rows, cols)`` int cluster of each scan position, e.g.
        ``segment_patterns(...).labels.data``.
    basis : array_like
        ``(rows, cols, 2, 2)`` fitted reciprocal bases (``StrainResult.basis``), 1/nm.
    status : array_like
        ``(rows, cols)`` :class:`~stemml_core.diffraction.lattice.FitStatus` codes; 0 fitted.
    erosion : int
        Scan positions removed from the cluster's border (its probe reaches the next cluster);
        0 keeps them.

    Returns
    -------
    numpy.ndarray
        ``(rows, cols)`` bool mask of the reference region.

    Raises
    ------
    ValueError
        Shapes that differ, or no cluster in which at least half of the patterns were fitted.

    Notes
    -----
    The rule, in order:

    1. A cluster is crystal when at least half of its patterns were fitted (status 0): vacuum
       and clusters of patterns off the lattice are skipped.
    2. The crystal cluster with the most fitted patterns is the reference grain (the lowest
       label among equals).
    3. Its fitted positions, less ``erosion`` positions along its border (kept whole when
       erosion would leave nothing): a pattern at a border sees both sides under the probe.
    4. The most uniform half: the positions whose basis differs least from the region's median
       basis (largest absolute strain or rotation component relative to it, at most its median
       over the region).

    The reference is thus the typical lattice of the largest grain, robust to strained features
    covering up to half of it. Choosing the reference from a clustering of the patterns
    follows the idea of Shi et al. (npj Comput. Mater. 8, 114, 2022), who cluster
    hierarchically; here one k-means level and a uniformity cut stand in for the hierarchy.

    Examples
    --------
    >>> labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]])
    >>> basis = np.broadcast_to(np.eye(2), (3, 4, 2, 2)).copy()
    >>> basis[0, 2] *= 1.01  # a strained pattern
    >>> status = np.where(labels == 0, 1, 0)  # cluster 0 is vacuum
    >>> reference_region(labels, basis, status, erosion=0).astype(int)
    array([[0, 0, 0, 1],
           [0, 0, 1, 1],
           [0, 0, 1, 1]])
    """
    labels = np.asarray(labels)
    basis = np.asarray(basis, dtype=float)
    fitted = np.asarray(status) == FitStatus.OK
    if basis.shape != labels.shape + (2, 2) or fitted.shape != labels.shape:
        raise ValueError(
            f"labels {labels.shape}, basis {basis.shape} and status {fitted.shape} differ; expected (rows, cols), "
            "(rows, cols, 2, 2) and (rows, cols)."
        )
    clusters = np.unique(labels)
    counts = np.array([fitted[labels == k].sum() for k in clusters])
    crystal = counts >= 0.5 * np.array([(labels == k).sum() for k in clusters])
    if not (crystal & (counts > 0)).any():
        raise ValueError(
            f"no cluster of {clusters.tolist()} has at least half of its patterns fitted (fitted per cluster: "
            f"{counts.tolist()}); expected a crystal region. Pass a reference mask instead."
        )
    grain = labels == clusters[np.argmax(np.where(crystal, counts, -1))]
    region = grain & fitted
    if erosion > 0:
        inner = ndimage.binary_erosion(grain, iterations=erosion, border_value=1) & fitted
        region = inner if inner.any() else region
    median = np.median(basis[region], axis=0)
    deviation = np.max(np.abs(strain_components(basis[region], median)), axis=0)
    mask = np.zeros(labels.shape, dtype=bool)
    mask[region] = deviation <= np.median(deviation)
    return mask


def _probe(sample: np.ndarray, pixel_size: np.ndarray):
    """Disk radius (1/nm), direct beams, crystal mask and probe template of the sampled patterns."""
    radius = disk_radius(sample, pixel_size)
    radius_px = radius / pixel_size
    beam = direct_beam(sample, radius_px)
    valid = np.isfinite(beam.origin).all(axis=1)
    if not valid.any():
        raise ValueError(
            "no direct beam was found away from the detector edge in the sampled patterns; expected the "
            f"direct beam (radius {radius_px.round(1).tolist()} px) inside the {sample.shape[1:]} px detector."
        )
    _check_saturation(sample, beam.origin, radius_px)
    fraction = beam.scattered_fraction
    high = np.nanpercentile(fraction, 90)
    vacuum = valid & (fraction < high / 4)
    crystal = valid & (fraction >= high / 2)
    source = vacuum if vacuum.sum() >= 4 else valid
    return radius, beam, crystal, probe_template(sample[source], beam.origin[source], radius_px)


def strain_map(
    signal,
    *,
    reference=None,
    reference_basis=None,
    scan_rotation: float = 0.0,
    descan_order: int = 2,
    min_snr: float = 5.0,
    min_relative: float = 2e-4,
    index_tolerance: float = 0.2,
    device: str = "cpu",
    block_pixels: int = 256,
    workers: int | None = None,
    tilt_false_alarm: float = 0.01,
    progress: bool = True,
) -> StrainResult:
    """Strain and rotation maps of a nanobeam 4D-STEM dataset.

    Parameters
    ----------
    signal : hyperspy.signals.Signal2D
        ``(rows, cols | H, W)`` patterns, eager or lazy; scan axes in nm (or Å, pm, µm),
        detector axes in 1/nm (or 1/Å, 1/pm), checked by :func:`stemml_core.io.load_4dstem`.
    reference : numpy.ndarray or PatternSegmentation, optional
        ``(rows, cols)`` bool mask of the unstrained reference region; its fitted patterns'
        median basis is ``G0``. A segmentation (:func:`~stemml_core.segment.segment_patterns`)
        or an int ``(rows, cols)`` label map: the region is chosen by :func:`reference_region`
        after the fit. None: the median over every fitted pattern (right when most of the
        crystal is unstrained).
    reference_basis : array_like, optional
        ``(2, 2)`` reference basis ``G0`` (columns ``g1``, ``g2`` in ``(kx, ky)`` of the scan
        frame, 1/nm), e.g. from a calibration; it also indexes the disks. Exclusive with
        ``reference``.
    scan_rotation : float
        Rotation of the diffraction pattern relative to the scan, degrees, counter-clockwise
        (``k_det = R(scan_rotation) k_scan``), known or calibrated; undone before the fit.
    descan_order : int
        Degree of the polynomial fitted to the direct-beam positions (``result.descan``); lower
        where the scan has fewer positions than the polynomial has terms.
    min_snr, min_relative : float
        Disk-detection thresholds, relative to each pattern's correlation noise and highest
        peak; see :func:`~stemml_core.diffraction.disks.find_disks`.
    index_tolerance : float
        Largest distance of a disk's fractional indices from integers.
    device : str
        ``"cpu"`` (scipy.fft) or a torch device such as ``"cuda"`` for the cross-correlation.
    block_pixels : int
        Patterns per block for in-memory input (memory bound: about 300 kB per 128 x 128 pattern).
    workers : int, optional
        Threads working on blocks of in-memory input side by side (each holds one block); None:
        one per CPU core available to the process with ``device="cpu"``, one with a GPU device.
        The maps do not depend on it.
    tilt_false_alarm : float
        Probability, in (0, 1), that noise alone flags a pattern on the zone axis as
        ``tilted``: the flag is ``tilt_chi2 > -2 ln(tilt_false_alarm)`` (9.2 at the default
        0.01). Valid for data in electron counts.
    progress : bool
        Show a text progress bar.

    Returns
    -------
    StrainResult
        Maps of ``exx``, ``eyy``, ``exy``, ``theta``, their standard deviations, residual, disks
        used and a reason code, the tilt indicator (Friedel dipole and the ``tilted`` flag),
        plus bases, reference, direct-beam origins and descan fit, template.

    Raises
    ------
    stemml_core.io.InputError
        Not 4D, uncalibrated axes, a scan of one position, a saturated direct beam.
    ValueError
        No Bragg disk in the sampled patterns (all vacuum), disks too close for their refinement
        windows, no pattern fitted, a bad ``reference`` or ``reference_basis``.

    Notes
    -----
    1. On a grid of at most 16 x 16 sampled patterns: the disk radius (half-maximum area),
       direct-beam centres (centre of mass, :func:`~stemml_core.diffraction.disks.direct_beam`),
       a saturation check, the probe template from the vacuum patterns (scattered fraction below
       a quarter of its 90th percentile; at least 4) or else from every sampled direct beam, and
       the primitive basis of the disks of their mean pattern
       (:func:`~stemml_core.diffraction.lattice.lattice_basis`).
    2. One pass over all patterns (:func:`~stemml_core.blocks.map_pixels`, chunk by chunk for
       lazy input, on whatever dask scheduler is active): disks by cross-correlation with
       sub-pixel refinement, indices relative to the brightest disk, and a weighted least-squares
       basis with a free offset per pattern (all orders; intensities as weights).
    3. The direct-beam centres (brightest disk) are fitted by a robust polynomial (descan, for
       the record: the free offset keeps descan out of the strain); ``G0`` is the median basis
       over the reference (chosen by :func:`reference_region` when ``reference`` is a
       segmentation); ``F``, ``eps`` and ``theta`` follow the module docstring.
    4. Tilt: the fitted intensities of each pattern's Friedel pairs give the dipole of
       :func:`friedel_dipole` and its chi-square; ``tilted`` flags the patterns whose dipole
       noise would reach with a probability below ``tilt_false_alarm``. A tilt also foreshortens
       the projected lattice across the tilt axis by ``cos(tilt)`` (an apparent compression of
       0.4 % at 5 degrees), which the strain cannot tell from a real one: flagged patterns are
       marked, not corrected.

    A direct beam clipped at a detector ceiling is refused: integer data that reach their dtype's
    maximum, or count data (integer values) whose direct beam has a flat top (more than a quarter
    of its central pixels at the pattern's maximum, where Poisson noise would make them differ).

    Lazy input is read chunk by chunk with bounded memory; only sixteen numbers per pattern are
    kept, so the returned maps are in memory. Eager, lazy and ``dask.distributed`` runs give
    the same numbers. As in :cite:`Bolhuis2024`, a pattern sees the lattice averaged over the
    probe.

    Examples
    --------
    >>> from stemml_core.synthetic import simulate_4dstem
    >>> shear = np.zeros((4, 4, 2, 2)); shear[..., 0, 1] = shear[..., 1, 0] = 0.01
    >>> signal, truth = simulate_4dstem(shear, detector_shape=(96, 96), dose=None)
    >>> result = strain_map(signal, reference_basis=truth.reference_basis, progress=False)
    >>> round(float(np.nanmean(result.exy.data)), 4), round(float(np.nanmean(result.theta.data)), 4) + 0.0
    (0.01, 0.0)
    """
    if not 0 < tilt_false_alarm < 1:
        raise ValueError(f"tilt_false_alarm={tilt_false_alarm!r}; expected a probability in (0, 1) such as 0.01.")
    signal = load_4dstem(signal)
    scan_shape = tuple(signal.axes_manager.navigation_shape[::-1])
    pixel_size = np.array([axis.scale for axis in signal.axes_manager.signal_axes[::-1]])  # (ky, kx) 1/nm
    mask, labels, reference_basis = _checked_reference(reference, reference_basis, scan_shape)

    sample = _sample(signal)
    radius, beam, crystal, template = _probe(sample, pixel_size)
    if reference_basis is None:
        mean = _mean_aligned(sample[crystal], beam.origin[crystal])
        disks = find_disks(mean[None], template, min_snr=min_snr, min_relative=min_relative, device=device)
        if len(disks.pattern) < 3:
            raise ValueError(
                f"no Bragg disks in the mean of {crystal.sum()} sampled patterns (found {len(disks.pattern)} disk(s)); "
                "expected a crystal with disks separated from the direct beam. All vacuum, or overlapping disks "
                "(convergence angle too large)? Otherwise lower min_relative or min_snr."
            )
        detector = (disks.position[1:] - disks.position[0])[:, ::-1] * pixel_size[::-1]
        approximate_basis = lattice_basis(detector @ _rotation(scan_rotation), disks.intensity[1:],
                                          tolerance=index_tolerance)
    else:
        approximate_basis = reference_basis
    spacing = np.linalg.norm(approximate_basis, axis=0).min() / pixel_size.max()
    if spacing < max(template.shape):
        raise ValueError(
            f"the shortest reciprocal basis vector spans {spacing:.1f} px, less than the {template.shape} px window "
            "each disk is refined in (its diameter plus a margin): neighbouring disks would enter each other's "
            "window. Expected nanobeam patterns with well separated disks (a smaller convergence angle or a "
            "longer camera length)."
        )

    fitted = map_pixels(
        signal,
        _fit_block,
        output_shape=(_N_OUTPUTS,),
        block_pixels=block_pixels,
        progress=progress,
        description="Disks and lattice",
        template=template,
        approximate_basis=approximate_basis,
        pixel_size=tuple(pixel_size),
        scan_rotation=float(scan_rotation),
        min_snr=min_snr,
        min_relative=min_relative,
        index_tolerance=index_tolerance,
        device=device,
        workers=_workers(workers, device),
    )
    values = compute_map(fitted, progress=progress, description="Disks and lattice")
    basis = values[..., :4].reshape(scan_shape + (2, 2))
    origin = values[..., 4:6]
    status = values[..., 8].astype(np.uint8)
    ok = status == FitStatus.OK
    if not ok.any():
        codes = {FitStatus(code).name: int((status == code).sum()) for code in np.unique(status)}
        raise ValueError(f"no pattern could be fitted (reason codes {codes}); expected Bragg disks of one crystal.")

    if reference_basis is None:
        if labels is not None:
            mask = reference_region(labels, basis, status)
        selected = int(mask.sum())
        mask = mask & ok
        if not mask.any():
            raise ValueError(
                f"reference selects {selected} scan positions, none of them fitted (status 0); "
                "expected a region of crystal. Check result.status or choose another region."
            )
        reference_basis = np.median(basis[mask], axis=0)
    components = strain_components(basis, reference_basis)
    covariance = values[..., [9, 10, 10, 11]].reshape(scan_shape + (2, 2))
    errors = strain_uncertainty(np.where(ok[..., None, None], basis, np.eye(2)), covariance, reference_basis)
    dipole = np.where(ok[..., None], values[..., 12:14], np.nan)
    chi2 = np.where(ok, values[..., 14], np.nan)
    maps = [
        navigation_map(component, signal, title=title, quantity=quantity)
        for component, title, quantity in zip(
            components,
            ("Strain exx", "Strain eyy", "Strain exy", "Rotation theta"),
            ("Strain", "Strain", "Strain", "Rotation (rad)"),
        )
    ]
    return StrainResult(
        *maps,
        residual=navigation_map(values[..., 6], signal, title="Lattice fit residual", quantity="Residual (1/nm)"),
        n_disks=navigation_map(values[..., 7].astype(int), signal, title="Disks in the fit", quantity="Disks"),
        status=navigation_map(status, signal, title="Fit status", quantity="Reason code"),
        **{f"{name}_std": navigation_map(np.where(ok, error, np.nan), signal, title=f"{title}, one standard deviation",
                                         quantity=quantity)
           for name, error, title, quantity in zip(
               ("exx", "eyy", "exy", "theta"), errors,
               ("Strain exx", "Strain eyy", "Strain exy", "Rotation theta"),
               ("Strain", "Strain", "Strain", "Rotation (rad)"))},
        tilt_dipole=navigation_map(np.hypot(dipole[..., 0], dipole[..., 1]), signal, title="Friedel dipole",
                                   quantity="Dipole (nm)"),
        tilt_direction=navigation_map(np.degrees(np.arctan2(-dipole[..., 1], dipole[..., 0])), signal,
                                      title="Friedel dipole direction", quantity="Direction (deg)"),
        tilt_chi2=navigation_map(chi2, signal, title="Friedel dipole chi-square", quantity="Chi-square"),
        tilted=navigation_map(np.nan_to_num(chi2) > -2 * np.log(tilt_false_alarm), signal,
                              title="Tilted (Friedel dipole)", quantity="Flagged"),
        basis=basis,
        reference_basis=np.asarray(reference_basis, dtype=float),
        reference=mask,
        origin=origin,
        descan=fit_descan(origin, order=_feasible_order(descan_order, np.isfinite(origin).all(axis=-1).sum())),
        template=template,
        disk_radius=radius,
        scan_rotation=float(scan_rotation),
    )


def plot_strain(result: StrainResult, axes, *, strain_limit: float | None = None,
                rotation_limit: float | None = None):
    """Draw the four maps of a :class:`StrainResult`: exx, eyy, exy in %, theta in degrees.

    Parameters
    ----------
    result : StrainResult
        From :func:`strain_map`.
    axes : sequence of matplotlib.axes.Axes
        Four axes, in the order exx, eyy, exy, theta.
    strain_limit : float, optional
        Symmetric colour limit of the three strain maps, %; default the 99th percentile of their
        absolute values.
    rotation_limit : float, optional
        Symmetric colour limit of the rotation map, degrees; default its 99th percentile.

    Returns
    -------
    list of matplotlib.image.AxesImage
    """
    from stemml_core.plotting import plot_map

    axes = list(np.ravel(axes))
    if len(axes) != 4:
        raise ValueError(f"plot_strain needs 4 axes (exx, eyy, exy, theta); got {len(axes)}.")
    strain = [signal * 100 for signal in (result.exx, result.eyy, result.exy)]
    rotation = result.theta * (180 / np.pi)

    def bound(signals, limit):
        if limit is not None:
            return limit
        values = np.concatenate([np.abs(s.data[np.isfinite(s.data)]) for s in signals])
        return float(np.percentile(values, 99)) if values.size else 1.0

    limits = [bound(strain, strain_limit)] * 3 + [bound([rotation], rotation_limit)]
    images = []
    for signal, name, unit, vmax in zip(strain + [rotation], ("exx", "eyy", "exy", "theta"), ("%", "%", "%", "deg"),
                                        limits):
        images.append(plot_map(signal, axes[len(images)], label=f"{name} ({unit})", cmap="RdBu_r",
                               vmin=-vmax, vmax=vmax))
    return images
