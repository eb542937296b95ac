"""Nanobeam 4D-STEM of a strained hexagonal 2D crystal, with strain and rotation ground truth.

Conventions (every function and the truth of this module use them):

- **Scan frame.** Scan position ``(row, col)`` lies at ``y = row * scan_step`` and
  ``x = col * scan_step`` (nm); x is the fast axis (columns), y the slow axis (rows). Displayed
  with ``imshow`` (row 0 at the top, x to the right) the scan is taken as seen looking down the
  beam, so (x, y, beam direction) is a right-handed frame.
- **Components.** Every 2-vector and 2x2 tensor of the deformation and of the reciprocal
  lattice is written in ``(x, y)`` component order (``kx``, ``ky`` for reciprocal vectors);
  only detector pixel positions are ``(row, col)``, i.e. ``(y, x)`` order.
- **Deformation.** ``displacement_gradient`` is ``D = F - I`` with ``F[i, j] = delta_ij +
  du_i/dx_j`` (``F[0, 1] = du_x/dy``). A reciprocal basis ``G`` has the basis vectors as
  *columns*, ``G = [g1 g2]`` (``G[:, 0] = g1 = (g1x, g1y)``), in 1/nm (no factor 2 pi,
  ``a_i . g_j = delta_ij``). It transforms as ``G = F^{-T} G0``, so ``F = (G0 G^{-1})^T``.
- **Strain** ``eps = sym(F) - I``: ``exx = F[0, 0] - 1``, ``eyy = F[1, 1] - 1``,
  ``exy = (F[0, 1] + F[1, 0]) / 2``; dimensionless (0.01 = 1 %), tensile positive, ``exy`` the
  tensor shear (half the engineering shear).
- **Rotation** ``theta = (F[0, 1] - F[1, 0]) / 2`` (the antisymmetric part), in radians,
  counter-clockwise looking down the beam, i.e. counter-clockwise on the ``imshow`` display:
  ``theta > 0`` turns +x towards -y (up). A small rigid rotation is
  ``F = [[1, theta], [-theta, 1]]``; conversely ``D = [[exx, exy + theta], [exy - theta, eyy]]``.
- **Detector.** Pixel ``(row, col)`` has its centre at the integer index and reads
  ``ky = (row - H // 2) * k_pixel_size[0]``, ``kx = (col - W // 2) * k_pixel_size[1]`` (1/nm)
  relative to the nominal optical axis (pixel ``(H // 2, W // 2)``); ``ky`` grows with the row,
  as y does. A reciprocal vector ``g`` of the scan frame appears at ``k_det = R(scan_rotation) g``
  with ``R(phi) = [[cos phi, sin phi], [-sin phi, cos phi]]`` (counter-clockwise, as ``theta``),
  i.e. at pixel ``(origin_row + k_det_y / k_pixel_size[0], origin_col + k_det_x / k_pixel_size[1])``,
  where ``origin`` is the direct-beam centre of that pattern (descan included).

The reference lattice, ``F = I``, is the unstrained crystal: every strain and rotation of the
truth is relative to it. All angles given as arguments are in degrees, all angles of the truth in
radians.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from math import ceil, sqrt
from typing import NamedTuple

import hyperspy.api as hs
import numpy as np
from scipy.special import erfc

from stemml_core._frozen import ReadOnlyArrays
from stemml_core.electrons import electron_wavelength

__all__ = [
    "LATTICE_CONSTANTS",
    "LayerStrain",
    "StrainTruth",
    "electron_wavelength",
    "hexagonal_reciprocal_basis",
    "simulate_4dstem",
    "strained_flake",
    "twisted_bilayer",
]

LATTICE_CONSTANTS = {"MoS2": 0.316, "WS2": 0.315}
"""In-plane lattice constants ``a`` of the 2H crystals, nm."""


# Strained flake: Gaussian features of the displacement gradient, centres as fractions of the
# scan's (x, y) field of view, width as a fraction of the smaller field-of-view side.
_FLAKE_FEATURES = (
    ("exx", 0.02, (0.25, 0.45)),
    ("eyy", -0.01, (0.55, 0.40)),
    ("exy", 0.005, (0.82, 0.55)),
    ("theta", float(np.deg2rad(0.5)), (0.65, 0.78)),
)
_FLAKE_FEATURE_WIDTH = 0.06
_FLAKE_REFERENCE = "x < 0.35 * field width and y > 0.7 * field height (bottom-left corner)"
# Twisted bilayer: features of the second layer's F2 - F1 (a local twist, a heterostrain), same form.
_BILAYER_FEATURES = (
    ("theta", float(np.deg2rad(0.3)), (0.5, 0.6)),
    ("exx", 0.005, (0.8, 0.3)),
)


@dataclass(frozen=True)
class LayerStrain(ReadOnlyArrays):
    """Strain and rotation of the second layer of a twisted bilayer.

    Same conventions as :class:`StrainTruth`; strain and rotation are relative to the second
    layer's own reference, the first layer's reference turned by the twist angle.

    Attributes
    ----------
    exx, eyy, exy, theta : numpy.ndarray
        ``(rows, cols)`` at the probe centre; strain dimensionless, ``theta`` in rad; NaN in vacuum.
        The local twist angle between the layers is ``radians(twist_deg) + theta - truth.theta``.
    exx_avg, eyy_avg, exy_avg, theta_avg : numpy.ndarray
        ``(rows, cols)`` averaged over the probe intensity; NaN in vacuum.
    reference_basis : numpy.ndarray
        ``(2, 2)`` reciprocal basis of the unstrained second layer, 1/nm, columns ``g1``, ``g2``
        in ``(kx, ky)`` components of the scan frame.
    """

    exx: np.ndarray
    eyy: np.ndarray
    exy: np.ndarray
    theta: np.ndarray
    exx_avg: np.ndarray
    eyy_avg: np.ndarray
    exy_avg: np.ndarray
    theta_avg: np.ndarray
    reference_basis: np.ndarray


@dataclass(frozen=True)
class StrainTruth(ReadOnlyArrays):
    """Ground truth of :func:`simulate_4dstem`.

    Conventions are those of the module docstring: ``eps = sym(F) - I`` dimensionless (0.01 =
    1 %), tensile positive, ``exy`` the tensor shear (half the engineering shear);
    ``theta = (F[0, 1] - F[1, 0]) / 2`` in rad, counter-clockwise looking down the beam, in the
    scan frame (x = fast axis; the scan-diffraction rotation is not part of ``theta``, an
    analysis undoes it before comparing); relative to the unstrained reference ``F = I``. The
    arrays are read-only.

    Attributes
    ----------
    exx, eyy, exy, theta : numpy.ndarray
        ``(rows, cols)`` float64, at the probe centre; NaN where ``vacuum``.
    exx_avg, eyy_avg, exy_avg, theta_avg : numpy.ndarray
        ``(rows, cols)`` float64, ``F`` averaged over the probe intensity (Airy disc of the
        convergence semi-angle) on the crystal under the probe; these are what the patterns
        show. NaN where ``vacuum``.
    vacuum : numpy.ndarray
        ``(rows, cols)`` bool; True where the probe centre is in vacuum (only the direct beam).
    origin : numpy.ndarray
        ``(rows, cols, 2)`` float64, direct-beam centre ``(row, col)`` in detector px.
    reference_basis : numpy.ndarray
        ``(2, 2)`` reciprocal basis of the unstrained (first) layer, 1/nm, columns ``g1``, ``g2``
        in ``(kx, ky)`` components of the scan frame: ``reference_basis[:, 0] = g1``.
    twist_deg : float or None
        Twist of the second layer relative to the first, degrees, counter-clockwise; None for a
        single layer.
    second_layer : LayerStrain or None
        Strain and rotation of the second layer; None for a single layer.
    params : dict
        Every scalar knob of the simulation (provenance), with units in the key names;
        :meth:`disk_positions` reads ``k_pixel_size_inv_nm`` ``(ky, kx)`` and
        ``scan_rotation_deg`` from it.
    tilt : numpy.ndarray or None
        ``(rows, cols, 2)`` float64 tilt vector ``tau`` of the specimen at the probe centre, rad,
        ``(x, y)`` components of the scan frame (see ``tilt`` of :func:`simulate_4dstem`): the
        tilt angle is ``|tau|``, the tilt axis lies in the specimen plane perpendicular to
        ``tau``. Zero where untilted, NaN in vacuum; None only for a truth built by hand.
        Strain and rotation above are those of the lattice itself, without the apparent
        compression by ``cos |tau|`` that the projection adds to the patterns.
    """

    exx: np.ndarray
    eyy: np.ndarray
    exy: np.ndarray
    theta: np.ndarray
    exx_avg: np.ndarray
    eyy_avg: np.ndarray
    exy_avg: np.ndarray
    theta_avg: np.ndarray
    vacuum: np.ndarray
    origin: np.ndarray
    reference_basis: np.ndarray
    twist_deg: float | None
    second_layer: LayerStrain | None
    params: dict
    tilt: np.ndarray | None = None

    def reciprocal_basis(self, *, averaged: bool = True, layer: int = 1) -> np.ndarray:
        """Local reciprocal basis ``G = F^{-T} G0`` at every scan position.

        Parameters
        ----------
        averaged : bool
            Use the probe-averaged ``F`` (what the patterns show) rather than ``F`` at the probe
            centre.
        layer : {1, 2}
            Which layer; 2 needs a twisted bilayer.

        Returns
        -------
        numpy.ndarray
            ``(rows, cols, 2, 2)`` in 1/nm, columns ``g1``, ``g2`` in ``(kx, ky)`` components of
            the scan frame; NaN in vacuum.
        """
        strain = self._layer(layer)
        suffix = "_avg" if averaged else ""
        components = (getattr(strain, name + suffix) for name in ("exx", "eyy", "exy", "theta"))
        return _deformed_basis(_gradient_from_components(*components), strain.reference_basis)

    def disk_positions(self, indices, *, layer: int = 1) -> np.ndarray:
        """Centres of the Bragg disks ``h g1 + k g2`` on the detector, as rendered.

        Parameters
        ----------
        indices : array_like
            ``(n, 2)`` integer indices ``(h, k)`` on the layer's reference basis.
        layer : {1, 2}
            Which layer; 2 needs a twisted bilayer.

        Returns
        -------
        numpy.ndarray
            ``(rows, cols, n, 2)`` disk centres ``(row, col)`` in detector px, from the
            probe-averaged ``F``, the projection of a tilted specimen (``tilt``), the
            scan-diffraction rotation, the pixel sizes and ``origin``; NaN in vacuum (there only
            the direct beam, ``origin``, exists).
        """
        basis = self.reciprocal_basis(averaged=True, layer=layer)
        if self.tilt is not None:
            basis = _projected(basis, np.nan_to_num(self.tilt))
        return _detector_positions(
            basis,
            np.asarray(indices, dtype=float),
            self.origin,
            self.params["scan_rotation_deg"],
            self.params["k_pixel_size_inv_nm"],
        )

    def twist_angle(self, *, averaged: bool = True) -> np.ndarray:
        """Local twist of the second layer relative to the first.

        Parameters
        ----------
        averaged : bool
            From the probe-averaged ``F`` of each layer (what the patterns show) rather than ``F``
            at the probe centre.

        Returns
        -------
        numpy.ndarray
            ``(rows, cols)`` degrees, counter-clockwise: the rotation of the polar decomposition
            of ``G2 G1^-1`` (``G`` the local reciprocal bases), ``atan2(M01 - M10, M00 + M11)``;
            to first order ``twist_deg + degrees(theta2 - theta1)``. NaN in vacuum.
        """
        first = self.reciprocal_basis(averaged=averaged, layer=1)
        relation = self.reciprocal_basis(averaged=averaged, layer=2) @ np.linalg.inv(first)
        turned = relation[..., 0, 1] - relation[..., 1, 0]
        return np.degrees(np.arctan2(turned, relation[..., 0, 0] + relation[..., 1, 1]))

    def _layer(self, layer: int):
        if layer == 1:
            return self
        if layer == 2 and self.second_layer is not None:
            return self.second_layer
        raise ValueError(
            f"layer={layer!r} does not exist; expected 1"
            + (" or 2." if self.second_layer is not None else " (this truth has a single layer).")
        )


def _rotation(angle: float) -> np.ndarray:
    """Counter-clockwise (looking down the beam) rotation by ``angle`` rad, (x, y) components."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, s], [-s, c]])


