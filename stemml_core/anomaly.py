"""Anomaly detection shared by the EELS and 4D-STEM analyses: which pixels the data's model does not explain.

:class:`AnomalyDetector` learns a low-rank model of feature vectors (square-root scaled spectra or
diffraction patterns) by PCA and scores each sample by its standardised reconstruction error,
optionally also by its density in the reduced space; the threshold is set by a false-alarm rate
from a robust (median/MAD) estimate of the clean population, so that a few anomalies in the
training data neither become part of the model nor raise the threshold.
:func:`anomaly_map` applies it to a spectrum image (one signal axis) or a 4D-STEM scan (two).

Nothing here knows spectra or lattices; :mod:`stemml_core.eels` and :mod:`stemml_core.diffraction`
may use it, as they use :mod:`stemml_core.segment`.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import numpy as np
from hyperspy.signal import BaseSignal
from scipy.stats import norm
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from sklearn.utils.validation import check_is_fitted, validate_data

from stemml_core.blocks import navigation_map
from stemml_core.segment import pattern_features

__all__ = ["AnomalyDetector", "AnomalyMap", "anomaly_map", "spectrum_features"]

# 1.4826 MAD estimates the standard deviation of a normal distribution.
_MAD_TO_SIGMA = 1.0 / norm.ppf(0.75)


def _check_false_alarm(false_alarm) -> float:
    if not (isinstance(false_alarm, (float, int, np.floating)) and 0.0 < false_alarm < 1.0):
        raise ValueError(
            f"false_alarm={false_alarm!r}; expected the fraction of clean samples to flag, a number in (0, 1) "
            "such as 1e-3."
        )
    return float(false_alarm)


def _robust_location_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based standard deviation (floored at a tiny positive value)."""
    centre = float(np.median(values))
    scale = _MAD_TO_SIGMA * float(np.median(np.abs(values - centre)))
    return centre, max(scale, 1e-12 * max(abs(centre), 1.0))


def _marchenko_pastur_median(beta: float) -> float:
    """Median of the Marchenko-Pastur distribution of aspect ratio ``beta`` in (0, 1], unit noise."""
    lower, upper = (1 - np.sqrt(beta)) ** 2, (1 + np.sqrt(beta)) ** 2
    x = np.linspace(lower, upper, 20001)
    density = np.sqrt(np.clip((upper - x) * (x - lower), 0, None)) / (2 * np.pi * beta * np.maximum(x, 1e-12))
    cumulative = np.cumsum(density)
    return float(np.interp(0.5, cumulative / cumulative[-1], x))


def _noise_from_spectrum(X: np.ndarray) -> float:
    """Noise variance per feature from the median singular value (Gavish & Donoho 2014)."""
    n, d = X.shape
    centred = X - X.mean(axis=0)
    gram = centred @ centred.T if n <= d else centred.T @ centred
    eigenvalues = np.clip(np.linalg.eigvalsh(gram), 0, None)
    beta = min(n, d) / max(n, d)
    noise = float(np.median(eigenvalues)) / (max(n, d) * _marchenko_pastur_median(beta))
    return noise if noise > 0 else 1e-300


def spectrum_features(spectra) -> tuple[np.ndarray, np.ndarray]:
    """Square-root scaled spectra and the variance their Poisson noise is expected to have.

    Parameters
    ----------
    spectra : array_like
        ``(n, n_energy)`` counts (electrons; small negative values from read noise are clipped to 0).

    Returns
    -------
    features : numpy.ndarray
        ``(n, n_energy)`` float64, ``sqrt((max(c, 0) + 3/8) / N)`` for the counts ``c`` of each
        channel and ``N`` of the whole spectrum (dimensionless).
    noise_variance : numpy.ndarray
        ``(n,)`` the expected variance of each feature of a spectrum, ``1 / (4 N)``.

    Raises
    ------
    ValueError
        Not 2D, or a spectrum with no positive total counts.

    Notes
    -----
    The square root (Anscombe) makes the variance of Poisson counts about ``1/4`` whatever the
    mean, so after dividing by ``N`` every channel of a spectrum has the noise variance ``1 / (4N)``;
    the ``3/8`` keeps that true down to a few counts.
    """
    spectra = np.asarray(spectra, dtype=np.float64)
    if spectra.ndim != 2 or 0 in spectra.shape:
        raise ValueError(f"spectra has shape {spectra.shape}; expected (n, n_energy) counts.")
    total = spectra.sum(axis=1)
    empty = ~(total > 0)
    if empty.any():
        raise ValueError(
            f"{int(empty.sum())} spectra have no positive total counts, the first at index {int(np.argmax(empty))}; "
            "expected counts in every spectrum: remove or mask empty pixels."
        )
    features = np.sqrt((np.clip(spectra, 0.0, None) + 0.375) / total[:, None])
    return features, 1.0 / (4.0 * total)


