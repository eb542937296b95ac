"""Direct beam and Bragg disks of nanobeam diffraction patterns (array functions, detector pixels).

Conventions, shared with :mod:`stemml_core.synthetic.diffraction`: patterns are ``(n, H, W)``
arrays of ``H`` detector rows by ``W`` columns; a position on the detector is ``(row, col)`` in
px with pixel centres at the integer indices. Nothing here knows the calibration: converting
positions to reciprocal vectors (1/nm, per-axis pixel sizes, scan rotation) happens in
:mod:`stemml_core.diffraction.lattice` and :mod:`stemml_core.diffraction.strain`.

The steps, each a batched array function:

1. :func:`disk_radius` and :func:`direct_beam` measure the direct beam of each pattern: its
   radius from the half-maximum area, its centre as the centre of mass of a window that holds the
   whole disk (exact for a disk inside the window: no pixel locking, no half-pixel shift).
2. :func:`fit_descan` fits a smooth, robust polynomial to the direct-beam positions over the scan.
3. :func:`probe_template` averages direct beams aligned to sub-pixel precision: the probe image
   every disk is a copy of.
4. :func:`find_disks` cross-correlates every pattern with the template (FFT, batched), keeps the
   correlation peaks above a threshold derived from each pattern, and :func:`refine_disks` finds
   each disk's sub-pixel position from the phase slope of its local cross-power spectrum.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import numpy as np
import scipy.fft
from scipy import ndimage

from stemml_core._frozen import ReadOnlyArrays

__all__ = [
    "DirectBeam",
    "Disks",
    "cross_correlate",
    "direct_beam",
    "disk_radius",
    "find_disks",
    "fit_descan",
    "probe_template",
    "refine_disks",
    "template_shape",
]

EDGE_MARGIN = 3.0
"""px a window keeps beyond the disk radius: the blurred disk edge and an offset of up to 1 px."""

_MAD_TO_SIGMA = 1.4826  # normal standard deviation per median absolute deviation


def _as_patterns(patterns, name: str = "patterns") -> np.ndarray:
    array = np.asarray(patterns)
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"{name} has shape {array.shape}; expected (n, H, W) diffraction patterns.")
    return array


def _radius_pair(radius) -> np.ndarray:
    pair = np.broadcast_to(np.asarray(radius, dtype=float), (2,)).copy()
    if not (np.isfinite(pair) & (pair > 0)).all():
        raise ValueError(f"radius={radius!r} px; expected a positive number or a (row, col) pair of them.")
    return pair


def disk_radius(patterns, pixel_size=(1.0, 1.0)) -> float:
    """Radius of the direct beam from the area above half its maximum.

    Parameters
    ----------
    patterns : array_like
        ``(n, H, W)`` diffraction patterns whose brightest disk is the direct beam.
    pixel_size : tuple of float
        ``(row, col)`` detector pixel size (1/nm for a calibrated detector); ``(1, 1)`` gives px.

    Returns
    -------
    float
        Median over the patterns of ``sqrt(area * pixel_row * pixel_col / pi)``, in the units of
        ``pixel_size`` (1/nm: the convergence semi-angle over the wavelength).

    Notes
    -----
    The half-maximum level is half the median of the pixels above half the brightest value of
    the pattern after a 3 x 3 minimum filter (the disk's plateau; a hot pixel, which the minimum
    filter removes, does not set it; the minimum filter is several times faster than a median). A
    disk with a symmetric blurred edge covers ``pi R^2`` above half its plateau, whatever the
    blur; counting whole pixels makes the estimate good to about 1 %.

    Examples
    --------
    >>> from stemml_core.synthetic import simulate_4dstem
    >>> signal, truth = simulate_4dstem(np.zeros((1, 2, 2, 2)), dose=None)
    >>> radius = disk_radius(signal.data[0], (0.125, 0.125))  # 1/nm
    >>> bool(abs(radius / truth.params["disk_radius_inv_nm"] - 1) < 0.02)
    True
    """
    patterns = _as_patterns(patterns).astype(np.float64)
    rough = ndimage.minimum_filter(patterns, size=(1, 3, 3)).max(axis=(1, 2)) / 2
    plateau = np.nanmedian(np.where(patterns > rough[:, None, None], patterns, np.nan), axis=(1, 2))
    area = (patterns > plateau[:, None, None] / 2).sum(axis=(1, 2))
    return float(np.sqrt(np.median(area) * pixel_size[0] * pixel_size[1] / np.pi))


def template_shape(radius) -> tuple[int, int]:
    """Shape ``(rows, cols)`` of the windows that hold one disk of ``radius`` px (row, col).

    Even sizes that FFT fast, at least ``2 (radius + EDGE_MARGIN) + 2``; a window's centre is
    pixel ``(rows // 2, cols // 2)``.
    """
    radius = _radius_pair(radius)
    return tuple(2 * int(scipy.fft.next_fast_len(ceil(r + EDGE_MARGIN) + 1, real=True)) for r in radius)


def _windows(patterns, pattern_index, centre, shape, reach=None) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``(m, *shape)`` whose centre pixel is ``centre`` (m, 2) int, and whether each is
    usable: the whole window on the detector (``reach`` None), or the ``(row, col)`` half extents
    ``reach`` px around the centre, with the window's pixels beyond the edge set to 0."""
    height, width = patterns.shape[1:]
    rows = centre[:, :1] - shape[0] // 2 + np.arange(shape[0])
    cols = centre[:, 1:] - shape[1] // 2 + np.arange(shape[1])
    if reach is None:
        reach = (shape[0] // 2, shape[1] // 2, shape[0] - 1 - shape[0] // 2, shape[1] - 1 - shape[1] // 2)
    else:
        reach = tuple(reach) * 2
    inside = ((centre[:, 0] >= reach[0]) & (centre[:, 1] >= reach[1])
              & (centre[:, 0] <= height - 1 - reach[2]) & (centre[:, 1] <= width - 1 - reach[3]))
    on_detector = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    windows = patterns[pattern_index[:, None, None], np.clip(rows, 0, height - 1)[:, :, None],
                       np.clip(cols, 0, width - 1)[:, None, :]]
    return np.where(on_detector, windows, 0), inside


def _support_reach(template: np.ndarray) -> np.ndarray:
    """Half extents ``(row, col)`` px of the template's disk (above 0.1 % of its maximum)."""
    support = np.argwhere(template > 1e-3 * template.max())
    return np.abs(support - np.array(template.shape) // 2).max(axis=0)


@dataclass(frozen=True)
class DirectBeam:
    """Direct beam of ``n`` patterns, from :func:`direct_beam`.

    Attributes
    ----------
    origin : numpy.ndarray
        ``(n, 2)`` centre ``(row, col)``, px; NaN where the window around the beam leaves the
        detector.
    intensity : numpy.ndarray
        ``(n,)`` intensity inside the window (data units, e.g. counts); NaN where ``origin`` is.
    total : numpy.ndarray
        ``(n,)`` intensity of the whole pattern.
    """

    origin: np.ndarray
    intensity: np.ndarray
    total: np.ndarray

    @property
    def scattered_fraction(self) -> np.ndarray:
        """``(n,)`` fraction of the pattern outside the direct-beam window: about 0 in vacuum."""
        return 1 - self.intensity / self.total


def direct_beam(patterns, radius, *, iterations: int = 2) -> DirectBeam:
    """Direct-beam centre of every pattern, by the centre of mass of a window around it.

    Parameters
    ----------
    patterns : array_like
        ``(n, H, W)`` patterns whose brightest disk is the direct beam.
    radius : float or tuple of float
        Disk radius, px, one value or ``(row, col)`` (non-square pixels).
    iterations : int
        Centre-of-mass passes, each with the window re-centred on the previous centre.

    Returns
    -------
    DirectBeam
        Centre ``(row, col)`` px, window intensity and total intensity per pattern.

    Notes
    -----
    The start is the brightest pixel of the pattern after a 3 x 3 minimum filter (a hot pixel
    does not win). The window is the ellipse of semi-axes ``radius + EDGE_MARGIN`` around the
    current centre (rounded to a pixel); the centre of mass of a disk that lies wholly inside it
    is the disk's centre whatever its sub-pixel position, so the estimate has no pixel locking
    and no offset. Diffuse background inside the window pulls it toward the window centre.

    Examples
    --------
    >>> from stemml_core.synthetic import simulate_4dstem
    >>> signal, truth = simulate_4dstem(np.zeros((1, 3, 2, 2)), dose=None, descan=2.0)
    >>> beam = direct_beam(signal.data[0], 4.8)
    >>> bool(np.abs(beam.origin - truth.origin[0]).max() < 1e-3)
    True
    """
    patterns = _as_patterns(patterns).astype(np.float64)
    radius = _radius_pair(radius)
    reach = radius + EDGE_MARGIN
    n, height, width = patterns.shape
    smooth = ndimage.minimum_filter(patterns, size=(1, 3, 3))
    centre = np.stack(np.unravel_index(smooth.reshape(n, -1).argmax(axis=1), (height, width)), axis=1).astype(float)
    shape = template_shape(radius)
    offsets = np.stack(np.meshgrid(np.arange(shape[0]) - shape[0] // 2, np.arange(shape[1]) - shape[1] // 2,
                                   indexing="ij"))
    index = np.arange(n)
    inside = np.ones(n, dtype=bool)
    for _ in range(iterations):
        anchor = np.rint(centre).astype(int)
        windows, fits = _windows(patterns, index, anchor, shape)
        inside &= fits
        ellipse = ((offsets[0] + anchor[:, 0, None, None] - centre[:, 0, None, None]) / reach[0]) ** 2 + (
            (offsets[1] + anchor[:, 1, None, None] - centre[:, 1, None, None]) / reach[1]
        ) ** 2 <= 1
        weights = windows * ellipse
        intensity = weights.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            shift = np.einsum("nij,kij->nk", weights, offsets.astype(float)) / intensity[:, None]
        centre = anchor + shift
    total = patterns.reshape(n, -1).sum(axis=1)
    valid = inside & (intensity > 0)
    return DirectBeam(
        origin=np.where(valid[:, None], centre, np.nan),
        intensity=np.where(valid, intensity, np.nan),
        total=total,
    )


def fit_descan(origins, *, order: int = 2, n_iterations: int = 5) -> np.ndarray:
    """Smooth direct-beam position over the scan: a robust 2D polynomial fit.

    Parameters
    ----------
    origins : array_like
        ``(rows, cols, 2)`` measured direct-beam centres ``(row, col)`` px; NaN where unknown.
    order : int
        Total degree of the polynomial in the scan coordinates (0 constant, 1 a plane, 2
        quadratic).
    n_iterations : int
        Least-squares passes, each but the first reweighted (Tukey biweight, ``c = 4.685`` robust
        standard deviations), so outliers such as a pattern whose brightest disk was not the
        direct beam get zero weight; 0 or 1: one unweighted fit.

    Returns
    -------
    numpy.ndarray
        ``(rows, cols, 2)`` fitted centres ``(row, col)`` px at every scan position.

    Raises
    ------
    ValueError
        Fewer finite origins than polynomial terms.

    Examples
    --------
    >>> rows, cols = np.mgrid[0:6, 0:8]
    >>> origins = np.stack([64 + 0.1 * rows, 64 - 0.05 * cols + 0.01 * rows * cols], -1).astype(float)
    >>> origins[2, 3] += 5.0  # an outlier
    >>> bool(np.abs(fit_descan(origins)[2, 3] - [64.2, 63.91]).max() < 1e-6)
    True
    """
    origins = np.asarray(origins, dtype=float)
    if origins.ndim != 3 or origins.shape[2] != 2:
        raise ValueError(f"origins has shape {origins.shape}; expected (rows, cols, 2) (row, col) px.")
    rows, cols = origins.shape[:2]
    v, u = np.meshgrid(np.linspace(-1, 1, rows) if rows > 1 else [0.0],
                       np.linspace(-1, 1, cols) if cols > 1 else [0.0], indexing="ij")
    terms = [(i, j) for degree in range(order + 1) for i in range(degree + 1) for j in [degree - i]]
    design = np.stack([u.ravel() ** i * v.ravel() ** j for i, j in terms], axis=1)
    values = origins.reshape(-1, 2)
    finite = np.isfinite(values).all(axis=1)
    if finite.sum() < len(terms):
        raise ValueError(
            f"fit_descan has {finite.sum()} finite origins for a polynomial of order {order} "
            f"({len(terms)} terms); expected at least {len(terms)}. Lower order or check the direct beam."
        )
    clean = np.where(finite[:, None], values, 0.0)

    def weighted_fit(weights):
        root = np.sqrt(weights)[:, None]
        return np.linalg.lstsq(design * root, clean * root, rcond=None)[0]

    coefficients = weighted_fit(finite.astype(float))
    for _ in range(n_iterations - 1):
        distance = np.linalg.norm(clean - design @ coefficients, axis=1)
        scale = _MAD_TO_SIGMA * np.median(distance[finite])
        if scale == 0:
            break
        coefficients = weighted_fit(
            np.where(finite, np.clip(1 - (distance / (4.685 * scale)) ** 2, 0, None) ** 2, 0.0))
    return (design @ coefficients).reshape(rows, cols, 2)


def _shift_phase(shape, shift) -> np.ndarray:
    """``exp(-2 pi i f . shift)`` on the FFT grid of ``shape``, for shifts (m, 2) px: (m, *shape)."""
    fy = scipy.fft.fftfreq(shape[0])[:, None]
    fx = scipy.fft.fftfreq(shape[1])[None, :]
    return np.exp(-2j * np.pi * (fy * shift[:, 0, None, None] + fx * shift[:, 1, None, None]))


def probe_template(patterns, origins, radius) -> np.ndarray:
    """Image of the probe: the direct beams of ``patterns`` aligned on their centres and averaged.

    Parameters
    ----------
    patterns : array_like
        ``(n, H, W)`` patterns (vacuum patterns are best; else any, the central disk is used).
    origins : array_like
        ``(n, 2)`` direct-beam centres ``(row, col)`` px (from :func:`direct_beam`); rows with NaN
        are skipped.
    radius : float or tuple of float
        Disk radius, px, one value or ``(row, col)``.

    Returns
    -------
    numpy.ndarray
        ``(rows, cols)`` = :func:`template_shape` float64, summing to 1, the disk centred on pixel
        ``(rows // 2, cols // 2)``.

    Raises
    ------
    ValueError
        No pattern with a finite origin whose window fits on the detector.

    Notes
    -----
    Each window is cut around the rounded centre and moved by the remaining sub-pixel offset
    with the Fourier shift theorem before averaging, so the template is not blurred by the
    pixel grid.
    """
    patterns = _as_patterns(patterns)
    origins = np.asarray(origins, dtype=float).reshape(-1, 2)
    shape = template_shape(radius)
    usable = np.flatnonzero(np.isfinite(origins).all(axis=1))
    anchor = np.rint(origins[usable]).astype(int)
    windows, inside = _windows(patterns, usable, anchor, shape)
    if not inside.any():
        raise ValueError(
            f"probe_template found no direct beam whose {shape} px window fits on the {patterns.shape[1:]} "
            "detector; expected at least one pattern with a finite origin away from the edge."
        )
    residual = origins[usable][inside] - anchor[inside]
    spectra = scipy.fft.fft2(windows[inside]) * _shift_phase(shape, -residual)
    template = scipy.fft.ifft2(spectra.mean(axis=0)).real
    return template / template.sum()


def _as_template(template) -> np.ndarray:
    template = np.asarray(template, dtype=np.float64)
    if template.ndim != 2 or not template.sum() > 0:
        raise ValueError(
            f"template has shape {template.shape} and sum {template.sum():.3g}; expected an image with a "
            "positive sum, centred on pixel (rows // 2, cols // 2), as probe_template returns."
        )
    return template / template.sum()


def cross_correlate(patterns, template, *, device: str = "cpu") -> np.ndarray:
    """Cross-correlation of every pattern with the probe template, scaled to disk intensities.

    Parameters
    ----------
    patterns : array_like
        ``(n, H, W)`` patterns.
    template : array_like
        ``(rows, cols)`` probe image centred on pixel ``(rows // 2, cols // 2)``.
    device : str
        ``"cpu"`` computes with ``scipy.fft``; any other torch device (``"cuda"``, ``"cuda:1"``)
        with ``torch.fft`` there. On the 2-core test machine scipy's float32 FFT ran about 2.4
        times as fast as torch's CPU FFT (8000 against 3400 128 x 128 patterns/s, forward and
        inverse), so torch is used only where a GPU earns it.

    Returns
    -------
    numpy.ndarray
        ``(n, H, W)`` float32; the value at pixel ``x`` is ``sum_y P(y) T(y - x) / sum T^2`` with
        ``T`` normalised to unit sum, so a disk ``N T(y - x0)`` peaks at ``x0`` with value ``N``,
        its integrated intensity. Periodic at the detector edges.
    """
    patterns = _as_patterns(patterns).astype(np.float32)
    kernel = _correlation_kernel(_as_template(template), patterns.shape[1:])
    if device == "cpu":
        return scipy.fft.irfft2(scipy.fft.rfft2(patterns) * np.conj(scipy.fft.rfft2(kernel)), s=kernel.shape)
    return _torch_correlation(patterns, kernel, device)


def _correlation_kernel(template: np.ndarray, shape) -> np.ndarray:
    """``T / sum T^2`` on a detector of ``shape``, float32, its centre moved to pixel (0, 0)."""
    kernel = np.zeros(shape)
    rows, cols = template.shape
    kernel[:rows, :cols] = template / (template**2).sum()
    return np.roll(kernel, (-(rows // 2), -(cols // 2)), axis=(0, 1)).astype(np.float32)


def _torch_correlation(patterns: np.ndarray, kernel: np.ndarray, device: str) -> np.ndarray:
    """Circular cross-correlation of float32 ``patterns`` (n, H, W) with ``kernel`` (H, W) on a torch device."""
    import torch

    spectrum = torch.fft.rfft2(torch.as_tensor(kernel, device=device)).conj()
    data = torch.as_tensor(patterns, device=device)
    return torch.fft.irfft2(torch.fft.rfft2(data) * spectrum, s=kernel.shape).cpu().numpy()


class _PhaseSlope:
    """Least-squares shift from the phase of a window's cross-power spectrum with the template.

    A window that holds ``a T(x - s) + b`` has the cross-power spectrum ``C(f) = a |T(f)|^2
    exp(-2 pi i f . s)`` away from ``f = 0``; its phase is linear in ``f``. ``s`` is the weighted
    least-squares slope with weights ``|T(f)|^2`` (the inverse phase variance for white noise, as
    Poisson noise is in Fourier space), first from the lowest frequencies (no phase wrapping for
    ``|s|`` up to 1.5 px), then from all of them on the phase that remains (a second pass changes
    the result by less than 1e-4 px).
    """

    def __init__(self, template: np.ndarray):
        self.spectrum_conj = np.conj(scipy.fft.rfft2(template)).astype(np.complex64)
        self.fy = scipy.fft.fftfreq(template.shape[0])
        self.fx = scipy.fft.rfftfreq(template.shape[1])
        fy, fx = np.meshgrid(self.fy, self.fx, indexing="ij")
        frequency = np.stack([fy.ravel(), fx.ravel()], axis=1)
        excluded = (np.abs(fy) == 0.5) | (np.abs(fx) == 0.5) | ((fy == 0) & (fx == 0))  # Nyquist, DC
        # rfft2 stores one of each pair (f, -f) except on the fx = 0 column: count the others twice
        self.multiplicity = (np.where(fx == 0, 1.0, 2.0) * ~excluded).ravel()
        power = np.abs(self.spectrum_conj.ravel()) ** 2 * self.multiplicity
        self.power_sum = power.sum()
        self.low = np.flatnonzero(((np.abs(fy) <= 1 / 6) & (np.abs(fx) <= 1 / 6)).ravel())
        self.coarse = self._solver(power[self.low], frequency[self.low])
        self.fine = self._solver(power, frequency)

    @staticmethod
    def _solver(weights, frequency) -> np.ndarray:
        """``Q`` (n_freq, 2) float32 with ``s = phase @ Q`` the weighted least-squares shift."""
        wf = weights[:, None] * frequency
        return (-wf @ np.linalg.inv(wf.T @ frequency) / (2 * np.pi)).astype(np.float32)

    def _turned(self, cross, shift):
        """``cross * exp(2 pi i f . shift)``, flattened to (m, n_freq): the phase left after ``shift``."""
        ramp_y = np.exp(2j * np.pi * self.fy[None, :] * shift[:, :1]).astype(np.complex64)
        ramp_x = np.exp(2j * np.pi * self.fx[None, :] * shift[:, 1:]).astype(np.complex64)
        return (cross * ramp_y[:, :, None] * ramp_x[:, None, :]).reshape(len(cross), -1)

    def __call__(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cross = scipy.fft.rfft2(windows.astype(np.float32)) * self.spectrum_conj
        low = cross.reshape(len(cross), -1)[:, self.low]
        shift = (np.arctan2(low.imag, low.real) @ self.coarse).astype(np.float64)
        turned = self._turned(cross, shift)
        shift = shift + np.arctan2(turned.imag, turned.real) @ self.fine
        amplitude = self._turned(cross, shift).real @ self.multiplicity / self.power_sum
        return shift, amplitude


def refine_disks(patterns, pattern_index, guess, template, *, max_shift: float = 1.5):
    """Sub-pixel disk centres and intensities by the phase slope of the local cross-power spectrum.

    Parameters
    ----------
    patterns : array_like
        ``(n, H, W)`` patterns.
    pattern_index : array_like
        ``(m,)`` int, the pattern of each disk.
    guess : array_like
        ``(m, 2)`` integer ``(row, col)`` px near each disk centre (within ``max_shift``).
    template : array_like
        ``(rows, cols)`` probe image from :func:`probe_template`; also the window shape.
    max_shift : float
        Largest accepted distance between the refined centre and ``guess``, px.

    Returns
    -------
    position : numpy.ndarray
        ``(m, 2)`` float64 centres ``(row, col)``, px.
    intensity : numpy.ndarray
        ``(m,)`` least-squares amplitude of the template (integrated disk intensity, data units).
    valid : numpy.ndarray
        ``(m,)`` bool: the disk with its blurred edge (where the template exceeds 0.1 % of its
        maximum) lies on the detector, the shift is at most ``max_shift`` and the intensity is
        positive.

    Notes
    -----
    In a window that holds the whole disk, ``P(x) = a T(x - s) + b + noise``; the Fourier shift
    theorem makes the phase of ``P^(f) conj(T^(f))`` equal to ``-2 pi f . s`` at every frequency,
    whatever the sub-pixel ``s``: the estimate does not pixel-lock, a constant background
    drops out with ``f = 0``, and the weights ``|T^(f)|^2`` make it the least-squares fit of
    the shifted template. This is the Fourier-domain sub-pixel registration of H. S. Stone et al.,
    IEEE Trans. Geosci. Remote Sens. 39, 2235 (2001), applied to each disk.
    """
    patterns = _as_patterns(patterns)
    template = _as_template(template)
    pattern_index = np.asarray(pattern_index, dtype=int)
    guess = np.asarray(guess, dtype=int).reshape(-1, 2)
    windows, inside = _windows(patterns, pattern_index, guess, template.shape, _support_reach(template))
    shift, intensity = _PhaseSlope(template)(windows)
    valid = inside & (np.abs(shift) <= max_shift).all(axis=1) & (intensity > 0)
    return guess + shift, intensity, valid


@dataclass(frozen=True)
class Disks(ReadOnlyArrays):
    """Disks found in ``n_patterns`` patterns by :func:`find_disks`, as flat arrays over all disks.

    Attributes
    ----------
    pattern : numpy.ndarray
        ``(m,)`` int, index of the pattern that holds each disk, ascending.
    position : numpy.ndarray
        ``(m, 2)`` float64 centres ``(row, col)``, px.
    intensity : numpy.ndarray
        ``(m,)`` integrated disk intensity (data units); within a pattern the disks are sorted by
        decreasing intensity, so the first is the brightest (the direct beam of a thin crystal).
    n_patterns : int
        Number of patterns searched; a pattern without any disk is in ``counts`` as 0.
    """

    pattern: np.ndarray
    position: np.ndarray
    intensity: np.ndarray
    n_patterns: int

    @property
    def counts(self) -> np.ndarray:
        """``(n_patterns,)`` number of disks in each pattern (0: nothing found)."""
        return np.bincount(self.pattern, minlength=self.n_patterns)


def _local_maxima(image: np.ndarray) -> np.ndarray:
    """Pixels ``>=`` their 8 neighbours, (n, H, W) bool; the detector's outer pixels are excluded."""
    centre = image[:, 1:-1, 1:-1]
    peak = np.zeros(image.shape, dtype=bool)
    inner = np.ones(centre.shape, dtype=bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr or dc:
                inner &= centre >= image[:, 1 + dr : image.shape[1] - 1 + dr, 1 + dc : image.shape[2] - 1 + dc]
    peak[:, 1:-1, 1:-1] = inner
    return peak


def _thresholds(patterns, template, correlation, min_snr, min_relative) -> np.ndarray:
    """Per-pattern correlation threshold (n,): background plus ``min_snr`` noise, at least
    ``min_relative`` of the highest peak.

    Background ``b`` is the median pixel; the pixel noise ``sigma`` the robust spread of each
    pixel minus the mean of its four neighbours (``1.25 sigma^2`` for independent noise), which
    smooth disks hardly feed. A constant ``b`` adds ``b / sum T^2`` to the correlation and the
    noise ``sigma / sqrt(sum T^2)`` (``T`` of unit sum)."""
    n = len(patterns)
    inner = patterns[:, 1:-1:2, 1:-1:2]
    detail = inner - 0.25 * (patterns[:, :-2:2, 1:-1:2] + patterns[:, 2::2, 1:-1:2]
                             + patterns[:, 1:-1:2, :-2:2] + patterns[:, 1:-1:2, 2::2])
    detail = detail.reshape(n, -1)
    spread = np.median(np.abs(detail - np.median(detail, axis=1, keepdims=True)), axis=1)
    sigma = _MAD_TO_SIGMA * spread / np.sqrt(1.25)
    background = np.median(inner.reshape(n, -1), axis=1)
    energy = (template**2).sum()
    noise_floor = background / energy + min_snr * sigma / np.sqrt(energy)
    return np.maximum(noise_floor, min_relative * correlation.reshape(n, -1).max(axis=1))


def _correlation_peaks(correlation, threshold, min_distance):
    """Peaks of each correlation map: (pattern, (row, col)) of the maxima within ``min_distance`` px
    that exceed the pattern's ``threshold``."""
    pattern, row, col = np.nonzero(_local_maxima(correlation) & (correlation > threshold[:, None, None]))
    value = correlation[pattern, row, col]
    reach = int(np.floor(min_distance))
    dr, dc = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    near = (dr**2 + dc**2 <= min_distance**2) & ((dr != 0) | (dc != 0))
    dr, dc = dr[near], dc[near]
    height, width = correlation.shape[1:]
    neighbours = correlation[
        pattern[:, None], np.clip(row[:, None] + dr, 0, height - 1), np.clip(col[:, None] + dc, 0, width - 1)
    ]
    keep = value >= neighbours.max(axis=1)
    return pattern[keep], np.stack([row[keep], col[keep]], axis=1)


def find_disks(
    patterns,
    template,
    *,
    min_snr: float = 5.0,
    min_relative: float = 2e-4,
    device: str = "cpu",
) -> Disks:
    """Find and refine the disks (direct beam and Bragg disks) of every pattern.

    Parameters
    ----------
    patterns : array_like
        ``(n, H, W)`` patterns.
    template : array_like
        ``(rows, cols)`` probe image from :func:`probe_template`.
    min_snr : float
        A correlation peak must exceed the correlation of the pattern's background by ``min_snr``
        times its noise, both measured on the pattern itself (median pixel; robust spread of
        each pixel minus the mean of its neighbours).
    min_relative : float
        ... and ``min_relative`` times the pattern's highest peak (the direct beam): the floor
        for patterns without background noise.
    device : str
        Where the cross-correlation runs, as in :func:`cross_correlate`.

    Returns
    -------
    Disks
        Refined centres ``(row, col)`` px and intensities of every disk found, pattern by
        pattern; patterns where nothing was found have ``counts == 0``.

    Notes
    -----
    Candidates are the maxima of :func:`cross_correlate` that are the highest value within the
    template's half-maximum radius (two disks closer than a radius would overlap by more than
    half) and above both thresholds, which follow each pattern's own background, noise and dose
    (a change of units or gain finds the same disks). Each is refined by :func:`refine_disks`;
    disks cut by the detector edge (hence biased) are left out.

    Examples
    --------
    >>> from stemml_core.synthetic import simulate_4dstem
    >>> signal, truth = simulate_4dstem(np.zeros((1, 1, 2, 2)), dose=1e6, random_state=0)
    >>> patterns = signal.data[0]
    >>> radius = disk_radius(patterns)
    >>> template = probe_template(patterns, direct_beam(patterns, radius).origin, radius)
    >>> disks = find_disks(patterns, template)
    >>> int(disks.counts[0])  # every disk whose blurred edge lies on the 128 x 128 detector
    20
    """
    patterns = _as_patterns(patterns).astype(np.float32)
    template = _as_template(template)
    correlation = cross_correlate(patterns, template, device=device)
    threshold = _thresholds(patterns, template, correlation, min_snr, min_relative)
    pattern, guess = _correlation_peaks(correlation, threshold, max(disk_radius(template[None]), 1.0))
    position, intensity, valid = refine_disks(patterns, pattern, guess, template)
    pattern, position, intensity = pattern[valid], position[valid], intensity[valid]
    order = np.lexsort((-intensity, pattern))
    return Disks(pattern[order], position[order], intensity[order], len(patterns))
