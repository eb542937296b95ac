"""Twisted bilayers: two lattices in one pattern, fitted jointly; twist angle and per-layer strain.

Conventions are those of :mod:`stemml_core.diffraction.strain` (scan frame, ``G = [g1 g2]`` in
1/nm, ``F = (G0 G^-1)^T``, ``eps = sym(F) - I``, ``theta`` counter-clockwise looking down the
beam). Two layers add two sets of Bragg disks about one direct beam. Where the layers' disks
overlap (below about 19 degrees of twist for the first order at 1.5 mrad on MoS2) a disk-by-disk
detection mixes them, so :func:`fit_lattices` fits every pattern at once: the direct beam and all
disks of both lattices as shifted copies of the probe template, their positions tied to one
origin and one basis per layer.

- :func:`twist_angle`: the rotation from one layer's basis to the other's, degrees.
- :func:`fit_lattices`: the joint least-squares fit of a batch of patterns (array function, px).
- :func:`bilayer_strain_map`: the signal-level analysis, a strain map per layer and a twist map,
  each with a standard-deviation map from the joint fit's covariance.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import scipy.fft
from hyperspy.signal import BaseSignal

from stemml_core._frozen import ReadOnlyArrays
from stemml_core.blocks import compute_map, map_pixels, navigation_map
from stemml_core.diffraction.disks import (
    _thresholds,
    cross_correlate,
    direct_beam,
    disk_radius,
    find_disks,
    fit_descan,
)
from stemml_core.diffraction.lattice import FitStatus, lattice_basis
from stemml_core.diffraction.strain import (
    StrainResult,
    _checked_reference,
    _feasible_order,
    _mean_aligned,
    _probe,
    _rotation,
    _sample,
    reference_region,
    strain_components,
    strain_uncertainty,
)
from stemml_core.io import load_4dstem

__all__ = ["BilayerResult", "JointFit", "bilayer_strain_map", "fit_lattices", "twist_angle"]

_TWIST_SEARCH = np.arange(1.0, 60.0)
"""Trial twists, degrees, when none is given: 1-degree steps, within the joint fit's reach."""
_N_REFINED = 5  # trial starts with the lowest residual that are fitted in full
_N_OUTPUTS = 53  # per pattern: origin (2), G1 (4), G2 (4), per layer residual and disks, status (2), residual,
# covariance of (G1, G2) (upper triangle of 8 x 8: 36)
_UPPER = np.triu_indices(8)
COMPONENTS = ("exx", "eyy", "exy", "theta")


def twist_angle(basis1, basis2) -> np.ndarray:
    """Twist of the second lattice relative to the first: the rotation of ``G2 G1^-1``.

    Parameters
    ----------
    basis1, basis2 : array_like
        ``(..., 2, 2)`` reciprocal bases, columns ``g1``, ``g2`` in ``(kx, ky)`` of the scan frame
        (any common unit), indexed alike (``basis2 ~ R basis1`` for a rotation ``R``).

    Returns
    -------
    numpy.ndarray
        ``(...)`` angle in degrees, counter-clockwise looking down the beam, in (-180, 180].

    Notes
    -----
    ``M = G2 G1^-1`` maps the first lattice onto the second. Its polar decomposition ``M = R U``
    (``R = [[cos t, sin t], [-sin t, cos t]]``, ``U`` symmetric positive) gives the twist
    ``t = atan2(M01 - M10, M00 + M11)`` exactly; ``U - I`` is the heterostrain. For small strains
    ``t`` is the reference twist plus ``theta2 - theta1``.

    Examples
    --------
    >>> from stemml_core.synthetic.diffraction import hexagonal_reciprocal_basis
    >>> float(twist_angle(hexagonal_reciprocal_basis(0.316), hexagonal_reciprocal_basis(0.316, 25.0)))
    25.0
    """
    basis1 = np.asarray(basis1, dtype=float)
    relation = np.asarray(basis2, dtype=float) @ np.linalg.inv(basis1)
    return np.degrees(np.arctan2(relation[..., 0, 1] - relation[..., 1, 0],
                                 relation[..., 0, 0] + relation[..., 1, 1]))