class AnomalyDetector(BaseEstimator):
    """Flags samples that a PCA model of the (mostly clean) training data does not explain.

    Parameters
    ----------
    n_components : int or None
        Principal components of the model. None: the components whose variance exceeds the largest
        one pure noise would give (the Marchenko-Pastur edge ``(1 + sqrt(d / n))^2`` times the noise
        variance, for ``n`` samples of ``d`` features; the noise variance is the median of the given
        ``noise_variance``, or else estimated from the median singular value of the centred data,
        Gavish & Donoho, IEEE Trans. Inf. Theory 60, 5040 (2014)), at most ``max_components``, and
        of those only the ones that ``min_support`` of the samples share.
    false_alarm : float
        Fraction of clean samples to flag, in (0, 1): sets ``threshold_``.
    max_components : int
        Largest number of components considered when ``n_components`` is None.
    min_support : float
        A component (with ``n_components=None``) is kept only when its variance over the samples
        outside its ``ceil(min_support * n)`` largest scores still exceeds the noise edge: structure
        seen in fewer samples is itself anomalous, not part of the model. In [0, 1).
    density_components : int
        0: score by the reconstruction error alone. ``k > 0``: also by the Mahalanobis distance of
        the PCA scores to the nearest component of a ``k``-component Gaussian mixture fitted on them
        (``k = 1``: one Gaussian), which flags samples the model reconstructs well but with unusual
        weights.
    random_state : int, numpy.random.RandomState or None
        Seed of the randomised PCA solver and of the mixture's initialisation.

    Attributes
    ----------
    pca_ : sklearn.decomposition.PCA
        PCA fitted on the training samples not flagged by a first pass.
    components_ : numpy.ndarray
        ``(n_components_, n_features)`` orthonormal components of the model.
    selected_ : numpy.ndarray
        ``(n_components_,)`` int, which components of ``pca_`` they are.
    mean_ : numpy.ndarray
        ``(n_features,)`` mean of the samples the PCA was fitted on.
    n_components_ : int
        Number of components kept.
    noise_variance_ : float
        Noise variance per feature used when ``score_samples`` gets no ``noise_variance``: when
        ``fit`` got none, the median over the training samples of the mean squared residual
        (per residual degree of freedom); else the median of the given variances.
    location_, scale_ : numpy.ndarray
        ``(n_terms,)`` median and MAD-based standard deviation of each raw score term
        (``log`` reduced chi², then the cube root of the squared Mahalanobis distance) over the
        training data.
    threshold_ : float
        ``score_samples`` above which a sample is anomalous, ``Phi^-1(1 - false_alarm / n_terms)``.
    density_ : sklearn.mixture.GaussianMixture or None
        The fitted mixture when ``density_components > 0``.
    n_features_in_ : int

    Notes
    -----
    1. The reconstruction error of a sample ``x`` with expected noise variance ``s^2`` per feature is
       the reduced chi-square ``r = |x - x_hat|^2 / (s^2 (d - k))``, ``x_hat`` its projection on the
       ``k`` components: about 1 when the model explains the sample to within its noise.
    2. Each score term ``u`` (``log r``; ``(D^2)^(1/3)``, Wilson-Hilferty's near-normal transform of
       the squared Mahalanobis distance ``D^2``) is standardised robustly,
       ``z = (u - median(u)) / (1.4826 MAD(u))`` over the training samples; the score is the largest
       ``z``. A clean population with a near-normal ``u`` gives ``P(z > Phi^-1(1 - a)) = a``; the
       median and MAD do not move when a few percent of the samples are anomalous.
    3. The fit runs twice: the samples flagged by the first model, and those of extreme leverage
       (robust z of ``(sum_j t_j^2 / lambda_j)^(1/3)`` above the threshold, for scores ``t_j`` and
       variances ``lambda_j`` of the kept components), are left out of the second PCA, so that
       anomalies that took a component of their own lose it. ``min_support`` guards the same way
       within one fit. The location and scale of the score terms come from all training samples.

    Unlike scikit-learn's outlier detectors, ``score_samples`` is higher for more anomalous samples.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(500, 2)) @ rng.normal(size=(2, 40)) + 0.1 * rng.normal(size=(500, 40))
    >>> x[:3] += 1.0 * rng.normal(size=(3, 40))
    >>> detector = AnomalyDetector(false_alarm=1e-3, random_state=0).fit(x)
    >>> detector.n_components_, np.flatnonzero(detector.predict(x))
    (2, array([0, 1, 2]))
    """

    def __init__(self, n_components=None, *, false_alarm=1e-3, max_components=30, min_support=0.02,
                 density_components=0, random_state=None):
        self.n_components = n_components
        self.false_alarm = false_alarm
        self.max_components = max_components
        self.min_support = min_support
        self.density_components = density_components
        self.random_state = random_state

    def _noise(self, noise_variance, n_samples):
        if noise_variance is None:
            return np.full(n_samples, self.noise_variance_)
        noise = np.broadcast_to(np.asarray(noise_variance, dtype=np.float64), (n_samples,))
        if not (np.isfinite(noise).all() and (noise > 0).all()):
            raise ValueError(
                f"noise_variance has non-finite or non-positive values (min {noise.min():g}); expected a positive "
                "variance per sample (e.g. 1 / (4 N) for square-root scaled counts N), or None to estimate it."
            )
        return noise

    def _residual_ss(self, X):
        centred = X - self.mean_
        scores = centred @ self.components_.T
        residual = centred - scores @ self.components_
        return np.einsum("ij,ij->i", residual, residual), scores

    def _select(self, pca, X, noise):
        if self.n_components is not None:
            return np.arange(self.n_components)
        n, d = X.shape
        edge = (1.0 + np.sqrt(d / n)) ** 2 * noise
        keep = []
        top = max(1, ceil(self.min_support * n))
        scores = pca.transform(X)
        for j, variance in enumerate(pca.explained_variance_):
            if variance <= edge:
                break
            power = np.sort(scores[:, j] ** 2)[::-1]
            if power[top:].mean() > edge:  # still above the noise without its largest scores
                keep.append(j)
        return np.asarray(keep, dtype=int)

    def _fit_model(self, X, noise):
        n, d = X.shape[0], X.shape[1]
        k_max = self.n_components if self.n_components is not None else min(self.max_components, n - 1, d)
        pca = PCA(n_components=k_max, random_state=self.random_state)
        pca.fit(X)
        if noise is None:
            noise = _noise_from_spectrum(X)
        selected = self._select(pca, X, noise)
        self.pca_ = pca
        self.mean_ = pca.mean_
        self.components_ = pca.components_[selected]
        self.n_components_ = int(selected.size)
        self.selected_ = selected

    def _terms(self, X, noise):
        ss, scores = self._residual_ss(X)
        dof = max(X.shape[1] - self.n_components_, 1)
        chi2 = ss / (noise * dof)
        terms = [np.log(np.maximum(chi2, 1e-300))]
        if self.density_ is not None:
            terms.append(np.cbrt(self._mahalanobis2(scores)))
        return np.column_stack(terms), chi2

    def _mahalanobis2(self, scores):
        """Squared Mahalanobis distance of each sample's scores to the nearest mixture component."""
        gmm = self.density_
        distances = [np.sum(((scores - mean) @ chol) ** 2, axis=1)
                     for mean, chol in zip(gmm.means_, gmm.precisions_cholesky_)]
        return np.min(distances, axis=0)

    def fit(self, X, y=None, *, noise_variance=None):
        """Learn the model and the threshold from mostly clean samples.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Feature vectors, e.g. :func:`spectrum_features` or
            :func:`~stemml_core.segment.pattern_features`; finite.
        y : Ignored
        noise_variance : float or array-like of shape (n_samples,), optional
            Expected noise variance of each feature of each sample (``1 / (4 N)`` for square-root
            scaled counts ``N``). None: estimated as the median mean squared residual.

        Returns
        -------
        self : AnomalyDetector

        Raises
        ------
        ValueError
            A bad hyper-parameter (naming it), non-finite ``X``, too few samples.
        """
        _check_false_alarm(self.false_alarm)
        if not 0.0 <= self.min_support < 1.0:
            raise ValueError(f"min_support={self.min_support!r}; expected a fraction in [0, 1).")
        if not (isinstance(self.density_components, (int, np.integer)) and self.density_components >= 0):
            raise ValueError(f"density_components={self.density_components!r}; expected an integer >= 0 (0: off).")
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=3, ensure_min_features=2)
        n, d = X.shape
        if self.n_components is not None and not (
                isinstance(self.n_components, (int, np.integer)) and 1 <= self.n_components < min(n, d)):
            raise ValueError(
                f"n_components={self.n_components!r} for {n} samples of {d} features; expected an integer from 1 "
                f"to {min(n, d) - 1}, or None to choose it from the noise level."
            )
        given = None if noise_variance is None else np.broadcast_to(
            np.asarray(noise_variance, dtype=np.float64), (n,))
        if given is not None and not (np.isfinite(given).all() and (given > 0).all()):
            raise ValueError("noise_variance has non-finite or non-positive values; expected a positive variance "
                             "per sample, or None to estimate it.")
        inliers = np.ones(n, bool)
        for _ in range(2):  # second pass: refit without the samples the first flagged
            self._fit_model(X[inliers], None if given is None else float(np.median(given[inliers])))
            if given is None:
                ss, _ = self._residual_ss(X)
                self.noise_variance_ = float(np.median(ss)) / max(d - self.n_components_, 1)
                self.noise_variance_ = max(self.noise_variance_, 1e-300)
            else:
                self.noise_variance_ = float(np.median(given))
            noise = self._noise(given, n)
            self.density_ = None
            if self.density_components:
                if self.n_components_ == 0:
                    raise ValueError("density_components > 0 needs at least one principal component; the model kept "
                                     "none: set n_components or density_components=0.")
                _, scores = self._residual_ss(X[inliers])
                self.density_ = GaussianMixture(self.density_components, random_state=self.random_state)
                self.density_.fit(scores)
            terms, _ = self._terms(X, noise)
            location, scale = zip(*(_robust_location_scale(t) for t in terms.T))
            self.location_, self.scale_ = np.array(location), np.array(scale)
            self.threshold_ = float(norm.isf(self.false_alarm / terms.shape[1]))
            inliers = self._standardised(terms) <= self.threshold_
            if self.n_components_:  # and leave out samples of extreme leverage (which own a component)
                _, scores = self._residual_ss(X)
                leverage = np.cbrt(np.sum(scores**2 / self.pca_.explained_variance_[self.selected_], axis=1))
                centre, scale = _robust_location_scale(leverage)
                inliers &= (leverage - centre) / scale <= self.threshold_
        return self

    def _standardised(self, terms):
        return ((terms - self.location_) / self.scale_).max(axis=1)

    def reconstruction_error(self, X, *, noise_variance=None):
        """Reduced chi-square of each sample's PCA residual, about 1 when the model explains it.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        noise_variance : float or array-like of shape (n_samples,), optional
            As in :meth:`fit`; None uses ``noise_variance_``.

        Returns
        -------
        numpy.ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return self._terms(X, self._noise(noise_variance, X.shape[0]))[1]

    def score_samples(self, X, *, noise_variance=None):
        """Anomaly score: robust z of the score terms (higher is more anomalous).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        noise_variance : float or array-like of shape (n_samples,), optional
            As in :meth:`fit`; None uses ``noise_variance_``.

        Returns
        -------
        numpy.ndarray of shape (n_samples,)
            Dimensionless; compare with ``threshold_``.
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return self._standardised(self._terms(X, self._noise(noise_variance, X.shape[0]))[0])

    def predict(self, X, *, noise_variance=None):
        """True for the samples whose score exceeds ``threshold_``.

        Returns
        -------
        numpy.ndarray of bool, shape (n_samples,)
        """
        return self.score_samples(X, noise_variance=noise_variance) > self.threshold_