def hexagonal_reciprocal_basis(a: float, orientation: float = 0.0) -> np.ndarray:
    """Reciprocal basis of a hexagonal 2D lattice.

    Parameters
    ----------
    a : float
        In-plane lattice constant, nm.
    orientation : float
        Angle of ``g1`` counter-clockwise from +kx (looking down the beam), degrees.

    Returns
    -------
    numpy.ndarray
        ``(2, 2)`` in 1/nm, columns ``g1``, ``g2`` in ``(kx, ky)`` components; ``|g| =
        2 / (sqrt(3) a)`` and ``g2`` is ``g1`` turned by 60 degrees counter-clockwise.

    Notes
    -----
    The real-space basis ``a1`` (at ``orientation - 30`` degrees) and ``a2`` (at
    ``orientation + 90`` degrees), 120 degrees apart with ``|a_i| = a``, obeys
    ``a_i . g_j = delta_ij``. With this basis ``(h, k)`` are the Miller indices of the usual
    hexagonal setting: {1 0} is the first order, {1 1} the second, {2 0} the third.

    Examples
    --------
    >>> basis = hexagonal_reciprocal_basis(0.316)
    >>> np.round(basis, 3)
    array([[ 3.654,  1.827],
           [ 0.   , -3.165]])
    """
    first = np.array([1.0, 0.0]) * 2 / (sqrt(3) * a)
    angle = np.deg2rad(orientation)
    return np.stack([_rotation(angle) @ first, _rotation(angle + np.pi / 3) @ first], axis=1)


def _gradient_from_components(exx, eyy, exy, theta) -> np.ndarray:
    """``D = F - I = [[exx, exy + theta], [exy - theta, eyy]]``, shape (..., 2, 2)."""
    return np.stack([np.stack([exx, exy + theta], -1), np.stack([exy - theta, eyy], -1)], -2)


def _deformed_basis(gradient: np.ndarray, reference_basis: np.ndarray) -> np.ndarray:
    """``G = F^{-T} G0`` for ``gradient = F - I`` of shape (..., 2, 2)."""
    inverse = np.linalg.inv(np.eye(2) + gradient)
    return np.swapaxes(inverse, -1, -2) @ reference_basis


