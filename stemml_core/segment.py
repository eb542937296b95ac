"""Unsupervised grouping of pixels, shared by the EELS and 4D-STEM analyses.

:class:`SortedKMeans` is scikit-learn's k-means with its clusters numbered in a
fixed order, so that the same data and seed always give the same label for the
same physical region. :func:`segment_by_intensity` applies it to the log of the
integrated intensity of each pixel, the thickness proxy of low-loss EELS
(Roest 2021) and a coarse specimen/vacuum separation for diffraction patterns.
"""

import numpy as np
from sklearn.cluster import KMeans

__all__ = ["SortedKMeans", "log_total_intensity", "segment_by_intensity"]


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