class _TemplateTerms:
    """The probe template on a grid twice its window, in Fourier space.

    A disk of amplitude ``a`` at ``p`` (px) is ``a T(x - p)``: the template moved by the Fourier
    shift theorem on this grid (its real trigonometric interpolant), which holds the template
    moved by up to a pixel and, for the autocorrelation, two templates side by side. Provides

    - data terms of windows centred on integer pixels: ``C(s) = sum_x W(x) T(x - s)`` and its
      gradient, for the sub-pixel offset ``s`` of the disk from the window centre;
    - the autocorrelation ``A(s) = sum_x T(x) T(x - s)``, its gradient and Hessian: the overlap
      of two model disks ``s`` apart;
    - images of ``T(x - s)`` and of its derivatives by the disk position, to sum over the part
      of a window that lies on the detector.
    """

    def __init__(self, template: np.ndarray):
        rows, cols = template.shape
        self.shape = (2 * rows, 2 * cols)
        padded = np.zeros(self.shape)
        padded[rows - rows // 2 : 2 * rows - rows // 2, cols - cols // 2 : 2 * cols - cols // 2] = template
        fy = scipy.fft.fftfreq(self.shape[0])
        fx = scipy.fft.rfftfreq(self.shape[1])
        self.spectrum = scipy.fft.rfft2(padded)
        self.conj = np.conj(self.spectrum).astype(np.complex64)
        # a real sum over the full spectrum: rfft2 holds one of each pair (f, -f) except on the
        # columns fx = 0 and fx = 1/2 (Nyquist, where the shift is that of the real interpolant)
        self.weight = np.broadcast_to(np.where((fx == 0) | (fx == 0.5), 1.0, 2.0), (len(fy), len(fx)))
        self.weight = self.weight / (self.shape[0] * self.shape[1])
        self.wy = 2 * np.pi * fy
        self.wx = 2 * np.pi * fx
        self.power = np.abs(self.spectrum) ** 2 * self.weight
        wy, wx = np.broadcast_arrays(self.wy[:, None], self.wx[None, :])
        one = np.ones(wy.shape)
        # columns: the frequency weights of C, dC/ds_row, dC/ds_col; of A and its Hessian; of A's gradient
        self.data_weights = np.stack([one, wy, wx], -1).reshape(-1, 3) * self.weight.reshape(-1, 1)
        self.data_weights = self.data_weights.astype(np.float32)
        self.overlap_even = np.stack([one, wy * wy, wy * wx, wx * wx], -1).reshape(-1, 4) * self.power.reshape(-1, 1)
        self.overlap_odd = np.stack([wy, wx], -1).reshape(-1, 2) * self.power.reshape(-1, 1)
        # the disk's extent, px (row, col): above 5 % of the maximum, beyond the template's ringing, plus 1 px
        disk = np.argwhere(template > 0.05 * template.max())
        self.reach = np.abs(disk - np.array([rows // 2, cols // 2])).max(axis=0) + 1
        self.pair_reach = 2 * self.reach + 1  # two disks farther apart do not overlap
        self.autocorrelation_zero = float(self.power.sum())
        self.curvature = self.overlap(np.zeros((1, 2)))[2][0]  # A's Hessian at 0, (2, 2)

    def _phase(self, shift: np.ndarray) -> np.ndarray:
        """``exp(i (wy s_row + wx s_col))``, (m, Fy, Fx) complex64, for shifts (m, 2)."""
        row = np.exp(1j * self.wy[None, :] * shift[:, :1]).astype(np.complex64)
        col = np.exp(1j * self.wx[None, :] * shift[:, 1:]).astype(np.complex64)
        return row[:, :, None] * col[:, None, :]

    def data(self, windows: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``C`` (m,) and its gradient (m, 2) for windows (m, *shape) and offsets (m, 2) px."""
        cross = (scipy.fft.rfft2(windows) * self.conj * self._phase(shift)).reshape(len(windows), self.power.size)
        # einsum, not BLAS: each pattern's numbers must not depend on how many share its batch
        value = np.einsum("mf,f->m", cross.real, self.data_weights[:, 0])
        gradient = -np.einsum("mf,fk->mk", cross.imag, self.data_weights[:, 1:])
        return value.astype(np.float64), gradient.astype(np.float64)

    def overlap(self, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``A`` (m,), its gradient (m, 2) and Hessian (m, 2, 2) at displacements (m, 2) px."""
        phase = self._phase(shift).reshape(len(shift), self.power.size).astype(np.complex128)
        value, yy, yx, xx = np.einsum("mf,fk->km", phase.real, self.overlap_even)
        gradient = -np.einsum("mf,fk->mk", phase.imag, self.overlap_odd)
        return value, gradient, -np.stack([np.stack([yy, yx], -1), np.stack([yx, xx], -1)], -2)

    def images(self, shift: np.ndarray) -> np.ndarray:
        """``T(x - s)``, ``dT/dp_row`` and ``dT/dp_col`` on the grid, (m, 3, *shape), for offsets
        (m, 2) px from the grid centre."""
        moved = self.spectrum * np.conj(self._phase(shift))
        spectra = np.stack([moved, -1j * self.wy[:, None] * moved, -1j * self.wx[None, :] * moved], axis=1)
        return scipy.fft.irfft2(spectra, s=self.shape)


@dataclass(frozen=True)
class JointFit(ReadOnlyArrays):
    """Joint fits of ``n`` patterns by :func:`fit_lattices`, in detector pixels.

    Attributes
    ----------
    origin : numpy.ndarray
        ``(n, 2)`` direct-beam centre ``(row, col)``, px.
    bases : numpy.ndarray
        ``(n, L, 2, 2)`` basis of each layer in detector px: column ``c`` is the ``(row, col)``
        displacement of the disk of index 1 along basis vector ``c``.
    layer : numpy.ndarray
        ``(m,)`` int, the layer of each modelled disk; -1 for the direct beam (disk 0).
    indices : numpy.ndarray
        ``(m, 2)`` int ``(h, k)`` of each modelled disk on its layer's basis.
    amplitude : numpy.ndarray
        ``(n, m)`` integrated intensity of each disk (data units); 0 where not ``valid``.
    background : numpy.ndarray
        ``(n,)`` constant background per pixel (data units).
    misfit : numpy.ndarray
        ``(n, m, 2)`` ``(row, col)`` px by which each disk alone would move to fit the data best,
        with all other disks in place (its distance from the lattice); NaN where not ``valid``.
    valid : numpy.ndarray
        ``(n, m)`` bool, the disk is modelled: its centre lies within a disk radius of the
        detector.
    residual : numpy.ndarray
        ``(n,)`` ``sum (P - M)^2 / sum P`` over the detector: 1 where the model explains a pattern
        of counts to its Poisson noise. The template's own ringing (it is averaged from direct
        beams moved by sub-pixel Fourier shifts, whose sharp edges are undersampled) leaves more
        around the bright direct beam: about 3 at 1e6 electrons on the generator's patterns.
        Compare it across a scan: a region the model does not describe stands out.
    n_iterations : numpy.ndarray
        ``(n,)`` int, Gauss-Newton steps taken.
    covariance : numpy.ndarray
        ``(n, 2 + 4 L, 2 + 4 L)`` covariance of the parameters ``(origin, B_1, ..., B_L)`` (each
        ``B_l`` row-major: ``B[0, 0], B[0, 1], B[1, 0], B[1, 1]``), px², for patterns of
        electron counts (see :func:`fit_lattices`).
    """

    origin: np.ndarray
    bases: np.ndarray
    layer: np.ndarray
    indices: np.ndarray
    amplitude: np.ndarray
    background: np.ndarray
    misfit: np.ndarray
    valid: np.ndarray
    residual: np.ndarray
    n_iterations: np.ndarray
    covariance: np.ndarray


def _twist_uncertainty(basis1, basis2, covariance) -> np.ndarray:
    """Standard deviation (degrees) of :func:`twist_angle`, to first order, from the covariance
    ``(..., 8, 8)`` of ``(G1, G2)`` (each row-major, 1/nm²)."""
    inverse = np.linalg.inv(basis1)
    relation = basis2 @ inverse  # M = G2 G1^-1
    u = relation[..., 0, 1] - relation[..., 1, 0]
    v = relation[..., 0, 0] + relation[..., 1, 1]
    gradient = np.empty(basis1.shape[:-2] + (8,))
    for c in range(2):
        for j in range(2):
            # dM for dG2 = E_cj: E_cj G1^-1; for dG1 = E_cj: -M E_cj G1^-1
            d_second = np.zeros(basis1.shape)
            d_second[..., c, :] = inverse[..., j, :]
            d_first = -relation[..., :, c, None] * inverse[..., None, j, :]
            for offset, change in ((0, d_first), (4, d_second)):
                du = change[..., 0, 1] - change[..., 1, 0]
                dv = change[..., 0, 0] + change[..., 1, 1]
                gradient[..., offset + 2 * c + j] = (v * du - u * dv) / (u**2 + v**2)
    variance = np.einsum("...a,...ab,...b->...", gradient, covariance, gradient)
    return np.degrees(np.sqrt(variance))


def _position_jacobian(layer: np.ndarray, indices: np.ndarray, n_layers: int) -> np.ndarray:
    """``d p_j / d theta``, (m, 2, 2 + 4 L), for ``theta = (origin, B_1 (row-major), ...)``."""
    jacobian = np.zeros((len(layer), 2, 2 + 4 * n_layers))
    jacobian[:, 0, 0] = jacobian[:, 1, 1] = 1.0
    for j, (l, (h, k)) in enumerate(zip(layer, indices)):
        if l >= 0:
            start = 2 + 4 * l
            jacobian[j, 0, start : start + 2] = h, k
            jacobian[j, 1, start + 2 : start + 4] = h, k
    return jacobian


class _PaddedPatterns:
    """Patterns zero-padded by a window on every side, to cut windows anywhere near the detector."""

    def __init__(self, patterns: np.ndarray, shape: tuple[int, int]):
        self.shape = shape
        self.detector = patterns.shape[1:]
        padded = np.pad(patterns, ((0, 0), (shape[0], shape[0]), (shape[1], shape[1])))
        self.view = np.lib.stride_tricks.sliding_window_view(padded, shape, axis=(1, 2))

    def windows(self, pattern: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """``(m, *shape)`` windows whose pixel ``(rows // 2, cols // 2)`` is ``centre`` (m, 2) on
        the detector; zero beyond the detector (a centre farther off is moved towards it)."""
        top = np.clip(centre[:, 0] + self.shape[0] - self.shape[0] // 2, 0, self.view.shape[1] - 1)
        left = np.clip(centre[:, 1] + self.shape[1] - self.shape[1] // 2, 0, self.view.shape[2] - 1)
        return self.view[pattern, top, left]


class _Terms:
    """Inner products of the data and the model disks of a batch at given positions.

    Disks are modelled when their centre lies within a disk radius of the detector; sums run over
    the detector only, so a disk cut by the edge has its own self terms (``self_*``), while those
    of a disk inside are the template's constants. Overlaps between disks use the
    autocorrelation (exact unless the overlap itself leaves the detector).
    """

    def __init__(self, patterns: _PaddedPatterns, terms: _TemplateTerms, position: np.ndarray, radius: np.ndarray):
        n, m = position.shape[:2]
        height, width = patterns.detector
        centre = np.rint(position).astype(int)
        windows = patterns.windows(np.repeat(np.arange(n), m), centre.reshape(-1, 2))
        inside = ((centre >= terms.reach) & (centre <= np.array([height, width]) - 1 - terms.reach)).all(-1).ravel()
        self.valid = ((position > -radius) & (position < np.array([height, width]) - 1 + radius)).all(-1)
        offset = (position - centre).reshape(-1, 2)
        value, gradient = terms.data(windows, offset)
        self.data = np.where(self.valid, value.reshape(n, m), 0.0)  # C_j = <P, T_j>
        self.data_gradient = np.where(self.valid[..., None], gradient.reshape(n, m, 2), 0.0)
        # self terms: <T_j, T_j>, <1, T_j>, <T_j, dT_j/dp>, <1, dT_j/dp>, <dT_j/dp, dT_j/dp>
        self.self_amplitude = np.where(self.valid, terms.autocorrelation_zero, 0.0)
        self.self_background = self.valid.astype(float)
        self.self_cross = np.zeros((n, m, 2))
        self.self_background_gradient = np.zeros((n, m, 2))
        self.self_stiffness = np.where(self.valid[..., None, None], -terms.curvature, 0.0)
        edge = np.flatnonzero(self.valid.ravel() & ~inside)
        if edge.size:
            rows = centre.reshape(-1, 2)[edge, :1] - terms.shape[0] // 2 + np.arange(terms.shape[0])
            cols = centre.reshape(-1, 2)[edge, 1:] - terms.shape[1] // 2 + np.arange(terms.shape[1])
            on = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
            images = terms.images(offset[edge]) * on[:, None]
            flat = images.reshape(len(edge), 3, -1)
            products = np.einsum("mip,mjp->mij", flat, flat)
            where = np.unravel_index(edge, (n, m))
            self.self_amplitude[where] = products[:, 0, 0]
            self.self_background[where] = flat[:, 0].sum(axis=1)
            self.self_cross[where] = products[:, 0, 1:]
            self.self_background_gradient[where] = flat[:, 1:].sum(axis=2)
            self.self_stiffness[where] = products[:, 1:, 1:]
        displacement = position[:, None, :, :] - position[:, :, None, :]  # s_ij = p_j - p_i
        near = (np.abs(displacement) <= terms.pair_reach).all(-1) & self.valid[:, :, None] & self.valid[:, None, :]
        near &= np.triu(np.ones((m, m), dtype=bool), k=1)
        self.pattern, self.first, self.second = np.nonzero(near)
        self.overlap, self.overlap_gradient, self.overlap_hessian = terms.overlap(
            displacement[self.pattern, self.first, self.second])
        self.amplitude_matrix = np.zeros((n, m, m))
        diagonal = np.arange(m)
        self.amplitude_matrix[:, diagonal, diagonal] = self.self_amplitude
        self.amplitude_matrix[self.pattern, self.first, self.second] = self.overlap
        self.amplitude_matrix[self.pattern, self.second, self.first] = self.overlap

    def position_gradient(self, amplitude: np.ndarray, background: np.ndarray) -> np.ndarray:
        """``<P - M, dT_j/dp_j>`` per disk, (n, m, 2): the data's pull on each disk position."""
        pull = (self.data_gradient - amplitude[..., None] * self.self_cross
                - background[:, None, None] * self.self_background_gradient)
        a_first = amplitude[self.pattern, self.first, None]
        a_second = amplitude[self.pattern, self.second, None]
        np.add.at(pull, (self.pattern, self.second), -a_first * self.overlap_gradient)
        np.add.at(pull, (self.pattern, self.first), a_second * self.overlap_gradient)
        return pull


def _normal_equations(batch: _Terms, amplitude, jacobian, n_pixels, total):
    """Gauss-Newton normal matrix and right-hand side for ``(d theta, a, b)`` (see fit_lattices)."""
    n, m = amplitude.shape
    k = jacobian.shape[-1]
    size = k + m + 1
    normal = np.zeros((n, size, size))
    rhs = np.zeros((n, size))
    amp = slice(k, k + m)
    normal[:, amp, amp] = batch.amplitude_matrix
    normal[:, amp, -1] = normal[:, -1, amp] = batch.self_background
    normal[:, -1, -1] = n_pixels
    # theta-theta: each disk with itself, then the overlapping pairs
    stiffness = np.einsum("jek,njef->njkf", jacobian, batch.self_stiffness)
    stiffness = np.einsum("njkf,jfl->njkl", stiffness, jacobian)
    normal[:, :k, :k] = np.einsum("nj,njkl->nkl", amplitude**2, stiffness)
    p, i, j = batch.pattern, batch.first, batch.second
    cross = -np.einsum("pek,pef,pfl->pkl", jacobian[i], batch.overlap_hessian, jacobian[j])
    cross *= (amplitude[p, i] * amplitude[p, j])[:, None, None]
    np.add.at(normal[:, :k, :k], p, cross + np.swapaxes(cross, 1, 2))
    # theta-a: <T_i, sum_j a_j dT_j/dtheta>; theta-b: <1, sum_j a_j dT_j/dtheta>
    theta_a = np.einsum("jek,nje->nkj", jacobian, batch.self_cross) * amplitude[:, None, :]
    np.add.at(theta_a, (p, slice(None), i), np.einsum("pek,pe->pk", jacobian[j], batch.overlap_gradient)
              * amplitude[p, j, None])
    np.add.at(theta_a, (p, slice(None), j), -np.einsum("pek,pe->pk", jacobian[i], batch.overlap_gradient)
              * amplitude[p, i, None])
    normal[:, :k, amp] = theta_a
    normal[:, amp, :k] = np.swapaxes(theta_a, 1, 2)
    normal[:, :k, -1] = normal[:, -1, :k] = np.einsum("nj,jek,nje->nk", amplitude, jacobian,
                                                      batch.self_background_gradient)
    rhs[:, :k] = np.einsum("nj,jek,nje->nk", amplitude, jacobian, batch.data_gradient)
    rhs[:, amp] = batch.data
    rhs[:, -1] = total
    pattern, disk = np.nonzero(~batch.valid)  # not modelled: amplitude 0
    normal[pattern, k + disk, :] = 0.0
    normal[pattern, :, k + disk] = 0.0
    normal[pattern, k + disk, k + disk] = 1.0
    return normal, rhs


def _scaled(normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Jacobi-scaled normal matrices with a tiny ridge (a disk of zero amplitude leaves a layer's
    parameters undetermined; the ridge keeps them where they are), and the scale."""
    scale = 1 / np.sqrt(np.maximum(np.diagonal(normal, axis1=1, axis2=2), 1e-300))
    scaled = normal * scale[:, :, None] * scale[:, None, :]
    scaled[:, np.arange(len(scale[0])), np.arange(len(scale[0]))] += 1e-9
    return scaled, scale


def _solve(normal: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched solve of the normal equations (see :func:`_scaled`)."""
    scaled, scale = _scaled(normal)
    return np.linalg.solve(scaled, (rhs * scale)[..., None])[..., 0] * scale


def _parameter_covariance(batch, terms, normal, amplitude, background, jacobian, total) -> np.ndarray:
    """Covariance (n, k, k) of the position parameters for Poisson counts: ``N^-1 S N^-1``.

    ``N`` is the Gauss-Newton normal matrix of the unweighted fit, ``S = J^T diag(M) J`` the
    covariance of its right-hand side when each pixel's variance is the model ``M`` (Poisson).
    ``S`` is built disk by disk, overlaps left out: with ``M ~ a_j T_j + b`` near disk ``j``,
    ``<M dT dT^T> = a_j <T dT dT^T> + b <dT dT^T>`` for the positions, ``a_j <T^3> + b <T^2>``
    for the amplitudes, ``a_j <T^2> + b <T>`` between amplitude and background and the total
    counts for the background; template constants of a disk inside the detector.
    """
    n, m = amplitude.shape
    k = jacobian.shape[-1]
    image, d_row, d_col = terms.images(np.zeros((1, 2)))[0]
    gradient = np.stack([d_row, d_col]).reshape(2, -1)
    cubic = np.einsum("p,ip,jp->ij", image.ravel(), gradient, gradient)  # <T dT dT^T>
    weight = np.where(batch.valid, np.maximum(amplitude, 0.0), 0.0)  # the model is not negative
    background = np.maximum(background, 0.0)
    local = (weight[..., None, None] * cubic + background[:, None, None, None] * -terms.curvature)
    local *= (weight**2)[..., None, None]
    size = normal.shape[-1]
    noise = np.zeros((n, size, size))
    noise[:, :k, :k] = np.einsum("jek,njef,jfl->nkl", jacobian, local, jacobian)
    disks = np.arange(k, k + m)
    noise[:, disks, disks] = weight * (image**3).sum() + background[:, None] * (image**2).sum()
    noise[:, disks, -1] = noise[:, -1, disks] = weight * (image**2).sum() + background[:, None] * batch.valid
    noise[:, -1, -1] = total
    scaled, scale = _scaled(normal)
    rows = (np.linalg.inv(scaled) * scale[:, :, None] * scale[:, None, :])[:, :k]  # N^-1 [theta, :]
    return np.einsum("nka,nab,nlb->nkl", rows, noise, rows)


def _positions(origin, bases, layer, indices) -> np.ndarray:
    """Disk centres (n, m, 2) px: the origin for the direct beam, ``o + B_l (h, k)`` for the rest."""
    shifted = np.einsum("nmij,mj->nmi", bases[:, np.maximum(layer, 0)], indices.astype(float))
    return origin[:, None, :] + np.where((layer >= 0)[None, :, None], shifted, 0.0)


def fit_lattices(
    patterns,
    template,
    origin,
    bases,
    indices,
    *,
    n_iterations: int = 20,
    tolerance: float = 1e-3,
    max_step: float = 1.0,
) -> JointFit:
    """Joint least-squares fit of the direct beam and the disks of several lattices.

    Parameters
    ----------
    patterns : array_like
        ``(n, H, W)`` patterns.
    template : array_like
        ``(rows, cols)`` probe image from :func:`~stemml_core.diffraction.disks.probe_template`,
        unit sum.
    origin : array_like
        ``(n, 2)`` starting direct-beam centres ``(row, col)``, px.
    bases : array_like
        ``(L, 2, 2)`` or ``(n, L, 2, 2)`` starting bases in detector px (column ``c``: the
        ``(row, col)`` displacement per unit index along basis vector ``c``), within about a
        pixel of the truth at the outermost modelled disk.
    indices : sequence of array_like
        ``L`` arrays ``(m_l, 2)`` of int ``(h, k)``: the disks of each layer to model (not
        ``(0, 0)``, which is the direct beam, shared by the layers). List every disk that reaches
        the detector: one left out is data the model cannot explain, and pulls the disks it
        overlaps.
    n_iterations : int
        Most Gauss-Newton steps.
    tolerance : float
        A pattern stops when no disk moves by more than this, px.
    max_step : float
        Largest move of a disk in one step, px (a trust region).

    Returns
    -------
    JointFit
        Origins, bases, amplitudes, background, per-disk misfits, residuals.

    Raises
    ------
    ValueError
        Shapes that do not match, or ``(0, 0)`` among the indices.

    Notes
    -----
    Each pattern ``P`` is modelled as ``M(x) = b + sum_j a_j T(x - p_j)`` with the template ``T``,
    ``p_0 = o`` (direct beam) and ``p_j = o + B_l (h_j, k_j)`` for disk ``j`` of layer ``l``.
    Gauss-Newton minimises ``sum_x (P - M)^2`` over ``o``, the ``B_l``, the amplitudes ``a_j``
    and ``b`` together, so overlapping disks of two layers are separated by the model rather
    than by detection. The normal equations need only inner products: ``<P, T_j>`` and its
    gradient from a window around each disk (Fourier shift theorem, as in
    :func:`~stemml_core.diffraction.disks.refine_disks`), and ``<T_i, T_j>`` from the template's
    autocorrelation at ``p_j - p_i`` (non-zero only for disks that overlap). No pattern is
    rendered, and the work grows with the number of disks, not of pixels. Unweighted least
    squares: every pixel counts alike. The sums run over the detector: a disk cut by its edge
    is modelled by its part on the detector; a disk whose centre lies more than a radius
    beyond the edge is not modelled (amplitude 0).

    ``covariance`` is that of unweighted least squares under Poisson noise, ``N^-1 J^T diag(M)
    J N^-1`` (``N = J^T J`` the normal matrix at the solution, ``M`` the model, the variance of
    each pixel's counts), with ``J^T diag(M) J`` summed disk by disk and overlaps between disks
    left out; it assumes the patterns are electron counts and the model fits them.

    ``misfit`` is one Gauss-Newton step of a disk's own position with everything else fixed,
    ``(a_j^2 K_j)^-1 a_j <P - M, dT_j/dp_j>`` (``K_j = <dT_j/dp, dT_j/dp>``), the free disk's
    offset from the lattice, which stays free of its overlapping neighbours.
    """
    patterns = np.asarray(patterns, dtype=np.float32)
    if patterns.ndim != 3 or 0 in patterns.shape:
        raise ValueError(f"patterns has shape {patterns.shape}; expected (n, H, W) diffraction patterns.")
    n = len(patterns)
    indices = [np.asarray(idx, dtype=int).reshape(-1, 2) for idx in indices]
    origin = np.array(origin, dtype=float)
    bases = np.asarray(bases, dtype=float)
    if origin.shape != (n, 2) or bases.shape[-3:] != (len(indices), 2, 2) or bases.ndim not in (3, 4):
        raise ValueError(
            f"origin {origin.shape} and bases {bases.shape} for {n} patterns and {len(indices)} layers of indices; "
            f"expected ({n}, 2) and ({len(indices)}, 2, 2) or ({n}, {len(indices)}, 2, 2)."
        )
    if any((idx == 0).all(axis=1).any() for idx in indices):
        raise ValueError("indices hold (0, 0); the direct beam is modelled once for all layers: leave it out.")
    bases = np.broadcast_to(bases, (n, len(indices), 2, 2)).copy()
    template = np.asarray(template, dtype=np.float64)
    terms = _TemplateTerms(template / template.sum())
    radius = disk_radius(template[None])
    layer = np.concatenate([[-1]] + [np.full(len(idx), l) for l, idx in enumerate(indices)]).astype(int)
    hk = np.concatenate([np.zeros((1, 2), dtype=int)] + indices)
    jacobian = _position_jacobian(layer, hk, len(indices))
    k = jacobian.shape[-1]
    n_pixels = patterns.shape[1] * patterns.shape[2]
    total = patterns.sum(axis=(1, 2), dtype=np.float64)

    def solve_amplitudes(batch):
        normal, rhs = _normal_equations(batch, np.zeros((n, len(layer))), jacobian, n_pixels, total)
        return _solve(normal[:, k:, k:], rhs[:, k:])

    padded = _PaddedPatterns(patterns, terms.shape)
    batch = _Terms(padded, terms, _positions(origin, bases, layer, hk), radius)
    linear = solve_amplitudes(batch)
    amplitude = linear[:, :-1]
    active = np.ones(n, dtype=bool)
    steps = np.zeros(n, dtype=int)
    for _ in range(n_iterations):
        normal, rhs = _normal_equations(batch, amplitude, jacobian, n_pixels, total)
        solution = _solve(normal[active], rhs[active])
        step = solution[:, :k]
        move = np.abs(np.einsum("jek,nk->nje", jacobian, step))
        move = np.where(batch.valid[active, :, None], move, 0.0).max(axis=(1, 2))
        step *= np.minimum(1.0, max_step / np.maximum(move, 1e-300))[:, None]
        origin[active] += step[:, :2]
        bases[active] += step[:, 2:].reshape(-1, len(indices), 2, 2)
        steps[active] += 1
        active[np.flatnonzero(active)[move < tolerance]] = False
        batch = _Terms(padded, terms, _positions(origin, bases, layer, hk), radius)
        amplitude = solve_amplitudes(batch)[:, :-1]
        if not active.any():
            break
    linear = solve_amplitudes(batch)
    amplitude, background = linear[:, :-1], linear[:, -1]
    pull = batch.position_gradient(amplitude, background)
    stiffness = batch.self_stiffness + np.where(batch.valid[..., None, None], 0.0, np.eye(2))
    with np.errstate(invalid="ignore", divide="ignore"):
        misfit = np.linalg.solve(stiffness, pull[..., None])[..., 0] / amplitude[..., None]
    normal, _ = _normal_equations(batch, amplitude, jacobian, n_pixels, total)
    covariance = _parameter_covariance(batch, terms, normal, amplitude, background, jacobian, total)
    model_energy = np.einsum("nj,njk,nk->n", amplitude, batch.amplitude_matrix, amplitude)
    squared = (np.einsum("nhw,nhw->n", patterns, patterns, dtype=np.float64)
               - 2 * (np.einsum("nj,nj->n", amplitude, batch.data) + background * total)
               + model_energy + 2 * background * np.einsum("nj,nj->n", amplitude, batch.self_background)
               + background**2 * n_pixels)
    return JointFit(
        origin=origin,
        bases=bases,
        layer=layer,
        indices=hk,
        amplitude=np.where(batch.valid, amplitude, 0.0),
        background=background,
        misfit=np.where(batch.valid[..., None], misfit, np.nan),
        valid=batch.valid,
        residual=squared / total,
        n_iterations=steps,
        covariance=covariance,
    )


def _detector_matrix(pixel_size: np.ndarray, scan_rotation: float) -> np.ndarray:
    """``D`` with ``(row, col) px = D g`` for a scan-frame vector ``g = (kx, ky)`` in 1/nm."""
    return np.array([[0.0, 1 / pixel_size[0]], [1 / pixel_size[1], 0.0]]) @ _rotation(scan_rotation)


def _lattice_points(basis_px: np.ndarray, reach: float) -> np.ndarray:
    """``(h, k) != (0, 0)`` whose lattice vector ``B (h, k)`` is at most ``reach`` px long, (m, 2)."""
    n_max = int(np.ceil(reach / np.linalg.svd(basis_px, compute_uv=False)[-1]))
    h, k = np.meshgrid(np.arange(-n_max, n_max + 1), np.arange(-n_max, n_max + 1), indexing="ij")
    hk = np.stack([h.ravel(), k.ravel()], axis=1)
    length = np.linalg.norm(hk @ basis_px.T, axis=1)
    return hk[(length > 0) & (length <= reach)]


def _disk_indices(basis_px: np.ndarray, origin: np.ndarray, shape, margin: float) -> np.ndarray:
    """``(h, k) != (0, 0)`` whose disk centre lies within ``margin`` px of the detector, (m, 2)."""
    hk = _lattice_points(basis_px, np.hypot(*shape) + margin)
    centre = origin + hk @ basis_px.T
    return hk[((centre > -margin) & (centre < np.array(shape) - 1 + margin)).all(axis=1)]


def _paired(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two layers' bases indexed alike and ordered so that the twist from the first to the
    second is counter-clockwise (>= 0).

    ``second`` is replaced by ``second @ U`` (``U`` integer, det 1: the same lattice) for which
    ``second @ U @ first^-1`` is closest to a rotation times a scale (equal lattices up to a
    twist; within 1 % of the best) and, among those, turns the least (for a hexagonal lattice,
    a twist in [0, 30] degrees)."""
    candidates = [np.array(u).reshape(2, 2) for u in product((-1, 0, 1), repeat=4)]
    candidates = [u for u in candidates if round(np.linalg.det(u)) == 1]
    relations = [second @ u @ np.linalg.inv(first) for u in candidates]
    values = [np.linalg.svd(m, compute_uv=False) for m in relations]
    anisotropy = np.array([(v[0] - v[1]) / (v[0] + v[1]) for v in values])
    angle = np.array([twist_angle(first, second @ u) for u in candidates])
    similar = anisotropy <= anisotropy.min() + 0.01
    best = np.flatnonzero(similar)[np.argmin(np.abs(angle[similar]))]
    second = second @ candidates[best]
    return (first, second) if angle[best] >= 0 else (second, first)


def _mean_pattern_bases(mean, template, to_detector, twist, *, min_snr, min_relative, index_tolerance):
    """The two layers' bases (2, 2, 2) in the scan frame, 1/nm, from joint fits of the mean pattern
    started from its dominant lattice turned by trial twists."""
    radius_px = disk_radius(template[None])
    disks = find_disks(mean[None], template, min_snr=min_snr, min_relative=min_relative)
    if len(disks.pattern) < 3:
        raise ValueError(
            f"no Bragg disks in the mean of the sampled crystal patterns (found {len(disks.pattern)} disk(s)); "
            "expected the disks of two lattices around the direct beam. All vacuum? Otherwise lower "
            "min_relative or min_snr."
        )
    origin = disks.position[:1]
    vectors = (disks.position[1:] - origin) @ np.linalg.inv(to_detector).T  # scan frame, 1/nm
    found = lattice_basis(vectors, disks.intensity[1:], tolerance=index_tolerance)
    starts = []
    for angle in _TWIST_SEARCH if twist is None else [twist]:
        half, full = _rotation(angle / 2), _rotation(angle)
        starts += [(half.T @ found, half @ found), (found, full @ found), (full.T @ found, found)]
    starts_px = to_detector @ np.array(starts)
    # every disk that reaches the detector, whatever the twist
    indices = [_lattice_points(to_detector @ found, np.hypot(*mean.shape) / 2 + radius_px)] * 2

    def fit(bases, n_iterations):
        patterns = np.broadcast_to(mean, (len(bases),) + mean.shape)
        return fit_lattices(patterns, template, np.repeat(origin, len(bases), axis=0), bases, indices,
                            n_iterations=n_iterations)

    screen = np.concatenate([fit(starts_px[i : i + 16], 0).residual for i in range(0, len(starts_px), 16)])
    best = fit(starts_px[np.argsort(screen)[:_N_REFINED]], 20)
    winner = int(np.argmin(best.residual))
    bragg = best.amplitude[winner] * (best.layer >= 0)
    share = np.array([bragg[best.layer == layer].sum() for layer in range(2)]) / bragg.sum()
    if share.min() < 0.1:
        raise ValueError(
            f"the mean pattern's Bragg intensity is shared {share[0]:.0%} / {share[1]:.0%} between the two fitted "
            "lattices; expected two layers (each at least 10 %). A single layer? Use strain_map."
        )
    bases = np.linalg.inv(to_detector) @ best.bases[winner]
    return np.stack(_paired(bases[0], bases[1]))


def _bilayer_block(patterns, *, template, bases_px, indices, radius_px, to_scan, pixel_size, min_snr, min_relative,
                   n_iterations):
    """Joint fit of a block of patterns (n, H, W): (n, _N_OUTPUTS) per-pattern numbers."""
    n = len(patterns)
    beam = direct_beam(patterns, radius_px)
    found = np.isfinite(beam.origin).all(axis=1)
    origin = np.where(found[:, None], beam.origin, np.array(patterns.shape[1:]) // 2)
    fit = fit_lattices(patterns, template, origin, bases_px, indices, n_iterations=n_iterations)
    threshold = _thresholds(patterns, template, cross_correlate(patterns, template), min_snr, min_relative)
    seen = fit.valid & (fit.amplitude > threshold[:, None]) & (fit.layer >= 0)
    misfit = np.hypot(fit.misfit[..., 0] * pixel_size[0], fit.misfit[..., 1] * pixel_size[1])  # 1/nm
    columns = [fit.origin, (to_scan @ fit.bases).reshape(n, 8)]
    status = []
    for layer in range(2):
        mine = seen & (fit.layer == layer)
        spread = np.einsum("nj,ja,jb->nab", mine.astype(float), fit.indices, fit.indices)
        spans = np.linalg.det(spread) > 0.5  # integer indices: 1 or more when not collinear
        code = np.where(~found | ~seen.any(axis=1), FitStatus.NO_DISKS,
                        np.where(spans, FitStatus.OK, FitStatus.TOO_FEW_INDEXED))
        weight = np.where(mine, fit.amplitude, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            residual = np.sqrt(np.nansum(weight * misfit**2, axis=1) / weight.sum(axis=1))
        status.append(code)
        columns += [np.where(code == FitStatus.OK, residual, np.nan)[:, None], mine.sum(axis=1)[:, None] + 1]
    ok = (status[0] == FitStatus.OK) & (status[1] == FitStatus.OK)
    columns[1] = np.where(ok[:, None], columns[1], np.nan)
    # (G1, G2) = to_scan (B1, B2): row-major elements transform by kron(to_scan, I)
    transform = np.kron(np.eye(2), np.kron(to_scan, np.eye(2)))
    covariance = transform @ fit.covariance[:, 2:, 2:] @ transform.T
    return np.column_stack(columns + [np.stack(status, axis=1), fit.residual, covariance[:, _UPPER[0], _UPPER[1]]])


@dataclass(frozen=True)
class BilayerResult:
    """Per-layer strain and the twist angle of a twisted bilayer, from :func:`bilayer_strain_map`.

    Attributes
    ----------
    layers : tuple of StrainResult
        The two layers, the second counter-clockwise of the first (twist >= 0). Each layer's
        strain and rotation are relative to its own reference basis (the median of its bases over
        the reference region); ``residual`` is the intensity-weighted RMS distance of its disks
        from its fitted lattice (1/nm), ``n_disks`` its disks above the detection threshold (the
        direct beam included), ``status`` its reason code. A pattern is fitted (status 0 in both
        layers, maps finite) only when both layers have two non-collinear disks above threshold.
        ``origin``, ``descan``, ``template``, ``disk_radius``, ``scan_rotation`` and ``reference``
        are shared.
    twist_angle : hyperspy.signal.BaseSignal
        Local twist of the second layer relative to the first (:func:`twist_angle`), degrees,
        counter-clockwise looking down the beam; NaN where not fitted.
    twist_angle_std : hyperspy.signal.BaseSignal
        One standard deviation of ``twist_angle``, degrees, from the joint fit's covariance
        (:attr:`JointFit.covariance`, both layers' bases and their correlation); NaN where not
        fitted.
    reference_twist : float
        Twist between the two reference bases, degrees.
    residual : hyperspy.signal.BaseSignal
        ``sum (P - M)^2 / sum P`` of the joint fit of each pattern (:class:`JointFit`): about 1
        where the model explains a pattern of counts to its Poisson noise.
    """

    layers: tuple[StrainResult, StrainResult]
    twist_angle: BaseSignal
    reference_twist: float
    residual: BaseSignal
    twist_angle_std: BaseSignal | None = None


def bilayer_strain_map(
    signal,
    *,
    twist: float | None = None,
    reference=None,
    scan_rotation: float = 0.0,
    descan_order: int = 2,
    min_snr: float = 5.0,
    min_relative: float = 2e-4,
    index_tolerance: float = 0.2,
    n_iterations: int = 20,
    block_pixels: int = 64,
    progress: bool = True,
) -> BilayerResult:
    """Strain of each layer and twist-angle map of a twisted bilayer from nanobeam 4D-STEM.

    Parameters
    ----------
    signal : hyperspy.signals.Signal2D
        ``(rows, cols | H, W)`` patterns, eager or lazy, calibrated as for
        :func:`~stemml_core.diffraction.strain.strain_map`.
    twist : float, optional
        Approximate twist angle, degrees, to start the fit of the mean pattern from (within a
        few degrees). None: trial twists from 1 to 59 degrees in steps of 1 degree are screened.
    reference : numpy.ndarray or PatternSegmentation, optional
        Reference region, as for :func:`~stemml_core.diffraction.strain.strain_map` (a bool
        mask, a segmentation or cluster labels, which :func:`reference_region` turns into a
        region using the first layer); None: every pattern fitted in both layers.
    scan_rotation : float
        Rotation of the diffraction pattern relative to the scan, degrees, counter-clockwise.
    descan_order : int
        Degree of the polynomial fitted to the direct-beam positions.
    min_snr, min_relative : float
        Thresholds a disk's fitted intensity must pass to count (as in
        :func:`~stemml_core.diffraction.disks.find_disks`).
    index_tolerance : float
        Indexing tolerance for finding the lattices of the mean pattern.
    n_iterations : int
        Most Gauss-Newton steps of each pattern's joint fit.
    block_pixels : int
        Patterns per block for in-memory input (memory: of the order of 1 MB per 128 x 128 pattern).
    progress : bool
        Show a text progress bar.

    Returns
    -------
    BilayerResult
        A :class:`~stemml_core.diffraction.strain.StrainResult` per layer, the twist-angle map
        (degrees) and the joint fit's residual.

    Raises
    ------
    stemml_core.io.InputError
        Not 4D, uncalibrated axes, a scan of one position, a saturated direct beam.
    ValueError
        No Bragg disks in the mean pattern, a second lattice with less than 10 % of the Bragg
        intensity (one layer), no pattern fitted in both layers, a bad ``reference``.

    Notes
    -----
    1. As :func:`~stemml_core.diffraction.strain.strain_map`: sampled patterns give the disk
       radius, the direct beams and the probe template.
    2. The mean of the sampled crystal patterns gives both lattices: its disks are detected and
       the lattice that indexes most of their intensity is taken as one layer, or as the blend of
       both where their disks overlap. For each trial twist (``twist``, or 1 to 59 degrees) three
       starts (that lattice as the first layer, as the second, or as their blend) are scored by
       the joint fit's residual at the start; the best five are fitted in full
       (:func:`fit_lattices`) and the lowest residual wins. Each layer must hold at least 10 % of
       the Bragg intensity. The second layer's basis is re-indexed to match the first and the
       layers are ordered so that the twist is counter-clockwise.
    3. Every pattern is fitted jointly from there, its origin started at its direct beam
       (:func:`~stemml_core.diffraction.disks.direct_beam`); disks with a fitted intensity above
       the detection threshold count.
    4. Per layer ``G0`` is the median basis over the reference; strain and rotation follow
       :func:`~stemml_core.diffraction.strain.strain_components`; the twist is
       :func:`twist_angle` of the two fitted bases.

    The joint fit separates overlapping disks of the two layers by modelling them, so it works
    down to small twists where every first-order disk of one layer overlaps one of the other;
    how precise it is there depends on the dose (see the tests). As in :cite:`vanHeijst2024`,
    the twist and the strain of each layer come from the same patterns.
    """
    signal = load_4dstem(signal)
    scan_shape = tuple(signal.axes_manager.navigation_shape[::-1])
    pixel_size = np.array([axis.scale for axis in signal.axes_manager.signal_axes[::-1]])  # (ky, kx) 1/nm
    mask, labels, _ = _checked_reference(reference, None, scan_shape)
    if twist is not None and not (np.isfinite(twist) and 0 < abs(twist) < 180):
        raise ValueError(f"twist={twist!r} degrees; expected the approximate twist angle, non-zero, or None.")

    sample = _sample(signal)
    radius, beam, crystal, template = _probe(sample, pixel_size)
    radius_px = radius / pixel_size
    to_detector = _detector_matrix(pixel_size, scan_rotation)
    mean = _mean_aligned(sample[crystal], beam.origin[crystal])
    bases = _mean_pattern_bases(mean, template, to_detector, twist, min_snr=min_snr, min_relative=min_relative,
                                index_tolerance=index_tolerance)
    origins = beam.origin[np.isfinite(beam.origin).all(axis=1)]
    centre = np.median(origins, axis=0)
    margin = radius_px.max() + np.abs(origins - centre).max() + 2
    bases_px = to_detector @ bases
    indices = [_disk_indices(basis, centre, signal.axes_manager.signal_shape[::-1], margin) for basis in bases_px]

    fitted = map_pixels(
        signal,
        _bilayer_block,
        output_shape=(_N_OUTPUTS,),
        block_pixels=block_pixels,
        progress=progress,
        description="Joint lattice fit",
        template=template,
        bases_px=bases_px,
        indices=indices,
        radius_px=radius_px,
        to_scan=np.linalg.inv(to_detector),
        pixel_size=tuple(pixel_size),
        min_snr=min_snr,
        min_relative=min_relative,
        n_iterations=n_iterations,
    )
    values = compute_map(fitted, progress=progress, description="Joint lattice fit")
    origin = values[..., :2]
    basis = values[..., 2:10].reshape(scan_shape + (2, 2, 2))
    status = values[..., 14:16].astype(np.uint8)
    ok = (status == FitStatus.OK).all(axis=-1)
    if not ok.any():
        codes = {FitStatus(code).name: int((status == code).sum()) for code in np.unique(status)}
        raise ValueError(
            f"no pattern could be fitted in both layers (reason codes {codes}); expected Bragg disks of two lattices."
        )
    if labels is not None:
        mask = reference_region(labels, basis[..., 0, :, :], np.where(ok, FitStatus.OK, status.max(axis=-1)))
    selected = int(mask.sum())
    mask = mask & ok
    if not mask.any():
        raise ValueError(
            f"reference selects {selected} scan positions, none of them fitted in both layers; expected a region "
            "of the bilayer. Check the layers' status or choose another region."
        )
    reference_bases = np.median(basis[mask], axis=0)
    descan = fit_descan(origin, order=_feasible_order(descan_order, np.isfinite(origin).all(axis=-1).sum()))
    covariance = np.zeros(scan_shape + (8, 8))
    covariance[..., _UPPER[0], _UPPER[1]] = values[..., 17:]
    covariance = covariance + np.swapaxes(np.triu(covariance, 1), -1, -2)
    fitted_basis = np.where(ok[..., None, None, None], basis, np.eye(2))
    titles = ("Strain exx", "Strain eyy", "Strain exy", "Rotation theta")
    quantities = ("Strain", "Strain", "Strain", "Rotation (rad)")
    layers = []
    for layer in range(2):
        name = f"layer {layer + 1}"
        components = strain_components(basis[..., layer, :, :], reference_bases[layer])
        maps = [navigation_map(component, signal, title=f"{title} ({name})", quantity=quantity)
                for component, title, quantity in zip(components, titles, quantities)]
        block = slice(4 * layer, 4 * layer + 4)
        errors = strain_uncertainty(fitted_basis[..., layer, :, :], covariance[..., block, block],
                                    reference_bases[layer])
        error_maps = {f"{component}_std": navigation_map(np.where(ok, error, np.nan), signal,
                                                        title=f"{title} ({name}), one standard deviation",
                                                        quantity=quantity)
                      for component, error, title, quantity in zip(COMPONENTS, errors, titles, quantities)}
        layers.append(StrainResult(
            *maps,
            residual=navigation_map(values[..., 10 + 2 * layer], signal, title=f"Lattice fit residual ({name})",
                                    quantity="Residual (1/nm)"),
            n_disks=navigation_map(values[..., 11 + 2 * layer].astype(int), signal, title=f"Disks ({name})",
                                   quantity="Disks"),
            status=navigation_map(status[..., layer], signal, title=f"Fit status ({name})", quantity="Reason code"),
            basis=basis[..., layer, :, :],
            reference_basis=reference_bases[layer],
            reference=mask,
            origin=origin,
            descan=descan,
            template=template,
            disk_radius=radius,
            scan_rotation=float(scan_rotation),
            **error_maps,
        ))
    twist_error = _twist_uncertainty(fitted_basis[..., 0, :, :], fitted_basis[..., 1, :, :], covariance)
    twist_map = navigation_map(twist_angle(basis[..., 0, :, :], basis[..., 1, :, :]), signal, title="Twist angle",
                               quantity="Twist angle (deg)")
    return BilayerResult(
        layers=tuple(layers),
        twist_angle=twist_map,
        reference_twist=float(twist_angle(reference_bases[0], reference_bases[1])),
        residual=navigation_map(values[..., 16], signal, title="Joint fit residual", quantity="Residual / Poisson"),
        twist_angle_std=navigation_map(np.where(ok, twist_error, np.nan), signal,
                                       title="Twist angle, one standard deviation", quantity="Twist angle (deg)"),
    )