def _detector_positions(basis, indices, origin, scan_rotation, k_pixel_size) -> np.ndarray:
    """Disk centres (row, col) px, shape (..., n, 2), of ``indices`` (n, 2) on ``basis`` (..., 2, 2)."""
    k_scan = np.einsum("...ij,nj->...ni", basis, indices)
    k_det = k_scan @ _rotation(np.deg2rad(scan_rotation)).T
    return origin[..., None, :] + k_det[..., ::-1] / np.asarray(k_pixel_size)


def _projected(basis: np.ndarray, tilt: np.ndarray) -> np.ndarray:
    """Reciprocal basis (..., 2, 2) of the lattice projected along the beam, for tilt vectors
    ``tilt`` (..., 2) rad: ``P^-1 G`` with ``P = I - (1 - cos phi) n n^T`` the real-space
    projection (``phi = |tilt|``, ``n = tilt / phi``)."""
    phi = np.linalg.norm(tilt, axis=-1)
    safe = np.where(phi > 0, phi, 1.0)
    factor = np.where(phi > 0, (1 / np.cos(phi) - 1) / safe**2, 0.5)  # limit 1/2 at phi = 0
    inverse = np.eye(2) + factor[..., None, None] * tilt[..., :, None] * tilt[..., None, :]
    return inverse @ basis


def _excitation_factor(g: np.ndarray, tilt: np.ndarray, wavelength: float, thickness: float) -> np.ndarray:
    """Relative intensity (n, m) of disks ``g`` (m, 2) 1/nm under tilts (n, 2) rad: the relrod
    profile ``L(s) = 1 / (1 + (pi t s)^2)`` at the excitation error ``s = -(g . tau + lambda
    |g|^2 / 2)``, divided by its value at ``tau = 0``."""

    def profile(s):
        return 1 / (1 + (np.pi * thickness * s) ** 2)

    curvature = wavelength * (g**2).sum(axis=1) / 2
    return profile(-(tilt @ g.T + curvature)) / profile(-curvature)


def _aperture_autocorrelation(q: np.ndarray, wavelength: float, convergence_angle: float) -> np.ndarray:
    """Fourier transform of the aberration-free probe intensity, 1 at ``q = 0``; q in 1/nm, angle in rad."""
    s = np.minimum(q * wavelength / (2 * convergence_angle), 1.0)
    return (2 / np.pi) * (np.arccos(s) - s * np.sqrt(1 - s**2))


class _FineGrid(NamedTuple):
    """Scan grid refined ``factor`` times (odd) and extended by ``margin`` samples on every side."""

    y: np.ndarray  # (ny, nx) nm
    x: np.ndarray  # (ny, nx) nm
    step: float  # nm
    factor: int
    margin: int
    scan_shape: tuple[int, int]

    def at_scan(self, values: np.ndarray) -> np.ndarray:
        rows, cols = self.scan_shape
        stop_y, stop_x = self.margin + rows * self.factor, self.margin + cols * self.factor
        return values[self.margin : stop_y : self.factor, self.margin : stop_x : self.factor]

    def from_scan(self, values: np.ndarray) -> np.ndarray:
        """Nearest scan position's value at every sample (constant over each scan pixel)."""
        rows, cols = self.scan_shape
        iy = np.clip(np.rint((np.arange(self.y.shape[0]) - self.margin) / self.factor), 0, rows - 1).astype(int)
        ix = np.clip(np.rint((np.arange(self.x.shape[1]) - self.margin) / self.factor), 0, cols - 1).astype(int)
        return values[iy][:, ix]


def _fine_grid(scan_shape, scan_step, wavelength, convergence_angle) -> _FineGrid:
    resolution = wavelength / convergence_angle  # nm, lambda / alpha
    factor = ceil(scan_step / (resolution / 8))
    factor += 1 - factor % 2
    step = scan_step / factor
    margin = ceil(4 * resolution / step)
    rows, cols = scan_shape
    y = (np.arange((rows - 1) * factor + 1 + 2 * margin) - margin) * step
    x = (np.arange((cols - 1) * factor + 1 + 2 * margin) - margin) * step
    yy, xx = np.meshgrid(y, x, indexing="ij")
    return _FineGrid(yy, xx, step, factor, margin, scan_shape)


def _probe_filter(values: np.ndarray, grid: _FineGrid, wavelength: float, convergence_angle: float) -> np.ndarray:
    """Convolve ``values`` (ny, nx, ...) with the probe intensity (periodic over the fine grid)."""
    ny, nx = values.shape[:2]
    q = np.hypot(np.fft.fftfreq(ny, grid.step)[:, None], np.fft.rfftfreq(nx, grid.step)[None, :])
    transfer = _aperture_autocorrelation(q, wavelength, convergence_angle)
    transfer = transfer.reshape(transfer.shape + (1,) * (values.ndim - 2))
    return np.fft.irfft2(np.fft.rfft2(values, axes=(0, 1)) * transfer, s=(ny, nx), axes=(0, 1))


def _on_grid(value, grid: _FineGrid, trailing: tuple, name: str, dtype=float) -> np.ndarray:
    """Sample a callable of (y_nm, x_nm), or a scan-grid array, on the fine grid."""
    if callable(value):
        result = np.asarray(value(grid.y, grid.x), dtype=dtype)
        expected = grid.y.shape + trailing
        try:
            return np.broadcast_to(result, expected)
        except ValueError:
            raise ValueError(
                f"{name} returned an array of shape {result.shape} for coordinate arrays of shape "
                f"{grid.y.shape}; expected {expected}."
            ) from None
    return grid.from_scan(value)


def _scan_array(value, scan_shape, trailing, name) -> np.ndarray:
    array = np.asarray(value, dtype=float)
    expected = tuple(scan_shape) + trailing
    try:
        return np.broadcast_to(array, expected)
    except ValueError:
        raise ValueError(
            f"{name} has shape {array.shape}; expected {expected} (scan rows, cols{', 2' * len(trailing)}) "
            "or a callable of (y_nm, x_nm)."
        ) from None


def _strain_components(gradient: np.ndarray, vacuum: np.ndarray) -> tuple[np.ndarray, ...]:
    """(exx, eyy, exy, theta) of ``gradient = F - I`` (rows, cols, 2, 2), NaN in vacuum."""
    exx = gradient[..., 0, 0]
    eyy = gradient[..., 1, 1]
    exy = (gradient[..., 0, 1] + gradient[..., 1, 0]) / 2
    theta = (gradient[..., 0, 1] - gradient[..., 1, 0]) / 2
    return tuple(np.where(vacuum, np.nan, component) for component in (exx, eyy, exy, theta))


def _unit_coordinates(scan_shape) -> tuple[np.ndarray, np.ndarray]:
    """Scan coordinates (v, u) scaled to [-1, 1] along (rows, cols), shape (rows, cols) each."""
    rows, cols = scan_shape
    v = np.linspace(-1, 1, rows) if rows > 1 else np.zeros(1)
    u = np.linspace(-1, 1, cols) if cols > 1 else np.zeros(1)
    return np.meshgrid(v, u, indexing="ij")


def _disk_weights(indices: np.ndarray, reference_basis: np.ndarray, falloff: float, asymmetry: float) -> np.ndarray:
    """Relative intensity of each diffracted disk, ``exp(-(|g0| / falloff)^2) (1 + asymmetry cos 3 psi)``."""
    g0 = indices @ reference_basis.T
    length = np.linalg.norm(g0, axis=1)
    g1 = reference_basis[:, 0]
    cos_psi = np.clip(g0 @ g1 / (length * np.linalg.norm(g1)), -1, 1)
    return np.exp(-((length / falloff) ** 2)) * (1 + asymmetry * np.cos(3 * np.arccos(cos_psi)))


