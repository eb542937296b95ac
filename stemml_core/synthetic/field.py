"""Focused-probe 4D-STEM of thin specimens in the phase-object approximation, with field ground truth.

Each pattern is ``I(k) = |FFT[P(r - r_p) exp(i sigma V(r))]|^2``: the probe ``P`` centred on the
scan position ``r_p`` is multiplied by the transmission function of the projected potential
``V`` (V nm) and Fourier transformed onto the detector. For a phase object the centre of mass
(CoM) of the pattern is exactly the probe-weighted potential gradient,

``<k> = (sigma / 2 pi) integral |P(r - r_p)|^2 grad V(r) d^2r``  (probe intensity of unit sum),

in 1/nm (sigma in rad / (V nm), grad V in V): the CoM is the gradient of the probe-blurred
potential ``(sigma / 2 pi) (|P|^2 * V)``. This is the basis of CoM / differential phase contrast
imaging of fields :cite:`Lazic2016,MullerCaspary2017`.

Conventions (shared with :mod:`stemml_core.synthetic.diffraction` and
:mod:`stemml_core.diffraction.field`):

- **Scan frame.** Scan position ``(row, col)`` lies at ``y = row * scan_step``,
  ``x = col * scan_step`` (nm); x is the fast axis. Vectors are in ``(x, y)`` component order,
  so ``com[..., 0]`` is the x component.
- **Detector.** Pixel ``(row, col)`` reads ``ky = (row - H // 2) * k_pixel_size``,
  ``kx = (col - W // 2) * k_pixel_size`` (1/nm); vectors on the detector are ``(kx, ky)``.
- **Scan-detector transform.** A vector ``v`` of the scan frame appears on the detector as
  ``k_det = R(scan_rotation) S v`` with ``R(phi) = [[cos phi, sin phi], [-sin phi, cos phi]]``
  (counter-clockwise looking down the beam, as in :func:`~stemml_core.synthetic.simulate_4dstem`)
  and ``S = diag(1, -1)`` when ``flip`` (the y component reversed first), else the identity.
- **Descan.** The direct beam moves across the detector linearly with the scan position: the
  whole pattern is shifted by ``k_d(r_p)``, simulated as a tilt of the illumination (the
  aperture shifted in k), so a vacuum pattern has its CoM at ``k_d`` exactly.

Noise-free CoM on the detector = ``truth.descan + R S truth.com``; see :class:`FieldTruth`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from math import ceil, pi, sqrt

import hyperspy.api as hs
import numpy as np
import scipy.fft
from scipy.special import erfc

from stemml_core._frozen import ReadOnlyArrays
from stemml_core.electrons import electron_wavelength, interaction_constant
from stemml_core.synthetic.diffraction import LATTICE_CONSTANTS, _poisson_counts, _positive, _shape

__all__ = [
    "FieldTruth",
    "atomic_monolayer",
    "interaction_constant",
    "polar_bilayer",
    "simulate_field_4dstem",
    "vacuum_scan",
]

# Atomic monolayer: peak projected potential (V nm) and Gaussian width (nm) of the two column
# types of a MoS2-like 2H monolayer seen along c (a model, not a parametrised scattering factor).
_MONOLAYER_COLUMNS = (("Mo", 110.0, 0.035), ("S2", 70.0, 0.035))


@dataclass(frozen=True)
class FieldTruth(ReadOnlyArrays):
    """Ground truth of :func:`simulate_field_4dstem` and its samples.

    The arrays are read-only; ``(rows, cols)`` is the scan shape. Conventions as in the module
    docstring.

    Attributes
    ----------
    com : numpy.ndarray
        ``(rows, cols, 2)`` float64, ``(x, y)`` in the scan frame, 1/nm: the probe-weighted
        potential gradient ``(sigma / 2 pi) sum |P|^2 grad V / sum |P|^2``, which a noise-free
        pattern's CoM equals (after the descan and the scan-detector transform).
    potential : numpy.ndarray
        ``(rows, cols)`` projected potential at the probe centre, V nm.
    potential_avg : numpy.ndarray
        ``(rows, cols)`` projected potential weighted by the probe intensity, V nm: what the
        integrated CoM recovers, up to a constant.
    domains : numpy.ndarray
        ``(rows, cols)`` int8 polarization sign of the domain at the probe centre, +1 or -1; 0 in
        vacuum and where the sample has no domains.
    walls : numpy.ndarray
        ``(rows, cols)`` bool, specimen positions with a 4-neighbour of the opposite domain sign
        (both sides of every wall).
    wall_distance : numpy.ndarray
        ``(rows, cols)`` distance of the probe centre from the nearest domain wall (the wall's
        centre line), nm; inf where the sample has no walls.
    vacuum : numpy.ndarray
        ``(rows, cols)`` bool, True where the probe centre is in vacuum (``V = 0`` there).
    descan : numpy.ndarray
        ``(rows, cols, 2)`` CoM of the vacuum pattern at each position, ``(kx, ky)`` on the
        detector, 1/nm (the tilt of the illumination, exact for the pixelated detector).
    scan_rotation : float
        Scan-detector rotation, degrees, counter-clockwise.
    flip : bool
        Whether the scan's y component is reversed before the rotation.
    params : dict
        Every scalar knob of the simulation (provenance), with units in the key names.
    """

    com: np.ndarray
    potential: np.ndarray
    potential_avg: np.ndarray
    domains: np.ndarray
    walls: np.ndarray
    wall_distance: np.ndarray
    vacuum: np.ndarray
    descan: np.ndarray
    scan_rotation: float
    flip: bool
    params: dict

    def field(self) -> np.ndarray:
        """Projected in-plane electric field ``E = -grad V`` weighted by the probe intensity.

        Returns
        -------
        numpy.ndarray
            ``(rows, cols, 2)`` ``(x, y)`` in the scan frame, V (the field in V/nm integrated
            along the beam over the specimen thickness in nm): ``-(2 pi / sigma) com``.
        """
        return -2 * pi / self.params["interaction_constant_rad_per_V_nm"] * self.com

    def detector_com(self) -> np.ndarray:
        """CoM of the noise-free patterns on the detector, ``descan + R S com``.

        Returns
        -------
        numpy.ndarray
            ``(rows, cols, 2)`` ``(kx, ky)``, 1/nm.
        """
        return self.descan + self.com @ _scan_to_detector(self.scan_rotation, self.flip).T


def _rotation(angle_deg: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    return np.array([[c, s], [-s, c]])


def _scan_to_detector(scan_rotation: float, flip: bool) -> np.ndarray:
    """``Q = R(scan_rotation) S`` acting on ``(x, y)`` columns."""
    return _rotation(scan_rotation) @ np.diag([1.0, -1.0 if flip else 1.0])


def _descan_shift(descan, scan_shape) -> np.ndarray:
    """Direct-beam shift ``(d_row, d_col)`` px, ``(rows, cols, 2)``: linear in the scan position."""
    if np.ndim(descan) == 0:
        if not np.isfinite(descan) or descan < 0:
            raise ValueError(f"descan={descan!r} px; expected a non-negative amplitude or a (rows, cols, 2) array.")
        rows, cols = scan_shape
        v, u = np.meshgrid(np.linspace(-1, 1, rows) if rows > 1 else [0.0],
                           np.linspace(-1, 1, cols) if cols > 1 else [0.0], indexing="ij")
        return descan * np.stack([0.3 + 0.8 * v - 0.3 * u, -0.2 + 0.9 * u + 0.2 * v], axis=-1)
    shift = np.asarray(descan, dtype=float)
    if shift.shape != tuple(scan_shape) + (2,) or not np.isfinite(shift).all():
        raise ValueError(
            f"descan has shape {shift.shape}; expected {tuple(scan_shape) + (2,)} (d_row, d_col) px or a float."
        )
    return shift


def simulate_field_4dstem(
    potential: Callable,
    *,
    scan_shape: tuple[int, int],
    scan_step: float = 0.5,
    detector_shape: tuple[int, int] = (64, 64),
    k_pixel_size: float = 0.125,
    beam_energy: float = 200.0,
    convergence_angle: float = 3.0,
    aperture_edge: float = 1.0,
    dose: float | None = 1e6,
    descan: float | np.ndarray = 2.0,
    scan_rotation: float = 0.0,
    flip: bool = False,
    random_state: int | np.random.Generator | None = None,
    block_patterns: int = 128,
) -> tuple[hs.signals.Signal2D, FieldTruth]:
    """Focused-probe 4D-STEM of a phase object, with the CoM ground truth.

    Parameters
    ----------
    potential : callable
        ``f(y, x) -> (V, dV_dx, dV_dy)`` for coordinate arrays in nm of the scan frame:
        projected potential (V nm) and its gradient (V), each of the coordinates' shape.
    scan_shape : tuple of int
        ``(rows, cols)`` scan positions.
    scan_step : float
        Scan step, nm.
    detector_shape : tuple of int
        ``(H, W)`` detector pixels, also the real-space window of each exit wave (periodic):
        ``(1 / k_pixel_size)`` nm on a side, sampled every ``1 / (H k_pixel_size)`` nm.
    k_pixel_size : float
        Detector pixel size, 1/nm (square pixels).
    beam_energy : float
        keV.
    convergence_angle : float
        Convergence semi-angle, mrad; aperture radius ``alpha / lambda`` in 1/nm.
    aperture_edge : float
        Width ``s`` of the aperture edge, ``A(k) = erfc((|k| - alpha / lambda) / (sqrt(2) s)) / 2``,
        in detector px (partial coherence / detector blur); it keeps the descan's CoM exact on
        the pixel grid.
    dose : float or None
        Expected electrons per pattern (Poisson noise); None for noise-free patterns summing to 1.
    descan : float or numpy.ndarray
        Direct-beam shift varying linearly over the scan: a float is the amplitude in px of the
        built-in shift ``d_row = A (0.3 + 0.8 v - 0.3 u)``, ``d_col = A (-0.2 + 0.9 u + 0.2 v)``
        (``u``, ``v`` the column and row coordinates scaled to [-1, 1]); an array
        ``(rows, cols, 2)`` gives ``(d_row, d_col)`` px.
    scan_rotation : float
        Scan-detector rotation, degrees, counter-clockwise: ``k_det = R(scan_rotation) S v``.
    flip : bool
        Reverse the scan's y component before the rotation (``S = diag(1, -1)``).
    random_state : int, numpy.random.Generator or None
        Seed of the Poisson noise.
    block_patterns : int
        Exit waves computed at once (memory: about ``16 H W`` bytes each).

    Returns
    -------
    signal : hyperspy.signals.Signal2D
        ``(rows, cols, H, W)`` float32 counts (fractions when ``dose`` is None); navigation axes
        "y", "x" (nm), signal axes "ky", "kx" (1/nm, 0 at pixel ``(H // 2, W // 2)``); metadata
        ``Acquisition_instrument.TEM.beam_energy`` (keV) and ``.convergence_angle`` (mrad).
    truth : FieldTruth
        CoM, potential, descan, rotation and flip; no domains, walls or vacuum (the samples add
        them).

    Raises
    ------
    ValueError
        An argument out of range or of the wrong shape (the message names it), or a window too
        small for the probe.

    Notes
    -----
    The exit wave of scan position ``r_p`` is ``psi = P(r - r_p) exp(i sigma V(r))`` on a
    ``(H, W)`` window aligned with the detector (the specimen is evaluated at ``r = S R^T rho``
    for window coordinates ``rho``, which turns the pattern by the scan-detector transform
    without interpolation). The probe is ``P = IFFT[A(k - k_d) exp(-2 pi i k . delta)]``: the
    aberration-free aperture with a soft edge, tilted by the descan ``k_d`` and moved by the
    sub-pixel offset ``delta`` of the scan position. The pattern is ``|FFT psi|^2`` scaled to a
    unit sum, then multiplied by ``dose`` and Poisson-sampled.

    For a phase object ``<k> = k_probe + (sigma / 2 pi) <grad V>_{|P|^2}``
    :cite:`Lazic2016,MullerCaspary2017`: the probe's own CoM ``k_probe`` (the descan) plus the
    probe-weighted gradient, evaluated here with the analytic gradient on the same window. The
    identity holds to the aliasing of the exit wave's spectrum beyond the detector edge and the
    probe's tails at the window edge: below 1e-7 1/nm for the default samples (float32 rounding
    of the patterns), where a 0.5 px aperture edge leaves 3e-5 1/nm.

    Examples
    --------
    >>> def ramp(y, x):  # a uniform gradient of 10 V along x
    ...     return 10.0 * x, np.full_like(x, 10.0), np.zeros_like(x)
    >>> signal, truth = simulate_field_4dstem(ramp, scan_shape=(2, 3), dose=None, descan=0.0)
    >>> signal.data.shape, round(float(truth.com[0, 0, 0]), 5)
    ((2, 3, 64, 64), 0.0116)
    """
    scan_shape = _shape(scan_shape, "scan_shape", "(rows, cols)")
    detector_shape = _shape(detector_shape, "detector_shape", "(H, W)")
    for name, value, unit in (("scan_step", scan_step, " nm"), ("k_pixel_size", k_pixel_size, " 1/nm"),
                              ("convergence_angle", convergence_angle, " mrad"),
                              ("aperture_edge", aperture_edge, " px")):
        _positive(name, value, unit)
    if dose is not None:
        _positive("dose", dose, " electrons per pattern")
    if not np.isfinite(scan_rotation):
        raise ValueError(f"scan_rotation={scan_rotation!r} degrees; expected a finite angle.")
    wavelength = electron_wavelength(beam_energy)
    sigma = interaction_constant(beam_energy)
    radius = convergence_angle * 1e-3 / wavelength  # 1/nm
    height, width = detector_shape
    step = np.array([1 / (height * k_pixel_size), 1 / (width * k_pixel_size)])  # (y, x) nm per window px
    if radius + 4 * aperture_edge * k_pixel_size > 0.45 * min(detector_shape) * k_pixel_size:
        raise ValueError(
            f"the aperture (radius {radius:.3g} 1/nm at convergence_angle={convergence_angle} mrad) reaches beyond "
            f"0.45 of the detector's half-width ({min(detector_shape) // 2 * k_pixel_size:.3g} 1/nm): the scattered "
            "beams would wrap round. Use a larger detector or larger k_pixel_size."
        )
    kd = _descan_shift(descan, scan_shape)[..., ::-1] * k_pixel_size  # (kx, ky) 1/nm
    transform = _scan_to_detector(scan_rotation, flip)

    rows, cols = np.indices(scan_shape)
    scan_xy = np.stack([cols * scan_step, rows * scan_step], axis=-1).reshape(-1, 2).astype(float)
    rho = scan_xy @ transform.T  # (n, 2) window-frame (x, y) positions, nm
    rho_yx = rho[:, ::-1]
    half = np.array(detector_shape) // 2
    start = rho_yx.min(axis=0) - (half + 2) * step  # nm, global grid origin (y, x)
    anchor = np.floor((rho_yx - start) / step).astype(int)  # (n, 2) global index of each window's centre pixel
    offset = rho_yx - (start + anchor * step)  # sub-pixel remainder, nm, in [0, step)
    grid_shape = tuple(anchor.max(axis=0) + np.array(detector_shape) + 4)
    gy = start[0] + np.arange(grid_shape[0]) * step[0]
    gx = start[1] + np.arange(grid_shape[1]) * step[1]
    rho_y, rho_x = np.meshgrid(gy, gx, indexing="ij")
    inverse = transform.T  # scan (x, y) = Q^T rho
    x = inverse[0, 0] * rho_x + inverse[0, 1] * rho_y
    y = inverse[1, 0] * rho_x + inverse[1, 1] * rho_y
    values = potential(y, x)
    if len(values) != 3:
        raise ValueError("potential must return (V, dV_dx, dV_dy); got a tuple of length " f"{len(values)}.")
    v_grid, dvdx, dvdy = (np.broadcast_to(np.asarray(a, dtype=float), x.shape) for a in values)
    transmission = np.exp(1j * sigma * v_grid)

    ky = scipy.fft.fftfreq(height, step[0])[:, None]
    kx = scipy.fft.fftfreq(width, step[1])[None, :]
    edge = aperture_edge * k_pixel_size
    n = len(scan_xy)
    patterns = np.empty((n, height, width), dtype=np.float32)
    com = np.empty((n, 2))
    vacuum_com = np.empty((n, 2))
    potential_avg = np.empty(n)
    window_rows = np.arange(height) - half[0]
    window_cols = np.arange(width) - half[1]
    for first in range(0, n, block_patterns):
        block = slice(first, first + block_patterns)
        kd_block = kd.reshape(-1, 2)[block]
        shift = offset[block] + half * step  # the probe centre from window pixel 0, nm
        distance = np.hypot(kx - kd_block[:, 0, None, None], ky - kd_block[:, 1, None, None])
        aperture = 0.5 * erfc((distance - radius) / (sqrt(2) * edge))
        weight = aperture**2
        vacuum_com[block] = np.stack([(weight * kx).sum(axis=(1, 2)), (weight * ky).sum(axis=(1, 2))], 1) / weight.sum(
            axis=(1, 2))[:, None]
        ramp = np.exp(-2j * pi * (ky * shift[:, 0, None, None] + kx * shift[:, 1, None, None]))
        probe = scipy.fft.ifft2(aperture * ramp)
        intensity = np.abs(probe) ** 2
        intensity /= intensity.sum(axis=(1, 2), keepdims=True)
        r = (anchor[block, 0, None] + window_rows)[:, :, None]
        c = (anchor[block, 1, None] + window_cols)[:, None, :]
        exit_wave = probe * transmission[r, c]
        pattern = np.abs(scipy.fft.fftshift(scipy.fft.fft2(exit_wave), axes=(1, 2))) ** 2
        patterns[block] = pattern / pattern.sum(axis=(1, 2), keepdims=True)
        com[block] = sigma / (2 * pi) * np.stack([(intensity * dvdx[r, c]).sum(axis=(1, 2)),
                                                   (intensity * dvdy[r, c]).sum(axis=(1, 2))], axis=1)
        potential_avg[block] = (intensity * v_grid[r, c]).sum(axis=(1, 2))

    data = patterns.reshape(scan_shape + detector_shape)
    _poisson_counts(data, dose, random_state)
    axes = [dict(name=name, size=size, scale=float(scan_step), offset=0.0, units="nm", navigate=True)
            for name, size in zip(("y", "x"), scan_shape)]
    axes += [dict(name=name, size=size, scale=float(k_pixel_size), offset=-(size // 2) * float(k_pixel_size),
                  units="1/nm", navigate=False) for name, size in zip(("ky", "kx"), detector_shape)]
    signal = hs.signals.Signal2D(data, axes=axes)
    signal.metadata.General.title = "Synthetic focused-probe 4D-STEM (phase object)"
    signal.metadata.set_item("Signal.quantity", "Intensity (fraction)" if dose is None else "Intensity (counts)")
    signal.metadata.set_item("Acquisition_instrument.TEM.beam_energy", float(beam_energy))
    signal.metadata.set_item("Acquisition_instrument.TEM.convergence_angle", float(convergence_angle))

    point = np.asarray(potential(scan_xy[:, 1], scan_xy[:, 0])[0], dtype=float)
    params = {
        "beam_energy_kev": float(beam_energy),
        "wavelength_nm": wavelength,
        "interaction_constant_rad_per_V_nm": sigma,
        "convergence_angle_mrad": float(convergence_angle),
        "aperture_radius_inv_nm": radius,
        "aperture_edge_px": float(aperture_edge),
        "scan_step_nm": float(scan_step),
        "scan_shape": scan_shape,
        "detector_shape": detector_shape,
        "k_pixel_size_inv_nm": float(k_pixel_size),
        "window_nm": tuple(float(s) for s in step * np.array(detector_shape)),
        "window_pixel_nm": tuple(float(s) for s in step),
        "dose": dose,
        "descan_max_px": float(np.abs(kd).max() / k_pixel_size),
        "scan_rotation_deg": float(scan_rotation),
        "flip": bool(flip),
        "random_state": random_state if random_state is None or isinstance(random_state, int) else repr(random_state),
    }
    truth = FieldTruth(
        com=com.reshape(scan_shape + (2,)),
        potential=np.broadcast_to(point, (n,)).reshape(scan_shape).copy(),
        potential_avg=potential_avg.reshape(scan_shape),
        domains=np.zeros(scan_shape, dtype=np.int8),
        walls=np.zeros(scan_shape, dtype=bool),
        wall_distance=np.full(scan_shape, np.inf),
        vacuum=np.zeros(scan_shape, dtype=bool),
        descan=vacuum_com.reshape(scan_shape + (2,)),
        scan_rotation=float(scan_rotation),
        flip=bool(flip),
        params=params,
    )
    return signal, truth


def _no_specimen(y, x):
    zero = np.zeros(np.shape(x))
    return zero, zero, zero


def vacuum_scan(
    truth: FieldTruth,
    *,
    dose: float | None = 1e6,
    random_state: int | np.random.Generator | None = None,
) -> hs.signals.Signal2D:
    """The scan of ``truth`` repeated over vacuum: a descan reference with the same optics.

    Parameters
    ----------
    truth : FieldTruth
        Truth of a simulation (its ``params`` and ``descan`` set the scan, detector, optics,
        rotation and descan).
    dose : float or None
        Electrons per pattern; None for noise-free fractions.
    random_state : int, numpy.random.Generator or None
        Seed of the Poisson noise.

    Returns
    -------
    hyperspy.signals.Signal2D
        ``(rows, cols, H, W)`` patterns of the bare probe, calibrated as the specimen scan; their
        CoM is ``truth.descan``.

    Examples
    --------
    >>> signal, truth = polar_bilayer((4, 4), dose=None)
    >>> reference = vacuum_scan(truth, dose=None)
    >>> reference.data.shape
    (4, 4, 64, 64)
    """
    p = truth.params
    signal, _ = simulate_field_4dstem(
        _no_specimen,
        scan_shape=p["scan_shape"],
        scan_step=p["scan_step_nm"],
        detector_shape=p["detector_shape"],
        k_pixel_size=p["k_pixel_size_inv_nm"],
        beam_energy=p["beam_energy_kev"],
        convergence_angle=p["convergence_angle_mrad"],
        aperture_edge=p["aperture_edge_px"],
        dose=dose,
        descan=np.asarray(truth.descan)[..., ::-1] / p["k_pixel_size_inv_nm"],
        scan_rotation=truth.scan_rotation,
        flip=truth.flip,
        random_state=random_state,
    )
    signal.metadata.General.title = "Synthetic vacuum reference scan"
    return signal


def _column_potential(positions: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> Callable:
    """``f(y, x) -> (V, dV/dx, dV/dy)``: a sum of Gaussian columns at ``positions`` (m, 2) (x, y) nm."""

    def potential(y, x):
        y, x = np.asarray(y, dtype=float), np.asarray(x, dtype=float)
        value, grad_x, grad_y = np.zeros(x.shape), np.zeros(x.shape), np.zeros(x.shape)
        for (px, py), height, width in zip(positions, heights, widths):
            near = (np.abs(x - px) < 7 * width) & (np.abs(y - py) < 7 * width)
            if not near.any():
                continue
            dx, dy = x[near] - px, y[near] - py
            bump = height * np.exp(-(dx**2 + dy**2) / (2 * width**2))
            value[near] += bump
            grad_x[near] -= bump * dx / width**2
            grad_y[near] -= bump * dy / width**2
        return value, grad_x, grad_y

    return potential


def atomic_monolayer(
    scan_shape: tuple[int, int] = (24, 24),
    *,
    scan_step: float = 0.03,
    dose: float | None = 1e5,
    scan_rotation: float = 15.0,
    flip: bool = False,
    random_state: int | np.random.Generator | None = 0,
    lattice: str | float = "MoS2",
    orientation: float = 10.0,
    detector_shape: tuple[int, int] = (96, 96),
    k_pixel_size: float = 0.75,
    convergence_angle: float = 25.0,
    **kwargs,
) -> tuple[hs.signals.Signal2D, FieldTruth]:
    """Atomic-resolution 4D-STEM of a MoS2-like monolayer (a phase object of Gaussian columns).

    The 2H monolayer seen along c is a honeycomb of Mo columns and S2 columns (two S atoms on top
    of each other) ``a / sqrt(3)`` apart. Each column is a Gaussian projected potential
    ``V0 exp(-r^2 / (2 w^2))``: Mo ``V0 = 110`` V nm, S2 ``70`` V nm, ``w = 0.035`` nm (a
    smooth model of the screened, thermally smeared columns: phases of 0.80 and 0.51 rad at
    200 kV). The first Mo column sits at the scan origin; ``a1`` points ``orientation`` degrees
    counter-clockwise from +x, ``a2`` 60 degrees further, the S2 columns at ``(a1 + a2) / 3``.

    Parameters
    ----------
    scan_shape : tuple of int
        ``(rows, cols)``; the default 24 x 24 at 0.03 nm covers about 2 x 2 unit cells.
    scan_step : float
        nm.
    dose : float or None
        Electrons per pattern; None for noise-free fractions.
    scan_rotation : float
        Scan-detector rotation, degrees.
    flip : bool
        Reverse the scan's y component before the rotation.
    random_state : int, numpy.random.Generator or None
        Seed of the Poisson noise.
    lattice : {"MoS2", "WS2"} or float
        Lattice name or lattice constant ``a`` in nm.
    orientation : float
        Angle of ``a1`` from +x, degrees, counter-clockwise looking down the beam.
    detector_shape, k_pixel_size, convergence_angle
        As in :func:`simulate_field_4dstem`; the defaults (96 x 96 px of 0.75 1/nm, 25 mrad at
        200 kV: an aperture radius of 13.3 px, a 1.33 nm window sampled every 0.014 nm) keep
        the exit wave's spectrum inside the detector.
    **kwargs
        Passed to :func:`simulate_field_4dstem` (``beam_energy``, ``descan``, ...).

    Returns
    -------
    signal : hyperspy.signals.Signal2D
        ``(rows, cols, H, W)`` counts.
    truth : FieldTruth
        No vacuum, domains or walls; ``params`` lists the columns.

    Examples
    --------
    >>> signal, truth = atomic_monolayer((4, 4), dose=None)
    >>> signal.data.shape, truth.params["sample"]
    ((4, 4, 96, 96), 'atomic_monolayer')
    """
    a = LATTICE_CONSTANTS[lattice] if isinstance(lattice, str) else float(lattice)
    _positive("lattice", a, " nm")
    angle = np.deg2rad(orientation)
    # counter-clockwise looking down the beam turns +x towards -y (y points down the display)
    a1 = a * np.array([np.cos(angle), -np.sin(angle)])
    a2 = a * np.array([np.cos(angle + pi / 3), -np.sin(angle + pi / 3)])
    extent = np.hypot(*scan_shape) * scan_step + 2.0  # nm: the scan, the window and the rotation
    reach = ceil(2 * extent / a) + 1
    i, j = np.meshgrid(np.arange(-reach, reach + 1), np.arange(-reach, reach + 1), indexing="ij")
    cells = i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2
    centre = np.array([scan_shape[1], scan_shape[0]]) * scan_step / 2
    positions, heights, widths = [], [], []
    for k, (name, height, width) in enumerate(_MONOLAYER_COLUMNS):
        sites = cells + k * (a1 + a2) / 3
        keep = np.linalg.norm(sites - centre, axis=1) < extent
        positions.append(sites[keep])
        heights += [height] * int(keep.sum())
        widths += [width] * int(keep.sum())
    signal, truth = simulate_field_4dstem(
        _column_potential(np.concatenate(positions), np.array(heights), np.array(widths)),
        scan_shape=scan_shape, scan_step=scan_step, dose=dose, scan_rotation=scan_rotation, flip=flip,
        random_state=random_state, detector_shape=detector_shape, k_pixel_size=k_pixel_size,
        convergence_angle=convergence_angle, **kwargs,
    )
    signal.metadata.General.title = "Synthetic atomic-resolution 4D-STEM of a MoS2-like monolayer"
    params = truth.params | {
        "sample": "atomic_monolayer",
        "lattice_constant_nm": a,
        "orientation_deg": float(orientation),
        "columns": [{"name": name, "peak_V_nm": height, "width_nm": width, "site_a1_a2_fraction": (k / 3, k / 3)}
                    for k, (name, height, width) in enumerate(_MONOLAYER_COLUMNS)],
    }
    return signal, replace(truth, params=params)


class _DomainNetwork:
    """Projected potential of a bilayer with triangular polar domains and a hole (all lengths nm).

    ``V = c (V_mip + V_dom s)``: ``c`` the smoothed specimen indicator (0 in the hole),
    ``s = t1 t2 t3`` the smoothed domain sign, ``t_j = tanh((2 / |G|) sin(u_j / 2) / w)`` with
    ``u_j = G_j . (r - r0)`` for three wave vectors ``G_j`` at 120 degrees (``|G| = 4 pi /
    (sqrt(3) L)``): the walls are the lines ``u_j = 2 pi n``, which tile the plane with
    equilateral triangles of side ``L`` of alternating sign.
    """

    def __init__(self, period, wall_width, orientation, node, v_mip, v_dom, hole_centre, hole_radius, edge_width):
        self.length = 4 * pi / (sqrt(3) * period)
        angles = np.deg2rad(orientation) + np.array([0.0, 2 * pi / 3, 4 * pi / 3])
        self.g = self.length * np.stack([np.cos(angles), -np.sin(angles)], axis=1)  # (3, 2) (x, y) rad/nm
        self.node = np.asarray(node, dtype=float)
        self.w, self.v_mip, self.v_dom = wall_width, v_mip, v_dom
        self.hole_centre, self.hole_radius, self.edge = np.asarray(hole_centre, dtype=float), hole_radius, edge_width

    def _phases(self, y, x):
        return [g[0] * (x - self.node[0]) + g[1] * (y - self.node[1]) for g in self.g]

    def sign(self, y, x):
        """Smoothed domain sign ``s`` and its gradient (x, y), 1/nm."""
        t, dt = [], []
        for g, u in zip(self.g, self._phases(y, x)):
            z = 2 / self.length * np.sin(u / 2) / self.w
            t.append(np.tanh(z))
            slope = np.cosh(z) ** -2 * np.cos(u / 2) / (self.w * self.length)
            dt.append((slope * g[0], slope * g[1]))
        s = t[0] * t[1] * t[2]
        grad = [sum(dt[j][axis] * t[(j + 1) % 3] * t[(j + 2) % 3] for j in range(3)) for axis in range(2)]
        return s, grad

    def specimen(self, y, x):
        """Smoothed specimen indicator ``c`` (1 on the flake, 0 in the hole) and its gradient (x, y)."""
        dx, dy = x - self.hole_centre[0], y - self.hole_centre[1]
        distance = np.maximum(np.hypot(dx, dy), 1e-12)
        z = (distance - self.hole_radius) / self.edge
        slope = 0.5 * np.cosh(z) ** -2 / self.edge
        return 0.5 * (1 + np.tanh(z)), (slope * dx / distance, slope * dy / distance)

    def __call__(self, y, x):
        s, (sx, sy) = self.sign(y, x)
        c, (cx, cy) = self.specimen(y, x)
        level = self.v_mip + self.v_dom * s
        return c * level, cx * level + c * self.v_dom * sx, cy * level + c * self.v_dom * sy

    def wall_distance(self, y, x):
        """Distance from the nearest wall line, nm."""
        return np.min([np.abs((u + pi) % (2 * pi) - pi) / self.length for u in self._phases(y, x)], axis=0)


def _opposite_neighbour(domains: np.ndarray) -> np.ndarray:
    """True where a 4-neighbour carries the opposite non-zero sign."""
    walls = np.zeros(domains.shape, dtype=bool)
    for axis in (0, 1):
        a = np.take(domains, np.arange(domains.shape[axis] - 1), axis=axis)
        b = np.take(domains, np.arange(1, domains.shape[axis]), axis=axis)
        change = (a * b) < 0
        index = [slice(None)] * 2
        index[axis] = slice(0, -1)
        walls[tuple(index)] |= change
        index[axis] = slice(1, None)
        walls[tuple(index)] |= change
    return walls


def polar_bilayer(
    scan_shape: tuple[int, int] = (32, 32),
    *,
    scan_step: float = 0.5,
    dose: float | None = 1e6,
    scan_rotation: float = -25.0,
    flip: bool = False,
    random_state: int | np.random.Generator | None = 0,
    period: float = 9.0,
    wall_width: float = 0.6,
    domain_potential: float = 10.0,
    mean_inner_potential: float = 20.0,
    hole_radius: float = 2.5,
    edge_width: float = 0.5,
    **kwargs,
) -> tuple[hs.signals.Signal2D, FieldTruth]:
    """A bilayer with triangular polar domains and a hole, seen by a nanometre probe (3 mrad).

    Model (all of it in the projected potential, V nm):

    - The bilayer has a mean inner potential ``V_mip`` (default 20 V nm, about 15 V over 1.3 nm);
      a circular hole of radius ``hole_radius`` (edge ``tanh`` width ``edge_width``) at 80 % of
      the width and 25 % of the height of the field of view is vacuum (``V = 0``).
    - Triangular domains of side ``period`` (the AB/BA network of a marginally twisted bilayer)
      carry opposite polarization; each adds ``+V_dom`` or ``-V_dom`` (``domain_potential``)
      to the potential, a potential step across every wall of ``tanh`` width ``wall_width``.
      ``V = c (V_mip + V_dom s)`` with ``c`` and ``s`` the smoothed hole and domain maps (see
      ``_DomainNetwork``).

    The projected field ``E = -grad V`` is therefore localised at the walls, where it points
    across the wall from the + domain (higher potential) to the - domain, and at the hole's
    edge; inside a domain it vanishes. The polarization sign of a domain (``truth.domains``)
    is the sign of its potential offset. A node of the network sits at 35 % / 40 % of the field
    of view; the walls run at ``30, 90, 150`` degrees from +x.

    Parameters
    ----------
    scan_shape : tuple of int
        ``(rows, cols)``.
    scan_step : float
        nm.
    dose : float or None
        Electrons per pattern; None for noise-free fractions.
    scan_rotation : float
        Scan-detector rotation, degrees.
    flip : bool
        Reverse the scan's y component before the rotation.
    random_state : int, numpy.random.Generator or None
        Seed of the Poisson noise.
    period : float
        Side of the triangular domains, nm.
    wall_width : float
        ``w`` of the ``tanh(d / w)`` wall profile, nm.
    domain_potential : float
        ``V_dom``, V nm (10 V nm: 0.073 rad at 200 kV).
    mean_inner_potential : float
        ``V_mip``, V nm.
    hole_radius, edge_width : float
        Hole radius and edge width, nm.
    **kwargs
        Passed to :func:`simulate_field_4dstem` (``convergence_angle`` (default 3 mrad),
        ``detector_shape`` (64 x 64), ``k_pixel_size`` (0.125 1/nm), ``descan``, ...).

    Returns
    -------
    signal : hyperspy.signals.Signal2D
        ``(rows, cols, H, W)`` counts.
    truth : FieldTruth
        With ``domains`` (+1 / -1, 0 in the hole), ``walls``, ``wall_distance`` and ``vacuum``.

    Examples
    --------
    >>> signal, truth = polar_bilayer((16, 16), scan_step=1.0, dose=None)
    >>> sorted(np.unique(truth.domains).tolist()), bool(truth.vacuum.any())
    ([-1, 0, 1], True)
    """
    for name, value in (("period", period), ("wall_width", wall_width), ("hole_radius", hole_radius),
                        ("edge_width", edge_width)):
        _positive(name, value, " nm")
    height, width = scan_shape[0] * scan_step, scan_shape[1] * scan_step
    network = _DomainNetwork(
        period, wall_width, 0.0, (0.35 * width, 0.4 * height), mean_inner_potential, domain_potential,
        (0.8 * width, 0.25 * height), hole_radius, edge_width,
    )
    signal, truth = simulate_field_4dstem(network, scan_shape=scan_shape, scan_step=scan_step, dose=dose,
                                          scan_rotation=scan_rotation, flip=flip, random_state=random_state, **kwargs)
    rows, cols = np.indices(scan_shape)
    y, x = rows * scan_step, cols * scan_step
    vacuum = network.specimen(y, x)[0] < 0.5
    domains = np.where(vacuum, 0, np.sign(network.sign(y, x)[0])).astype(np.int8)
    signal.metadata.General.title = "Synthetic 4D-STEM of a bilayer with polar domains"
    params = truth.params | {
        "sample": "polar_bilayer",
        "domain_period_nm": float(period),
        "wall_width_nm": float(wall_width),
        "domain_potential_V_nm": float(domain_potential),
        "mean_inner_potential_V_nm": float(mean_inner_potential),
        "hole_centre_xy_nm": (0.8 * width, 0.25 * height),
        "hole_radius_nm": float(hole_radius),
        "edge_width_nm": float(edge_width),
        "network_node_xy_nm": (0.35 * width, 0.4 * height),
    }
    return signal, replace(
        truth,
        domains=domains,
        walls=_opposite_neighbour(domains),
        wall_distance=network.wall_distance(y, x),
        vacuum=vacuum,
        params=params,
    )
