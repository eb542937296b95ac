"""Spectral features (excitons) of ZLP-subtracted low-loss EELS: detect, fit, name, group.

The analysis of :cite:`vanderLippe2024` finds the excitonic peaks of a MoS2
nanostructure automatically in every pixel. Here, per pixel (:func:`find_features`):

1. **Detect** on the median over the Monte Carlo replicas of the inelastic
   spectrum, by stepwise model selection. A polynomial background is fitted;
   peaks are then added where a matched filter of the residual,
   ``z(E0, w) = sum_i t_i r_i / s_i^2 / sqrt(sum_i t_i^2 / s_i^2)`` for a
   peak profile ``t`` at ``E0`` with FWHM ``w``, exceeds a threshold set by a
   false-alarm rate, or where splitting a peak in two lowers chi^2 by more
   than the threshold squared (an unresolved pair such as the A and B excitons,
   0.15 eV apart, looks like one broad peak); background and all peaks are
   refitted jointly after each step; finally peaks whose removal raises chi^2
   by less than the threshold squared are removed again.
2. **Fit** every replica with the same peaks, starting from the median's fit;
   the median and the 16th and 84th percentiles over the replicas give each
   peak's energy, FWHM and height with a 68 % interval.

Then, over the image:

3. **Name** (:func:`label_features`): the peaks of all pixels are clustered
   in (energy, ln FWHM) by a Gaussian mixture (number of components by BIC);
   each cluster takes the name of the nearest reference energy (A 1.88, B
   2.03, C 2.9 eV by default) within a tolerance, else ``"unknown"``.
4. **Group** (:func:`cluster_spectra`): pixels without significant signal form
   one group (their summed counts in the window within a few standard
   deviations of the spread of that sum over the replicas, which carries the
   ZLP's uncertainty), the others are grouped by the shape of their spectra
   (PCA then k-means on unit-norm spectra in the window).

:func:`map_features` does all four on a spectrum image with a fitted
:class:`~stemml_core.eels.zlp.ZLPEnsemble`.

Over the whole low-loss range, with a profile chosen per feature:
:mod:`stemml_core.eels.catalogue`.

The noise ``s`` of a channel is the standard deviation over the replicas of the
part of their differences that the smooth background cannot absorb (one
replica's ZLP differs from another's by a smooth curve; counting noise does
not), averaged over 0.2 eV as it changes slowly with energy, plus, in
quadrature, any counting noise the replicas do not carry (``noise_variance``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hyperspy.signal import BaseSignal
from scipy.ndimage import correlate1d, uniform_filter1d
from scipy.optimize import least_squares
from scipy.signal import find_peaks
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

from .replicas import check_replica_input, inelastic_replicas, noise_variance
from .thickness import PERCENTILES, ReplicaInterval  # median, then the 68 % interval

__all__ = [
    "PROFILES",
    "REFERENCE_ENERGIES",
    "FeatureFit",
    "FeatureLabels",
    "FeatureMap",
    "FeatureMapResult",
    "cluster_spectra",
    "feature_curve",
    "find_features",
    "label_features",
    "map_features",
]

#: Reference energies (eV) of bulk MoS2 features: the A and B excitons (spin-orbit split) and the C
#: feature :cite:`vanderLippe2024`.
REFERENCE_ENERGIES = {"A": 1.88, "B": 2.03, "C": 2.9}

_SHAPES = ("gaussian", "lorentzian")
#: Peak profiles among which :func:`find_features` (``profiles=``) and :func:`~stemml_core.eels.catalogue.identify_features` choose
#: per peak: the detection templates are Gaussian or Lorentzian; a Drude term (a plasmon) is a model.
PROFILES = ("gaussian", "lorentzian", "drude")
_FOUR_LN2 = 4.0 * math.log(2.0)
# Rice's formula: upcrossings of level u per eV of the matched-filter output of white noise are
# c / (2 pi w) exp(-u^2 / 2), with c = sqrt(-rho''(0)) w for a template of FWHM w:
# Gaussian sqrt(4 ln 2) (rho Gaussian of twice the variance), Lorentzian sqrt(2) (rho Lorentzian of
# twice the FWHM).
_RICE = {"gaussian": math.sqrt(_FOUR_LN2), "lorentzian": math.sqrt(2.0)}
# Template half-length in FWHM: the Gaussian is < 1e-10 there; the Lorentzian keeps 1/101.
_TEMPLATE_REACH = {"gaussian": 3.0, "lorentzian": 5.0}
#: Summed counts of a spectrum in the window above which, in standard deviations of the sum,
#: :func:`cluster_spectra` counts it as signal (one-sided false-alarm probability 3e-5 for
#: Gaussian errors).
SIGNAL_THRESHOLD = 4.0

# Information-criterion difference below which two profiles count as equally supported.
_TIE = 2.0
# Width, eV, of the running mean of the replicas' variance along the energy axis.
_NOISE_SMOOTHING = 0.2
# Matched-filter widths per factor of 2 in FWHM.
_WIDTHS_PER_OCTAVE = 2


@dataclass(frozen=True)
class FeatureFit:
    """Result of :func:`find_features` for ``n`` pixels and at most ``k = max_peaks`` peaks each.

    Peaks of a pixel fill slots ``0 .. n_peaks - 1`` in ascending energy; empty slots are NaN.

    Attributes
    ----------
    energy : numpy.ndarray, shape (3, n, k)
        Peak centre, eV: median, 16th and 84th percentile over the replicas (:data:`PERCENTILES`).
    width : numpy.ndarray, shape (3, n, k)
        Full width at half maximum, eV, as observed (it includes the instrument resolution).
    amplitude : numpy.ndarray, shape (3, n, k)
        Peak height above the background, counts per channel.
    significance : numpy.ndarray, shape (n, k)
        ``sqrt(chi^2 rise)`` when the peak is removed from the fit of the median spectrum and the
        rest refitted, in standard deviations of the noise; at least ``threshold``. Two peaks of an
        overlapping pair share one value (without either, the other takes both).
    n_peaks : numpy.ndarray of int, shape (n,)
        Number of significant peaks.
    median_spectrum : numpy.ndarray, shape (n, n_window)
        Median over the replicas of the spectra inside the window, counts.
    noise : numpy.ndarray, shape (n, n_window)
        Standard deviation of each channel of the median spectrum used for detection and
        weights, counts.
    window_energy : numpy.ndarray, shape (n_window,)
        Energies of the window's channels, eV.
    threshold : float
        Detection threshold, standard deviations, from the false-alarm rate (see
        :func:`find_features`).
    shape : str
        Peak profile of the detection, ``"gaussian"`` or ``"lorentzian"``.
    profile : numpy.ndarray of str, shape (n, k), or None
        With ``profiles=``: the profile chosen for each peak (``"gaussian"``, ``"lorentzian"`` or
        ``"drude"``; ``""`` in empty slots); for a Drude peak, ``width`` is the damping Gamma (close
        to the FWHM when Gamma << energy). None without model choice: every peak has ``shape``.
    profile_evidence : numpy.ndarray, shape (n, k), or None
        With ``profiles=``: how much the information criterion of the chosen profile is below that
        of the best other one (a difference of chi^2, since all profiles have three parameters;
        above about 10 the choice is clear; negative down to -2 where a preferred profile was kept
        at equal support); NaN in empty slots.
    """

    energy: np.ndarray
    width: np.ndarray
    amplitude: np.ndarray
    significance: np.ndarray
    n_peaks: np.ndarray
    median_spectrum: np.ndarray
    noise: np.ndarray
    window_energy: np.ndarray
    threshold: float
    shape: str
    profile: np.ndarray | None = None
    profile_evidence: np.ndarray | None = None


@dataclass(frozen=True)
class FeatureLabels:
    """Clusters of peak energies and their names, from :func:`label_features`.

    Attributes
    ----------
    cluster : numpy.ndarray of int, shape of the input energies
        Cluster of each peak; -1 where the input was NaN (no peak).
    centres : numpy.ndarray, shape (n_clusters,)
        Mean energy of each cluster, eV, ascending.
    spreads : numpy.ndarray, shape (n_clusters,)
        Standard deviation of each cluster's energies, eV.
    names : tuple of str, length n_clusters
        Name of each cluster: the key of the nearest reference energy within the tolerance, else
        ``"unknown"``. Several clusters may share a name.
    """

    cluster: np.ndarray
    centres: np.ndarray
    spreads: np.ndarray
    names: tuple

    def peak_names(self):
        """Name of every peak, an array of str of the input's shape (``""`` where there is no peak)."""
        table = np.array(list(self.names) + [""], dtype=object)
        return table[self.cluster]


