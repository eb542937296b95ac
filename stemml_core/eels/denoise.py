"""Spatial pooling of a spectrum image: a Gaussian-weighted average over neighbouring pixels.

A per-pixel fit of a weak feature (a band-gap onset a few counts above a sub-gap
background) is limited by counting noise. Averaging each spectrum with its
neighbours, weighted by a Gaussian of width ``sigma`` pixels, divides the noise
variance by the effective number of pooled pixels, ``(Σw)² / Σw²`` (about
``4π sigma²`` for ``sigma >= 1``), at the cost of spatial resolution.
EELSfitter :cite:`Brokkelkamp2022` pools in the same way before its fits.

Pixels are pooled only with neighbours of the same label (e.g. the thickness
clusters of a :class:`~stemml_core.eels.zlp.ZLPEnsemble`), so that vacuum and
specimen, or two terraces, do not mix at their borders: with masks ``m_k`` of the
labels and weights ``w``,

.. math::

    \\bar I = \\sum_k m_k \\frac{w \\star (m_k I)}{w \\star m_k}, \\qquad
    \\operatorname{var} \\bar I = \\sum_k m_k \\frac{w^2 \\star (m_k \\operatorname{var} I)}{(w \\star m_k)^2},

``⋆`` a correlation over the navigation axes. The variance travels with the
pooled signal as HyperSpy's ``metadata.Signal.Noise_properties.variance``, so
later steps (e.g. :func:`~stemml_core.eels.bandgap.estimate_band_gap`) know the
noise of the pooled data.

:func:`decomposition_denoise` denoises without spatial smoothing: it rebuilds the
spectrum image from the few components of HyperSpy's decomposition (SVD or NMF,
after Poisson normalisation :cite:`KeenanKotula2004`) that stand above the noise
edge of :func:`noise_edge`, and carries the noise variance such a low-rank model keeps.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import dask.array as da
import numpy as np
from scipy import ndimage

__all__ = ["ALGORITHMS", "Decomposition", "decomposition_denoise", "gaussian_weights", "noise_edge", "pool_spectra"]


def gaussian_weights(sigma: float, n_dims: int, *, truncate: float = 2.0) -> np.ndarray:
    """Unnormalised Gaussian weights ``exp(-r² / 2 sigma²)`` on the pixel offsets within ``truncate sigma``.

    Parameters
    ----------
    sigma : float
        Width, pixels, > 0.
    n_dims : int
        Number of navigation dimensions (1 or 2 in practice).
    truncate : float
        Radius of the neighbourhood in units of ``sigma``.

    Returns
    -------
    numpy.ndarray, shape (2 r + 1,) * n_dims
        With ``r = ceil(truncate sigma)``; 1 at the centre.
    """
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma={sigma!r} pixels is invalid; expected a finite width > 0 pixels")
    if not (np.isfinite(truncate) and truncate > 0):
        raise ValueError(f"truncate={truncate!r} is invalid; expected a finite value > 0 (in units of sigma)")
    radius = math.ceil(truncate * sigma)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    r2 = sum(np.meshgrid(*[offsets**2] * n_dims, indexing="ij"))
    return np.exp(-r2 / (2.0 * sigma**2))


def _pool_arrays(data, variance, labels, weights):
    """Pooled (data, variance) of arrays of shape (*nav, n_energy); labels of shape (*nav, 1), < 0 not pooled."""
    data = np.asarray(data, dtype=np.float64)
    variance = np.broadcast_to(np.asarray(variance, dtype=np.float64), data.shape)
    labels = np.asarray(labels)[..., 0]
    kernel = weights[..., None]  # no smoothing along the energy axis
    pooled = data.copy()
    pooled_variance = variance.copy()
    for label in np.unique(labels[labels >= 0]):
        mask = labels == label
        weight_sum = ndimage.correlate(mask.astype(np.float64), weights, mode="constant")[mask]
        m = mask[..., None]
        pooled[mask] = ndimage.correlate(data * m, kernel, mode="constant")[mask] / weight_sum[:, None]
        pooled_variance[mask] = (
            ndimage.correlate(variance * m, kernel**2, mode="constant")[mask] / weight_sum[:, None] ** 2
        )
    return pooled, pooled_variance


def pool_spectra(signal, sigma: float = 1.0, *, labels=None, truncate: float = 2.0):
    """Gaussian-weighted pooling of a spectrum image over its navigation axes, within labels.

    Parameters
    ----------
    signal : hyperspy Signal1D or exspy EELSSpectrum
        Spectrum image, counts, navigation dimension 1 or 2; eager or lazy.
        Not modified.
    sigma : float
        Width of the Gaussian weights, pixels.
    labels : array_like of int, shape nav, optional
        Pool each pixel only with pixels of the same label (e.g. the
        ``labels_`` of a fitted ZLP ensemble reshaped to the scan); pixels with
        a negative label are left as they are. None: one label for all.
    truncate : float
        Neighbourhood radius in units of ``sigma``.

    Returns
    -------
    hyperspy signal
        Same class, axes and metadata as ``signal``, lazy when it is, with the
        pooled counts and ``metadata.Signal.Noise_properties.variance`` (a
        signal, counts²) of the pooled counts. The input variance is taken from
        the signal's own ``Noise_properties.variance`` when set (a number or a
        signal), otherwise from Poisson statistics with gain 1: ``max(I, 0)``.

    Raises
    ------
    ValueError
        A signal without navigation axes or with other than one signal axis,
        labels of the wrong shape, or a bad ``sigma``/``truncate``.

    Examples
    --------
    >>> from stemml_core.synthetic.lowloss import flake_sample
    >>> s, truth = flake_sample((6, 8), dose=1e6, energy_range=(-1.0, 9.0))
    >>> pooled = pool_spectra(s, 1.0, labels=truth.vacuum.astype(int))
    >>> pooled.data.shape == s.data.shape
    True
    """
    am = signal.axes_manager
    if am.signal_dimension != 1:
        raise ValueError(f"the signal has {am.signal_dimension} signal axes; expected one energy axis (a Signal1D)")
    nav_shape = tuple(am.navigation_shape[::-1])
    if not nav_shape:
        raise ValueError("the signal is a single spectrum; pooling needs a spectrum image (navigation axes)")
    weights = gaussian_weights(sigma, len(nav_shape), truncate=truncate)
    if labels is None:
        labels = np.zeros(nav_shape, dtype=np.int64)
    labels = labels if isinstance(labels, da.Array) else np.asarray(labels)
    if labels.shape != nav_shape or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels have shape {labels.shape} and dtype {labels.dtype}; expected integers of the "
                         f"navigation shape {nav_shape}")
    variance = signal.metadata.get_item("Signal.Noise_properties.variance")
    if variance is None:
        variance = (da if signal._lazy else np).clip(signal.data, 0, None)
    elif hasattr(variance, "data"):
        variance = variance.data
    labels = labels[..., None]
    if signal._lazy:
        data = signal.data.rechunk({len(nav_shape): -1})
        variance = da.broadcast_to(da.asarray(variance), data.shape).rechunk(data.chunks)
        labels = da.asarray(labels).rechunk(data.chunks[:-1] + (1,))
        depth = {axis: weights.shape[0] // 2 for axis in range(len(nav_shape))} | {len(nav_shape): 0}
        n_energy = data.shape[-1]

        def block(d, v, lab):
            # data and variance side by side on the energy axis, which the pooling does not mix
            return np.concatenate(_pool_arrays(d, v, lab, weights), axis=-1)

        both = da.map_overlap(block, data, variance, labels, depth=depth, boundary="none", dtype=np.float64,
                              chunks=data.chunks[:-1] + ((2 * n_energy,),))
        pooled, pooled_variance = both[..., :n_energy], both[..., n_energy:]
    else:
        pooled, pooled_variance = _pool_arrays(signal.data, variance, labels, weights)
    out = signal._deepcopy_with_new_data(pooled)
    out.metadata.set_item("Signal.Noise_properties.variance", signal._deepcopy_with_new_data(pooled_variance))
    out.metadata.General.title = f"{signal.metadata.General.title} (pooled, sigma={sigma:g} px)"
    return out


# --------------------------------------------------------------------------
# Decomposition (PCA / NMF) denoising through HyperSpy
# --------------------------------------------------------------------------

#: Decomposition algorithms of :func:`decomposition_denoise` (HyperSpy's names).
ALGORITHMS = ("SVD", "NMF")


@dataclass(frozen=True)
class Decomposition:
    """What :func:`decomposition_denoise` did, for a scree plot and for the record.

    Attributes
    ----------
    algorithm : str
        ``"SVD"`` (PCA without centring) or ``"NMF"``.
    n_components : int
        Components kept in the denoised signal.
    chosen_from_data : bool
        True when ``n_components`` was chosen from the scree against the noise edge.
    explained_variance : numpy.ndarray
        Variance of each SVD component of the Poisson-normalised data, largest first
        (HyperSpy's ``learning_results.explained_variance``: squared singular value over the
        number of pixels), for the components computed (at most ``max_components + 1``).
    noise_edge : float
        The largest variance one component of pure noise would reach, same units: the
        edge of :func:`noise_edge` for the Poisson variance of the normalised data, ``I / (a b)``
        with ``a`` and ``b`` the pixel and channel sums of the counts, times ``noise_calibration``.
        Components above it hold signal.
    noise_calibration : float
        Median of the data's scree over the median of the simulated noise's: 1 for counts with
        Poisson noise of gain 1; gain and read noise move it (the bulk of the scree is noise).
    elbow : int
        HyperSpy's ``estimate_elbow_position`` of the scree + 1 (a number of components), for comparison.
    variance_factor : float
        ``k (n + d - k) / (n d)`` for k components of n pixels and d channels: about the mean
        fraction of the raw noise variance the denoised signal keeps (its
        ``Noise_properties.variance`` is computed per value, see :func:`decomposition_denoise`).
    """

    algorithm: str
    n_components: int
    chosen_from_data: bool
    explained_variance: np.ndarray
    noise_edge: float
    noise_calibration: float
    elbow: int
    variance_factor: float


def noise_edge(variance, *, n_draws: int = 3, random_state: int = 0) -> tuple[float, float]:
    """The largest variance one decomposition component of pure noise reaches, and the median one.

    Draws ``n_draws`` matrices of independent Gaussian noise with the given variance of
    each value and returns the largest squared singular value over the number of rows
    (HyperSpy's explained variance) among them, and the median of all of them. For a
    uniform variance ``σ²`` of an ``n x d`` matrix the largest is the Marchenko–Pastur
    edge ``σ² (1 + sqrt(d / n))²`` (plus its small Tracy–Widom spread); for a variance
    that differs between values, as Poisson noise after Keenan and Kotula's normalisation
    of a spectrum image that is not of rank one, the edge lies higher, and the draws find it.

    Parameters
    ----------
    variance : array_like, shape (n, d)
        Noise variance of each value.
    n_draws : int
        Noise matrices drawn.
    random_state : int
        Seed of the draws.

    Returns
    -------
    edge, median : float
        Same units as ``variance``.

    Examples
    --------
    >>> edge, _ = noise_edge(np.full((400, 100), 2.0))
    >>> round(edge / (2.0 * (1 + (100 / 400) ** 0.5) ** 2), 1)
    1.0
    """
    variance = np.asarray(variance, dtype=np.float64)
    if variance.ndim != 2 or min(variance.shape) < 1 or not np.all(np.isfinite(variance) & (variance >= 0)):
        raise ValueError(f"variance has shape {variance.shape}; expected a finite, non-negative (n, d) array")
    if not (isinstance(n_draws, (int, np.integer)) and n_draws >= 1):
        raise ValueError(f"n_draws={n_draws!r}; expected an integer >= 1")
    rng = np.random.default_rng(random_state)
    sigma = np.sqrt(variance)
    spectra = np.stack([np.linalg.svd(sigma * rng.standard_normal(sigma.shape), compute_uv=False) ** 2
                        for _ in range(int(n_draws))]) / variance.shape[0]
    return float(spectra[:, 0].max()), float(np.median(spectra))


def decomposition_denoise(signal, algorithm: str = "SVD", n_components: int | None = None, *,
                          max_components: int = 30, random_state: int = 0, **kwargs):
    """Denoise a spectrum image by a low-rank model from HyperSpy's decomposition.

    The counts are normalised for Poisson noise (:cite:`KeenanKotula2004`, HyperSpy's
    ``normalize_poissonian_noise=True``), decomposed by HyperSpy's
    ``decomposition`` (``"SVD"``: PCA without centring; ``"NMF"``: scikit-learn's
    non-negative matrix factorisation), and rebuilt from the first components with
    ``get_decomposition_model``. After the normalisation the noise is close to
    uniform, so the number of components can be read off the scree: a component holds
    signal when its variance exceeds the largest that pure noise of the same variance reaches
    (:func:`noise_edge`, the Marchenko–Pastur edge for uniform noise), with the noise
    variance of every normalised value known from Poisson statistics. NMF takes the number
    of components from the SVD scree.

    Parameters
    ----------
    signal : hyperspy Signal1D or exspy EELSSpectrum
        Spectrum image, counts (gain 1), navigation dimension 1 or 2, in memory. Not
        modified. Negative counts (read noise) are set to 0 for the decomposition.
    algorithm : {"SVD", "NMF"}
        Decomposition of HyperSpy.
    n_components : int, optional
        Components to keep; None: chosen from the data (see above), at least 1.
    max_components : int
        Most components chosen from the data (and computed for the scree).
    random_state : int
        Seed of the NMF initialisation and of HyperSpy's randomised SVD solver.
    **kwargs
        Further arguments of the scikit-learn ``NMF`` (defaults here: ``init="nndsvda"``,
        ``max_iter=5000``, which converges on the flake samples, and ``random_state``).

    Returns
    -------
    denoised : hyperspy signal
        Same class, axes and metadata as ``signal``, with the low-rank counts and
        ``metadata.Signal.Noise_properties.variance`` (a signal, counts²): the noise
        variance left in the denoised counts. In the normalised space, with ``τ = I / (a b)``
        the Poisson variance of each value (``a``, ``b`` the pixel and channel sums), ``V`` the
        k channel components and ``h_i`` the leverage of pixel i (the squared norm of its row of
        the k pixel components) of the SVD, the rank-k model keeps ``τ (V Vᵀ)∘² + h τ``: the
        noise the channel projection lets through plus the noise the pixel components absorb
        (``∘²`` squares element-wise). Times ``a b`` and ``noise_calibration`` this is in counts²;
        on average it is about ``k (n + d - k) / (n d)`` of the raw variance (the degrees of
        freedom of a rank-k model of n pixels and d channels over the number of values). A
        variance the input carries (e.g. from :func:`pool_spectra`) is scaled by the same
        per-value fraction instead. NMF uses the SVD's components of the same rank for this.
        The kept noise is correlated between channels and pixels, which
        :func:`~stemml_core.eels.bandgap.estimate_band_gap` (independent draws per channel)
        does not model, so its intervals are approximate.
    info : Decomposition
        Scree, noise edge, chosen number of components and variance factor.

    Raises
    ------
    ValueError
        An unknown algorithm, a signal without navigation axes or with other than one signal
        axis, fewer pixels or channels than components + 2 (naming what was expected),
        non-finite counts or a spectrum image without counts.
    NotImplementedError
        A lazy signal: the decomposition needs the whole image in memory; load it with
        ``signal.compute()`` (or crop it) first.

    Examples
    --------
    >>> from stemml_core.synthetic.lowloss import flake_sample
    >>> s, truth = flake_sample((8, 10), dose=1e6, energy_range=(-1.0, 9.0))
    >>> denoised, info = decomposition_denoise(s)
    >>> denoised.data.shape == s.data.shape, info.n_components >= 2
    (True, True)
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}; expected one of {ALGORITHMS}")
    am = signal.axes_manager
    if am.signal_dimension != 1:
        raise ValueError(f"the signal has {am.signal_dimension} signal axes; expected one energy axis (a Signal1D)")
    nav_shape = tuple(am.navigation_shape[::-1])
    if not nav_shape:
        raise ValueError("the signal is a single spectrum; decomposition denoising needs a spectrum image "
                         "(navigation axes)")
    if signal._lazy:
        raise NotImplementedError("the signal is lazy; the decomposition needs the whole spectrum image in memory: "
                                  "call signal.compute() (or crop it) first")
    n_pixels, n_channels = int(np.prod(nav_shape)), int(am.signal_shape[0])
    wanted = (n_components if n_components is not None else 1)
    if n_components is not None and not (isinstance(n_components, (int, np.integer)) and n_components >= 1):
        raise ValueError(f"n_components={n_components!r}; expected an integer >= 1 or None (chosen from the data)")
    if not (isinstance(max_components, (int, np.integer)) and max_components >= 1):
        raise ValueError(f"max_components={max_components!r}; expected an integer >= 1")
    if min(n_pixels, n_channels) < wanted + 2:
        raise ValueError(
            f"the spectrum image has {n_pixels} pixels of {n_channels} channels; expected at least "
            f"{wanted + 2} pixels and channels for {wanted} component(s) (n_components + 2: the components and "
            "the noise above them)"
        )
    data = np.asarray(signal.data, dtype=np.float64)
    if not np.all(np.isfinite(data)):
        raise ValueError("the spectrum image has NaN or infinite counts; expected finite counts")
    counts = np.clip(data, 0.0, None)
    if not counts.sum(axis=-1).all() or not counts.reshape(-1, n_channels).sum(axis=0).all():
        raise ValueError("a pixel or a channel of the spectrum image holds no positive counts; crop or mask it "
                         "(the Poisson normalisation divides by these sums)")
    work = signal._deepcopy_with_new_data(counts)
    work.metadata.Signal.Noise_properties = {}
    n_scree = int(min(max_components + 1, n_pixels, n_channels))
    with _quiet_decomposition():
        work.decomposition(normalize_poissonian_noise=True, algorithm="SVD", print_info=False, svd_solver="full")
    spectrum = np.asarray(work.learning_results.explained_variance, dtype=np.float64)
    variance = spectrum[:n_scree]
    # Poisson variance of the normalised values, E[X_ij] / (a_i b_j), estimated by X_ij / (a_i b_j)
    a = counts.reshape(-1, n_channels).sum(axis=1)
    b = counts.reshape(-1, n_channels).sum(axis=0)
    edge, noise_median = noise_edge(counts.reshape(-1, n_channels) / a[:, None] / b[None, :],
                                    random_state=random_state)
    # Gain and read noise change the variance from the Poisson I: calibrate the edge by the bulk of the
    # scree, which is noise when the signal has few components (Gavish and Donoho's median rule)
    calibration = float(np.median(spectrum[:min(n_pixels, n_channels)])) / noise_median
    edge *= calibration
    elbow = int(work.estimate_elbow_position(variance[: min(len(variance), 20)])) + 1 if len(variance) > 2 else 1
    chosen = n_components is None
    if chosen:
        above = variance > edge
        n_components = int(np.argmin(above)) if not above.all() else len(variance)
        n_components = min(max(n_components, 1), max_components)
    n_components = int(n_components)
    # noise kept by the rank-k model, in the normalised space (see the docstring), from the SVD's subspaces
    lr = work.learning_results
    root_a, root_b = np.sqrt(a), np.sqrt(b)
    v = np.asarray(lr.factors[:, :n_components], dtype=np.float64) / root_b[:, None]
    v /= np.linalg.norm(v, axis=0)
    u = np.asarray(lr.loadings[:, :n_components], dtype=np.float64) / root_a[:, None]
    u /= np.linalg.norm(u, axis=0)
    tau = counts.reshape(-1, n_channels) / a[:, None] / b[None, :]
    if n_components**2 < n_channels:  # tau (V Vᵀ)∘² = (tau Z) Zᵀ with Z_j,(lm) = V_jl V_jm: O(n d k²), not O(n d²)
        z = (v[:, :, None] * v[:, None, :]).reshape(n_channels, -1)
        through = (tau @ z) @ z.T
    else:
        through = tau @ (v @ v.T) ** 2
    kept = through + np.sum(u**2, axis=1)[:, None] * tau
    if algorithm == "NMF":
        options = {"init": "nndsvda", "max_iter": 5000, "random_state": random_state} | kwargs
        with _quiet_decomposition():
            work.decomposition(normalize_poissonian_noise=True, algorithm="NMF", output_dimension=n_components,
                               print_info=False, **options)
    with _quiet_decomposition():
        model = work.get_decomposition_model(n_components)
    factor = n_components * (n_pixels + n_channels - n_components) / (n_pixels * n_channels)
    fraction = (kept / np.where(tau > 0, tau, np.inf)).reshape(data.shape)  # kept / raw noise, per value
    fraction = np.where(tau.reshape(data.shape) > 0, fraction, factor)
    given = signal.metadata.get_item("Signal.Noise_properties.variance")
    if given is None:
        noise = calibration * (kept * a[:, None] * b[None, :]).reshape(data.shape)
    else:
        noise = fraction * np.broadcast_to(np.asarray(getattr(given, "data", given), dtype=np.float64), data.shape)
    out = signal._deepcopy_with_new_data(np.asarray(model.data, dtype=np.float64))
    out.metadata.set_item("Signal.Noise_properties.variance", signal._deepcopy_with_new_data(noise))
    out.metadata.General.title = f"{signal.metadata.General.title} ({algorithm}, {n_components} components)"
    info = Decomposition(algorithm=algorithm, n_components=n_components, chosen_from_data=chosen,
                         explained_variance=variance, noise_edge=edge, noise_calibration=calibration, elbow=elbow,
                         variance_factor=float(factor))
    return out, info


@contextlib.contextmanager
def _quiet_decomposition():
    """HyperSpy logs its decomposition at INFO level; keep it out of the notebooks."""
    logger = logging.getLogger("hyperspy")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