def _lattice_indices(reference_basis: np.ndarray, reach: float) -> np.ndarray:
    """All (h, k) != (0, 0) with ``|h g1 + k g2| <= reach``, shape (n, 2)."""
    n_max = ceil(reach / np.linalg.svd(reference_basis, compute_uv=False)[-1])
    h, k = np.meshgrid(np.arange(-n_max, n_max + 1), np.arange(-n_max, n_max + 1), indexing="ij")
    indices = np.stack([h.ravel(), k.ravel()], axis=1)
    length = np.linalg.norm(indices @ reference_basis.T, axis=1)
    return indices[(length <= reach) & (length > 0)].astype(float)


def _disk_half_window(radius, k_pixel_size, edge_width) -> np.ndarray:
    """Half size (rows, cols) in px of the window that holds a disk and its edge out to 5 sigma."""
    scale = np.asarray(k_pixel_size, dtype=float)
    return np.ceil((radius + 5 * edge_width * scale.max()) / scale).astype(int) + 1


def _render_disks(out, centres, weights, radius, k_pixel_size, edge_width) -> None:
    """Add soft-edged disks to ``out`` (n_patterns, H, W) in place.

    ``centres`` (n_patterns, n_disks, 2) (row, col) px; ``weights`` (n_patterns, n_disks);
    ``radius`` 1/nm. The profile is ``erfc((d - radius) / (sqrt(2) sigma)) / 2`` with ``d`` the
    distance in 1/nm and ``sigma = edge_width * max(k_pixel_size)``.
    """
    n_patterns, height, width = out.shape
    scale = np.asarray(k_pixel_size, dtype=float)
    sigma = edge_width * scale.max()
    half = _disk_half_window(radius, k_pixel_size, edge_width)
    span_r, span_c = np.arange(2 * half[0] + 1), np.arange(2 * half[1] + 1)
    patterns = np.arange(n_patterns)[:, None, None]
    for disk in range(centres.shape[1]):
        row, col = centres[:, disk, 0], centres[:, disk, 1]
        top = np.clip(np.floor(row).astype(int) - half[0], 0, height - span_r.size)
        left = np.clip(np.floor(col).astype(int) - half[1], 0, width - span_c.size)
        rr = top[:, None] + span_r  # (n_patterns, window rows)
        cc = left[:, None] + span_c
        distance = np.hypot(
            ((rr - row[:, None]) * scale[0])[:, :, None],
            ((cc - col[:, None]) * scale[1])[:, None, :],
        )
        profile = 0.5 * erfc((distance - radius) / (sqrt(2) * sigma))
        out[patterns, rr[:, :, None], cc[:, None, :]] += weights[:, disk, None, None] * profile


def _poisson_counts(data, dose, random_state) -> None:
    """Turn ``data`` (float32 patterns per incident electron, scan rows first) into Poisson counts for ``dose``
    electrons per pattern, in place; nothing when ``dose`` is None (noise-free)."""
    if dose is not None:
        data *= np.float32(dose)
        rng = np.random.default_rng(random_state)
        for row in data:  # row by row keeps the int64 draws small
            row[...] = rng.poisson(row)


def _positive(name, value, unit):
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r}{unit}; expected a positive number.")


def _shape(value, name, meaning) -> tuple[int, int]:
    if len(value) != 2 or not all(int(n) == n and n > 0 for n in value):
        raise ValueError(f"{name}={value!r}; expected two positive integers {meaning}.")
    return tuple(int(n) for n in value)


def _pixel_sizes(k_pixel_size) -> tuple[float, float]:
    """(ky, kx) detector pixel sizes, 1/nm, from one value or a pair."""
    sizes = np.ravel(np.asarray(k_pixel_size, dtype=float))
    if np.ndim(k_pixel_size) > 1 or sizes.size not in (1, 2) or not (np.isfinite(sizes) & (sizes > 0)).all():
        raise ValueError(f"k_pixel_size={k_pixel_size!r} 1/nm; expected a positive number or a (ky, kx) pair of them.")
    return tuple(float(s) for s in np.broadcast_to(sizes, (2,)))


def _gradient_and_scan_shape(displacement_gradient, scan_shape):
    """The validated displacement gradient (array or callable) and the scan shape it implies."""
    if callable(displacement_gradient):
        if scan_shape is None:
            raise ValueError("scan_shape=None with a callable displacement_gradient; pass scan_shape=(rows, cols).")
        return displacement_gradient, _shape(scan_shape, "scan_shape", "(rows, cols)")
    gradient = np.asarray(displacement_gradient, dtype=float)
    if gradient.ndim != 4 or gradient.shape[2:] != (2, 2) or 0 in gradient.shape:
        raise ValueError(
            f"displacement_gradient has shape {gradient.shape}; expected (rows, cols, 2, 2) "
            "or a callable of (y_nm, x_nm)."
        )
    if scan_shape is not None and tuple(scan_shape) != gradient.shape[:2]:
        raise ValueError(
            f"scan_shape={scan_shape!r} differs from displacement_gradient's scan shape {gradient.shape[:2]}."
        )
    return gradient, gradient.shape[:2]


def _descan_shift(descan, scan_shape) -> np.ndarray:
    """Direct-beam shift (d_row, d_col) px, shape (rows, cols, 2), from an amplitude or an array."""
    if np.ndim(descan) == 0:
        if not np.isfinite(descan) or descan < 0:
            raise ValueError(f"descan={descan!r} px; expected a non-negative amplitude or a (rows, cols, 2) array.")
        v, u = _unit_coordinates(scan_shape)
        return descan * np.stack([0.75 * v - 0.25 * u**2, 0.75 * u + 0.25 * u * v], axis=-1)
    shift = np.asarray(descan, dtype=float)
    if shift.shape != scan_shape + (2,):
        raise ValueError(f"descan has shape {shift.shape}; expected {scan_shape + (2,)} (d_row, d_col) px or a float.")
    return shift


def _probe_averaged(layer_gradients, crystal, grid: _FineGrid, wavelength, convergence_angle):
    """F - I of each layer at the scan positions, at the probe centre and probe-averaged.

    ``layer_gradients``: (ny, nx, 2, 2) per layer and ``crystal`` (ny, nx) 0/1 on the fine grid.
    Returns lists of (rows, cols, 2, 2) (zero in vacuum), the vacuum mask (rows, cols) and the
    crystal fraction under the probe (rows, cols), zero in vacuum.
    """
    vacuum = grid.at_scan(crystal) == 0
    fraction = np.clip(grid.at_scan(_probe_filter(crystal, grid, wavelength, convergence_angle)), 0, 1)
    fraction[vacuum] = 0
    mask = ~vacuum[..., None, None]
    point, averaged = [], []
    for gradient in layer_gradients:
        point.append(np.where(mask, grid.at_scan(gradient), 0.0))
        weighted = grid.at_scan(_probe_filter(gradient * crystal[..., None, None], grid, wavelength, convergence_angle))
        averaged.append(np.divide(weighted, fraction[..., None, None], out=np.zeros_like(weighted), where=mask))
    for gradient in point + averaged:
        if not np.isfinite(gradient).all() or (np.abs(np.linalg.det(np.eye(2) + gradient)) < 0.1).any():
            raise ValueError(
                "displacement_gradient (or heterostrain) gives a non-finite or near-singular F = I + D; "
                "expected |D| << 1."
            )
    return point, averaged, vacuum, fraction