# --------------------------------------------------------------------------
# Peak profiles and the joint fit
# --------------------------------------------------------------------------


def _profile(energy, centre, fwhm, shape):
    """Unit-height profile and its derivatives by centre and FWHM, each of energy's shape.

    For ``"drude"``, ``centre`` is the plasmon energy Ep and ``fwhm`` the damping Gamma: the Drude loss
    function E Gamma Ep^2 / ((E^2 - Ep^2)^2 + (E Gamma)^2) scaled to height 1 at E = Ep."""
    if shape == "drude":
        e2 = energy * energy
        diff = e2 - centre * centre
        den = diff * diff + e2 * fwhm * fwhm
        num = energy * fwhm * fwhm * centre
        g = num / den
        d_centre = energy * fwhm * fwhm / den + 4.0 * num * centre * diff / den**2
        d_fwhm = 2.0 * energy * fwhm * centre / den - num * 2.0 * e2 * fwhm / den**2
        return g, d_centre, d_fwhm
    u = (energy - centre) / fwhm
    if shape == "gaussian":
        g = np.exp(-_FOUR_LN2 * u**2)
        d_centre = g * 2.0 * _FOUR_LN2 * u / fwhm
        return g, d_centre, d_centre * u
    g = 1.0 / (1.0 + 4.0 * u**2)
    d_centre = 8.0 * u * g**2 / fwhm
    return g, d_centre, d_centre * u


