"""Unsupervised grouping of pixels, shared by the EELS and 4D-STEM analyses.

:class:`SortedKMeans` is scikit-learn's k-means with its clusters numbered in a
fixed order, so that the same data and seed always give the same label for the
same physical region. :func:`segment_by_intensity` applies it to the log of the
integrated intensity of each pixel, the thickness proxy of low-loss EELS
(Roest 2021) and a coarse specimen/vacuum separation for diffraction patterns.
:func:`segment_patterns` clusters whole diffraction patterns (vacuum, specimen,
grains, domains): centred, binned, square-root scaled patterns, reduced by PCA and
clustered by :class:`SortedKMeans`.

Nothing here knows lattices or calibrations: the 4D-STEM analyses
(:mod:`stemml_core.diffraction`) use these segmentations, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import numpy as np
import scipy.fft
from hyperspy.signal import BaseSignal
from hyperspy.signals import Signal2D
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer

from stemml_core.blocks import _navigation_signal, compute_map, map_pixels, navigation_map

__all__ = [
    "PatternSegmentation",
    "SortedKMeans",
    "log_total_intensity",
    "pattern_features",
    "segment_by_intensity",
    "segment_patterns",
]


class SortedKMeans(KMeans):
    """K-means whose clusters are numbered in ascending order of their centres.

    Same parameters, attributes and methods as :class:`sklearn.cluster.KMeans`;
    after ``fit`` the centres are sorted lexicographically (first feature
    first), so for a single feature label 0 is the cluster with the smallest
    value. k-means itself numbers its clusters in the order its random
    initialisation found them, which changes with the seed.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[5.0], [0.1], [5.2], [0.0], [9.9], [10.0]])
    >>> SortedKMeans(n_clusters=3, random_state=0).fit(x).labels_
    array([1, 0, 1, 0, 2, 2], dtype=int32)
    """

    def fit(self, X, y=None, sample_weight=None):
        """Compute the k-means clustering, then sort the clusters.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Points to cluster.
        y : Ignored
            Present for API consistency.
        sample_weight : array-like of shape (n_samples,), optional
            Weight of each point.

        Returns
        -------
        self : SortedKMeans
            The fitted estimator.
        """
        super().fit(X, y, sample_weight=sample_weight)
        centers = self.cluster_centers_
        order = np.lexsort(centers.T[::-1])
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        self.cluster_centers_ = centers[order]
        self.labels_ = rank[self.labels_].astype(self.labels_.dtype)
        return self


def log_total_intensity(data, *, axis=-1):
    """Natural log of the integrated intensity of each pixel, ln N_tot.

    Parameters
    ----------
    data : array-like of shape (*nav, *signal)
        Counts, e.g. spectra ``(n_rows, n_cols, n_energy)`` or diffraction
        patterns ``(n_rows, n_cols, n_ky, n_kx)``.
    axis : int or tuple of int, default -1
        The signal axes, summed over.

    Returns
    -------
    log_total : ndarray of shape nav
        ln of the summed counts of each pixel (dimensionless).

    Raises
    ------
    ValueError
        If a pixel's summed counts are zero or negative (an empty or
        over-subtracted pixel has no log intensity).
    """
    total = np.sum(np.asarray(data, dtype=np.float64), axis=axis)
    bad = ~(total > 0)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{int(bad.sum())} pixel(s) have zero or negative total counts, the "
            f"first at index {first} (sum {total[first]:g}); ln N_tot needs "
            "positive counts: remove or mask these pixels."
        )
    return np.log(total)


def segment_by_intensity(data, n_clusters=5, *, axis=-1, random_state=None):
    """Label map of k-means clusters of ln N_tot, numbered by ascending intensity.

    Parameters
    ----------
    data : array-like of shape (*nav, *signal)
        Counts per pixel, e.g. ``(n_rows, n_cols, n_energy)``.
    n_clusters : int, default 5
        Number of clusters; at most the number of pixels.
    axis : int or tuple of int, default -1
        The signal axes, summed to the integrated intensity N_tot.
    random_state : int, numpy.random.RandomState or None
        Seed of the k-means initialisation.

    Returns
    -------
    labels : ndarray of int of shape nav
        Cluster of each pixel, 0 for the lowest ln N_tot.

    Raises
    ------
    ValueError
        If a pixel has no positive counts or there are fewer pixels than
        clusters.

    Examples
    --------
    >>> import numpy as np
    >>> counts = np.array([[[10.0, 90.0], [1e3, 1e3]], [[5.0, 95.0], [1.0, 3e3]]])
    >>> segment_by_intensity(counts, n_clusters=2, random_state=0)
    array([[0, 1],
           [0, 1]], dtype=int32)
    """
    log_total = log_total_intensity(data, axis=axis)
    if log_total.size < n_clusters:
        raise ValueError(
            f"n_clusters={n_clusters} exceeds the number of pixels ({log_total.size}); "
            f"use n_clusters <= {log_total.size}."
        )
    model = SortedKMeans(n_clusters=n_clusters, n_init=10, random_state=random_state)
    model.fit(log_total.reshape(-1, 1))
    return model.labels_.reshape(log_total.shape)


def pattern_features(patterns, *, bin_factor: int = 4) -> np.ndarray:
    """Centred, binned, square-root scaled diffraction patterns: the input of the clustering.

    Parameters
    ----------
    patterns : array_like
        ``(n, H, W)`` patterns, counts (any non-negative intensities).
    bin_factor : int
        Sum blocks of ``bin_factor x bin_factor`` detector pixels (rows and columns beyond a
        whole number of blocks are left out).

    Returns
    -------
    numpy.ndarray
        ``(n, (H // bin_factor) * (W // bin_factor))`` float64, ``sqrt(N_b / N)`` for the counts
        ``N_b`` of each bin of the centred pattern and ``N`` of the whole pattern
        (dimensionless; each row has a norm of about 1).

    Raises
    ------
    ValueError
        ``patterns`` is not 3D, ``bin_factor`` is not a positive integer no larger than the
        detector, or a pattern has no positive counts.

    Notes
    -----
    1. Each pattern is divided by its total ``N``, which removes the dose and slow intensity
       drifts: patterns group by the shape of their intensity distribution (vacuum: the direct
       beam alone; crystal: Bragg disks whose positions depend on the orientation).
    2. It is moved (Fourier shift, periodic at the detector edges) so that the centroid of its
       brightest feature (the intensity above half the pattern's maximum: the direct beam of a
       thin specimen) lies on pixel ``(H // 2, W // 2)``; descan, which would otherwise be a
       leading principal component, drops out.
    3. Binning speeds the reduction up ``bin_factor**2`` times.
    4. The square root makes Poisson noise about uniform (variance ``1 / (4 N)`` per bin,
       Anscombe), so that no bin dominates the principal components by its noise alone.

    Examples
    --------
    >>> patterns = np.zeros((2, 4, 4)); patterns[0, 0, 1] = 9.0; patterns[1, 3, 0] = 4.0
    >>> np.round(pattern_features(patterns, bin_factor=2), 6) + 0.0  # both moved to pixel (2, 2)
    array([[0., 0., 0., 1.],
           [0., 0., 0., 1.]])
    """
    patterns = np.asarray(patterns)
    if patterns.ndim != 3 or 0 in patterns.shape:
        raise ValueError(f"patterns has shape {patterns.shape}; expected (n, H, W) diffraction patterns.")
    n, height, width = patterns.shape
    if not (isinstance(bin_factor, (int, np.integer)) and 1 <= bin_factor <= min(height, width)):
        raise ValueError(
            f"bin_factor={bin_factor!r}; expected an integer from 1 to the detector's smaller side "
            f"({min(height, width)} px)."
        )
    total = patterns.sum(axis=(1, 2), dtype=np.float64)
    empty = ~(total > 0)
    if empty.any():
        raise ValueError(
            f"{int(empty.sum())} pattern(s) have no positive counts, the first at index {int(np.argmax(empty))}; "
            "expected counts in every pattern: remove or mask empty frames."
        )
    fraction = (patterns / total[:, None, None]).astype(np.float32)
    bright = np.clip(fraction - fraction.max(axis=(1, 2), keepdims=True) / 2, 0, None).astype(np.float64)
    weight = bright.sum(axis=(1, 2))
    shift_row = bright.sum(axis=2) @ np.arange(height) / weight - height // 2
    shift_col = bright.sum(axis=1) @ np.arange(width) / weight - width // 2
    ramp_row = np.exp(2j * np.pi * scipy.fft.fftfreq(height) * shift_row[:, None]).astype(np.complex64)
    ramp_col = np.exp(2j * np.pi * scipy.fft.rfftfreq(width) * shift_col[:, None]).astype(np.complex64)
    spectrum = scipy.fft.rfft2(fraction) * ramp_row[:, :, None] * ramp_col[:, None, :]
    centred = scipy.fft.irfft2(spectrum, s=(height, width)).astype(np.float64)
    rows, cols = height // bin_factor, width // bin_factor
    cropped = centred[:, : rows * bin_factor, : cols * bin_factor]
    binned = cropped.reshape(n, rows, bin_factor, cols, bin_factor).sum(axis=(2, 4)).reshape(n, -1)
    return np.sqrt(np.clip(binned, 0, None))


@dataclass(frozen=True)
class PatternSegmentation:
    """Clusters of diffraction patterns from :func:`segment_patterns`.

    Attributes
    ----------
    labels : hyperspy.signal.BaseSignal
        Cluster of each scan position (int), the input's navigation axes and no signal axis;
        clusters are numbered ``0 .. n_clusters - 1`` in ascending order of their centres'
        first principal-component score (then the second, ...), as :class:`SortedKMeans`.
    scores : hyperspy.signal.BaseSignal
        Principal-component scores, the input's navigation axes and one signal axis
        ``component`` (``n_components``), dimensionless.
    mean_patterns : hyperspy.signals.Signal2D
        ``(n_clusters | H, W)`` mean of the patterns of each cluster among those the model was
        fitted on (data units), with the input's signal axes and a navigation axis ``cluster``:
        what each cluster looks like.
    model : sklearn.pipeline.Pipeline
        The fitted steps, features (:func:`pattern_features`) → ``PCA`` → :class:`SortedKMeans`;
        ``model.predict(patterns)`` labels further ``(n, H, W)`` patterns.
    fit_positions : numpy.ndarray
        ``(n_fit, n_nav)`` int, the navigation indices (array order) of the patterns the model
        was fitted on.
    """

    labels: BaseSignal
    scores: BaseSignal
    mean_patterns: Signal2D
    model: Pipeline
    fit_positions: np.ndarray

    def __post_init__(self):
        self.fit_positions.setflags(write=False)

    @property
    def n_clusters(self) -> int:
        """Number of clusters."""
        return self.mean_patterns.axes_manager.navigation_size


def _fit_grid(nav_shape: tuple[int, ...], max_patterns: int) -> tuple[slice, ...]:
    """Strided slices of the navigation axes that select at most ``max_patterns`` positions."""
    stride = max(1, ceil((np.prod(nav_shape) / max_patterns) ** (1 / len(nav_shape))))
    while np.prod([ceil(n / stride) for n in nav_shape]) > max_patterns:
        stride += 1
    return tuple(slice(None, None, stride) for _ in nav_shape)


def _label_block(block: np.ndarray, *, model: Pipeline) -> np.ndarray:
    """``(n, n_components + 1)``: the PCA scores and the cluster of each pattern of a block."""
    scores = model[:-1].transform(block)
    return np.column_stack([scores, model[-1].predict(scores)])


def segment_patterns(
    signal: BaseSignal,
    n_clusters: int = 3,
    *,
    n_components: int = 8,
    bin_factor: int = 4,
    max_fit_patterns: int = 1024,
    n_init: int = 10,
    random_state=None,
    block_pixels: int = 4096,
    progress: bool = True,
) -> PatternSegmentation:
    """Segment a 4D-STEM scan into regions of similar diffraction patterns.

    Parameters
    ----------
    signal : hyperspy.signals.Signal2D
        ``(*nav | H, W)`` patterns (any number of navigation axes, usually the scan's rows and
        columns), eager or lazy. No calibration is needed.
    n_clusters : int
        Number of clusters, e.g. 2 for specimen and vacuum, one more per grain or domain.
    n_components : int
        Principal components kept; at most the number of fitted patterns and of features.
    bin_factor : int
        Detector binning before the reduction, see :func:`pattern_features`.
    max_fit_patterns : int
        PCA and k-means are fitted on at most this many patterns, on a regular grid over the
        scan (every ``s``-th position along each navigation axis); then every pattern is labelled.
    n_init : int
        k-means initialisations; the best is kept.
    random_state : int, numpy.random.RandomState or None
        Seed of the PCA solver and of the k-means initialisation.
    block_pixels : int
        Patterns per block for in-memory input.
    progress : bool
        Show a text progress bar.

    Returns
    -------
    PatternSegmentation
        Label and score maps with the input's navigation axes, each cluster's mean pattern with
        its signal axes, the fitted model.

    Raises
    ------
    ValueError
        Not a signal with two signal axes, fewer fitted patterns than ``n_clusters`` or
        ``n_components``, an empty pattern, a bad ``bin_factor``.

    Notes
    -----
    1. The fit sample (a regular grid of at most ``max_fit_patterns`` positions, read once) is
       turned into features, `the patterns centred on their brightest feature, binned, ``sqrt`` of each bin's share of
       the pattern's counts (:func:`pattern_features`).
    2. PCA keeps the ``n_components`` directions of largest variance (vacuum against crystal,
       one orientation against another); the rest, mostly Poisson noise, is dropped.
    3. k-means (:class:`SortedKMeans`) groups the scores; the clusters are numbered in ascending
       order of their centres, so the same data and seed give the same labels.
    4. One pass over all patterns (:func:`~stemml_core.blocks.map_pixels`, chunk by chunk for a
       lazy signal, on any dask scheduler) gives every pattern's scores and cluster. Eager and
       lazy input give the same labels and mean patterns, and the same scores to rounding.

    Clustering diffraction patterns to find regions of one lattice, and so the reference of a
    strain map, follows :cite:`Bolhuis2024`; Shi et al. (npj Comput. Mater. 8, 114, 2022) cluster
    the patterns hierarchically to the same end.

    Examples
    --------
    >>> from stemml_core.synthetic import simulate_4dstem
    >>> vacuum = np.zeros((4, 6), bool); vacuum[:, :2] = True
    >>> signal, _ = simulate_4dstem(np.zeros((4, 6, 2, 2)), vacuum=vacuum, detector_shape=(64, 64),
    ...                             dose=1e5, random_state=0)
    >>> segmentation = segment_patterns(signal, n_clusters=2, n_components=2, random_state=0,
    ...                                 progress=False)
    >>> segmentation.labels.data
    array([[0, 0, 1, 1, 1, 1],
           [0, 0, 1, 1, 1, 1],
           [0, 0, 1, 1, 1, 1],
           [0, 0, 1, 1, 1, 1]])
    """
    if not isinstance(signal, BaseSignal) or signal.axes_manager.signal_dimension != 2:
        raise ValueError(
            f"segment_patterns got {type(signal).__name__}"
            + (f" with {signal.axes_manager.signal_dimension} signal axes" if isinstance(signal, BaseSignal) else "")
            + "; expected a HyperSpy signal of diffraction patterns (two signal axes), e.g. from io.load_4dstem."
        )
    am = signal.axes_manager
    if am.navigation_dimension == 0:
        raise ValueError("segment_patterns got a single pattern; expected a scan (one or more navigation axes).")
    nav_shape = tuple(am.navigation_shape[::-1])
    sig_shape = tuple(am.signal_shape[::-1])
    grid = _fit_grid(nav_shape, max_fit_patterns)
    sample = signal.data[grid]
    sample = np.asarray(sample.compute() if signal._lazy else sample).reshape(-1, *sig_shape)
    features = pattern_features(sample, bin_factor=bin_factor)
    if not 1 <= n_clusters <= len(features) or not 1 <= n_components <= min(features.shape):
        raise ValueError(
            f"n_clusters={n_clusters} and n_components={n_components} for {len(features)} fitted patterns of "
            f"{features.shape[1]} features; expected 1 <= n_clusters <= {len(features)} and 1 <= n_components <= "
            f"{min(features.shape)} (raise max_fit_patterns, lower bin_factor or lower the numbers)."
        )
    reduction = PCA(n_components=n_components, random_state=random_state).fit(features)
    clustering = SortedKMeans(n_clusters=n_clusters, n_init=n_init, random_state=random_state)
    clustering.fit(reduction.transform(features))
    model = make_pipeline(FunctionTransformer(pattern_features, kw_args={"bin_factor": bin_factor}),
                          reduction, clustering)
    fit_labels = clustering.labels_
    mean_patterns = Signal2D(
        np.stack([sample[fit_labels == k].mean(axis=0, dtype=np.float64) for k in range(n_clusters)]),
        axes=[{"name": "cluster", "size": n_clusters, "navigate": True}]
        + [axis.get_axis_dictionary() | {"navigate": False} for axis in am.signal_axes[::-1]],
    )
    mean_patterns.metadata.General.title = "Mean pattern of each cluster"
    mean_patterns.metadata.set_item("Signal.quantity", signal.metadata.get_item("Signal.quantity", "Intensity"))
    fit_positions = np.stack(np.meshgrid(*(np.arange(n)[s] for n, s in zip(nav_shape, grid)), indexing="ij"),
                             axis=-1).reshape(-1, len(nav_shape))

    mapped = map_pixels(
        signal,
        _label_block,
        output_shape=(n_components + 1,),
        block_pixels=block_pixels,
        progress=progress,
        description="Clusters",
        model=model,
    )
    values = compute_map(mapped, progress=progress, description="Clusters")
    scores = _navigation_signal(values[..., :n_components], signal,
                                [{"size": n_components, "name": "component"}], lazy=False)
    scores.metadata.General.title = "Principal-component scores"
    scores.metadata.set_item("Signal.quantity", "Score")
    labels = navigation_map(values[..., n_components].astype(int), signal, title="Clusters", quantity="Cluster")
    return PatternSegmentation(labels, scores, mean_patterns, model, fit_positions)