def _render_patterns(
    averaged, references, origin, scattered, *, detector_shape, k_pixel, radius, edge_width, scan_rotation,
    intensity_falloff, asymmetry, tilt=None, wavelength=None, thickness=None,
) -> np.ndarray:
    """Noise-free patterns (rows * cols, H, W) float32, each summing to 1.

    ``averaged``: probe-averaged F - I (rows, cols, 2, 2) and ``references``: reference basis
    (2, 2) per layer; ``origin`` (rows, cols, 2) px; ``scattered`` (rows, cols): fraction of the
    beam one layer scatters; ``tilt`` (rows, cols, 2) rad or None, with ``wavelength`` and
    ``thickness`` (nm) for its excitation error.
    """
    n_patterns = origin.shape[0] * origin.shape[1]
    reach = np.hypot(detector_shape[0] * k_pixel[0], detector_shape[1] * k_pixel[1]) + radius
    stretch = max(np.linalg.norm(np.eye(2) + g, ord=2, axis=(-2, -1)).max() for g in averaged)
    indices = _lattice_indices(references[0], reach * stretch)
    direct = (1 - scattered) ** len(references)
    layer_share = ((1 - direct) / len(references)).reshape(n_patterns, 1)
    centres = [origin.reshape(n_patterns, 1, 2)]
    weights = [direct.reshape(n_patterns, 1)]
    for reference, gradient in zip(references, averaged):
        relative = _disk_weights(indices, reference, intensity_falloff, asymmetry)[None, :]
        basis = _deformed_basis(gradient, reference)
        if tilt is not None:
            basis = _projected(basis, tilt)
            relative = relative * _excitation_factor(indices @ reference.T, tilt.reshape(-1, 2), wavelength, thickness)
        positions = _detector_positions(basis, indices, origin, scan_rotation, k_pixel)
        centres.append(positions.reshape(n_patterns, -1, 2))
        weights.append(layer_share * relative / relative.sum(axis=1, keepdims=True))
    centres, weights = np.concatenate(centres, axis=1), np.concatenate(weights, axis=1)
    half = _disk_half_window(radius, k_pixel, edge_width)
    on_detector = ((centres > -half) & (centres < np.array(detector_shape) - 1 + half)).all(axis=-1).any(axis=0)
    patterns = np.zeros((n_patterns,) + detector_shape, dtype=np.float32)
    _render_disks(patterns, centres[:, on_detector], weights[:, on_detector], radius, k_pixel, edge_width)
    patterns /= patterns.sum(axis=(1, 2), dtype=np.float64).astype(np.float32)[:, None, None]
    return patterns


