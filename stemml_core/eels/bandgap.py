"""Band-gap energy and type from the onset of the inelastic low-loss signal.

Near the band gap the single-scattering intensity of a semiconductor rises as
``A (E - Eg)^b`` with ``b ≈ 0.5`` for a direct and ``b ≈ 1.5`` for an indirect
gap :cite:`RaffertyBrown1998`. Real spectra also carry intensity below the gap
(the low-energy tail of the plasmon, Cherenkov and surface losses), so a pure
power law fitted in a fixed window is biased; here the onset is fitted together
with a smooth background, as :cite:`Brokkelkamp2022` recommends:

.. math::

    I(E) = \\sum_{k=0}^{K} c_k E^k + A\\,[(E - E_g)_+^b \\otimes R](E),

where ``R`` is the instrument resolution (the unit-area zero-loss peak) when
known. For fixed ``(Eg, b)`` the model is linear in ``(c_k, A)``, so the fit
profiles the least-squares residual over a grid of ``(Eg, b)``: every spectrum
is fitted against every grid point in one matrix product (no per-spectrum
optimiser, no starting values), the best point is refined by a parabola, and
``A ≥ 0`` is enforced. Uncertainties come from fitting every Monte Carlo
replica of the ZLP-subtracted spectrum and taking percentiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import contextlib
import sys

import dask
import hyperspy.api as hs
import numpy as np
from dask.diagnostics import ProgressBar
from scipy.signal import fftconvolve

from .replicas import check_replica_input, inelastic_replicas, noise_variance
from .thickness import PERCENTILES, ReplicaInterval

__all__ = ["NAN_REASONS", "BandGapResult", "OnsetFit", "estimate_band_gap", "fit_onset", "onset_curve", "onset_window",
           "resolution_from"]

#: Exponent below which a gap is reported as direct (halfway between 0.5 and 1.5).
DIRECT_INDIRECT_THRESHOLD = 1.0


@dataclass(frozen=True)
class OnsetFit:
    """Result of :func:`fit_onset` for ``n`` spectra.

    Attributes
    ----------
    band_gap : numpy.ndarray, shape (n,)
        Onset energy Eg, eV; NaN where no onset was found.
    exponent : numpy.ndarray, shape (n,)
        Onset exponent b (0.5 direct, 1.5 indirect); NaN where no onset.
    amplitude : numpy.ndarray, shape (n,)
        Onset amplitude A, counts per eV^b; NaN where no onset.
    rss : numpy.ndarray, shape (n,)
        Residual sum of squares of the best fit, counts².
    significance : numpy.ndarray, shape (n,)
        How much better the onset model fits than the background alone:
        ``(RSS_background - RSS) / s²`` with ``s²`` the residual variance of
        the onset fit (a Δχ² for the 3 onset parameters).
    found : numpy.ndarray of bool, shape (n,)
        True where a significant onset (``significance`` above the threshold,
        positive amplitude) lies inside the window, not at its edge.
    at_edge : numpy.ndarray of bool, shape (n,)
        True where the onset is significant but its best Eg lies on the edge
        of the searched range (the window is too narrow or misplaced).
    """

    band_gap: np.ndarray
    exponent: np.ndarray
    amplitude: np.ndarray
    rss: np.ndarray
    significance: np.ndarray
    found: np.ndarray
    at_edge: np.ndarray


def _onset_table(energy, window, gaps, exponents, resolution):
    """Onset shapes (E - Eg)_+^b inside ``window`` for every (Eg, b) of the grid, convolved
    with ``resolution`` when given. Returns (n_gaps, n_exponents, n_window)."""
    inside = (energy >= window[0]) & (energy <= window[1])
    first, last = np.flatnonzero(inside)[[0, -1]]
    half = 0 if resolution is None else len(resolution) // 2
    lo, hi = first - half, last + (0 if resolution is None else len(resolution) - 1 - half)
    # extend the axis past its ends with the same channel width, for the convolution margins
    e = energy[0] + (energy[1] - energy[0]) * np.arange(lo, hi + 1)
    table = np.clip(e[None, None, :] - gaps[:, None, None], 0.0, None) ** exponents[None, :, None]
    if resolution is not None:
        kernel = np.asarray(resolution, dtype=np.float64)
        table = fftconvolve(table, (kernel / kernel.sum())[None, None, ::-1], mode="valid", axes=-1)
    return table


def _background(energy, order):
    scale = np.abs(energy).max()
    return np.stack([(energy / scale) ** k for k in range(order + 1)], axis=-1)


def _coarse_search(y, background, table):
    """Profile least squares over a shared grid: index of the best (Eg, b) per spectrum."""
    n_params = background.shape[1] + 1
    design = np.concatenate(
        [np.broadcast_to(background, table.shape[:2] + background.shape), table[..., None]], axis=-1
    )
    q, r = np.linalg.qr(design)  # (G, B, n_w, P), (G, B, P, P)
    e_amp = np.zeros(n_params)
    e_amp[-1] = 1.0
    w_amp = np.einsum("gbwp,gbp->gbw", q, np.linalg.inv(np.swapaxes(r, -1, -2)) @ e_amp)
    projections = np.einsum("gbwp,nw->ngbp", q, y, optimize=True)
    rss = np.einsum("nw,nw->n", y, y)[:, None, None] - np.einsum("ngbp,ngbp->ngb", projections, projections)
    amplitude = np.einsum("gbw,nw->ngb", w_amp, y, optimize=True)
    rss = np.where(amplitude > 0, rss, np.inf).reshape(len(y), -1)
    return np.unravel_index(rss.argmin(axis=1), table.shape[:2])


def _local_search(y, background, table, ig, ib, reach):
    """Per-spectrum least squares on the fine grid within ``reach`` (steps in Eg, b) of (ig, ib).

    Returns the residual, amplitude and grid indices of every candidate: (n, c) arrays."""
    n_g, n_b = table.shape[:2]
    dg, db = np.meshgrid(np.arange(-reach[0], reach[0] + 1), np.arange(-reach[1], reach[1] + 1), indexing="ij")
    gi = np.clip(ig[:, None] + dg.ravel()[None], 0, n_g - 1)
    bi = np.clip(ib[:, None] + db.ravel()[None], 0, n_b - 1)
    onset = table[gi, bi]  # (n, c, n_w)
    btb = background.T @ background  # (K, K)
    bt_on = np.einsum("wk,ncw->nck", background, onset)
    on_on = np.einsum("ncw,ncw->nc", onset, onset)
    n, c = gi.shape
    k = background.shape[1]
    normal = np.empty((n, c, k + 1, k + 1))
    normal[..., :k, :k] = btb
    normal[..., :k, k] = bt_on
    normal[..., k, :k] = bt_on
    normal[..., k, k] = on_on
    rhs = np.concatenate([np.broadcast_to((y @ background)[:, None, :], (n, c, k)),
                          np.einsum("ncw,nw->nc", onset, y)[..., None]], axis=-1)
    coef = np.linalg.solve(normal, rhs[..., None])[..., 0]
    rss = np.einsum("nw,nw->n", y, y)[:, None] - np.einsum("nck,nck->nc", coef, rhs)
    amplitude = coef[..., -1]
    return np.where(amplitude > 0, rss, np.inf), amplitude, gi, bi


def fit_onset(
    spectra,
    energy,
    *,
    window: tuple[float, float],
    exponents=None,
    gap_step: float = 0.005,
    background_order: int = 1,
    resolution=None,
    min_above: float = 0.15,
    min_significance: float = 25.0,
    block: int = 2048,
) -> OnsetFit:
    """Fit ``Eg``, ``b`` and ``A`` of a power-law onset on a smooth background.

    Parameters
    ----------
    spectra : array_like, shape (n, n_energy)
        Inelastic (ZLP-subtracted) spectra, counts per channel.
    energy : array_like, shape (n_energy,)
        Energy loss of each channel, eV, uniform and increasing.
    window : (float, float)
        Energy-loss range of the fit, eV. It should start a few tenths of an
        eV below the onset and end a few tenths above it.
    exponents : array_like, optional
        Onset exponents b to search, increasing. A uniform grid of at least
        9 values is searched as a continuum (the optimum is refined between
        grid points); default 0.2 to 2.6 in steps of 0.025. A few values,
        e.g. ``(0.5, 1.5)``, are a discrete model choice (direct or indirect):
        b is one of them and only Eg is refined.
    gap_step : float
        Step of the Eg grid, eV.
    background_order : int
        Degree of the polynomial background (0: constant, 1: linear, ...).
    resolution : array_like, optional
        Instrument resolution (e.g. the model ZLP), sampled on the same
        channel width and centred in the array; the onset is convolved with
        it. None: no broadening.
    min_above : float
        Eg is searched from the window start to ``window[1] - min_above``, eV,
        so that the onset has at least this much rise inside the window.
    min_significance : float
        Smallest Δχ² of the onset model over the background alone for an onset
        to count as found (25: about a 1e-5 false-alarm rate for 3 parameters
        under Gaussian noise).
    block : int
        Spectra fitted at once (memory bound).

    Returns
    -------
    OnsetFit

    Raises
    ------
    ValueError
        Mismatched shapes, a window outside the energy axis or too narrow,
        non-finite spectra, or a bad exponent grid.

    Notes
    -----
    The search has two stages over one fine grid of ``(Eg, b)``. First a
    coarse sub-grid (every 8th Eg, every 4th b) shared by all spectra: the
    residual at grid point ``g`` is ``||y||² - ||Q_g^T y||²`` with
    ``X_g = Q_g R_g`` the thin QR factorisation of the design matrix, and the
    amplitude ``A = w_g^T y`` with ``w_g = Q_g R_g^{-T} e_A``, both one matrix
    product over all spectra. Then every spectrum is refitted on the fine grid
    around its coarse optimum (batched normal equations), and the optimum is
    refined to the vertex of a quadratic surface through its 3 x 3 fine-grid
    neighbourhood. The fit is unweighted: within a window of about 1 eV the
    counting noise of an inelastic spectrum changes little.
    """
    spectra = np.asarray(spectra, dtype=np.float64)
    energy = np.asarray(energy, dtype=np.float64)
    if spectra.ndim != 2 or spectra.shape[1] != energy.shape[0]:
        raise ValueError(
            f"spectra has shape {spectra.shape}; expected (n_spectra, {energy.shape[0]}) to match energy"
        )
    if not np.all(np.isfinite(spectra)):
        raise ValueError("spectra contain NaN or infinite values; expected finite counts")
    lo, hi = map(float, window)
    if not energy[0] <= lo < hi <= energy[-1]:
        raise ValueError(
            f"window=({lo}, {hi}) eV is not inside the energy axis [{energy[0]:.3g}, {energy[-1]:.3g}] eV "
            "or is not increasing"
        )
    inside = (energy >= lo) & (energy <= hi)
    n_params = background_order + 2
    if inside.sum() < 3 * n_params or hi - lo <= 2 * min_above:
        raise ValueError(
            f"window=({lo}, {hi}) eV holds {inside.sum()} channels; expected at least {3 * n_params} "
            f"and a width above {2 * min_above} eV"
        )
    exponents = np.arange(0.2, 2.601, 0.025) if exponents is None else np.asarray(exponents, dtype=np.float64)
    if exponents.ndim != 1 or exponents.size < 1 or np.any(exponents <= 0) or np.any(np.diff(exponents) <= 0):
        raise ValueError(f"exponents={exponents!r}; expected one or more positive values in increasing order")
    continuous = len(exponents) >= 9 and np.allclose(np.diff(exponents), exponents[1] - exponents[0])
    gaps = np.arange(lo, hi - min_above + gap_step / 2, gap_step)
    if len(gaps) < 9:
        raise ValueError(f"gap_step={gap_step} eV gives {len(gaps)} band-gap values in the window; expected at least 9")

    table = _onset_table(energy, (lo, hi), gaps, exponents, resolution)
    background = _background(energy[inside], background_order)
    stride = (8, 4 if continuous else 1)
    reach = (8, 4 if continuous else 0)
    coarse = table[::stride[0], ::stride[1]]
    out = {key: np.full(len(spectra), np.nan) for key in ("band_gap", "exponent", "amplitude", "rss", "significance")}
    q_background = np.linalg.qr(background)[0]
    dof = inside.sum() - n_params - 2
    found = np.zeros(len(spectra), dtype=bool)
    at_edge = np.zeros(len(spectra), dtype=bool)
    for start in range(0, len(spectra), block):
        y = spectra[start:start + block, inside]
        cg, cb = _coarse_search(y, background, coarse)
        rss, amplitude, gi, bi = _local_search(y, background, table, cg * stride[0], cb * stride[1], reach)
        rows = np.arange(len(y))
        best = rss.argmin(axis=1)
        ig, ib = gi[rows, best], bi[rows, best]
        local = rss.reshape(len(y), 2 * reach[0] + 1, 2 * reach[1] + 1)
        du, dv = _vertex_offsets(local, *np.unravel_index(best, local.shape[1:]), ig, ib, table.shape[:2])
        band_gap = gaps[ig] + du * gap_step
        exponent = exponents[ib] + (dv * (exponents[1] - exponents[0]) if continuous else 0.0)
        best_rss = rss[rows, best]
        background_rss = np.einsum("nw,nw->n", y, y) - np.sum((y @ q_background) ** 2, axis=1)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # a noise-free fit: infinite
            significance = (background_rss - best_rss) / (np.maximum(best_rss, 0.0) / dof)
        significant = np.isfinite(best_rss) & (significance > min_significance)
        inner = (ig > 0) & (ig < len(gaps) - 1)
        ok = significant & inner
        sl = slice(start, start + len(y))
        at_edge[sl] = significant & ~inner
        out["band_gap"][sl] = np.where(ok, band_gap, np.nan)
        out["exponent"][sl] = np.where(ok, exponent, np.nan)
        out["amplitude"][sl] = np.where(ok, amplitude[rows, best], np.nan)
        out["rss"][sl] = best_rss
        out["significance"][sl] = significance
        found[sl] = ok
    return OnsetFit(found=found, at_edge=at_edge, **out)


def onset_curve(spectrum, energy, *, band_gap, exponent, window, resolution=None, background_order=1):
    """The fitted curve of :func:`fit_onset`'s model at given ``(Eg, b)``, for plots.

    Parameters
    ----------
    spectrum : array_like, shape (n_energy,)
        One inelastic spectrum, counts per channel.
    energy : array_like, shape (n_energy,)
        Energy loss, eV, uniform and increasing.
    band_gap, exponent : float
        Eg (eV) and b, e.g. the medians of :func:`estimate_band_gap`.
    window, resolution, background_order
        As for :func:`fit_onset`.

    Returns
    -------
    energy : numpy.ndarray
        The channels inside ``window``, eV.
    total, background : numpy.ndarray
        Least-squares fit of background plus onset, and its background part, counts.
    """
    spectrum = np.asarray(spectrum, dtype=np.float64)
    energy = np.asarray(energy, dtype=np.float64)
    inside = (energy >= window[0]) & (energy <= window[1])
    if spectrum.shape != energy.shape or inside.sum() < background_order + 3:
        raise ValueError(f"spectrum has shape {spectrum.shape} and the window {window} eV holds {inside.sum()} "
                         f"channels; expected the shape {energy.shape} and at least {background_order + 3} channels")
    onset = _onset_table(energy, window, np.array([float(band_gap)]), np.array([float(exponent)]), resolution)[0, 0]
    design = np.column_stack([_background(energy[inside], background_order), onset])
    coef = np.linalg.lstsq(design, spectrum[inside], rcond=None)[0]
    return energy[inside], design @ coef, design[:, :-1] @ coef[:-1]


# Least-squares fit of a quadratic surface to a 3 x 3 neighbourhood: the pseudo-inverse of the
# design matrix [1, u, v, u², v², uv] at the offsets u, v in {-1, 0, 1}.
_U, _V = (g.ravel() for g in np.meshgrid([-1, 0, 1], [-1, 0, 1], indexing="ij"))
_QUADRATIC = np.linalg.pinv(np.stack([np.ones(9), _U, _V, _U**2, _V**2, _U * _V], axis=1).astype(float))


def _vertex_offsets(local, lu, lv, ig, ib, grid_shape):
    """Offsets (in grid steps, within ±1) from the minimum (lu, lv) of each local residual grid
    ``local`` (n, Lu, Lv) to the vertex of the quadratic surface through its 3 x 3 neighbourhood;
    0 where the neighbourhood leaves the local or the global grid or the surface has no minimum."""
    n, n_u, n_v = local.shape
    if n_v == 1:  # a discrete exponent: refine Eg alone, by a parabola through three points
        inner = (lu > 0) & (lu < n_u - 1) & (ig > 0) & (ig < grid_shape[0] - 1)
        rows = np.arange(n)
        left, mid, right = (local[rows, np.clip(lu + k, 0, n_u - 1), 0] for k in (-1, 0, 1))
        with np.errstate(invalid="ignore"):  # inf - inf next to a rejected (negative-amplitude) point
            curvature = left - 2 * mid + right
            ok = inner & np.isfinite(curvature) & (curvature > 0)
            du = 0.5 * (left - right) / np.where(ok, curvature, 1.0)
        ok &= np.abs(du) <= 1
        return np.where(ok, du, 0.0), np.zeros(n)
    inner = (lu > 0) & (lu < n_u - 1) & (lv > 0) & (lv < n_v - 1)
    inner &= (ig > 0) & (ig < grid_shape[0] - 1) & (ib > 0) & (ib < grid_shape[1] - 1)
    pu = np.clip(lu[:, None] + _U[None], 0, n_u - 1)
    pv = np.clip(lv[:, None] + _V[None], 0, n_v - 1)
    patch = local[np.arange(n)[:, None], pu, pv]
    inner &= np.all(np.isfinite(patch), axis=1)
    _, cu, cv, cuu, cvv, cuv = (np.where(inner[:, None], patch, 0.0) @ _QUADRATIC.T).T
    det = 4 * cuu * cvv - cuv**2
    ok = inner & (cuu > 0) & (det > 0)
    safe = np.where(ok, det, 1.0)
    du = (-2 * cvv * cu + cuv * cv) / safe
    dv = (-2 * cuu * cv + cuv * cu) / safe
    ok &= (np.abs(du) <= 1) & (np.abs(dv) <= 1)
    return np.where(ok, du, 0.0), np.where(ok, dv, 0.0)


# --------------------------------------------------------------------------
# HyperSpy-aware wrapper: one fit per pixel and ZLP replica
# --------------------------------------------------------------------------

#: Why a pixel of a band-gap map is NaN: code -> reason (code 0: a value was found).
NAN_REASONS = {
    1: "no significant onset in enough replicas (e.g. vacuum, or too noisy)",
    2: "onset on the edge of the fit window (widen or move the window)",
}

#: Columns of :func:`estimate_band_gap`'s per-pixel block output.
_COLUMNS = ("gap_median", "gap_low", "gap_high", "b_median", "b_low", "b_high", "found", "direct", "reason")


@dataclass(frozen=True)
class BandGapResult:
    """Band-gap maps with intervals over the Monte Carlo replicas.

    Every map is a HyperSpy signal with the input's navigation axes (lazy
    when the input was lazy); NaN where fewer than ``min_found`` of the
    replicas show a significant onset, with the reason in ``reason``.

    Attributes
    ----------
    band_gap : ReplicaInterval
        Median, 16th and 84th percentile of Eg over the replicas, eV.
    exponent : ReplicaInterval
        The same for the onset exponent b (0.5 direct, 1.5 indirect).
    found_fraction : hyperspy.signal.BaseSignal
        Fraction of the replicas with a significant onset in the window.
    direct_fraction : hyperspy.signal.BaseSignal
        Fraction of the replicas with an onset whose exponent is below 1
        (direct); NaN where the band gap is NaN.
    reason : hyperspy.signal.BaseSignal
        0 where a band gap was found, else a key of :data:`NAN_REASONS`.
    window : (float, float)
        Energy-loss window of the fits, eV.
    replicas : hyperspy.signal.BaseSignal or None
        With ``keep_replicas=True``: Eg of every replica, eV, navigation axes
        and one signal axis over the ensemble's kept replicas (NaN where a
        replica found no onset and wherever ``band_gap`` is NaN). Replica r
        of every pixel shares ZLP replica r, so a quantity derived from a
        whole map (a slope against strain, a mean over a region) computed
        per replica carries the ZLP uncertainty that pixels share; the
        percentiles of single pixels cannot show it. None otherwise.
    """

    band_gap: ReplicaInterval
    exponent: ReplicaInterval
    found_fraction: object
    direct_fraction: object
    reason: object
    window: tuple
    replicas: object = None

    def direct(self):
        """True where most replicas find a direct gap (exponent below 1), as a navigation map."""
        with np.errstate(invalid="ignore"):
            out = self.direct_fraction > 0.5
        out.metadata.General.title = "Direct band gap"
        return out

    def compute(self, *, progress: bool = True) -> "BandGapResult":
        """An in-memory copy of a lazy result, every map computed in one pass over the data
        (on the active dask scheduler, e.g. a ``dask.distributed`` client); ``self`` if eager."""
        fields = ("band_gap", "exponent", "found_fraction", "direct_fraction", "reason")
        fields += ("replicas",) if self.replicas is not None else ()
        maps = [m for name in fields for m in _maps(getattr(self, name))]
        if not any(m._lazy for m in maps):
            return self
        with ProgressBar(out=sys.stderr) if progress else contextlib.nullcontext():
            arrays = iter(dask.compute(*(m.data for m in maps)))
        eager = iter(hs.signals.BaseSignal(np.asarray(next(arrays)), axes=m.axes_manager._get_axes_dicts(),
                                           metadata=m.metadata.as_dictionary()) for m in maps)
        out = {name: (ReplicaInterval(*(next(eager) for _ in range(3)))
                      if isinstance(getattr(self, name), ReplicaInterval) else next(eager)) for name in fields}
        return BandGapResult(window=self.window, **out)

    def reason_counts(self) -> dict:
        """Number of pixels per outcome: ``{"found": n, <reason>: n, ...}`` (computes a lazy map)."""
        codes = np.asarray(self.reason.data if not self.reason._lazy else self.reason.data.compute())
        counts = {"found": int(np.sum(codes == 0))}
        counts.update({text: int(np.sum(codes == code)) for code, text in NAN_REASONS.items()})
        return counts


def _maps(value):
    """The signals of a ReplicaInterval, or the one signal."""
    return (value.median, value.low, value.high) if isinstance(value, ReplicaInterval) else (value,)


def resolution_from(spectrum, energy, *, half_width: float = 1.0):
    """Instrument resolution from a vacuum (or model) ZLP: the channels within ``half_width``
    eV of its maximum, normalised to unit sum, centred for :func:`fit_onset`."""
    spectrum = np.asarray(spectrum, dtype=np.float64)
    peak = int(np.argmax(spectrum))
    half = int(round(half_width / (energy[1] - energy[0])))
    if peak - half < 0 or peak + half >= spectrum.size:
        raise ValueError(f"half_width={half_width} eV reaches past the energy axis around the ZLP at {energy[peak]:.3g} eV")
    kernel = np.clip(spectrum[peak - half: peak + half + 1], 0.0, None)
    return kernel / kernel.sum()


def onset_window(model, *, resolution=None, search=(0.5, 3.0), below=0.4, above=0.6, min_relative=0.2,
                 iterations=3):
    """A band-gap fit window chosen from the data: around the onsets of the clusters' median spectra.

    For every cluster of ``model`` the median ZLP is subtracted from the cluster's
    median spectrum and the onset is located by :func:`fit_onset` (direct or indirect),
    first in ``search``, then ``iterations`` times in ``[Eg - below, Eg + 2 above]``
    around the last estimate. Clusters whose subtracted signal in the search range is
    below ``min_relative`` of the strongest cluster's (vacuum, where only a residual of
    the ZLP remains) are left out.

    Parameters
    ----------
    model : stemml_core.eels.zlp.ZLPEnsemble
        Fitted ensemble (its ``cluster_medians_``).
    resolution : array_like, optional
        Instrument resolution, see :func:`resolution_from`.
    search : (float, float)
        Energy-loss range of the first search, eV.
    below, above : float
        The window runs from ``below`` eV under the lowest cluster onset to ``above``
        eV over the highest.
    min_relative : float
        Smallest subtracted signal of a cluster, relative to the strongest, for its onset to count.
    iterations : int
        Refinements of each cluster's onset.

    Returns
    -------
    (float, float)
        The window, eV, clipped to the model's energy axis.

    Raises
    ------
    ValueError
        No cluster shows a significant onset (e.g. an all-vacuum image): give ``window``.
    """
    energy = model.energy_
    lo, hi = max(search[0], energy[0]), min(search[1], energy[-1])
    inelastic = np.asarray(model.subtract(model.cluster_medians_, energy).median, dtype=np.float64)
    inside = (energy >= lo) & (energy <= hi)
    strength = np.clip(inelastic[:, inside], 0.0, None).sum(axis=1)
    onsets = fit_onset(inelastic, energy, window=(lo, hi), resolution=resolution, exponents=(0.5, 1.5)).band_gap
    onsets[strength < min_relative * strength.max()] = np.nan
    for _ in range(iterations):
        for k in np.flatnonzero(np.isfinite(onsets)):
            window = (max(energy[0], onsets[k] - below), min(energy[-1], onsets[k] + 2 * above))
            onsets[k] = fit_onset(inelastic[k:k + 1], energy, window=window, resolution=resolution,
                                  exponents=(0.5, 1.5)).band_gap[0]
    if not np.isfinite(onsets).any():
        raise ValueError(
            f"no cluster's median spectrum shows a band-gap onset between {lo:.3g} and {hi:.3g} eV "
            "(an all-vacuum image?); give the fit window explicitly"
        )
    return (max(energy[0], float(np.nanmin(onsets)) - below), min(energy[-1], float(np.nanmax(onsets)) + above))


def _band_gap_block(block, *, variance=None, pixel=None, model, energy, window, resolution, exponents,
                    background_order, min_found, random_state, keep_replicas=False):
    """Per pixel of ``block`` (n, n_energy): the columns of :data:`_COLUMNS` over the replicas,
    followed by the band gap of every replica when ``keep_replicas``.

    Replica r of a pixel is its spectrum plus a Gaussian draw of its noise (``variance``
    given; seeded by ``random_state`` and the pixel's flat index, so any blocking gives
    the same numbers) minus the ZLP of the ensemble's replica r."""
    inside = (energy >= window[0]) & (energy <= window[1])
    pseudo = inelastic_replicas(block, model, energy, inside, variance=variance, pixel=pixel,
                                random_state=random_state)
    n_rep, n = pseudo.shape[:2]
    fit_energy = energy[inside]
    fit = fit_onset(pseudo.reshape(n_rep * n, -1), fit_energy, window=(fit_energy[0], fit_energy[-1]),
                    resolution=resolution, exponents=exponents, background_order=background_order)
    gap = fit.band_gap.reshape(n_rep, n)
    exponent = fit.exponent.reshape(n_rep, n)
    found = fit.found.reshape(n_rep, n)
    out = np.full((n, len(_COLUMNS)), np.nan)
    out[:, 6] = found.mean(axis=0)
    enough = out[:, 6] >= min_found
    with np.errstate(all="ignore"):
        if enough.any():
            direct = found[:, enough] & (exponent[:, enough] < DIRECT_INDIRECT_THRESHOLD)
            out[enough, 7] = direct.sum(axis=0) / found[:, enough].sum(axis=0)
            out[enough, 0:3] = np.nanpercentile(gap[:, enough], PERCENTILES, axis=0).T
            out[enough, 3:6] = np.nanpercentile(exponent[:, enough], PERCENTILES, axis=0).T
    edge = fit.at_edge.reshape(n_rep, n).sum(axis=0)
    out[:, 8] = np.where(enough, 0, np.where(edge > (n_rep - found.sum(axis=0)) / 2, 2, 1))
    if keep_replicas:
        out = np.concatenate([out, np.where(enough & found, gap, np.nan).T], axis=1)
    return out