@dataclass(frozen=True)
class AnomalyMap:
    """Anomaly scores of every pixel, from :func:`anomaly_map`.

    Attributes
    ----------
    score : hyperspy.signal.BaseSignal
        Anomaly score of each pixel (dimensionless robust z, see :class:`AnomalyDetector`), the
        input's navigation axes and no signal axis.
    anomalous : hyperspy.signal.BaseSignal
        bool, True where ``score > threshold``.
    ranked : numpy.ndarray
        ``(n_anomalous, n_nav)`` int, the navigation indices in array order (row, col) of the
        anomalous pixels, highest score first.
    threshold : float
        Score threshold; ``false_alarm`` of clean pixels are expected above it.
    model : AnomalyDetector
        The fitted detector (its features: :func:`spectrum_features` for spectra,
        :func:`~stemml_core.segment.pattern_features` for patterns).
    """

    score: BaseSignal
    anomalous: BaseSignal
    ranked: np.ndarray
    threshold: float
    model: AnomalyDetector


def anomaly_map(signal, *, false_alarm=1e-3, n_components=None, random_state=0, density_components=0,
                bin_factor=4, min_support=0.02, max_components=30) -> AnomalyMap:
    """Anomaly score and flags of every pixel of a spectrum image or 4D-STEM scan.

    Parameters
    ----------
    signal : hyperspy.signal.BaseSignal
        Counts (electrons): spectra ``(*nav | n_energy)`` (one signal axis) or diffraction patterns
        ``(*nav | H, W)`` (two), at least one navigation axis, finite. A lazy signal is computed:
        the model is fitted on every pixel.
    false_alarm : float
        Expected fraction of clean pixels flagged, in (0, 1).
    n_components, density_components, min_support, max_components, random_state
        As in :class:`AnomalyDetector`.
    bin_factor : int
        Detector binning of the patterns (:func:`~stemml_core.segment.pattern_features`).

    Returns
    -------
    AnomalyMap

    Raises
    ------
    ValueError
        Not a signal with one or two signal axes and a navigation axis, non-finite data, a
        pixel without counts, ``false_alarm`` outside (0, 1).

    Notes
    -----
    The noise is Poisson: each feature's expected variance is ``1 / (4 N)`` for a pixel of ``N``
    counts. Eager and lazy input give the same scores.

    Examples
    --------
    >>> from stemml_core.synthetic.anomalies import lowloss_anomalies
    >>> signal, truth = lowloss_anomalies((12, 16), n_contaminated=2)
    >>> result = anomaly_map(signal)
    >>> bool(result.anomalous.data[truth.anomalous].all())
    True
    """
    false_alarm = _check_false_alarm(false_alarm)
    dims = signal.axes_manager.signal_dimension if isinstance(signal, BaseSignal) else None
    if dims not in (1, 2) or signal.axes_manager.navigation_dimension == 0:
        raise ValueError(
            f"anomaly_map got {type(signal).__name__}"
            + (f" with {dims} signal and {signal.axes_manager.navigation_dimension} navigation axes"
               if dims is not None else "")
            + "; expected a HyperSpy spectrum image (one signal axis) or 4D-STEM scan (two signal axes) with at "
            "least one navigation axis."
        )
    am = signal.axes_manager
    nav_shape = tuple(am.navigation_shape[::-1])
    data = signal.data.compute() if signal._lazy else signal.data
    flat = np.asarray(data, dtype=np.float64).reshape(int(np.prod(nav_shape)), *am.signal_shape[::-1])
    bad = ~np.isfinite(flat).reshape(flat.shape[0], -1).all(axis=1)
    if bad.any():
        first = np.unravel_index(int(np.argmax(bad)), nav_shape)
        raise ValueError(
            f"signal has NaN or infinite values in {int(bad.sum())} pixel(s), the first at navigation index "
            f"{tuple(int(i) for i in first)}; expected finite counts: replace or mask them first."
        )
    if dims == 1:
        features, noise = spectrum_features(flat)
    else:
        features = pattern_features(flat, bin_factor=bin_factor)
        noise = 1.0 / (4.0 * flat.sum(axis=(1, 2)))
    model = AnomalyDetector(n_components, false_alarm=false_alarm, max_components=max_components,
                            min_support=min_support, density_components=density_components,
                            random_state=random_state).fit(features, noise_variance=noise)
    score = model.score_samples(features, noise_variance=noise)
    flagged = score > model.threshold_
    order = np.flatnonzero(flagged)[np.argsort(-score[flagged], kind="stable")]
    ranked = np.column_stack(np.unravel_index(order, nav_shape)).astype(int)
    return AnomalyMap(
        navigation_map(score.reshape(nav_shape), signal, title="Anomaly score", quantity="Anomaly score (z)"),
        navigation_map(flagged.reshape(nav_shape), signal, title="Anomalous pixels", quantity="Anomalous"),
        ranked,
        model.threshold_,
        model,
    )