def simulate_4dstem(
    displacement_gradient: np.ndarray | Callable,
    *,
    scan_shape: tuple[int, int] | None = None,
    vacuum: np.ndarray | Callable | None = None,
    scan_step: float = 1.0,
    detector_shape: tuple[int, int] = (128, 128),
    k_pixel_size: float | tuple[float, float] = 0.125,
    lattice: str | float = "MoS2",
    orientation: float = 0.0,
    beam_energy: float = 200.0,
    convergence_angle: float = 1.5,
    dose: float | None = 1e6,
    direct_fraction: float = 0.8,
    intensity_falloff: float = 6.0,
    asymmetry: float = 0.3,
    intensity_variation: float = 0.2,
    edge_width: float = 0.5,
    descan: float | np.ndarray = 1.5,
    twist: float | None = None,
    heterostrain: np.ndarray | Callable | None = None,
    scan_rotation: float = 0.0,
    tilt: np.ndarray | Callable | None = None,
    thickness: float = 10.0,
    random_state: int | np.random.Generator | None = None,
) -> tuple[hs.signals.Signal2D, StrainTruth]:
    """Nanobeam 4D-STEM of a deformed hexagonal 2D crystal (one layer or a twisted bilayer).

    Every pattern holds the direct beam and the Bragg disks of the crystal under the probe at
    the reciprocal-lattice points ``G = F^{-T} G0`` (all orders that touch the detector), with
    ``F`` the probe-averaged deformation gradient; conventions as in the module docstring.

    Parameters
    ----------
    displacement_gradient : numpy.ndarray or callable
        ``D = F - I`` in the scan frame, ``(x, y)`` components (``D[..., 0, 1] = du_x/dy``):
        an array ``(rows, cols, 2, 2)`` (taken as constant over each scan pixel), or a callable
        ``f(y, x)`` of coordinate arrays in nm (shape ``(ny, nx)``; scan position ``(row, col)``
        lies at ``y = row * scan_step``, ``x = col * scan_step``) returning ``(ny, nx, 2, 2)``;
        the callable is also sampled between and around the scan positions for the probe average.
    scan_shape : tuple of int, optional
        ``(rows, cols)``; required with a callable, must match an array.
    vacuum : numpy.ndarray or callable, optional
        ``(rows, cols)`` bool array, or a callable ``f(y, x)`` returning bool ``(ny, nx)``: True
        where there is no crystal. None: crystal everywhere.
    scan_step : float
        Scan step, nm.
    detector_shape : tuple of int
        ``(H, W)`` detector pixels.
    k_pixel_size : float or tuple of float
        Detector pixel size, 1/nm: one value for square pixels or ``(ky, kx)``.
    lattice : {"MoS2", "WS2"} or float
        Crystal name (see ``LATTICE_CONSTANTS``) or in-plane lattice constant ``a`` in nm.
    orientation : float
        Angle of the reference ``g1`` counter-clockwise from +kx of the scan frame, degrees.
    beam_energy : float
        keV; sets the relativistic wavelength ``lambda``.
    convergence_angle : float
        Convergence semi-angle ``alpha``, mrad. Disk radius ``alpha / lambda`` in 1/nm.
    dose : float or None
        Expected electrons recorded per pattern (Poisson noise). None: noise-free patterns that
        sum to 1.
    direct_fraction : float
        Fraction of the beam left in the direct beam by one layer of crystal, in (0, 1].
    intensity_falloff : float
        ``g_f`` of the kinematic-like falloff ``exp(-(|g| / g_f)^2)`` of the disk intensities, 1/nm.
    asymmetry : float
        Amplitude of the three-fold modulation ``1 + asymmetry cos(3 psi)`` of the disk
        intensities (``psi`` the angle of ``g0`` from ``g1``), the same at every scan position;
        in [0, 1). It makes Friedel pairs unequal (``cos 3 psi`` changes sign from ``g`` to
        ``-g``), but as a three-fold pattern without a dipole: a tilt indicator that looks for
        the dipole of ``tilt`` must not mistake it for one.
    intensity_variation : float
        The diffracted intensity falls linearly by this fraction from the top-left to the
        bottom-right corner of the scan (a thickness ramp; it scales all disks alike and keeps
        Friedel pairs equal, so a local tilt is ``tilt``); in [0, 1).
    edge_width : float
        Disk edge blur ``sigma`` in px of the coarser detector axis (anti-aliasing; a
        detector point-spread function), > 0.
    descan : float or numpy.ndarray
        Direct-beam shift from the optical axis: a float is the amplitude in px of a smooth
        built-in drift (``d_col = A (0.75 u + 0.25 u v)``, ``d_row = A (0.75 v - 0.25 u^2)`` with
        ``u, v`` the scan coordinates scaled to [-1, 1]); an array ``(rows, cols, 2)`` gives
        ``(d_row, d_col)`` in px.
    twist : float or None
        Adds a second layer whose reference is the first turned by ``twist`` degrees
        counter-clockwise. Its disks add to the first layer's where they overlap.
    heterostrain : numpy.ndarray or callable, optional
        ``F2 - F1`` of the second layer relative to the first (its symmetric part is the
        heterostrain, its antisymmetric part a local change of twist): an array broadcastable to
        ``(rows, cols, 2, 2)`` (a ``(2, 2)`` is uniform) or a callable as for
        ``displacement_gradient``. None: both layers share ``F``. Needs ``twist``.
    scan_rotation : float
        Rotation of the diffraction pattern relative to the scan frame, degrees,
        counter-clockwise as ``theta``: ``k_det = R(scan_rotation) k_scan``.
    tilt : numpy.ndarray or callable, optional
        Local tilt of the specimen away from the zone axis (bending), mrad: the tilt vector
        ``tau`` in ``(x, y)`` components of the scan frame, whose length is the tilt angle and
        whose direction is perpendicular to the tilt axis (the specimen turns about the in-plane
        axis ``(-tau_y, tau_x)``, the beam then leans towards ``tau`` in the crystal's frame).
        An array broadcastable to ``(rows, cols, 2)`` (a ``(2,)`` is uniform) or a callable
        ``f(y, x)`` of coordinates in nm returning ``(ny, nx, 2)``; taken at the probe centre,
        below 500 mrad. None: on the zone axis everywhere (the truth's ``tilt`` is zero). See
        the notes for what it changes.
    thickness : float
        Specimen thickness ``t``, nm; sets the width of the excitation-error profile of
        ``tilt`` (unused without it).
    random_state : int, numpy.random.Generator or None
        Seed of the Poisson noise.

    Returns
    -------
    signal : hyperspy.signals.Signal2D
        ``(rows, cols, H, W)`` float32 counts; navigation axes "y", "x" (nm, scale
        ``scan_step``), signal axes "ky", "kx" (1/nm, scale ``k_pixel_size``, offset so that
        0 is the nominal optical axis, pixel ``(H // 2, W // 2)``). Metadata
        ``Acquisition_instrument.TEM.beam_energy`` (keV), ``.convergence_angle`` (mrad),
        ``General.title``.
    truth : StrainTruth
        Strain and rotation at the probe centre and probe-averaged, vacuum, direct-beam origin,
        reference basis, twist and the parameters.

    Raises
    ------
    ValueError
        For an argument out of range or of the wrong shape; the message names it.

    Notes
    -----
    The probe is aberration-free: its intensity is the Airy pattern
    ``[2 J1(v) / v]^2``, ``v = 2 pi alpha r / lambda``. A pattern sees the crystal averaged over
    it: ``F_avg = (P * (c F)) / (P * c)`` with ``P`` the probe intensity, ``c`` the crystal
    indicator and ``*`` a convolution, done exactly in Fourier space (``P`` transforms to the
    autocorrelation of the aperture, zero beyond ``2 alpha / lambda``) on a grid finer than
    ``lambda / (8 alpha)`` that extends ``4 lambda / alpha`` beyond the scan (periodic beyond).
    Each pattern is rendered with ``F_avg`` alone: the spread of ``F`` within the probe, which
    would blur the disks, is neglected.

    Intensities: a layer of crystal scatters ``p = (1 - direct_fraction) c_avg m`` of the beam
    (``c_avg = P * c`` the crystal fraction under the probe, ``m`` the intensity ramp); with
    ``n`` layers the direct beam keeps ``(1 - p)^n``, the rest is shared equally by the layers
    and, within a layer, by the disks in proportion to their relative intensity. Each
    noise-free pattern is scaled to sum to ``dose`` (disks cut by the detector edge lose their
    outer part before that scaling). Patterns whose probe centre is in vacuum hold only the
    direct beam. The disk edge is ``erfc((d - R) / (sqrt(2) sigma)) / 2``, which encodes
    sub-pixel positions in the intensities.

    Tilt (``tilt``, vector ``tau`` in rad, ``phi = |tau|``), two effects, both at the probe
    centre. (1) Excitation error: disk ``g`` (its reference vector in the scan frame, 1/nm)
    lies off the Ewald sphere by ``s_g = -(g . tau + lambda |g|^2 / 2)`` (1/nm; small angles),
    and its intensity is multiplied by ``L(s_g) / L(s_g^0)`` with ``L(s) = 1 / (1 + (pi t
    s)^2)``, a Lorentzian stand-in for the kinematic ``sinc^2(pi t s)`` of a plate of
    thickness ``t`` with its side lobes left out, and ``s_g^0`` the excitation error on the
    zone axis (untilted patterns are unchanged); each layer's disks are then rescaled to their
    former total. As ``g . tau`` changes sign from ``g`` to ``-g``, Friedel pairs become
    unequal: the brighter member is the one with ``g . tau < 0``, an intensity dipole along ``-tau`` (at 5 mrad and 10 nm the first-order pair of
    MoS2 differs by about a factor 2). Dynamical scattering, absorption and the
    three-fold ``asymmetry`` are not coupled to it. (2) Projection: the lattice is seen
    foreshortened by ``cos phi`` along ``tau``, i.e. the rendered basis is ``P^-1 G`` with
    ``P = I - (1 - cos phi) n n^T``, ``n = tau / phi``: an apparent uniaxial compression
    ``cos phi - 1`` (-0.4 % at 5 degrees) that is not in the truth's strain.

    The strain geometry follows the nanobeam strain mapping of :cite:`Bolhuis2024` and the
    twisted bilayers of :cite:`vanHeijst2024`.

    Examples
    --------
    >>> shear = np.zeros((4, 5, 2, 2)); shear[..., 0, 1] = shear[..., 1, 0] = 0.01
    >>> signal, truth = simulate_4dstem(shear, detector_shape=(64, 64), dose=None)
    >>> signal.data.shape, float(truth.exy[0, 0]), float(truth.theta[0, 0])
    ((4, 5, 64, 64), 0.01, 0.0)
    """
    if isinstance(lattice, str):
        if lattice not in LATTICE_CONSTANTS:
            raise ValueError(
                f"lattice={lattice!r} is unknown; expected one of {sorted(LATTICE_CONSTANTS)} "
                "or a lattice constant in nm."
            )
        a = LATTICE_CONSTANTS[lattice]
    else:
        a = float(lattice)
        _positive("lattice", a, " nm")
    wavelength = electron_wavelength(beam_energy)
    _positive("convergence_angle", convergence_angle, " mrad")
    _positive("scan_step", scan_step, " nm")
    _positive("intensity_falloff", intensity_falloff, " 1/nm")
    _positive("edge_width", edge_width, " px")
    if dose is not None:
        _positive("dose", dose, " electrons per pattern")
    if not 0 < direct_fraction <= 1:
        raise ValueError(f"direct_fraction={direct_fraction!r}; expected a fraction in (0, 1].")
    for name, value in (("asymmetry", asymmetry), ("intensity_variation", intensity_variation)):
        if not 0 <= value < 1:
            raise ValueError(f"{name}={value!r}; expected a fraction in [0, 1).")
    if heterostrain is not None and twist is None:
        raise ValueError(
            "heterostrain was given with twist=None; a heterostrain needs a second layer (set twist in degrees)."
        )
    if twist is not None and not np.isfinite(twist):
        raise ValueError(f"twist={twist!r} degrees; expected a finite angle or None.")
    _positive("thickness", thickness, " nm")
    alpha = convergence_angle * 1e-3
    radius = alpha / wavelength  # 1/nm
    k_pixel = _pixel_sizes(k_pixel_size)
    detector_shape = _shape(detector_shape, "detector_shape", "(H, W)")
    window = 2 * _disk_half_window(radius, k_pixel, edge_width) + 1
    if (window > np.array(detector_shape)).any():
        raise ValueError(
            f"detector_shape={detector_shape} is smaller than one disk ({tuple(window.tolist())} px at "
            f"k_pixel_size={k_pixel} 1/nm); use a larger detector or larger pixels."
        )
    displacement_gradient, scan_shape = _gradient_and_scan_shape(displacement_gradient, scan_shape)
    if vacuum is not None and not callable(vacuum):
        vacuum = np.asarray(vacuum)
        if vacuum.dtype != bool or vacuum.shape != scan_shape:
            raise ValueError(
                f"vacuum is a {vacuum.dtype} array of shape {vacuum.shape}; expected a bool array of shape "
                f"{scan_shape} or a callable of (y_nm, x_nm)."
            )
    origin = np.array(detector_shape, dtype=float) // 2 + _descan_shift(descan, scan_shape)

    grid = _fine_grid(scan_shape, scan_step, wavelength, alpha)
    layer_gradients = [_on_grid(displacement_gradient, grid, (2, 2), "displacement_gradient")]
    if twist is not None:
        relative = np.zeros((2, 2)) if heterostrain is None else heterostrain
        if not callable(relative):
            relative = _scan_array(relative, scan_shape, (2, 2), "heterostrain")
        layer_gradients.append(layer_gradients[0] + _on_grid(relative, grid, (2, 2), "heterostrain"))
    tilt_scan = np.zeros(scan_shape + (2,))
    if tilt is not None:
        tilt_scan = 1e-3 * (grid.at_scan(_on_grid(tilt, grid, (2,), "tilt")) if callable(tilt)
                            else _scan_array(tilt, scan_shape, (2,), "tilt"))
        if not (np.isfinite(tilt_scan).all() and np.linalg.norm(tilt_scan, axis=-1).max() < 0.5):
            raise ValueError(
                f"tilt reaches {1e3 * np.nanmax(np.linalg.norm(tilt_scan, axis=-1)):.4g} mrad or is not finite; "
                "expected finite tilt vectors (x, y) below 500 mrad."
            )
    crystal = np.ones(grid.y.shape) if vacuum is None else 1.0 - _on_grid(vacuum, grid, (), "vacuum", dtype=bool)
    point, averaged, vacuum_scan, crystal_fraction = _probe_averaged(layer_gradients, crystal, grid, wavelength, alpha)

    reference = hexagonal_reciprocal_basis(a, orientation)
    references = [reference] + ([_rotation(np.deg2rad(twist)) @ reference] if twist is not None else [])
    v, u = _unit_coordinates(scan_shape)
    scattered = (1 - direct_fraction) * crystal_fraction * (1 - intensity_variation * (u + v + 2) / 4)
    patterns = _render_patterns(
        averaged,
        references,
        origin,
        scattered,
        detector_shape=detector_shape,
        k_pixel=k_pixel,
        radius=radius,
        edge_width=edge_width,
        scan_rotation=scan_rotation,
        intensity_falloff=intensity_falloff,
        asymmetry=asymmetry,
        tilt=None if tilt is None else tilt_scan,
        wavelength=wavelength,
        thickness=thickness,
    )
    data = patterns.reshape(scan_shape + detector_shape)
    _poisson_counts(data, dose, random_state)

    axes = [dict(name=name, size=n, scale=scan_step, offset=0.0, units="nm", navigate=True)
            for name, n in zip(("y", "x"), scan_shape)]
    axes += [dict(name=name, size=n, scale=scale, offset=-(n // 2) * scale, units="1/nm", navigate=False)
             for name, n, scale in zip(("ky", "kx"), detector_shape, k_pixel)]
    signal = hs.signals.Signal2D(data, axes=axes)
    lattice_name = lattice if isinstance(lattice, str) else f"a = {a} nm"
    signal.metadata.General.title = f"Synthetic nanobeam 4D-STEM ({lattice_name})"
    quantity = "Intensity (fraction)" if dose is None else "Intensity (counts)"
    signal.metadata.set_item("Signal.quantity", quantity)
    signal.metadata.set_item("Acquisition_instrument.TEM.beam_energy", float(beam_energy))
    signal.metadata.set_item("Acquisition_instrument.TEM.convergence_angle", float(convergence_angle))

    params = {
        "lattice": lattice_name,
        "a_nm": a,
        "orientation_deg": float(orientation),
        "beam_energy_kev": float(beam_energy),
        "convergence_angle_mrad": float(convergence_angle),
        "wavelength_nm": wavelength,
        "disk_radius_inv_nm": radius,
        "scan_step_nm": float(scan_step),
        "scan_shape": scan_shape,
        "detector_shape": detector_shape,
        "k_pixel_size_inv_nm": k_pixel,
        "dose": dose,
        "direct_fraction": direct_fraction,
        "intensity_falloff_inv_nm": intensity_falloff,
        "asymmetry": asymmetry,
        "intensity_variation": intensity_variation,
        "edge_width_px": edge_width,
        "descan_max_px": float(np.abs(origin - np.array(detector_shape) // 2).max()),
        "twist_deg": None if twist is None else float(twist),
        "scan_rotation_deg": float(scan_rotation),
        "tilt_max_mrad": float(1e3 * np.linalg.norm(tilt_scan, axis=-1).max()),
        "thickness_nm": float(thickness),
        "probe_grid_step_nm": grid.step,
        "random_state": random_state if random_state is None or isinstance(random_state, int) else repr(random_state),
    }
    second = None
    if twist is not None:
        second = LayerStrain(
            *_strain_components(point[1], vacuum_scan),
            *_strain_components(averaged[1], vacuum_scan),
            reference_basis=references[1],
        )
    truth = StrainTruth(
        *_strain_components(point[0], vacuum_scan),
        *_strain_components(averaged[0], vacuum_scan),
        vacuum=vacuum_scan,
        origin=origin,
        reference_basis=reference,
        twist_deg=params["twist_deg"],
        second_layer=second,
        params=params,
        tilt=np.where(vacuum_scan[..., None], np.nan, tilt_scan),
    )
    return signal, truth


def _gaussian_features(features, height, width, sigma):
    """``f(y, x)`` (nm) -> (ny, nx, 2, 2) sum of Gaussian bumps, each in one component of ``F - I``."""

    def gradient(y, x):
        parts = dict.fromkeys(("exx", "eyy", "exy", "theta"), np.zeros(np.shape(x)))
        for component, amplitude, (u, v) in features:
            bump = np.exp(-((x - u * width) ** 2 + (y - v * height) ** 2) / (2 * sigma**2))
            parts[component] = parts[component] + amplitude * bump
        return _gradient_from_components(**parts)

    return gradient


def _flake_fields(scan_shape, scan_step):
    """Displacement gradient and vacuum callables of the default flake, coordinates in nm."""
    height, width = scan_shape[0] * scan_step, scan_shape[1] * scan_step
    sigma = _FLAKE_FEATURE_WIDTH * min(height, width)

    def vacuum(y, x):
        return y < height * (0.15 + 0.05 * np.sin(2 * np.pi * x / width))

    return _gaussian_features(_FLAKE_FEATURES, height, width, sigma), vacuum, sigma


def strained_flake(
    scan_shape: tuple[int, int] = (32, 32),
    *,
    detector_shape: tuple[int, int] = (128, 128),
    dose: float | None = 1e6,
    twist: float | None = None,
    random_state: int | np.random.Generator | None = 0,
    scan_step: float = 1.0,
    **kwargs,
) -> tuple[hs.signals.Signal2D, StrainTruth]:
    """A flake (MoS2 unless ``lattice`` says otherwise) with a vacuum edge and four smooth strain features.

    Layout, in fractions of the field of view (``x`` across, ``y`` down, the scan as displayed):
    vacuum above ``y = 0.15 + 0.05 sin(2 pi x)`` (a wavy top edge); Gaussian features of width
    ``sigma = 0.06`` of the smaller side, each in one component of ``F - I``: ``exx = +2 %`` at
    ``(x, y) = (0.25, 0.45)``, ``eyy = -1 %`` at ``(0.55, 0.40)``, ``exy = +0.5 %`` at
    ``(0.82, 0.55)``, ``theta = +0.5 degrees`` at ``(0.65, 0.78)``. The reference region, the
    bottom-left corner ``x < 0.35``, ``y > 0.7``, is unstrained (every component below 1e-4);
    the rest of the flake away from the features too. At the defaults (32 x 32 scan, 1 nm step)
    the features have ``sigma = 1.92 nm``, so the probe-averaged peaks are about 0.89 of the point
    values.

    Parameters
    ----------
    scan_shape : tuple of int
        ``(rows, cols)`` scan positions.
    detector_shape : tuple of int
        ``(H, W)`` detector pixels.
    dose : float or None
        Expected electrons per pattern; None for noise-free patterns summing to 1.
    twist : float or None
        Adds a second layer turned by ``twist`` degrees that shares the deformation (pass
        ``heterostrain`` to give it its own).
    random_state : int, numpy.random.Generator or None
        Seed of the Poisson noise.
    scan_step : float
        Scan step, nm.
    **kwargs
        Passed to :func:`simulate_4dstem` (for example ``lattice="WS2"``, ``scan_rotation``,
        ``k_pixel_size``, ``heterostrain``, ``descan``).

    Returns
    -------
    signal : hyperspy.signals.Signal2D
        ``(rows, cols, H, W)`` float32, calibrated as in :func:`simulate_4dstem`.
    truth : StrainTruth
        Ground truth; ``params`` also holds the feature list and the reference region.

    Examples
    --------
    >>> signal, truth = strained_flake((16, 16), detector_shape=(64, 64), dose=None)
    >>> signal.data.shape, bool(truth.vacuum.any())
    ((16, 16, 64, 64), True)
    >>> round(float(np.nanmax(truth.exx)), 3)
    0.02
    """
    gradient, vacuum, sigma = _flake_fields(scan_shape, scan_step)
    signal, truth = simulate_4dstem(
        gradient,
        scan_shape=scan_shape,
        vacuum=vacuum,
        scan_step=scan_step,
        detector_shape=detector_shape,
        dose=dose,
        twist=twist,
        random_state=random_state,
        **kwargs,
    )
    lattice_name = truth.params["lattice"]
    signal.metadata.General.title = f"Synthetic strained {lattice_name} flake (4D-STEM)"
    features = [{"component": c, "amplitude": amp, "centre_xy_fraction": centre} for c, amp, centre in _FLAKE_FEATURES]
    params = truth.params | {
        "sample": "strained_flake",
        "flake_features": features,
        "flake_feature_sigma_nm": sigma,
        "flake_reference_region": _FLAKE_REFERENCE,
    }
    return signal, replace(truth, params=params)


def twisted_bilayer(
    scan_shape: tuple[int, int] = (24, 24),
    *,
    twist: float = 25.0,
    detector_shape: tuple[int, int] = (128, 128),
    dose: float | None = 1e6,
    random_state: int | np.random.Generator | None = 0,
    scan_step: float = 1.0,
    **kwargs,
) -> tuple[hs.signals.Signal2D, StrainTruth]:
    """The strained flake as a twisted bilayer, with a local twist and a heterostrain of its own.

    Both layers share the deformation of :func:`strained_flake` (same vacuum edge, same four
    features, same unstrained bottom-left corner); the second is turned by ``twist`` degrees and
    carries two more Gaussian features of ``F2 - F1`` (width 0.06 of the smaller side): a local
    extra twist of +0.3 degrees at ``(x, y) = (0.5, 0.6)`` and a heterostrain ``exx = +0.5 %`` at
    ``(0.8, 0.3)`` of the field of view. At 25 degrees the layers' first-order disks are 12.6 px
    apart on the default detector (1.5 mrad on MoS2: they overlap below about 19 degrees).

    Parameters
    ----------
    scan_shape : tuple of int
        ``(rows, cols)`` scan positions.
    twist : float
        Twist of the second layer's reference, degrees, counter-clockwise.
    detector_shape : tuple of int
        ``(H, W)`` detector pixels.
    dose : float or None
        Expected electrons per pattern; None for noise-free patterns summing to 1.
    random_state : int, numpy.random.Generator or None
        Seed of the Poisson noise.
    scan_step : float
        Scan step, nm.
    **kwargs
        Passed to :func:`simulate_4dstem` (for example ``lattice="WS2"``, ``scan_rotation``).

    Returns
    -------
    signal : hyperspy.signals.Signal2D
        ``(rows, cols, H, W)`` float32, calibrated as in :func:`simulate_4dstem`.
    truth : StrainTruth
        Ground truth with ``second_layer``; :meth:`StrainTruth.twist_angle` gives the local twist.

    Examples
    --------
    >>> signal, truth = twisted_bilayer((12, 12), detector_shape=(64, 64), dose=None)
    >>> twist = truth.twist_angle(averaged=False)
    >>> round(float(np.nanmin(twist)), 3), round(float(np.nanmax(twist)), 1)
    (25.0, 25.3)
    """
    height, width = scan_shape[0] * scan_step, scan_shape[1] * scan_step
    gradient, vacuum, sigma = _flake_fields(scan_shape, scan_step)
    signal, truth = simulate_4dstem(
        gradient,
        scan_shape=scan_shape,
        vacuum=vacuum,
        scan_step=scan_step,
        detector_shape=detector_shape,
        dose=dose,
        twist=twist,
        heterostrain=_gaussian_features(_BILAYER_FEATURES, height, width, sigma),
        random_state=random_state,
        **kwargs,
    )
    lattice_name = truth.params["lattice"]
    signal.metadata.General.title = f"Synthetic twisted {lattice_name} bilayer (4D-STEM)"
    described = [{"component": c, "amplitude": amp, "centre_xy_fraction": centre} for c, amp, centre in _FLAKE_FEATURES]
    heterostrain = [{"component": c, "amplitude": amp, "centre_xy_fraction": centre}
                    for c, amp, centre in _BILAYER_FEATURES]
    params = truth.params | {
        "sample": "twisted_bilayer",
        "flake_features": described,
        "heterostrain_features": heterostrain,
        "flake_feature_sigma_nm": sigma,
        "flake_reference_region": _FLAKE_REFERENCE,
    }
    return signal, replace(truth, params=params)