def estimate_band_gap(signal, model, *, window=None, resolution=None, exponents=(0.5, 1.5), background_order=1,
                      min_found=0.8, noise=True, random_state=0, keep_replicas=False, block_pixels=64,
                      progress=True) -> BandGapResult:
    """Map the band gap of a low-loss spectrum image from Monte Carlo replicas.

    Every pixel gets as many replicas as ``model`` has kept ZLP replicas:
    replica r is the pixel's spectrum plus a random draw of its counting noise
    (when ``noise``) minus ZLP replica r. :func:`fit_onset` fits the onset of
    each; the median and the 16th and 84th percentiles over the replicas give
    the value and its 68 % interval, which so carries both the uncertainty of
    the ZLP and the noise of the data.

    Parameters
    ----------
    signal : exspy.signals.EELSSpectrum
        Low-loss spectra (counts) on the energy axis ``model`` was fitted on;
        eager or lazy, any navigation shape. A pooled signal
        (:func:`~stemml_core.eels.denoise.pool_spectra`) carries its noise
        variance in ``metadata.Signal.Noise_properties.variance``, which is
        used when present; otherwise the variance is ``max(I, 0)`` (Poisson,
        gain 1).
    model : stemml_core.eels.zlp.ZLPEnsemble
        A fitted ZLP ensemble.
    window : (float, float), optional
        Energy-loss window of the onset fits, eV: a few tenths of an eV below
        the lowest expected gap to about 0.5 eV above the highest (the onset
        of a real spectrum rolls over further up). None: chosen from the
        clusters' median spectra by :func:`onset_window`.
    resolution : array_like, optional
        Instrument resolution for the onset model (see :func:`resolution_from`).
    exponents : sequence of float
        Exponents of :func:`fit_onset`; the default ``(0.5, 1.5)`` lets every
        replica choose between a direct and an indirect onset. A uniform grid
        of at least 9 values fits b as a continuous parameter.
    background_order : int
        Degree of the polynomial under the onset (see :func:`fit_onset`).
    min_found : float
        Smallest fraction of replicas with a significant onset for a pixel to
        get a value (NaN otherwise, e.g. vacuum).
    noise : bool
        Add a draw of the data's noise to every replica (see above). False:
        the intervals reflect the ZLP uncertainty alone.
    random_state : int
        Seed of the noise draws; with the pixel's index it fixes every draw,
        so eager, lazy and distributed runs give the same maps.
    keep_replicas : bool
        Also return the band gap of every replica (``result.replicas``), for
        quantities derived from whole maps.
    block_pixels : int
        Pixels per block (memory: about ``block_pixels x n_replicas x
        n_energy`` floats per block).
    progress : bool
        Progress bar for in-memory input.

    Returns
    -------
    BandGapResult

    Raises
    ------
    ValueError
        An energy axis other than the model's, a window outside it, a
        variance of another shape than the data, or bad options.
    """
    from sklearn.utils.validation import check_is_fitted

    from ..blocks import map_pixels

    check_is_fitted(model)
    energy = check_replica_input(signal, model.energy_, random_state, "estimate_band_gap", image=False)
    if not 0.0 <= min_found <= 1.0:
        raise ValueError(f"min_found={min_found}; expected a fraction between 0 and 1")
    if resolution is not None:
        resolution = np.asarray(resolution, dtype=np.float64)
    if window is None:
        window = onset_window(model, resolution=resolution)
    # validate the window and grids once, before any block runs
    fit_onset(np.zeros((1, energy.size)), energy, window=window, exponents=exponents, resolution=resolution,
              background_order=background_order)
    extra = {}
    if noise:
        extra = {"variance": noise_variance(signal),
                 "pixel": np.arange(int(np.prod(signal.data.shape[:-1]))).reshape(signal.data.shape[:-1])}
    n_out = len(_COLUMNS) + (int(np.sum(model.kept_)) if keep_replicas else 0)
    out = map_pixels(signal, _band_gap_block, output_shape=(n_out,), extra=extra,
                     block_pixels=block_pixels, progress=progress, description="band gap", model=model,
                     energy=energy, window=tuple(window), resolution=resolution, exponents=exponents,
                     background_order=background_order, min_found=min_found, random_state=int(random_state),
                     keep_replicas=bool(keep_replicas))

    def item(name, title, quantity):
        one = out.isig[_COLUMNS.index(name)]
        one = one.transpose(signal_axes=0) if one.axes_manager.signal_dimension else one
        one.metadata.General.title = title
        one.metadata.set_item("Signal.quantity", quantity)
        return one

    def interval(prefix, name, quantity):
        return ReplicaInterval(*(item(f"{prefix}_{key}", f"{name} ({label})", quantity) for key, label in
                                 (("median", "median"), ("low", "16th percentile"), ("high", "84th percentile"))))

    return BandGapResult(
        band_gap=interval("gap", "Band gap", "Band gap (eV)"),
        exponent=interval("b", "Onset exponent", "Onset exponent"),
        found_fraction=item("found", "Replicas with an onset", "Fraction"),
        direct_fraction=item("direct", "Replicas with a direct onset", "Fraction"),
        reason=item("reason", "Why no band gap (0: found)", "Reason code"),
        window=tuple(window),
        replicas=_replica_signal(out.isig[len(_COLUMNS):]) if keep_replicas else None,
    )


def _replica_signal(values):
    """The per-replica columns of :func:`estimate_band_gap`'s output as a navigation x replica signal."""
    values.metadata.General.title = "Band gap of every replica"
    values.metadata.set_item("Signal.quantity", "Band gap (eV)")
    axis = values.axes_manager.signal_axes[0]
    axis.name, axis.offset, axis.scale, axis.units = "Replica", 0, 1, ""
    return values