def _design(params, energy, basis, shape):
    """Model (n_w,) and Jacobian (n_w, n_params) of background + peaks.

    ``params`` = background coefficients (basis.shape[1]), then (centre, FWHM, height) per peak;
    ``shape`` is one profile for all peaks or a sequence of one per peak."""
    n_b = basis.shape[1]
    model = basis @ params[:n_b]
    jac = np.empty((energy.size, params.size))
    jac[:, :n_b] = basis
    for j in range(n_b, params.size, 3):
        centre, fwhm, height = params[j : j + 3]
        g, d_centre, d_fwhm = _profile(energy, centre, fwhm, shape if isinstance(shape, str) else shape[(j - n_b) // 3])
        model = model + height * g
        jac[:, j] = height * d_centre
        jac[:, j + 1] = height * d_fwhm
        jac[:, j + 2] = g
    return model, jac


def _fit(y, energy, inv_sigma, basis, x0, bounds, shape):
    """Weighted least squares of background + peaks; (params, chi2), params NaN when the fit fails."""

    def residual(p):
        return (_design(p, energy, basis, shape)[0] - y) * inv_sigma

    def jacobian(p):
        return _design(p, energy, basis, shape)[1] * inv_sigma[:, None]

    x0 = np.clip(x0, bounds[0], bounds[1])
    fit = least_squares(residual, x0, jac=jacobian, bounds=bounds, method="trf", x_scale="jac")
    if fit.status <= 0:
        return np.full_like(x0, np.nan), np.inf
    return fit.x, 2.0 * fit.cost


def _bounds(n_background, n_peaks, window, width_range):
    low = [-np.inf] * n_background + [window[0], width_range[0], 0.0] * n_peaks
    high = [np.inf] * n_background + [window[1], width_range[1], np.inf] * n_peaks
    return np.array(low), np.array(high)


def _templates(step, widths, shape):
    """Unit-height profiles of each FWHM in ``widths`` on a channel grid, centred (odd lengths)."""
    out = []
    for fwhm in widths:
        half = int(math.ceil(_TEMPLATE_REACH[shape] * fwhm / step))
        out.append(_profile(step * np.arange(-half, half + 1), 0.0, fwhm, shape)[0])
    return out


def _matched_filter(residual, inv_var, templates):
    """z and the best-fit height of a template at every channel: two arrays (n_widths, n, n_w).

    For template t centred at channel c: height = sum t r / s^2 / sum t^2 / s^2 and
    z = height * sqrt(sum t^2 / s^2); channels beyond the window count as missing."""
    z = np.empty((len(templates), *residual.shape))
    height = np.empty_like(z)
    for k, t in enumerate(templates):
        num = correlate1d(residual * inv_var, t, axis=-1, mode="constant")
        den = correlate1d(inv_var, t * t, axis=-1, mode="constant")
        height[k] = num / den
        z[k] = num / np.sqrt(den)
    return z, height


def _widths(width_range):
    """FWHMs of the matched filter, eV: geometric from the smallest to the largest, two per octave."""
    w_lo, w_hi = (float(v) for v in width_range)
    return np.geomspace(w_lo, w_hi, max(2, int(round(_WIDTHS_PER_OCTAVE * math.log2(w_hi / w_lo))) + 1))


def _threshold(span, widths, shape, false_alarm):
    """z above which a pure-noise spectrum shows ``false_alarm`` peaks on average (Rice's formula,
    summed over the template widths: a union bound)."""
    crossings = sum(_RICE[shape] * span / (2.0 * math.pi * w) for w in widths)
    return math.sqrt(2.0 * math.log(max(crossings / false_alarm, 1.0)))


def _candidates(z, height, energy, widths, threshold, room):
    """Peaks to add: local maxima (over energy) of the best ``z`` over the widths above ``threshold``,
    strongest first, each farther than the mean FWHM of the pair from a stronger one; at most
    ``room``. Rows of (centre eV, FWHM eV, height counts, z)."""
    best = z.argmax(axis=0)
    z_best = z[best, np.arange(z.shape[1])]
    maxima, _ = find_peaks(z_best, height=threshold)
    chosen = []
    for i in maxima[np.argsort(-z_best[maxima], kind="stable")][: 4 * room]:
        if all(abs(energy[i] - energy[j]) > 0.5 * (widths[best[i]] + widths[best[j]]) for j in chosen):
            chosen.append(i)
    return np.array([(energy[i], widths[best[i]], height[best[i], i], z_best[i]) for i in chosen[:room]])


def _detect(y, energy, inv_sigma, basis, templates, widths, threshold, window, width_range, max_peaks, shape,
            profiles=(), criterion="aic"):
    """Stepwise selection of peaks in one spectrum; (parameters, significances, profiles).

    The parameters are the background's, then (centre, FWHM, height) per peak; the profiles a tuple of
    one name per peak (all ``shape`` without ``profiles``).

    Each round tries two kinds of move and keeps the one with the lower chi^2: add every
    well-separated significant maximum of the residual's matched filter (so that no clear peak is
    left for the background to absorb), or if that fit collapses the strongest alone; or split
    one peak in two (a blend such as A + B looks like one broad peak), if that lowers chi^2 by more
    than ``threshold^2``. With ``profiles``, the profile of every peak is chosen after each round
    (:func:`_choose_profiles`), so that a plasmon fitted by its Drude term leaves no residual for
    spurious peaks. The search ends when no move is left.
    Then peaks are removed while removing one raises chi^2 by less than ``threshold^2`` (backward
    elimination). Returns the parameters, each peak's significance sqrt(chi^2 rise on removal) and
    the profiles."""
    n_b = basis.shape[1]
    params, chi2 = _background_fit(y, inv_sigma, basis)
    shapes = ()

    def refit(x0, trial):
        bounds = _bounds(n_b, (x0.size - n_b) // 3, window, width_range)
        new, new_chi2 = _fit(y, energy, inv_sigma, basis, x0, bounds, trial)
        ok = np.all(np.isfinite(new)) and not _collapsed(new[n_b:].reshape(-1, 3))
        return (new, new_chi2, trial) if ok else (None, np.inf, trial)

    def without(params, shapes, j):  # peak j removed and the rest refitted (kept as they were if that collapses)
        fewer = np.delete(params, np.s_[n_b + 3 * j : n_b + 3 * j + 3])
        rest = shapes[:j] + shapes[j + 1 :]
        if fewer.size == n_b:
            return (*_background_fit(y, inv_sigma, basis), rest)
        fit = refit(fewer, rest)
        if fit[0] is not None:
            return fit
        return fewer, float(np.sum(((_design(fewer, energy, basis, rest)[0] - y) * inv_sigma) ** 2)), rest

    while (params.size - n_b) // 3 < max_peaks:
        n_peaks = (params.size - n_b) // 3
        residual = y - _design(params, energy, basis, shapes)[0]
        z, height = _matched_filter(residual[None], inv_sigma[None] ** 2, templates)
        found = _candidates(z[:, 0], height[:, 0], energy, widths, threshold, max_peaks - n_peaks)
        moves = []
        for trial in (found, found[:1]) if found.size else ():
            moves.append(refit(np.concatenate([params, trial[:, :3].ravel()]), shapes + (shape,) * len(trial)))
            if moves[-1][0] is not None:
                break
        moves += [fit for fit in (refit(_split(params, n_b, j, width_range), shapes[:j] + shapes[j + 1 :]
                                        + (shapes[j],) * 2) for j in range(n_peaks))
                  if chi2 - fit[1] > threshold**2]
        new, new_chi2, new_shapes = min(moves, key=lambda fit: fit[1], default=(None, np.inf, ()))
        if new is None:
            break
        if profiles:
            bounds = _bounds(n_b, (new.size - n_b) // 3, window, width_range)
            new, new_shapes, _ = _choose_profiles(y, energy, inv_sigma, basis, new, bounds, new_shapes, profiles,
                                                  criterion)
            new_chi2 = float(np.sum(((_design(new, energy, basis, new_shapes)[0] - y) * inv_sigma) ** 2))
            if not new_chi2 < chi2:
                break
        params, chi2, shapes = new, new_chi2, tuple(new_shapes)
    # Backward elimination: drop the peak whose removal (and a refit of the rest) raises chi^2 the
    # least, while that rise is below threshold^2; it also undoes detours of the forward search.
    while True:
        n_peaks = (params.size - n_b) // 3
        if n_peaks == 0:
            return params, np.empty(0), ()
        removed = [without(params, shapes, j) for j in range(n_peaks)]
        rise = np.array([fit[1] for fit in removed]) - chi2
        j = int(np.argmin(rise))
        if rise[j] >= threshold**2:
            return params, np.sqrt(rise), shapes
        params, chi2, shapes = removed[j]


def _choose_profiles(y, energy, inv_sigma, basis, params, bounds, shapes, profiles, criterion):
    """Profile of each peak by an information criterion: (params, shapes, evidence per peak).

    ``shapes`` holds the current profile of each peak. Peaks are visited strongest first; each is
    refitted (jointly with the rest, whose profiles stay) with every candidate profile, and the lowest
    criterion wins. All profiles have three parameters, so the criterion orders the fits as chi^2
    does; the evidence is the criterion's margin over the next best profile."""
    n_b = basis.shape[1]
    k = (params.size - n_b) // 3
    shapes = list(shapes)
    penalty = 2.0 if criterion == "aic" else math.log(energy.size)
    n_params = params.size
    current = float(np.sum(((_design(params, energy, basis, shapes)[0] - y) * inv_sigma) ** 2))
    evidence = np.full(k, np.nan)
    for j in np.argsort(-params[n_b + 2 :: 3], kind="stable"):
        scores = {}
        for candidate in dict.fromkeys((shapes[j], *profiles)):
            trial = list(shapes)
            trial[j] = candidate
            if candidate == shapes[j]:
                fit, chi2 = params, current
            else:
                fit, chi2 = _fit(y, energy, inv_sigma, basis, params, bounds, trial)
                if not np.all(np.isfinite(fit)) or _collapsed(fit[n_b:].reshape(-1, 3)):
                    continue
            scores[candidate] = (chi2 + penalty * n_params, fit, chi2)
        ranked = [c for c in sorted(scores, key=lambda c: scores[c][0]) if c in profiles] or sorted(scores)
        # Within _TIE of the lowest criterion the models are equally supported (Burnham & Anderson's
        # rule for AIC differences): the first in the order of `profiles` wins, so that a narrow line
        # stays a Lorentzian unless a Drude term fits clearly better.
        low = scores[ranked[0]][0]
        best = next(c for c in profiles if c in scores and scores[c][0] <= low + _TIE) if ranked[0] in profiles \
            else ranked[0]
        others = [scores[c][0] for c in ranked if c != best]
        evidence[j] = min(others) - scores[best][0] if others else np.inf
        shapes[j] = best
        params, current = scores[best][1], scores[best][2]
    return params, tuple(shapes), evidence


def _background_fit(y, inv_sigma, basis):
    """Weighted least-squares polynomial background alone: (coefficients, chi^2)."""
    coef = np.linalg.lstsq(basis * inv_sigma[:, None], y * inv_sigma, rcond=None)[0]
    return coef, float(np.sum(((basis @ coef - y) * inv_sigma) ** 2))


def _split(params, n_b, j, width_range):
    """``params`` with peak j replaced by two of about half its FWHM a quarter FWHM to each side."""
    centre, fwhm, height = params[n_b + 3 * j : n_b + 3 * j + 3]
    half = max(fwhm / 2.0, width_range[0])
    pair = [centre - fwhm / 4.0, half, 0.75 * height, centre + fwhm / 4.0, half, 0.75 * height]
    return np.concatenate([np.delete(params, np.s_[n_b + 3 * j : n_b + 3 * j + 3]), pair])


def _collapsed(peaks):
    """True when a peak has no height or two peaks sit within half the narrower FWHM."""
    if np.any(peaks[:, 2] <= 0.0):
        return True
    order = np.argsort(peaks[:, 0])
    centre, fwhm = peaks[order, 0], peaks[order, 1]
    return bool(np.any(np.diff(centre) < 0.5 * np.minimum(fwhm[1:], fwhm[:-1])))


# --------------------------------------------------------------------------
# Array functions
# --------------------------------------------------------------------------


def _check_energy(energy):
    energy = np.asarray(energy, dtype=np.float64)
    if energy.ndim != 1 or energy.size < 3 or not np.all(np.isfinite(energy)):
        raise ValueError(f"energy has shape {energy.shape}; expected at least 3 finite energies (eV), shape (n_energy,)")
    step = np.diff(energy)
    if not np.all(step > 0) or np.ptp(step) > 1e-3 * step.mean():
        raise ValueError("energy is not uniform and increasing; expected channel centres (eV) with one dispersion")
    return energy


def _check_window(energy, window, width_range, background_order):
    """(lo, hi) eV and the boolean mask of the window's channels, or a ValueError."""
    lo, hi = (float(v) for v in window)
    if not energy[0] <= lo < hi <= energy[-1]:
        raise ValueError(
            f"window=({lo:g}, {hi:g}) eV is not an increasing range inside the energy axis "
            f"[{energy[0]:.4g}, {energy[-1]:.4g}] eV; choose a window on the axis (e.g. (1.5, 3.5) for excitons)"
        )
    inside = (energy >= lo) & (energy <= hi)
    needed = 3 * (background_order + 4)
    if inside.sum() < needed:
        raise ValueError(
            f"window=({lo:g}, {hi:g}) eV holds {inside.sum()} channels; expected at least {needed} "
            f"(3 per parameter of a background of order {background_order} and one peak); widen the window"
        )
    w_lo, w_hi = (float(v) for v in width_range)
    step = energy[1] - energy[0]
    if not step <= w_lo < w_hi <= hi - lo:
        raise ValueError(
            f"width_range=({w_lo:g}, {w_hi:g}) eV; expected the channel width {step:.4g} eV <= smallest FWHM "
            f"< largest FWHM <= the window's width {hi - lo:.4g} eV"
        )
    return (lo, hi), inside


def _check_options(false_alarm, max_peaks, background_order, shape):
    if not 0.0 < float(false_alarm) < 1.0:
        raise ValueError(f"false_alarm={false_alarm!r}; expected the mean number of false peaks per spectrum, in (0, 1)")
    if not isinstance(max_peaks, (int, np.integer)) or isinstance(max_peaks, bool) or max_peaks < 1:
        raise ValueError(f"max_peaks={max_peaks!r}; expected an int >= 1")
    if not isinstance(background_order, (int, np.integer)) or isinstance(background_order, bool) or background_order < 0:
        raise ValueError(f"background_order={background_order!r}; expected an int >= 0 (polynomial order)")
    if shape not in _SHAPES:
        raise ValueError(f"shape={shape!r}; expected one of {_SHAPES}")


def _check_profiles(profiles, criterion):
    """The candidate profiles as a tuple (empty for None), or a ValueError."""
    if criterion not in ("aic", "bic"):
        raise ValueError(f"criterion={criterion!r}; expected 'aic' or 'bic'")
    if profiles is None:
        return ()
    profiles = (profiles,) if isinstance(profiles, str) else tuple(profiles)
    if not profiles or any(p not in PROFILES for p in profiles) or len(set(profiles)) != len(profiles):
        raise ValueError(f"profiles={profiles!r}; expected distinct names among {PROFILES}")
    return profiles


def find_features(
    spectra,
    energy,
    *,
    window,
    noise_variance=None,
    false_alarm: float = 1e-3,
    width_range=(0.05, 0.6),
    background_order: int = 4,
    max_peaks: int = 6,
    shape: str = "gaussian",
    profiles=None,
    criterion: str = "aic",
) -> FeatureFit:
    """Find and fit the peaks of inelastic spectra, with intervals over Monte Carlo replicas.

    Parameters
    ----------
    spectra : array_like, shape (n_replicas, n, n_energy) or (n, n_energy)
        Inelastic (ZLP-subtracted) spectra, counts per channel: every replica of every pixel; a 2-D
        array is a single replica (then `noise_variance` is required and the intervals are empty,
        ``low = median = high``).
    energy : array_like, shape (n_energy,)
        Channel centres, eV, uniform and increasing.
    window : (float, float)
        Energy-loss range searched and fitted, eV, inside `energy`.
    noise_variance : array_like, optional
        Counting noise the replicas do not carry, counts², broadcastable to ``(n, n_energy)``; added
        to the replicas' variance. None when the replicas' spread is the whole noise.
    false_alarm : float
        Mean number of peaks a spectrum of pure noise shows in the window, in (0, 1); sets the
        detection threshold (4.56 standard deviations for the defaults on a 2 eV window).
    width_range : (float, float)
        Smallest and largest peak FWHM, eV; the matched filter uses FWHMs from the first to the
        second, two per factor of 2, and the fit keeps the FWHM inside.
    background_order : int
        Order of the polynomial background over the window (4: the band-gap onset, its roll-off and
        the plasmon and ZLP tails over a 2 eV window to 0.2 % of 3e4 counts; order 3 leaves
        residuals that read as broad peaks above about 3e3 counts).
    max_peaks : int
        Most peaks per spectrum.
    shape : {"gaussian", "lorentzian"}
        Peak profile of the detection (and of the fits, without `profiles`).
    profiles : sequence of str, optional
        Profiles to choose from per peak after the detection, among :data:`PROFILES`
        (``"gaussian"``, ``"lorentzian"``, ``"drude"``), in order of preference: each peak in turn,
        strongest first, is refitted with every profile (with the rest), and the one with the lowest
        `criterion` is kept, or the first in this order within 2 of it (equal support: a Drude term
        of small damping is a Lorentzian); the replicas are then fitted with the chosen profiles.
        None: every peak keeps ``shape``.
    criterion : {"aic", "bic"}
        Information criterion of the model choice: chi^2 + 2 p (Akaike) or chi^2 + p ln n (Bayesian)
        for p parameters and n channels. The three profiles have three parameters each, so the two
        rank the candidates alike (and the choice is by chi^2) until a profile with another number of
        parameters joins them.

    Returns
    -------
    FeatureFit
        Energies, FWHMs and heights with intervals, significances and peak counts.

    Raises
    ------
    ValueError
        Spectra that are not (n_replicas, n, n_energy) or (n, n_energy) on `energy`, non-finite
        values, a window outside the axis or too narrow, a 2-D input without `noise_variance`, a
        zero noise estimate, or bad options.

    Notes
    -----
    Model of a spectrum in the window, with ``P_j`` Legendre polynomials on the window and
    ``g(u) = exp(-4 ln2 u^2)`` (Gaussian) or ``1 / (1 + 4 u^2)`` (Lorentzian):

    .. math::

        I(E) = \\sum_{j=0}^{K} c_j P_j(E) + \\sum_k a_k\\, g\\big((E - E_k) / w_k\\big),

    fitted by weighted least squares (``scipy.optimize.least_squares``, trust-region reflective,
    ``a_k >= 0``) with the weights ``1 / s^2`` of the noise model in the module docstring.

    The matched filter ``z`` of white noise is a smooth Gaussian process of unit variance; by
    Rice's formula its maxima above ``u`` per eV number ``c / (2 pi w) exp(-u^2 / 2)`` for
    a template of FWHM ``w`` (``c = sqrt(4 ln 2)`` Gaussian, ``sqrt(2)`` Lorentzian). The
    threshold ``u`` solves ``sum over the template widths of that rate times the window's
    width = false_alarm`` (a union bound, so conservative). Model selection, on the median
    spectrum: each step adds the significant, well-separated maxima of ``z`` on the residual, or
    splits one peak in two if that lowers chi^2 by more than ``u^2``, whichever fits better, and
    refits everything; a step whose fit collapses (a zero height, or two centres closer than half
    the narrower FWHM) is not taken. At the end, peaks are removed while removing one (and
    refitting the rest) raises chi^2 by less than ``u^2``.

    The observed FWHM is the peak's intrinsic width broadened by the instrument resolution (for
    Gaussians, ``w_obs^2 = w^2 + w_ZLP^2``); the height is in counts per channel. Both ZLP replicas
    and noise draws can make the replicas: :func:`map_features` uses the data minus each ZLP
    replica plus a draw of the data's noise.

    References
    ----------
    vanderLippe2024 (``references.bib``): automated exciton maps of 1D MoS2 nanostructures.

    Examples
    --------
    The ends of a synthetic MoS2 nanoribbon carry the A, B and C features. Replicas: the measured
    spectra minus the true zero-loss peak, plus draws of their Poisson noise.

    >>> from stemml_core.synthetic.nanostructures import nanostructure_sample
    >>> signal, truth = nanostructure_sample((16, 24), dose=3e7, energy_range=(-1.0, 9.0))
    >>> ends = truth.mask("end")
    >>> counts = signal.data[ends].astype(float)  # (18, 401)
    >>> draws = np.random.default_rng(0).standard_normal((16, *counts.shape))
    >>> replicas = counts - truth.lowloss.zlp[ends] + np.sqrt(counts) * draws
    >>> found = find_features(replicas, truth.lowloss.energy, window=(1.5, 3.5))
    >>> found.n_peaks.tolist() == [3] * 18
    True
    >>> np.round(found.energy[:, 0, :3], 3)  # median, 16th, 84th percentile (eV) of A, B, C in pixel 0
    array([[1.893, 2.04 , 2.924],
           [1.889, 2.03 , 2.916],
           [1.901, 2.048, 2.932]])
    >>> label_features(found.energy[0], found.width[0]).names
    ('A', 'B', 'C')
    """
    _check_options(false_alarm, max_peaks, background_order, shape)
    profiles = _check_profiles(profiles, criterion)
    energy = _check_energy(energy)
    spectra = np.asarray(spectra, dtype=np.float64)
    if spectra.ndim not in (2, 3) or spectra.shape[-1] != energy.size:
        raise ValueError(
            f"spectra have shape {spectra.shape}; expected (n_replicas, n_pixels, {energy.size}) or "
            f"(n_pixels, {energy.size}) to match energy"
        )
    if spectra.ndim == 2:
        if noise_variance is None:
            raise ValueError(
                "spectra are 2-D (one replica) and noise_variance is None; pass the counting noise variance "
                "(counts², e.g. the raw counts for Poisson data) or a replica stack (n_replicas, n_pixels, n_energy)"
            )
        spectra = spectra[None]
    if not np.all(np.isfinite(spectra)):
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(spectra))[0])
        raise ValueError(f"spectra contain NaN or infinite values (first at index {index}); expected finite counts")
    window, inside = _check_window(energy, window, width_range, background_order)
    n_rep, n = spectra.shape[:2]

    y = spectra[..., inside]
    e = energy[inside]
    median = np.median(y, axis=0)
    basis = np.polynomial.legendre.legvander(np.linspace(-1.0, 1.0, e.size), background_order)
    variance = np.zeros_like(median)
    if n_rep > 1:
        # Only what the background cannot absorb counts as noise: project each replica's deviation
        # from the mean off the polynomials (a smooth ZLP difference between replicas goes), and
        # undo the projection's loss 1 - h_ii of white noise. The noise changes slowly with energy:
        # average over _NOISE_SMOOTHING eV.
        hat = basis @ np.linalg.pinv(basis)
        deviation = y - y.mean(axis=0)
        deviation -= deviation @ hat
        size = 2 * int(round(_NOISE_SMOOTHING / 2.0 / (e[1] - e[0]))) + 1
        white = np.sum(deviation**2, axis=0) / (n_rep - 1) / (1.0 - np.diag(hat))
        variance = uniform_filter1d(white, size, axis=-1, mode="nearest")
    if noise_variance is not None:
        extra = np.asarray(noise_variance, dtype=np.float64)
        try:
            extra = np.broadcast_to(extra, (n, energy.size))
        except ValueError:
            raise ValueError(
                f"noise_variance has shape {extra.shape}; expected a shape broadcastable to (n_pixels, n_energy) = "
                f"{(n, energy.size)}, counts²"
            ) from None
        if not np.all(np.isfinite(extra)) or np.any(extra < 0):
            raise ValueError("noise_variance contains negative or non-finite values; expected variances >= 0, counts²")
        variance = variance + extra[:, inside]
    if np.any(variance <= 0):
        pixel, channel = (int(i) for i in np.argwhere(variance <= 0)[0])
        raise ValueError(
            f"pixel {pixel} has no noise at {e[channel]:.4g} eV (the replicas agree and noise_variance is "
            f"{'None' if noise_variance is None else 0}); expected a positive noise estimate: pass noise_variance, "
            "counts²"
        )
    inv_sigma = 1.0 / np.sqrt(variance)

    step = e[1] - e[0]
    widths = _widths(width_range)
    templates = _templates(step, widths, shape)
    threshold = _threshold(window[1] - window[0], widths, shape, false_alarm)
    n_b = basis.shape[1]

    # Background alone for every pixel at once: only pixels with a candidate go on.
    weighted = basis[None] * inv_sigma[..., None]  # (n, n_w, n_b)
    gram = np.einsum("nwa,nwb->nab", weighted, weighted)
    coef = np.linalg.solve(gram, np.einsum("nwa,nw->na", weighted, median * inv_sigma)[..., None])[..., 0]
    z, _ = _matched_filter(median - coef @ basis.T, inv_sigma**2, templates)
    candidates = np.flatnonzero(z.max(axis=(0, 2)) > threshold)

    out = {key: np.full((len(PERCENTILES), n, max_peaks), np.nan) for key in ("energy", "width", "amplitude")}
    significance = np.full((n, max_peaks), np.nan)
    n_peaks = np.zeros(n, dtype=int)
    chosen = np.full((n, max_peaks), "", dtype="<U10") if profiles else None
    evidence = np.full((n, max_peaks), np.nan) if profiles else None
    for p in candidates:
        params, z_peaks, peak_shapes = _detect(median[p], e, inv_sigma[p], basis, templates, widths, threshold,
                                               window, width_range, max_peaks, shape, profiles, criterion)
        k = z_peaks.size
        if k == 0:
            continue
        bounds = _bounds(n_b, k, window, width_range)
        if profiles:
            params, peak_shapes, gains = _choose_profiles(median[p], e, inv_sigma[p], basis, params, bounds,
                                                          peak_shapes, profiles, criterion)
        fits = np.array([_fit(y[m, p], e, inv_sigma[p], basis, params, bounds, peak_shapes)[0] for m in range(n_rep)]
                        if n_rep > 1 else [params])
        peaks = fits[:, n_b:].reshape(n_rep, k, 3)
        order = np.argsort(params[n_b:].reshape(k, 3)[:, 0])
        with np.errstate(all="ignore"):
            values = np.nanpercentile(peaks[:, order], PERCENTILES, axis=0)  # (3, k, 3)
        for key, column in (("energy", 0), ("width", 1), ("amplitude", 2)):
            out[key][:, p, :k] = values[..., column]
        significance[p, :k] = z_peaks[order]
        n_peaks[p] = k
        if profiles:
            chosen[p, :k] = np.asarray(peak_shapes)[order]
            evidence[p, :k] = gains[order]
    return FeatureFit(significance=significance, n_peaks=n_peaks, median_spectrum=median, noise=1.0 / inv_sigma,
                      window_energy=e, threshold=threshold, shape=shape, profile=chosen, profile_evidence=evidence,
                      **out)


def feature_curve(spectrum, energy, *, window, centres, widths, heights, noise=None, background_order: int = 4,
                  shape: str = "gaussian"):
    """The model of :func:`find_features` for given peaks, with its background refitted, for plots.

    Parameters
    ----------
    spectrum : array_like, shape (n_energy,)
        One inelastic spectrum, counts per channel (e.g. the median over the replicas).
    energy : array_like, shape (n_energy,)
        Channel centres, eV, uniform and increasing.
    window : (float, float)
        Energy-loss window of the fit, eV.
    centres, widths, heights : array_like, shape (k,)
        Peak centre (eV), observed FWHM (eV) and height (counts per channel) of each peak, e.g. the
        medians of :func:`map_features` at one pixel; entries with a NaN are left out.
    noise : array_like, optional
        Standard deviation of each channel, counts, broadcastable to ``(n_energy,)``; weights of the
        background fit (unweighted when None).
    background_order, shape
        As for :func:`find_features`.

    Returns
    -------
    energy : numpy.ndarray
        The channels inside ``window``, eV.
    total, background : numpy.ndarray
        Background plus peaks, and the background alone, counts: the polynomial background is the
        weighted least-squares fit to the spectrum minus the peaks.

    Raises
    ------
    ValueError
        A spectrum of another shape than the energy axis, a window outside it or too narrow, peak
        arrays of different shapes, or bad options.

    Examples
    --------
    >>> energy = np.linspace(1.0, 4.0, 121)
    >>> spectrum = 100.0 + 20.0 * energy + 50.0 * np.exp(-4 * np.log(2) * ((energy - 2.0) / 0.2) ** 2)
    >>> e, total, background = feature_curve(spectrum, energy, window=(1.5, 3.5), centres=[2.0],
    ...                                      widths=[0.2], heights=[50.0])
    >>> bool(np.allclose(total, spectrum[(energy >= 1.5) & (energy <= 3.5)]))
    True
    >>> round(float(background[0]), 6)  # 100 + 20 * 1.5
    130.0
    """
    _check_options(0.5, 1, background_order, shape)
    energy = _check_energy(energy)
    spectrum = np.asarray(spectrum, dtype=np.float64)
    if spectrum.shape != energy.shape or not np.all(np.isfinite(spectrum)):
        raise ValueError(f"spectrum has shape {spectrum.shape}; expected finite counts of the energy axis' shape "
                         f"{energy.shape}")
    lo, hi = (float(v) for v in window)
    inside = (energy >= lo) & (energy <= hi)
    if not energy[0] <= lo < hi <= energy[-1] or inside.sum() < 3 * (background_order + 1):
        raise ValueError(f"window=({lo:g}, {hi:g}) eV holds {int(inside.sum())} channels of the energy axis "
                         f"[{energy[0]:.4g}, {energy[-1]:.4g}] eV; expected an increasing range on the axis with at "
                         f"least {3 * (background_order + 1)} channels")
    peaks = [np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (centres, widths, heights)]
    if not peaks[0].ndim == 1 or not all(v.shape == peaks[0].shape for v in peaks):
        raise ValueError(f"centres, widths and heights have shapes {[v.shape for v in peaks]}; expected one value "
                         "per peak each, shape (k,)")
    keep = np.all(np.isfinite(np.stack(peaks)), axis=0)
    e = energy[inside]
    peak_sum = np.zeros(e.size)
    for centre, fwhm, height in zip(*(v[keep] for v in peaks)):
        peak_sum += height * _profile(e, centre, fwhm, shape)[0]
    sigma = np.ones(e.size) if noise is None else np.broadcast_to(np.asarray(noise, dtype=np.float64),
                                                                   energy.shape)[inside]
    basis = np.polynomial.legendre.legvander(np.linspace(-1.0, 1.0, e.size), background_order)
    coef, _ = _background_fit(spectrum[inside] - peak_sum, 1.0 / np.maximum(sigma, 1e-12), basis)
    background = basis @ coef
    return e, background + peak_sum, background


def label_features(energies, widths=None, *, references=None, tolerance: float = 0.05, max_clusters: int = 8,
                   random_state=0) -> FeatureLabels:
    """Name peaks consistently across an image by clustering their energies (and widths).

    Parameters
    ----------
    energies : array_like
        Peak energies, eV, any shape (e.g. ``FeatureFit.energy[0]``, shape (n, k)); NaN for no peak.
    widths : array_like, optional
        Peak FWHMs, eV, the shape of `energies` (e.g. ``FeatureFit.width[0]``). With them the
        clusters are found in (energy, ln FWHM), which keeps an unresolved blend (A + B: one peak
        at about 1.95 eV, twice as broad) apart from the A and B peaks themselves.
    references : dict of str to float, optional
        Name -> reference energy, eV; default :data:`REFERENCE_ENERGIES` (A 1.88, B 2.03, C 2.9).
    tolerance : float
        Largest distance, eV, between a cluster's mean energy and a reference energy for the
        cluster to take its name (0.05: less than half the 0.15 eV A-B splitting, so a blend
        stays unknown).
    max_clusters : int
        Most mixture components tried.
    random_state : int or None
        Seed of the mixture's initialisation.

    Returns
    -------
    FeatureLabels

    Raises
    ------
    ValueError
        Empty or invalid references, a tolerance <= 0, max_clusters < 1, or widths of another
        shape than the energies or not positive.

    Notes
    -----
    The feature energies are learned from the data: Gaussian mixtures
    (``sklearn.mixture.GaussianMixture``, full covariances) with 1 to ``max_clusters``
    components (at most the number of distinct peaks) are fitted to all peaks, the number with
    the lowest BIC is kept, and the components are numbered by ascending mean energy. Each peak
    belongs to its most probable component. The references only name the clusters, they never
    place them.

    Examples
    --------
    >>> energies = np.array([[1.879, 2.031], [1.882, 2.028], [1.878, np.nan], [2.905, np.nan]])
    >>> labels = label_features(energies)
    >>> labels.names, labels.peak_names()[0].tolist()
    (('A', 'B', 'C'), ['A', 'B'])
    """
    references = dict(REFERENCE_ENERGIES if references is None else references)
    if not references or not all(np.isfinite(float(v)) for v in references.values()):
        raise ValueError(f"references={references!r}; expected a non-empty dict of name -> energy (eV)")
    if not float(tolerance) > 0:
        raise ValueError(f"tolerance={tolerance!r}; expected an energy > 0 eV")
    if not isinstance(max_clusters, (int, np.integer)) or max_clusters < 1:
        raise ValueError(f"max_clusters={max_clusters!r}; expected an int >= 1")
    energies = np.asarray(energies, dtype=np.float64)
    found = np.isfinite(energies)
    values = energies[found][:, None]
    if widths is not None:
        widths = np.asarray(widths, dtype=np.float64)
        if widths.shape != energies.shape or np.any(widths[found] <= 0) or not np.all(np.isfinite(widths[found])):
            raise ValueError(
                f"widths have shape {widths.shape}; expected positive FWHMs (eV) of the energies' shape "
                f"{energies.shape} wherever an energy is given"
            )
        values = np.column_stack([values, np.log(widths[found])])
    cluster = np.full(energies.shape, -1, dtype=int)
    n_max = min(int(max_clusters), len(np.unique(values, axis=0)))
    if n_max == 0:
        return FeatureLabels(cluster=cluster, centres=np.empty(0), spreads=np.empty(0), names=())
    if values.shape[0] == 1:  # one peak in all: one cluster (a mixture needs two samples)
        values = np.vstack([values, values])
    models = [GaussianMixture(k, covariance_type="diag", n_init=2, random_state=random_state).fit(values) for k in range(1, n_max + 1)]
    best = models[int(np.argmin([m.bic(values) for m in models]))]
    order = np.argsort(best.means_[:, 0])
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    cluster[found] = rank[best.predict(values)][: int(found.sum())]
    centres = best.means_[order, 0]
    spreads = np.sqrt(best.covariances_.reshape(len(order), -1)[order, 0])
    ref_names = list(references)
    ref_energies = np.array([float(references[k]) for k in ref_names])
    nearest = np.argmin(np.abs(centres[:, None] - ref_energies[None]), axis=1)
    names = tuple(ref_names[j] if abs(c - ref_energies[j]) <= tolerance else "unknown"
                  for c, j in zip(centres, nearest))
    return FeatureLabels(cluster=cluster, centres=centres, spreads=spreads, names=names)


def cluster_spectra(spectra, energy, *, window, noise=None, sum_noise=None, n_clusters: int = 4,
                    n_components: int = 5, random_state=0):
    """Group pixels by the shape of their inelastic spectra in a window.

    Parameters
    ----------
    spectra : array_like, shape (n, n_energy)
        Inelastic spectra (e.g. the replica median), counts per channel.
    energy : array_like, shape (n_energy,)
        Channel centres, eV.
    window : (float, float)
        Energy-loss range compared, eV.
    noise : array_like, optional
        Standard deviation of each channel, counts, broadcastable to ``(n, n_energy)`` (e.g.
        ``FeatureFit.noise``). With it, pixels whose summed counts in the window are not above
        zero by :data:`SIGNAL_THRESHOLD` standard deviations of the sum (vacuum) form group 0 and
        the others are clustered into ``n_clusters - 1`` groups. The standard deviation of the sum
        is `sum_noise` when given, else ``sqrt(sum noise^2)`` over the window (independent
        channels).
    sum_noise : array_like, optional
        Standard deviation of each spectrum's summed counts in the window, counts, shape (n,):
        e.g. the spread of that sum over Monte Carlo replicas (:func:`map_features` takes half
        their 68 % range, robust to a stray replica), which also carries the errors all
        channels share (one ZLP replica lies above another over the whole window, which the
        per-channel `noise` of :func:`find_features` leaves out). Given alone, it switches the
        signal test on as `noise` does.
    n_clusters : int
        Number of groups, at least 2 with `noise`, at most n.
    n_components : int
        Principal components kept, at most ``min(n, channels in the window)``.
    random_state : int or None
        Seed of PCA and k-means.

    Returns
    -------
    numpy.ndarray of int, shape (n,)
        Group of each pixel, ``0 .. n_clusters - 1``: with `noise` or `sum_noise`, 0 is "no signal"
        (all pixels, when none has signal) and the others follow in ascending order of the group's
        mean intensity in the window; without them, all groups follow that order.

    Raises
    ------
    ValueError
        Wrong shapes, non-finite spectra or noise, a window outside the axis, or too many clusters
        or components for the data.

    Notes
    -----
    Each spectrum in the window is scaled to unit Euclidean norm (its shape, not its thickness,
    matters), reduced by PCA to ``n_components`` scores and clustered by k-means (10
    initialisations). Spectra of pure noise have random directions and scatter over the whole
    unit sphere; they would take several clusters of their own, hence the signal test first.

    The test must count every error of the sum. A vacuum spectrum minus a ZLP model that lies
    3 % below the true tail over the window (well inside the ensemble's band) keeps a smooth
    positive residual; summed over 80 channels it exceeds the channels' independent noise
    ``sqrt(sum noise^2)`` several times, but not the spread of the sum over the ZLP replicas.

    Examples
    --------
    >>> energy = np.linspace(1.0, 4.0, 121)
    >>> peak = np.exp(-((energy - 2.0) / 0.1) ** 2)
    >>> spectra = np.vstack([np.zeros((3, 121)), 50 + 0 * peak[None].repeat(3, 0), 50 + 80 * peak[None].repeat(3, 0)])
    >>> spectra += np.random.default_rng(0).normal(0.0, 1.0, spectra.shape)
    >>> cluster_spectra(spectra, energy, window=(1.5, 3.5), noise=1.0, n_clusters=3, n_components=2).tolist()
    [0, 0, 0, 1, 1, 1, 2, 2, 2]
    """
    energy = _check_energy(energy)
    spectra = np.asarray(spectra, dtype=np.float64)
    if spectra.ndim != 2 or spectra.shape[1] != energy.size:
        raise ValueError(f"spectra have shape {spectra.shape}; expected (n_pixels, {energy.size}) to match energy")
    if not np.all(np.isfinite(spectra)):
        raise ValueError("spectra contain NaN or infinite values; expected finite counts")
    lo, hi = (float(v) for v in window)
    inside = (energy >= lo) & (energy <= hi)
    if not (energy[0] <= lo < hi <= energy[-1]) or inside.sum() < 2:
        raise ValueError(
            f"window=({lo:g}, {hi:g}) eV is not an increasing range of channels inside the energy axis "
            f"[{energy[0]:.4g}, {energy[-1]:.4g}] eV"
        )
    n, n_window = spectra.shape[0], int(inside.sum())
    window_spectra = spectra[:, inside]
    signal = np.ones(n, dtype=bool)
    n_shapes = n_clusters
    if noise is not None or sum_noise is not None:
        if sum_noise is not None:
            spread = np.asarray(sum_noise, dtype=np.float64)
            if spread.shape != (n,) or not np.all(np.isfinite(spread)) or np.any(spread < 0):
                raise ValueError(f"sum_noise has shape {spread.shape}; expected one finite standard deviation >= 0 "
                                 f"(counts) per spectrum, shape ({n},)")
        if noise is not None:
            try:
                sigma = np.broadcast_to(np.asarray(noise, dtype=np.float64), spectra.shape)[:, inside]
            except ValueError:
                raise ValueError(f"noise has shape {np.shape(noise)}; expected a shape broadcastable to "
                                 f"{spectra.shape}, counts") from None
            if not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
                raise ValueError("noise contains negative or non-finite values; expected standard deviations >= 0, "
                                 "counts")
            if sum_noise is None:
                spread = np.sqrt(np.sum(sigma**2, axis=1))
        signal = window_spectra.sum(axis=1) > SIGNAL_THRESHOLD * spread
        n_shapes = n_clusters - 1
    n_signal = int(signal.sum())
    if n_signal == 0 and n_shapes < n_clusters:
        return np.zeros(n, dtype=int)  # nothing but noise: every pixel in group 0
    if not 1 <= n_shapes <= max(n_signal, 1) or not 1 <= n_components <= min(max(n_signal, 1), n_window):
        raise ValueError(
            f"n_clusters={n_clusters} and n_components={n_components} for {n_signal} spectra with signal of "
            f"{n_window} channels; expected 1 <= n_clusters{' - 1' if n_shapes < n_clusters else ''} <= {n_signal} "
            f"and 1 <= n_components <= {min(n_signal, n_window)}"
        )
    shapes = window_spectra[signal] / np.linalg.norm(window_spectra[signal], axis=1, keepdims=True)
    scores = PCA(n_components=n_components, random_state=random_state).fit_transform(shapes)
    groups = KMeans(n_clusters=n_shapes, n_init=10, random_state=random_state).fit_predict(scores)
    mean = np.array([window_spectra[signal][groups == k].mean() for k in range(n_shapes)])
    rank = np.empty(n_shapes, dtype=int)
    rank[np.argsort(mean, kind="stable")] = np.arange(n_shapes)
    labels = np.zeros(n, dtype=int)
    labels[signal] = rank[groups] + (n_clusters - n_shapes)
    return labels


# --------------------------------------------------------------------------
# HyperSpy-aware wrapper
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureMap:
    """Maps of one named feature; NaN where the pixel shows no peak of that name.

    Attributes
    ----------
    energy : ReplicaInterval
        Peak centre, eV: median, 16th and 84th percentile over the replicas.
    width : ReplicaInterval
        Observed FWHM, eV (intrinsic width and instrument resolution).
    amplitude : ReplicaInterval
        Peak height above the background, counts per channel.
    significance : hyperspy.signal.BaseSignal
        Significance of the peak, standard deviations (see ``FeatureFit.significance``).
    """

    energy: ReplicaInterval
    width: ReplicaInterval
    amplitude: ReplicaInterval
    significance: BaseSignal


@dataclass(frozen=True)
class FeatureMapResult:
    """Result of :func:`map_features`; every map has the input's navigation axes (in memory).

    Attributes
    ----------
    features : dict of str to FeatureMap
        One entry per reference name (``"A"``, ``"B"``, ``"C"`` by default).
    feature_clusters : hyperspy.signal.BaseSignal
        Group of each pixel by the shape of its median inelastic spectrum in the window
        (:func:`cluster_spectra`), int: 0 for no significant signal (vacuum: summed counts in the
        window not above :data:`SIGNAL_THRESHOLD` standard deviations of their spread over the
        replicas), then in ascending order of mean intensity.
    n_peaks : hyperspy.signal.BaseSignal
        Significant peaks in each pixel, named or not.
    counts : dict of str to int
        Pixels where each named feature was found, and ``"unknown"``: peaks of unnamed clusters
        plus extra peaks of a name already taken in their pixel.
    labels : FeatureLabels
        The clusters of all peaks (centres in eV, names); ``labels.cluster`` has shape
        ``(*nav, max_peaks)``.
    window : (float, float)
        Energy-loss window, eV.
    threshold : float
        Detection threshold, standard deviations.
    """

    features: dict
    feature_clusters: BaseSignal
    n_peaks: BaseSignal
    counts: dict
    labels: FeatureLabels
    window: tuple
    threshold: float


def _columns(max_peaks, n_window):
    """Per-pixel output layout of :func:`_feature_block`: name -> slice."""
    k = max_peaks
    names = [f"{q}_{p:g}" for q in ("energy", "width", "amplitude") for p in PERCENTILES] + ["significance"]
    layout = {name: slice(i * k, (i + 1) * k) for i, name in enumerate(names)}
    start = len(names) * k
    layout["n_peaks"] = slice(start, start + 1)
    layout["sum_noise"] = slice(start + 1, start + 2)
    layout["spectrum"] = slice(start + 2, start + 2 + n_window)
    layout["noise"] = slice(start + 2 + n_window, start + 2 + 2 * n_window)
    return layout


def _feature_block(block, *, variance, pixel, model, energy, inside, options, noise, random_state):
    """Per pixel of ``block`` (n, n_energy): the :func:`_columns` of :func:`find_features`'s result,
    and the spread of the summed counts in the window over the replicas (half their 68 % range).

    Replica r of a pixel is its spectrum minus the ZLP of the ensemble's replica r, plus (with
    ``noise``) a Gaussian draw of the data's noise, seeded by ``random_state`` and the pixel's flat
    index, so any blocking gives the same numbers. Without ``noise`` the data's variance enters
    the detection as ``noise_variance`` (and the sum's spread in quadrature)."""
    spectra = inelastic_replicas(block, model, energy, inside, variance=variance if noise else None, pixel=pixel,
                                 random_state=random_state)
    variance = np.clip(variance[:, inside], 0.0, None)
    # the replicas carry the data's noise when drawn, and there are at least two of them
    carried = noise and spectra.shape[0] > 1
    fit = find_features(spectra, energy[inside], noise_variance=None if carried else variance, **options)
    layout = _columns(options["max_peaks"], int(inside.sum()))
    out = np.empty((block.shape[0], layout["noise"].stop))
    for key in ("energy", "width", "amplitude"):
        for i, p in enumerate(PERCENTILES):
            out[:, layout[f"{key}_{p:g}"]] = getattr(fit, key)[i]
    out[:, layout["significance"]] = fit.significance
    out[:, layout["n_peaks"]] = fit.n_peaks[:, None]
    # half the 68 % range of the replicas' sums: robust to a replica whose ZLP strays far
    low, high = np.percentile(spectra.sum(axis=-1), [16, 84], axis=0)
    spread = ((high - low) / 2.0) ** 2
    if not carried:
        spread = spread + variance.sum(axis=1)
    out[:, layout["sum_noise"]] = np.sqrt(spread)[:, None]
    out[:, layout["spectrum"]] = fit.median_spectrum
    out[:, layout["noise"]] = fit.noise
    return out


def map_features(
    signal,
    model,
    *,
    window=(1.5, 3.5),
    references=None,
    tolerance: float = 0.05,
    false_alarm: float = 1e-3,
    width_range=(0.05, 0.6),
    background_order: int = 4,
    max_peaks: int = 6,
    shape: str = "gaussian",
    n_clusters: int = 4,
    noise: bool = True,
    random_state: int = 0,
    block_pixels: int = 64,
    progress: bool = True,
) -> FeatureMapResult:
    """Map the excitons (named spectral features) of a low-loss spectrum image.

    Every pixel gets as many replicas as ``model`` has kept ZLP replicas: replica r is the
    pixel's spectrum plus a random draw of its counting noise (when ``noise``) minus ZLP replica
    r. :func:`find_features` detects and fits the peaks in ``window``; :func:`label_features`
    names them from the clusters of all peak energies of the image; :func:`cluster_spectra`
    groups the pixels by their median inelastic spectra, after setting apart those whose summed
    counts in the window are not significant against the spread of that sum over the replicas.

    Parameters
    ----------
    signal : exspy.signals.EELSSpectrum
        Low-loss spectra, counts, on the energy axis ``model`` was fitted on; eager or lazy, with
        navigation axes. The noise variance is ``metadata.Signal.Noise_properties.variance`` when
        set (e.g. by :func:`~stemml_core.eels.denoise.pool_spectra`), else ``max(I, 0)``
        (Poisson, gain 1).
    model : stemml_core.eels.zlp.ZLPEnsemble
        A fitted ZLP ensemble.
    window : (float, float)
        Energy-loss window searched, eV (default 1.5 to 3.5 eV: the A, B and C features of MoS2).
    references : dict of str to float, optional
        Name -> reference energy, eV, of the features to map; default :data:`REFERENCE_ENERGIES`.
    tolerance : float
        See :func:`label_features`, eV.
    false_alarm, width_range, background_order, max_peaks, shape
        See :func:`find_features`.
    n_clusters : int
        Groups of :func:`cluster_spectra`, counting group 0 (no signal); at least 2.
    noise : bool
        Add a draw of the data's noise to every replica; False: the intervals reflect the ZLP
        uncertainty alone (the detection still counts the noise of the data).
    random_state : int
        Seed of the noise draws (with each pixel's flat index, so eager, lazy and distributed
        runs draw the same), of the mixture and of the clustering.
    block_pixels : int
        Pixels per block for in-memory input (memory: about ``block_pixels x n_replicas x
        n_energy`` floats).
    progress : bool
        Show text progress bars.

    Returns
    -------
    FeatureMapResult

    Raises
    ------
    ValueError
        A signal without navigation axes, an energy axis other than the model's, a window or
        option rejected by :func:`find_features`, non-finite data, or a noise variance of another
        shape than the data.

    Notes
    -----
    Naming needs the peaks of the whole image, so a lazy input is computed block by block
    (:func:`~stemml_core.blocks.compute_map`, on the active dask scheduler, memory bounded by a
    band of blocks) and the maps come back in memory. Eager and lazy input give the same maps.
    Where two peaks of one pixel get the same name, the more significant is mapped.

    Cost: pixels without a candidate peak (vacuum) take almost nothing; a pixel with peaks takes
    a few tens of joint fits for the detection and one per replica. Measured on one core of the
    project's 2-core machine: the 16 x 24 synthetic ribbon (86 specimen pixels, 8 replicas) in
    2 to 4 s.

    Examples
    --------
    >>> from stemml_core.eels.zlp import ZLPEnsemble
    >>> from stemml_core.synthetic.nanostructures import nanostructure_sample
    >>> signal, truth = nanostructure_sample((16, 24), dose=3e7, energy_range=(-1.0, 9.0))
    >>> model = ZLPEnsemble(n_replicas=8, n_clusters=3, n_warmup=60, max_iter=40, random_state=0,
    ...                     progress=False).fit(signal)
    >>> maps = map_features(signal, model, progress=False)
    >>> sorted(maps.features), maps.features["A"].energy.median.data.shape  # maps (rows, cols), eV
    (['A', 'B', 'C'], (16, 24))
    >>> a = maps.features["A"].energy.median.data
    >>> bool(np.isnan(a[truth.mask("inner")]).all()), bool(np.isfinite(a[truth.mask("end")]).any())
    (True, True)
    """
    from sklearn.utils.validation import check_is_fitted

    from ..blocks import compute_map, map_pixels, navigation_map

    check_is_fitted(model)
    energy = check_replica_input(signal, model.energy_, random_state, "map_features")
    am = signal.axes_manager
    _check_options(false_alarm, max_peaks, background_order, shape)
    window, inside = _check_window(energy, window, width_range, background_order)
    if not signal._lazy and not np.all(np.isfinite(signal.data)):
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(np.asarray(signal.data)))[0])
        raise ValueError(f"the signal contains NaN or infinite counts (first at index {index}); expected finite counts")

    if not isinstance(n_clusters, (int, np.integer)) or isinstance(n_clusters, bool) or n_clusters < 2:
        raise ValueError(f"n_clusters={n_clusters!r}; expected an int >= 2 (group 0 is the pixels without signal)")
    label_features(np.empty(0), references=references, tolerance=tolerance)  # validates before the long part
    references = dict(REFERENCE_ENERGIES if references is None else references)

    nav_shape = tuple(am.navigation_shape[::-1])
    extra = {"variance": noise_variance(signal), "pixel": np.arange(int(np.prod(nav_shape))).reshape(nav_shape)}
    options = dict(window=window, false_alarm=false_alarm, width_range=tuple(width_range),
                   background_order=background_order, max_peaks=max_peaks, shape=shape)
    layout = _columns(max_peaks, int(inside.sum()))
    n_columns = layout["noise"].stop
    mapped = map_pixels(signal, _feature_block, output_shape=(n_columns,), extra=extra, block_pixels=block_pixels,
                        progress=progress, description="features", model=model, energy=energy, inside=inside,
                        options=options, noise=bool(noise), random_state=int(random_state))
    values = compute_map(mapped, progress=progress, description="features").reshape(-1, n_columns)

    def column(key):
        return values[:, layout[key]]

    labels = label_features(column("energy_50"), column("width_50"), references=references, tolerance=tolerance,
                            random_state=random_state)
    names = labels.peak_names()  # (n, max_peaks)
    rows = np.arange(values.shape[0])
    features, counts = {}, {}
    for name in references:
        z = np.where(names == name, column("significance"), -np.inf)
        slot = np.argmax(z, axis=1)
        has = np.isfinite(z[rows, slot])
        counts[name] = int(has.sum())

        def one(key, title, quantity, name=name, slot=slot, has=has):
            data = np.where(has, column(key)[rows, slot], np.nan).reshape(nav_shape)
            return navigation_map(data, signal, title=f"{name}: {title}", quantity=quantity)

        def interval(key, title, quantity):
            return ReplicaInterval(*(one(f"{key}_{p:g}", f"{title} ({label})", quantity) for p, label in
                                     zip(PERCENTILES, ("median", "16th percentile", "84th percentile"))))

        features[name] = FeatureMap(
            energy=interval("energy", "peak energy", "Energy loss (eV)"),
            width=interval("width", "FWHM", "FWHM (eV)"),
            amplitude=interval("amplitude", "peak height", "Intensity (counts)"),
            significance=one("significance", "significance", "Significance (sigma)"),
        )
    n_peaks = column("n_peaks")[:, 0].astype(int)
    counts["unknown"] = int(n_peaks.sum()) - sum(counts.values())
    groups = cluster_spectra(column("spectrum"), energy[inside], window=window, noise=column("noise"),
                             sum_noise=column("sum_noise")[:, 0], n_clusters=n_clusters, random_state=random_state)
    return FeatureMapResult(
        features=features,
        feature_clusters=navigation_map(groups.reshape(nav_shape), signal, title="Spectral groups", quantity="Group"),
        n_peaks=navigation_map(n_peaks.reshape(nav_shape), signal, title="Significant peaks", quantity="Peaks"),
        counts=counts,
        labels=FeatureLabels(cluster=labels.cluster.reshape(*nav_shape, max_peaks), centres=labels.centres,
                             spreads=labels.spreads, names=labels.names),
        window=window,
        threshold=_threshold(window[1] - window[0], _widths(width_range), shape, false_alarm),
    )
