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
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
from scipy import ndimage

__all__ = ["gaussian_weights", "pool_spectra"]


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
