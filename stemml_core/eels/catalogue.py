"""Every significant feature of a low-loss spectrum image, with a profile per feature, and a catalogue.

The detection of :func:`~stemml_core.eels.features.find_features` runs in several windows over the
low-loss range (:data:`LOWLOSS_WINDOWS`: states in the gap, excitons and interband transitions, the pi
plasmon range, surface and bulk plasmons), each with its own background and threshold; every peak
then takes a Gaussian, Lorentzian or Drude profile by an information criterion (``profiles=`` of
:func:`~stemml_core.eels.features.find_features`) (:func:`identify_features`).
:func:`feature_catalogue` names the features of an image and clusters its pixels by the features
they show; :func:`map_lowloss_features` does both on a spectrum image with a fitted ZLP ensemble.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hyperspy.signal import BaseSignal
from sklearn.cluster import KMeans

from .dielectric import angular_factor
from .features import (PROFILES, REFERENCE_ENERGIES, FeatureFit, FeatureLabels, FeatureMap, _check_energy,
                       _check_profiles, _check_window, find_features, label_features)
from .replicas import check_replica_input, inelastic_replicas, noise_variance
from .thickness import ReplicaInterval

__all__ = [
    "LOWLOSS_WINDOWS",
    "PROFILE_CODES",
    "FeatureCatalogue",
    "LowLossFeatureMaps",
    "LowLossFeatures",
    "feature_catalogue",
    "identify_features",
    "map_lowloss_features",
    "match_features",
]


#: Default windows of :func:`identify_features` over the low-loss range: (low eV, high eV, smallest
#: FWHM eV, largest FWHM eV, order of the polynomial background, candidate profiles, most peaks:
#: room for the detours of the stepwise search where narrow features crowd, little under the
#: plasmons, where extra broad peaks would only take up model error; relative model error, None for
#: the ``systematic`` argument). Under the plasmons the model error is 2 %: with 1 %, 5.8 % of the
#: feature-free pixels of a 16 x 24 feature sample (seed 2) showed a broad peak on the bulk plasmon's
#: upper flank, where plural scattering departs from the Drude term (0.5 % with 2 %). Under the
#: surface and bulk plasmons the candidates are Drude (preferred at equal support) and Gaussian: a
#: Lorentzian is the limit of a
#: Drude term for a damping small against its energy, the two can hardly be told apart there, and
#: the Lorentzian's centre (the maximum) lies below the plasmon energy (by 0.1 eV for Ep = 20 eV,
#: damping 3.5 eV). Mid-gap states below the onset, excitons and interband transitions,
#: the pi plasmon range, surface and bulk plasmons. Neighbours overlap; each owns the energies up to
#: the middle of its overlaps.
LOWLOSS_WINDOWS = ((0.4, 1.4, 0.05, 0.5, 4, PROFILES, 6, None), (1.3, 4.5, 0.05, 1.0, 4, PROFILES, 6, None),
                   (4.0, 11.0, 0.3, 3.0, 4, PROFILES, 4, None),
                   (10.0, 30.0, 1.0, 8.0, 3, ("drude", "gaussian"), 4, 0.02))
# Channels per smallest FWHM of a window below which its channels are summed (binned) for speed.
_CHANNELS_PER_WIDTH = 6


@dataclass(frozen=True)
class LowLossFeatures:
    """Result of :func:`identify_features` for ``n`` pixels, up to ``k`` peaks each over all windows.

    Peaks of a pixel fill slots ``0 .. n_peaks - 1`` in ascending energy; empty slots are NaN (``""``
    for the profile, -1 for the window).

    Attributes
    ----------
    energy, width, amplitude : numpy.ndarray, shape (3, n, k)
        Median, 16th and 84th percentile over the replicas of each peak's energy (eV), width (eV:
        FWHM, or the damping Gamma of a Drude peak) and height (counts per channel).
    significance : numpy.ndarray, shape (n, k)
        Standard deviations of the noise (see ``FeatureFit.significance``).
    profile : numpy.ndarray of str, shape (n, k)
        Chosen profile of each peak.
    profile_evidence : numpy.ndarray, shape (n, k)
        Margin of the information criterion over the next best profile.
    window : numpy.ndarray of int, shape (n, k)
        Index into `windows` of the window each peak was found in.
    n_peaks : numpy.ndarray of int, shape (n,)
        Significant peaks of each pixel.
    windows : tuple
        The windows searched, ``(low, high, smallest FWHM, largest FWHM, background order, profiles,
        most peaks, model error)`` (eV; None where the defaults of :func:`identify_features` apply),
        after cropping to the energy axis.
    thresholds : tuple of float
        Detection threshold of each window, standard deviations.
    """

    energy: np.ndarray
    width: np.ndarray
    amplitude: np.ndarray
    significance: np.ndarray
    profile: np.ndarray
    profile_evidence: np.ndarray
    window: np.ndarray
    n_peaks: np.ndarray
    windows: tuple
    thresholds: tuple


def _windows_on_axis(energy, windows):
    """The windows (default: :data:`LOWLOSS_WINDOWS` cropped to the axis), checked; a ValueError names
    a bad one."""
    default = windows is None
    out = []
    for spec in LOWLOSS_WINDOWS if default else windows:
        try:
            values = [float(v) for v in spec[:4]]
            if len(values) != 4 or len(spec) > 8:
                raise ValueError
            order = int(spec[4]) if len(spec) >= 5 and spec[4] is not None else None
            kinds = _check_profiles(spec[5], "aic") if len(spec) >= 6 and spec[5] is not None else None
            most = int(spec[6]) if len(spec) >= 7 and spec[6] is not None else None
            error = float(spec[7]) if len(spec) == 8 and spec[7] is not None else None
            if (most is not None and most < 1) or (error is not None and not error >= 0):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"window {spec!r}; expected (low eV, high eV, smallest FWHM eV, largest FWHM eV[, "
                             "background order[, profiles[, most peaks >= 1[, model error >= 0]]]])") from None
        lo, hi, w_lo, w_hi = values
        if default:
            lo, hi = max(lo, float(energy[0])), min(hi, float(energy[-1]))
            if hi - lo < 2 * w_lo * 4 or hi <= lo:
                continue
            w_hi = min(w_hi, hi - lo)
        out.append((lo, hi, w_lo, w_hi, order, kinds, most, error))
    if not out:
        raise ValueError(f"no window of {LOWLOSS_WINDOWS} lies on the energy axis [{energy[0]:.4g}, {energy[-1]:.4g}] "
                         "eV; pass windows=")
    out = [out[i] for i in np.argsort([w[0] for w in out])]
    for first, second in zip(out[:-1], out[1:]):
        if second[1] <= first[1] or second[0] == first[0]:
            raise ValueError(f"windows {first[:2]} and {second[:2]} eV are nested; expected windows whose low and "
                             "high edges both increase (neighbours may overlap: each owns the energies up to the "
                             "middle of the overlap)")
    return tuple(out)


def identify_features(
    spectra,
    energy,
    *,
    windows=None,
    noise_variance=None,
    false_alarm: float = 1e-3,
    profiles=PROFILES,
    criterion: str = "aic",
    background_order: int = 4,
    max_peaks: int = 6,
    detection_shape: str = "gaussian",
    systematic: float = 0.01,
    angular=None,
) -> LowLossFeatures:
    """Find every significant feature of inelastic spectra over the whole low-loss range.

    Each window gets its own polynomial background and detection threshold (:func:`find_features`
    with ``profiles``): peaks are detected by a matched filter against the noise measured from the
    spread of the Monte Carlo replicas, then each peak's profile (Gaussian, Lorentzian or Drude) is
    chosen by an information criterion and every replica is fitted for the intervals.

    Parameters
    ----------
    spectra : array_like, shape (n_replicas, n, n_energy)
        Monte Carlo replicas of the inelastic (ZLP-subtracted) spectra, counts per channel,
        ``n_replicas >= 2`` (e.g. the data minus each ZLP replica plus a draw of its noise): their
        spread is the noise the significance is measured against. One replica (2-D input) only with
        `noise_variance`.
    energy : array_like, shape (n_energy,)
        Channel centres, eV.
    windows : sequence of (low, high, smallest FWHM, largest FWHM[, order[, profiles[, most peaks[, model error]]]])
        Energy windows, eV, each searched for peaks of FWHMs in its range (on channels summed in
        groups where its smallest FWHM spans more than 6 channels). Default
        :data:`LOWLOSS_WINDOWS`, cropped to the axis; an order, profiles, most peaks or model error
        left out (or None) are `background_order`, `profiles`, `max_peaks` and `systematic`. Where windows overlap, a peak belongs to the
        window that owns its energy (up to the middle of the overlap).
    noise_variance : array_like, optional
        Counting noise the replicas do not carry, counts², as for :func:`find_features`.
    false_alarm : float
        Mean number of false peaks per window for a spectrum of pure noise.
    profiles : sequence of str
        Candidate profiles per peak, among :data:`PROFILES`.
    criterion : {"aic", "bic"}
        Information criterion of the model choice.
    background_order, max_peaks : int
        Per window, as for :func:`find_features`.
    detection_shape : {"gaussian", "lorentzian"}
        Template of the matched filter.
    systematic : float
        Relative model error, >= 0: ``(systematic x median spectrum)^2`` is added to every channel's
        noise variance. Peak and background models are approximations (the recorded plasmon is the
        Drude term weighted by the angular factor of the collection and broadened by plural
        scattering); at a few 1e4 counts per channel a 1 % mismatch would otherwise read as
        significant peaks. A window's own model error (:data:`LOWLOSS_WINDOWS`: 2 % under the
        plasmons) replaces it there. 0 trusts the models fully.
    angular : (float, float), optional
        ``(beam energy keV, collection semi-angle mrad)``: divide the spectra (and the noise) by the
        angular factor of single scattering, ``ln(1 + (beta / theta_E)^2)`` with ``theta_E = E /
        (gamma m0 v^2)`` (Egerton eq. 4.26), normalised to 1 at the middle of each window, so that
        a plasmon keeps the shape of its loss function (a Drude term) instead of leaning to lower
        energies. Heights are then counts per channel at the middle of the window.

    Returns
    -------
    LowLossFeatures

    Raises
    ------
    ValueError
        Spectra without replicas (fewer than two) and without `noise_variance` (the significance
        needs one or the other), spectra of another shape than the axis, non-finite values, a
        window that is not (low, high, smallest FWHM, largest FWHM) on the axis, or bad options.

    Examples
    --------
    >>> energy = np.arange(0.5, 30.0, 0.025)
    >>> clean = 500 + 800 * np.exp(-4 * np.log(2) * ((energy - 2.0) / 0.15) ** 2)
    >>> clean += 2e4 * 20 * 3**2 * energy / ((energy**2 - 20**2) ** 2 + (3 * energy) ** 2)  # a plasmon
    >>> rng = np.random.default_rng(0)
    >>> replicas = clean + np.sqrt(clean) * rng.standard_normal((8, 1, energy.size))
    >>> found = identify_features(replicas, energy)
    >>> np.round(found.energy[0, 0, : found.n_peaks[0]], 2), found.profile[0, : found.n_peaks[0]].tolist()
    (array([ 2., 20.]), ['gaussian', 'drude'])
    """
    energy = _check_energy(energy)
    spectra = np.asarray(spectra, dtype=np.float64)
    if noise_variance is None and (spectra.ndim != 3 or spectra.shape[0] < 2):
        raise ValueError(
            f"spectra have shape {spectra.shape} and noise_variance is None: the significance of a feature needs "
            f"its noise; expected Monte Carlo replicas (n_replicas >= 2, n_pixels, {energy.size}) whose spread "
            "gives it (e.g. stemml_core.eels.inelastic_replicas), or noise_variance (counts²)"
        )
    profiles = _check_profiles(profiles, criterion)
    if not profiles:
        raise ValueError(f"profiles=None; expected candidate profiles among {PROFILES}")
    if not (np.isfinite(float(systematic)) and float(systematic) >= 0):
        raise ValueError(f"systematic={systematic!r}; expected a relative model error >= 0 (e.g. 0.01)")
    if spectra.ndim == 2:
        spectra = spectra[None]
    n = spectra.shape[1]
    if spectra.shape[-1] != energy.size:
        raise ValueError(f"spectra have shape {spectra.shape}; expected (n_replicas, n_pixels, {energy.size}) to "
                         "match energy")
    median = np.median(spectra, axis=0)  # the scale of each window's model error
    weight = np.ones(energy.size)
    if angular is not None:
        try:
            beam, beta = (float(v) for v in angular)
        except (TypeError, ValueError):
            beam = beta = float("nan")
        if not (beam > 0 and beta > 0):
            raise ValueError(f"angular={angular!r}; expected (beam energy keV > 0, collection semi-angle mrad > 0)")
        weight = angular_factor(np.maximum(energy, 1e-3), beam, beta)
    spans = _windows_on_axis(energy, windows)
    bounds = [spans[0][0]] + [(spans[i][1] + spans[i + 1][0]) / 2 for i in range(len(spans) - 1)] + [spans[-1][1]]
    columns = {key: [] for key in ("energy", "width", "amplitude", "significance", "profile", "evidence", "window")}
    thresholds = []
    if noise_variance is not None:
        noise_variance = np.broadcast_to(np.asarray(noise_variance, dtype=np.float64), (n, energy.size))
    step = energy[1] - energy[0]
    for w, (lo, hi, w_lo, w_hi, order, kinds, most, error) in enumerate(spans):
        # Sum channels where the narrowest peak spans many: counts add, and so do variances.
        _check_window(energy, (lo, hi), (w_lo, w_hi), background_order if order is None else order)
        b = max(1, int(w_lo / (_CHANNELS_PER_WIDTH * step)))
        inside = np.flatnonzero((energy >= lo) & (energy <= hi))
        inside = inside[: inside.size // b * b]
        e_w = energy[inside].reshape(-1, b).mean(axis=1)
        scale = np.interp((lo + hi) / 2, energy, weight) / weight[inside]
        y_w = (spectra[..., inside] * scale).reshape(*spectra.shape[:2], -1, b).sum(axis=-1)
        error = float(systematic) if error is None else error
        v_w = None if noise_variance is None else noise_variance[:, inside]
        if error > 0:
            floor = (error * median[:, inside]) ** 2
            v_w = floor if v_w is None else v_w + floor
        v_w = None if v_w is None else (v_w * scale**2).reshape(n, -1, b).sum(axis=-1)
        fit = find_features(y_w, e_w, window=(e_w[0], e_w[-1]), noise_variance=v_w, false_alarm=false_alarm,
                            width_range=(max(w_lo, b * step), w_hi),
                            background_order=background_order if order is None else order,
                            max_peaks=max_peaks if most is None else most, shape=detection_shape,
                            profiles=kinds or profiles,
                            criterion=criterion)
        fit = FeatureFit(**{**fit.__dict__, "amplitude": fit.amplitude / b})  # counts per channel of the input
        thresholds.append(fit.threshold)
        owned = (fit.energy[0] >= bounds[w]) & (fit.energy[0] < bounds[w + 1]) if w < len(spans) - 1 else \
            (fit.energy[0] >= bounds[w])
        columns["energy"].append(np.where(owned, fit.energy, np.nan))
        columns["width"].append(np.where(owned, fit.width, np.nan))
        columns["amplitude"].append(np.where(owned, fit.amplitude, np.nan))
        columns["significance"].append(np.where(owned, fit.significance, np.nan))
        columns["profile"].append(np.where(owned, fit.profile, ""))
        columns["evidence"].append(np.where(owned, fit.profile_evidence, np.nan))
        columns["window"].append(np.where(owned, w, -1))
    stacked = {key: np.concatenate(value, axis=-1) for key, value in columns.items()}
    n_found = np.isfinite(stacked["energy"][0]).sum(axis=1)
    k = max(int(n_found.max()) if n else 0, 1)
    order = np.argsort(np.where(np.isfinite(stacked["energy"][0]), stacked["energy"][0], np.inf), axis=1,
                       kind="stable")[:, :k]

    def take(values):
        if values.ndim == 3:
            return np.take_along_axis(values, order[None], axis=2)
        return np.take_along_axis(values, order, axis=1)

    return LowLossFeatures(energy=take(stacked["energy"]), width=take(stacked["width"]),
                           amplitude=take(stacked["amplitude"]), significance=take(stacked["significance"]),
                           profile=take(stacked["profile"]), profile_evidence=take(stacked["evidence"]),
                           window=take(stacked["window"]), n_peaks=n_found, windows=spans,
                           thresholds=tuple(thresholds))


def match_features(energy, planted, *, tolerance: float = 0.1):
    """Match found peaks to known (planted or reference) features, pixel by pixel.

    Parameters
    ----------
    energy : array_like, shape (n, k)
        Found peak energies, eV, NaN in empty slots (e.g. ``LowLossFeatures.energy[0]``).
    planted : dict of str to (energy, width) or (energy, width, mask)
        Per feature: its energy and width (eV) in each pixel, arrays of shape (n,) or scalars, and
        where it is present (bool (n,); default: where its energy is finite).
    tolerance : float
        Largest distance, as a fraction of the feature's width (at least 0.05 eV), between a found
        peak and the feature it is matched to.

    Returns
    -------
    slots : dict of str to numpy.ndarray of int, shape (n,)
        Slot of the peak matched to each feature, -1 where none is.
    unmatched : numpy.ndarray of bool, shape (n, k)
        Found peaks matched to no present feature (false features, or features not in `planted`).

    Notes
    -----
    Features are matched in the order given, each to the nearest free peak within its tolerance.

    Examples
    --------
    >>> slots, extra = match_features([[1.88, 2.03, 5.0]], {"A": (1.88, 0.08), "B": (2.04, 0.1)})
    >>> {name: s.tolist() for name, s in slots.items()}, extra.tolist()
    ({'A': [0], 'B': [1]}, [[False, False, True]])
    """
    energy = np.atleast_2d(np.asarray(energy, dtype=np.float64))
    n = energy.shape[0]
    free = np.isfinite(energy)
    slots = {}
    for name, spec in planted.items():
        centre = np.broadcast_to(np.asarray(spec[0], dtype=np.float64), (n,))
        width = np.broadcast_to(np.asarray(spec[1], dtype=np.float64), (n,))
        mask = np.broadcast_to(np.asarray(spec[2], dtype=bool), (n,)) if len(spec) > 2 else np.isfinite(centre)
        reach = np.maximum(tolerance * np.nan_to_num(width), 0.05)
        distance = np.where(free, np.abs(energy - centre[:, None]), np.inf)
        best = np.argmin(distance, axis=1)
        ok = mask & (distance[np.arange(n), best] <= reach)
        slots[name] = np.where(ok, best, -1)
        free[np.flatnonzero(ok), best[ok]] = False
    return slots, free


#: Profile codes of the maps of :func:`map_lowloss_features` (0: no peak).
PROFILE_CODES = {"": 0, "gaussian": 1, "lorentzian": 2, "drude": 3}


@dataclass(frozen=True)
class FeatureCatalogue:
    """Features of an image and the clusters of pixels that share them, from :func:`feature_catalogue`.

    Attributes
    ----------
    names : tuple of str
        One name per feature class (a cluster of peaks of all pixels in energy and ln width), in
        ascending energy: the reference's name within the tolerance, else its energy (``"14.14 eV"``);
        a repeated name gets a suffix (``"A (2)"``).
    labels : FeatureLabels
        The peak clusters (``labels.cluster`` has the shape of the peak arrays, (n, k)).
    slots : dict of str to numpy.ndarray of int, shape (n,)
        Per feature, the slot of its most significant peak in each pixel; -1 where it is absent.
    maps : dict of str to dict
        Per feature: ``energy``, ``width``, ``amplitude`` arrays (3, n) (median, 16th, 84th
        percentile; NaN where absent), ``significance`` (n,) and ``profile`` (n,) str.
    clusters : numpy.ndarray of int, shape (n,)
        Cluster of each pixel (k-means on its feature vector: which features it shows and their log
        heights relative to the feature's median), numbered by ascending mean number of peaks.
    table : list of dict
        One row per (pixel cluster, feature found in it): ``cluster``, ``pixels`` (of the cluster),
        ``feature``, ``found`` (pixels of the cluster showing it), ``profile`` (the most frequent),
        and the medians over those pixels of ``energy``, ``energy_low``, ``energy_high``, ``width``,
        ``width_low``, ``width_high``, ``amplitude``, ``amplitude_low``, ``amplitude_high`` (eV, eV,
        counts per channel; the low/high columns are the medians of the pixels' 68 % bounds).
    """

    names: tuple
    labels: FeatureLabels
    slots: dict
    maps: dict
    clusters: np.ndarray
    table: list


def feature_catalogue(found: LowLossFeatures, *, references=None, tolerance: float = 0.05, n_clusters: int = 4,
                      max_classes: int = 12, random_state=0) -> FeatureCatalogue:
    """Name the features of an image, map them and cluster the pixels by the features they show.

    Parameters
    ----------
    found : LowLossFeatures
        From :func:`identify_features`.
    references : dict of str to float, optional
        Name -> energy (eV) of known features; default :data:`REFERENCE_ENERGIES`. Feature classes
        are learned from the data (:func:`label_features`); references only name them.
    tolerance : float
        Largest distance (eV) from a class's mean energy to a reference that names it.
    n_clusters : int
        Clusters of pixels (``sklearn.cluster.KMeans``), at least 1, at most the number of pixels.
    max_classes : int
        Most feature classes tried (mixtures of 1 to ``max_classes`` components, by BIC).
    random_state : int or None
        Seed of the mixture and of k-means.

    Returns
    -------
    FeatureCatalogue

    Raises
    ------
    ValueError
        Not a :class:`LowLossFeatures`, or bad options.

    Examples
    --------
    >>> energy = np.arange(0.5, 30.0, 0.025)
    >>> peak = 800 * np.exp(-4 * np.log(2) * ((energy - 2.2) / 0.15) ** 2)
    >>> clean = 500 + np.array([[0.0], [1.0]]) * peak  # pixel 0: background only
    >>> replicas = clean + np.sqrt(clean) * np.random.default_rng(0).standard_normal((8, 2, energy.size))
    >>> catalogue = feature_catalogue(identify_features(replicas, energy), n_clusters=2)
    >>> catalogue.names, catalogue.clusters.tolist()  # no reference within 0.05 eV of 2.2 eV
    (('2.20 eV',), [0, 1])
    >>> [(row["cluster"], row["feature"], row["found"], row["profile"]) for row in catalogue.table]
    [(1, '2.20 eV', 1, 'gaussian')]
    """
    if not isinstance(found, LowLossFeatures):
        raise ValueError(f"feature_catalogue got {type(found).__name__}; expected the LowLossFeatures of "
                         "identify_features")
    n = found.n_peaks.size
    if not isinstance(n_clusters, (int, np.integer)) or isinstance(n_clusters, bool) or not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters={n_clusters!r}; expected an int from 1 to the number of pixels, {n}")
    references = dict(REFERENCE_ENERGIES if references is None else references)
    labels = label_features(found.energy[0], found.width[0], references=references, tolerance=tolerance,
                            max_clusters=max_classes, random_state=random_state)
    names, seen = [], {}
    for name, centre in zip(labels.names, labels.centres):
        base = f"{centre:.2f} eV" if name == "unknown" else name
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base} ({seen[base]})")
    rows = np.arange(n)
    slots, maps = {}, {}
    for c, name in enumerate(names):
        z = np.where(labels.cluster == c, np.nan_to_num(found.significance, nan=0.0) + 1.0, -np.inf)
        slot = np.argmax(z, axis=1)
        has = np.isfinite(z[rows, slot])
        slots[name] = np.where(has, slot, -1)
        maps[name] = {key: np.where(has, getattr(found, key)[:, rows, slot], np.nan)
                      for key in ("energy", "width", "amplitude")}
        maps[name]["significance"] = np.where(has, found.significance[rows, slot], np.nan)
        maps[name]["profile"] = np.where(has, found.profile[rows, slot], "")
    clusters = np.zeros(n, dtype=int)
    if names:
        present = np.column_stack([slots[name] >= 0 for name in names]).astype(float)
        heights = np.column_stack([maps[name]["amplitude"][0] for name in names])
        with np.errstate(all="ignore"):
            scale = np.nanmedian(np.where(heights > 0, heights, np.nan), axis=0)
            level = np.clip(np.log(heights / scale), -2.0, 2.0)
        vectors = np.hstack([present, 0.5 * np.nan_to_num(level, nan=0.0, posinf=0.0, neginf=0.0) * present])
        k = min(int(n_clusters), len(np.unique(vectors, axis=0)))
        raw = KMeans(n_clusters=k, n_init=10, random_state=random_state).fit_predict(vectors)
        peaks_per_cluster = np.array([present[raw == j].sum(axis=1).mean() for j in range(k)])
        rank = np.empty(k, dtype=int)
        rank[np.argsort(peaks_per_cluster, kind="stable")] = np.arange(k)
        clusters = rank[raw]
    table = []
    for j in range(int(clusters.max()) + 1 if n else 0):
        members = clusters == j
        for name in names:
            where = members & (slots[name] >= 0)
            if not where.any():
                continue
            kinds, counts = np.unique(maps[name]["profile"][where], return_counts=True)
            row = {"cluster": j, "pixels": int(members.sum()), "feature": name, "found": int(where.sum()),
                   "profile": str(kinds[np.argmax(counts)])}
            for key in ("energy", "width", "amplitude"):
                values = np.nanmedian(maps[name][key][:, where], axis=1)
                row |= {key: float(values[0]), f"{key}_low": float(values[1]), f"{key}_high": float(values[2])}
            table.append(row)
    return FeatureCatalogue(names=tuple(names), labels=labels, slots=slots, maps=maps, clusters=clusters,
                            table=table)


@dataclass(frozen=True)
class LowLossFeatureMaps:
    """Result of :func:`map_lowloss_features`; maps have the input's navigation axes (in memory).

    Attributes
    ----------
    features : dict of str to FeatureMap
        Per feature of the catalogue: energy, width and height with their 68 % intervals, and
        significance (NaN where absent).
    profiles : dict of str to hyperspy.signal.BaseSignal
        Per feature, the chosen profile as a code of :data:`PROFILE_CODES` (0 where absent).
    clusters : hyperspy.signal.BaseSignal
        Cluster of each pixel (see ``FeatureCatalogue.clusters``).
    n_peaks : hyperspy.signal.BaseSignal
        Significant peaks of each pixel.
    catalogue : FeatureCatalogue
        The table per cluster, the peak classes and the per-pixel arrays (flattened pixels).
    found : LowLossFeatures
        Every peak of every pixel (flattened pixels).
    """

    features: dict
    profiles: dict
    clusters: BaseSignal
    n_peaks: BaseSignal
    catalogue: FeatureCatalogue
    found: LowLossFeatures


def map_lowloss_features(signal, model, *, windows=None, references=None, tolerance: float = 0.05,
                         n_clusters: int = 4, noise: bool = True, random_state: int = 0, **options):
    """Identify, map and catalogue the features of a low-loss spectrum image over its whole range.

    Replica r of every pixel is its spectrum minus the ZLP replica r of ``model`` plus (``noise``) a
    draw of its counting noise, as in :func:`map_features`; :func:`identify_features` finds the
    features in every window and :func:`feature_catalogue` names, maps and clusters them.

    Parameters
    ----------
    signal : exspy.signals.EELSSpectrum
        Low-loss spectra with navigation axes, on the energy axis of ``model`` (a lazy one is
        computed). The noise variance is ``metadata.Signal.Noise_properties.variance`` when set, else
        the counts (Poisson).
    model : stemml_core.eels.zlp.ZLPEnsemble
        A fitted ZLP ensemble; its replicas give the intervals and the noise of the significance.
    windows, references, tolerance, n_clusters
        See :func:`identify_features` and :func:`feature_catalogue`.
    noise : bool
        Add a draw of the data's noise to every replica (else it enters as ``noise_variance``).
    random_state : int
        Seed of the noise draws (with each pixel's flat index), of the mixture and of k-means.
    **options
        Further options of :func:`identify_features` (``false_alarm``, ``profiles``, ``criterion``,
        ``systematic``, ...). ``angular`` defaults to the beam energy and collection angle of the
        signal's metadata (None where they are not recorded).

    Returns
    -------
    LowLossFeatureMaps

    Raises
    ------
    ValueError
        A signal without navigation axes or on another energy axis than the model's, a model
        with fewer than two replicas and ``noise=False`` (no replica band to measure the
        significance against), or any error of :func:`identify_features`.
    """
    from sklearn.utils.validation import check_is_fitted

    from ..blocks import navigation_map

    check_is_fitted(model)
    energy = check_replica_input(signal, model.energy_, random_state, "map_lowloss_features")
    am = signal.axes_manager
    nav_shape = tuple(am.navigation_shape[::-1])
    data = np.asarray(signal.data.compute() if signal._lazy else signal.data, dtype=np.float64).reshape(-1, energy.size)
    if not np.all(np.isfinite(data)):
        raise ValueError("the signal contains NaN or infinite counts; expected finite counts")
    variance = noise_variance(signal)
    variance = np.asarray(variance.compute() if hasattr(variance, "compute") else variance,
                          dtype=np.float64).reshape(data.shape)
    inside = energy > 0.0
    pixel = np.arange(data.shape[0])
    # the replicas carry the counting noise as draws when there are several; a single replica gets none
    # and the noise enters as noise_variance instead (never both)
    carried = noise and int(np.sum(model.kept_)) > 1
    replicas = inelastic_replicas(data, model, energy, inside, variance=variance if carried else None, pixel=pixel,
                                  random_state=random_state)
    if replicas.shape[0] < 2 and not noise:
        raise ValueError(f"the model has {replicas.shape[0]} replica and noise=False: the significance needs a replica "
                         "band; expected a ZLPEnsemble with at least two kept replicas, or noise=True")
    if "angular" not in options:  # the microscope's beam energy and collection angle, when recorded
        tem = signal.metadata.get_item("Acquisition_instrument.TEM", default=None)
        beam = None if tem is None else tem.get_item("beam_energy", default=None)
        beta = None if tem is None else tem.get_item("Detector.EELS.collection_angle", default=None)
        options["angular"] = (beam, beta) if beam and beta else None
    found = identify_features(replicas, energy[inside], windows=windows,
                              noise_variance=None if carried else np.clip(variance[:, inside], 0.0, None), **options)
    catalogue = feature_catalogue(found, references=references, tolerance=tolerance,
                                  n_clusters=min(n_clusters, data.shape[0]), random_state=random_state)
    features, profiles = {}, {}
    for name in catalogue.names:
        values = catalogue.maps[name]

        def interval(key, title, quantity, name=name, values=values):
            return ReplicaInterval(*(navigation_map(values[key][i].reshape(nav_shape), signal,
                                                    title=f"{name}: {title} ({label})", quantity=quantity)
                                     for i, label in enumerate(("median", "16th percentile", "84th percentile"))))

        features[name] = FeatureMap(
            energy=interval("energy", "energy", "Energy loss (eV)"),
            width=interval("width", "width", "Width (eV)"),
            amplitude=interval("amplitude", "peak height", "Intensity (counts)"),
            significance=navigation_map(values["significance"].reshape(nav_shape), signal,
                                        title=f"{name}: significance", quantity="Significance (sigma)"))
        codes = np.vectorize(PROFILE_CODES.get, otypes=[int])(values["profile"])
        profiles[name] = navigation_map(codes.reshape(nav_shape), signal, title=f"{name}: profile",
                                        quantity="Profile (1 Gaussian, 2 Lorentzian, 3 Drude)")
    return LowLossFeatureMaps(
        features=features, profiles=profiles,
        clusters=navigation_map(catalogue.clusters.reshape(nav_shape), signal, title="Feature clusters",
                                quantity="Cluster"),
        n_peaks=navigation_map(found.n_peaks.reshape(nav_shape), signal, title="Significant peaks", quantity="Peaks"),
        catalogue=catalogue, found=found)
