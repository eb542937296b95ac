"""Energy-gain and energy-loss peak pairs around the zero-loss peak: fit, intervals, maps.

An excitation of energy Ev (a vibration, or the photons of a light field) gives a loss peak at +Ev and
a gain peak at -Ev; their intensity ratio is exp(-Ev / kT) for a vibration in thermal equilibrium
(detailed balance, EELS thermometry :cite:`Idrobo2018`) and about 1 for photon-induced sidebands.

Steps, per pixel:

1. **ZLP.** A ZLP model fitted where there is no specimen cannot contain gain or loss peaks: the
   ZLP ensemble of :mod:`stemml_core.eels.zlp` learns the ZLP from the region below dE1, which
   includes the gain side, so trained on specimen pixels it would learn the gain peak as part of the
   ZLP. :class:`VacuumZLP` therefore takes the ZLP shape from vacuum pixels (no specimen, so no gain or
   loss): Monte Carlo replicas of it are bootstrap means of the vacuum spectra, or the replicas of a
   :class:`~stemml_core.eels.zlp.ZLPEnsemble` fitted on the vacuum pixels alone and evaluated there.
   In a specimen pixel each replica is scaled to the pixel's ZLP core (|E| up to ``core``), where
   the peaks contribute nothing measurable; the ZLP is assumed not to change shape or position
   between vacuum and specimen (an aligned, monochromated beam).
2. **Replicas** of the subtracted spectrum: the spectrum plus a draw of its counting noise minus each
   scaled ZLP replica (:func:`~stemml_core.eels.replicas.inelastic_replicas`).
3. **Fit** (:func:`fit_gain_loss`) on the two side windows lo <= |E| <= hi: a polynomial background
   on each side plus one peak on each side (pseudo-Voigt, Lorentzian or Gaussian), by weighted least
   squares (``scipy.optimize.least_squares``), first on the median over the replicas (a few starts,
   and the significance of each peak from the chi^2 rise without it), then on every replica from that
   solution. The 16th, 50th and 84th percentiles over the replicas give the intervals.

:func:`map_gain_loss` does all of it on a spectrum image and returns Signal2D maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hyperspy.signal import BaseSignal
from scipy import constants
from scipy.ndimage import uniform_filter1d
from scipy.optimize import least_squares
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from .features import _check_energy, _profile
from .replicas import check_replica_input, inelastic_replicas, noise_variance
from .thickness import PERCENTILES, ReplicaInterval
from .zlp import zlp_fwhm

__all__ = [
    "BOLTZMANN_EV",
    "GainLossFit",
    "GainLossMaps",
    "VacuumZLP",
    "fit_gain_loss",
    "map_gain_loss",
]

#: Boltzmann constant, eV/K.
BOLTZMANN_EV = constants.physical_constants["Boltzmann constant in eV/K"][0]
_SHAPES = ("pseudo_voigt", "lorentzian", "gaussian")
# Area of a unit-height, unit-FWHM Gaussian and Lorentzian.
_GAUSS_AREA = 0.5 * math.sqrt(math.pi / math.log(2.0))
_LORENTZ_AREA = 0.5 * math.pi
# Fitted quantities, in the order of GainLossFit's interval fields.
_QUANTITIES = ("gain_energy", "loss_energy", "energy", "width", "eta", "gain_intensity", "loss_intensity", "ratio",
               "temperature")
# Channels of the running mean of the replicas' variance (the noise changes slowly with energy).
_NOISE_SMOOTHING = 5


# --------------------------------------------------------------------------
# The ZLP from vacuum
# --------------------------------------------------------------------------


class VacuumZLP(BaseEstimator):
    """ZLP replicas taken from vacuum pixels and scaled to each pixel's ZLP core.

    Parameters
    ----------
    n_replicas : int
        Bootstrap replicas of the vacuum mean (ignored with `ensemble`, whose kept replicas are used).
    core : float, optional
        Half-width of the ZLP core, eV, over which each replica is scaled to a pixel (least squares);
        default the FWHM of the vacuum ZLP.
    ensemble : stemml_core.eels.zlp.ZLPEnsemble, optional
        A ZLP ensemble fitted on vacuum spectra alone; its replicas, evaluated at the vacuum median
        spectrum, replace the bootstrap means.
    random_state : int
        Seed of the bootstrap draws.

    Attributes
    ----------
    energy_ : numpy.ndarray, shape (n_energy,)
        Energy axis, eV.
    reference_ : numpy.ndarray, shape (n_replicas, n_energy)
        ZLP replicas of the vacuum, counts per channel.
    fwhm_ : float
        FWHM of the vacuum median spectrum, eV.
    core_ : numpy.ndarray of bool, shape (n_energy,)
        Channels used to scale the ZLP to a pixel.

    Notes
    -----
    Bootstrap: replica m is the mean of as many vacuum spectra as there are, drawn with replacement;
    the spread of the replicas is the statistical uncertainty of the vacuum ZLP. A ZLP ensemble's
    networks can be used instead, but they must then reproduce the ZLP tail to a fraction of the gain
    peak (a few per mille of the ZLP maximum): measured on :func:`~stemml_core.synthetic.gain.gain_loss_sample`
    (104 vacuum spectra, 16 replicas, one cluster, default training) the ensemble's replicas scattered by
    20-40 % of the ZLP tail at +-0.15 eV, the bootstrap means by 0.3 %.
    """

    def __init__(self, n_replicas=32, *, core=None, ensemble=None, random_state=0):
        self.n_replicas = n_replicas
        self.core = core
        self.ensemble = ensemble
        self.random_state = random_state

    def fit(self, X, energy=None, *, vacuum=None):
        """Take the ZLP from vacuum spectra.

        Parameters
        ----------
        X : hyperspy Signal1D/EELSSpectrum or array_like, shape (..., n_energy)
            Spectra, counts. With `vacuum`, a spectrum image of which the vacuum pixels are used;
            without, spectra that are all vacuum.
        energy : array_like, shape (n_energy,), optional
            Energy axis, eV, for an array input; None for a signal.
        vacuum : array_like of bool, shape nav, optional
            True at the vacuum pixels of `X`.

        Returns
        -------
        self

        Raises
        ------
        ValueError
            Fewer than 2 vacuum spectra, a mask of another shape than the navigation, no ZLP on the
            axis, or bad options.
        """
        data, energy = _spectra_and_energy(X, energy)
        if vacuum is not None:
            mask = np.asarray(vacuum, dtype=bool)
            if mask.shape != data.shape[:-1]:
                raise ValueError(f"vacuum has shape {mask.shape}; expected the navigation shape {data.shape[:-1]} "
                                 "(True at the vacuum pixels)")
            data = data[mask]
        spectra = data.reshape(-1, energy.size).astype(np.float64)
        if spectra.shape[0] < 2:
            raise ValueError(f"{spectra.shape[0]} vacuum spectrum/spectra; expected at least 2 (the vacuum ZLP and "
                             "its bootstrap replicas)")
        if not np.all(np.isfinite(spectra)):
            raise ValueError("the vacuum spectra contain NaN or infinite counts; expected finite counts")
        if self.ensemble is None and (not isinstance(self.n_replicas, (int, np.integer)) or self.n_replicas < 2):
            raise ValueError(f"n_replicas={self.n_replicas!r}; expected an int >= 2")
        median = np.median(spectra, axis=0)
        if abs(energy[np.argmax(median)]) > 0.5 * (energy[-1] - energy[0]) or energy[0] >= 0 or energy[-1] <= 0:
            raise ValueError(
                f"no ZLP near 0 eV: the vacuum spectra peak at {energy[np.argmax(median)]:.3g} eV on the axis "
                f"[{energy[0]:.3g}, {energy[-1]:.3g}] eV; expected the ZLP at 0 eV with both energy gains (E < 0) "
                "and losses (E > 0) recorded"
            )
        fwhm = zlp_fwhm(energy, median)
        core = fwhm if self.core is None else float(self.core)
        inside = np.abs(energy) <= core
        if not core > 0 or inside.sum() < 3:
            raise ValueError(f"core={self.core!r} eV holds {int(inside.sum())} channels; expected a half-width "
                             "> 0 eV covering at least 3 channels of the ZLP core")
        if self.ensemble is not None:
            check_is_fitted(self.ensemble)
            reference = self.ensemble.predict_replicas(median[None], energy)[:, 0].astype(np.float64)
        else:
            rng = np.random.default_rng(self.random_state)
            draws = rng.integers(0, spectra.shape[0], (self.n_replicas, spectra.shape[0]))
            reference = np.stack([spectra[d].mean(axis=0) for d in draws])
        self.energy_, self.reference_, self.fwhm_, self.core_ = energy, reference, fwhm, inside
        return self

    def predict_replicas(self, X, energy=None, *, channels=None):
        """The ZLP of every spectrum from each replica, scaled to the spectrum's ZLP core.

        Parameters
        ----------
        X : array_like, shape (..., n_energy)
            Spectra, counts, on the axis of the fit.
        energy : array_like, shape (n_energy,)
            Energy axis, eV (checked against the fit's).
        channels : array_like of bool, shape (n_energy,), optional
            Channels to return; None for all.

        Returns
        -------
        numpy.ndarray, shape (n_replicas, ..., n_channels)
            Counts.
        """
        check_is_fitted(self, "reference_")
        spectra = np.asarray(X, dtype=np.float64)
        if energy is not None:
            energy = np.asarray(energy, dtype=np.float64)
            if energy.shape != self.energy_.shape or not np.allclose(energy, self.energy_):
                raise ValueError(
                    f"the energy axis ({energy.size} channels) differs from the one of the fit ({self.energy_.size} "
                    f"channels, {self.energy_[0]:.4g} to {self.energy_[-1]:.4g} eV)"
                )
        if spectra.shape[-1] != self.energy_.size:
            raise ValueError(f"spectra have shape {spectra.shape}; expected (..., {self.energy_.size})")
        flat = spectra.reshape(-1, self.energy_.size)
        ref = self.reference_[:, self.core_]  # (m, n_core)
        scale = (flat[:, self.core_] @ ref.T) / np.sum(ref**2, axis=1)  # (n, m)
        if channels is not None:
            channels = np.asarray(channels)
            if channels.dtype != bool or channels.shape != (self.energy_.size,):
                raise ValueError(f"channels is a {channels.dtype} array of shape {channels.shape}; expected a bool "
                                 f"mask of the {self.energy_.size} channels")
        selected = self.reference_ if channels is None else self.reference_[:, channels]
        out = scale.T[:, :, None] * selected[:, None, :]
        return out.reshape(out.shape[0], *spectra.shape[:-1], out.shape[-1])


def _spectra_and_energy(X, energy):
    if hasattr(X, "axes_manager"):
        if energy is not None:
            raise ValueError("energy is taken from the signal's axis; pass energy=None with a signal")
        axes = X.axes_manager.signal_axes
        if len(axes) != 1:
            raise ValueError(f"expected a signal with one energy axis, got {len(axes)} signal axes")
        energy = np.asarray(axes[0].axis, dtype=np.float64)
        data = np.asarray(X.data)
    else:
        if energy is None:
            raise ValueError("energy=None: an array input needs its energy axis (eV), shape (n_energy,)")
        data = np.asarray(X)
        energy = np.asarray(energy, dtype=np.float64)
    if energy.ndim != 1 or data.ndim < 1 or data.shape[-1] != energy.size:
        raise ValueError(f"spectra have shape {data.shape} and energy {energy.shape}; expected (..., n_energy) and "
                         "(n_energy,)")
    return data, _check_energy(energy)


# --------------------------------------------------------------------------
# The peak-pair model
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where each parameter sits: background coefficients, then the peaks' parameters."""

    n_background: int
    centre: tuple  # (gain, loss) indices
    width: tuple
    eta: tuple  # indices, or None where eta is fixed
    height: tuple
    fixed_eta: float  # eta where it is not fitted
    size: int


def _layout(n_background, shape, tie_shape):
    i = n_background
    free_eta = shape == "pseudo_voigt"
    if tie_shape:
        centre = (i, i + 1)
        width = (i + 2, i + 2)
        eta = (i + 3, i + 3) if free_eta else (None, None)
        i += 4 if free_eta else 3
        height = (i, i + 1)
        size = i + 2
    else:
        step = 4 if free_eta else 3
        centre = (i, i + step)
        width = (i + 1, i + step + 1)
        eta = (i + 2, i + step + 2) if free_eta else (None, None)
        height = (i + step - 1, i + 2 * step - 1)
        size = i + 2 * step
    return _Layout(n_background, centre, width, eta, height, 1.0 if shape == "lorentzian" else 0.0, size)


def _model(params, energy, basis, layout):
    """Model (n_w,) and Jacobian (n_w, n_params) of background (``basis``: one polynomial per side of the
    ZLP) + gain peak + loss peak (both peaks count on both sides)."""
    model = basis @ params[: layout.n_background]
    jac = np.zeros((energy.size, params.size))
    jac[:, : layout.n_background] = basis
    for side in (0, 1):  # each peak on both sides: a Lorentzian tail reaches across the ZLP
        c, w, h = params[layout.centre[side]], params[layout.width[side]], params[layout.height[side]]
        eta = layout.fixed_eta if layout.eta[side] is None else params[layout.eta[side]]
        g, g_c, g_w = _profile(energy, c, w, "gaussian")
        lo, l_c, l_w = _profile(energy, c, w, "lorentzian")
        profile = (1.0 - eta) * g + eta * lo
        model += h * profile
        jac[:, layout.centre[side]] += h * ((1.0 - eta) * g_c + eta * l_c)
        jac[:, layout.width[side]] += h * ((1.0 - eta) * g_w + eta * l_w)
        if layout.eta[side] is not None:
            jac[:, layout.eta[side]] += h * (lo - g)
        jac[:, layout.height[side]] += profile
    return model, jac


def _solve(y, inv_sigma, energy, basis, layout, x0, low, high, free):
    """Weighted least squares over the free parameters; (params, chi2), NaN params if it fails."""
    x0 = np.clip(x0, low, high)
    fixed = x0.copy()

    def full(p):
        x = fixed.copy()
        x[free] = p
        return x

    def residual(p):
        return (_model(full(p), energy, basis, layout)[0] - y) * inv_sigma

    def jacobian(p):
        return _model(full(p), energy, basis, layout)[1][:, free] * inv_sigma[:, None]

    fit = least_squares(residual, x0[free], jac=jacobian, bounds=(low[free], high[free]), method="trf",
                        x_scale="jac")
    if fit.status <= 0:
        return np.full_like(x0, np.nan), np.inf
    return full(fit.x), 2.0 * fit.cost


def _area(params, layout, side, step):
    """Integrated counts of a peak: height (counts per channel) x FWHM x the unit profile's area / dispersion."""
    eta = layout.fixed_eta if layout.eta[side] is None else params[..., layout.eta[side]]
    return params[..., layout.height[side]] * params[..., layout.width[side]] / step * (
        (1.0 - eta) * _GAUSS_AREA + eta * _LORENTZ_AREA)


# --------------------------------------------------------------------------
# Array function
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class GainLossFit:
    """Result of :func:`fit_gain_loss` for ``n`` pixels.

    Each interval field has shape (3, n): median, 16th and 84th percentile over the replicas
    (:data:`~stemml_core.eels.thickness.PERCENTILES`); NaN where the loss peak is not significant, and
    the gain energy, the mean energy and the temperature also where the gain peak is not.

    Attributes
    ----------
    gain_energy : numpy.ndarray
        Centre of the gain peak on the energy axis, eV (negative).
    loss_energy : numpy.ndarray
        Centre of the loss peak, eV (positive).
    energy : numpy.ndarray
        Excitation energy (loss - gain) / 2, eV: independent of an offset of the energy axis.
    width : numpy.ndarray
        Observed FWHM of the loss peak, eV (line width and instrument resolution).
    eta : numpy.ndarray
        Lorentzian fraction of the loss peak's pseudo-Voigt (1 Lorentzian, 0 Gaussian).
    gain_intensity, loss_intensity : numpy.ndarray
        Integrated counts of each peak (height x FWHM x the profile's area).
    ratio : numpy.ndarray
        Gain/loss intensity ratio.
    temperature : numpy.ndarray
        -energy / (k ln ratio), K: the temperature for which detailed balance gives the ratio
        (meaningful for vibrations in equilibrium only); NaN unless the ratio is in (0, 1) in at least
        84 % of the replicas (so not for photon-induced sidebands, ratio about 1).
    significance : numpy.ndarray, shape (n, 2)
        sqrt(chi^2 rise) of the median spectrum's fit without the gain, without the loss peak
        (standard deviations).
    window : (float, float)
        lo, hi: the fitted channels have lo <= |E| <= hi, eV.
    shape : str
        Peak profile.
    """

    gain_energy: np.ndarray
    loss_energy: np.ndarray
    energy: np.ndarray
    width: np.ndarray
    eta: np.ndarray
    gain_intensity: np.ndarray
    loss_intensity: np.ndarray
    ratio: np.ndarray
    temperature: np.ndarray
    significance: np.ndarray
    window: tuple
    shape: str


def _check_window(energy, window, background_order):
    """(lo, hi) and the mask of the channels lo <= |E| <= hi, or a ValueError naming the missing side."""
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"window={window!r}; expected (lo, hi) in eV with 0 < lo < hi") from None
    if not 0.0 < lo < hi:
        raise ValueError(f"window=({lo:g}, {hi:g}) eV; expected 0 < lo < hi: the fit uses lo <= |E| <= hi on both "
                         "sides of the ZLP")
    axis = f"the energy axis [{energy[0]:.4g}, {energy[-1]:.4g}] eV"
    if energy[0] > -hi + 0.5 * (energy[1] - energy[0]):
        raise ValueError(
            f"no gain side on the energy axis: window=({lo:g}, {hi:g}) eV fits the gain peak on [{-hi:g}, {-lo:g}] eV, "
            f"but {axis} starts above {-hi:g} eV; expected energy gains (negative energy loss) recorded down to "
            f"{-hi:g} eV, or a smaller window"
        )
    if energy[-1] < hi - 0.5 * (energy[1] - energy[0]):
        raise ValueError(
            f"no loss side on the energy axis: window=({lo:g}, {hi:g}) eV fits the loss peak on [{lo:g}, {hi:g}] eV, "
            f"but {axis} ends below {hi:g} eV; expected energy losses recorded up to {hi:g} eV, or a smaller window"
        )
    inside = (np.abs(energy) >= lo) & (np.abs(energy) <= hi)
    needed = 3 * (background_order + 4)
    per_side = min(int((inside & (energy < 0)).sum()), int((inside & (energy > 0)).sum()))
    if per_side < needed:
        raise ValueError(f"window=({lo:g}, {hi:g}) eV holds {per_side} channels on a side; expected at least "
                         f"{needed} (3 per parameter of a background of order {background_order} and a peak)")
    return (lo, hi), inside


def fit_gain_loss(
    spectra,
    energy,
    *,
    window=(0.06, 0.4),
    noise_variance=None,
    shape: str = "pseudo_voigt",
    tie_shape: bool = True,
    background_order: int = 1,
    width_range=None,
    min_significance: float = 5.0,
) -> GainLossFit:
    """Fit the gain and the loss peak of ZLP-subtracted spectra, with intervals over the replicas.

    Parameters
    ----------
    spectra : array_like, shape (n_replicas, n, n_energy)
        ZLP-subtracted spectra, counts per channel: every Monte Carlo replica of every pixel (at least
        2 replicas). A single replica (n, n_energy) is accepted with `noise_variance`; its intervals
        are then empty (low = median = high).
    energy : array_like, shape (n_energy,)
        Channel centres, eV, uniform and increasing, with energy gains (E < 0) and losses (E > 0).
    window : (float, float)
        (lo, hi), eV: the gain peak is fitted on -hi <= E <= -lo, the loss peak on lo <= E <= hi. lo
        keeps the fit off the ZLP core, where subtraction residuals are largest.
    noise_variance : array_like, optional
        Noise variance of the spectra, counts², broadcastable to (n, n_energy). None: the variance
        over the replicas (a running mean over 5 channels).
    shape : {"pseudo_voigt", "lorentzian", "gaussian"}
        Peak profile; the pseudo-Voigt fits its Lorentzian fraction.
    tie_shape : bool
        Give both peaks one FWHM and Lorentzian fraction (both are the resolution function broadened
        by the same line); False fits them separately (the width and eta returned are the loss
        peak's).
    background_order : int
        Order of the polynomial background on each side (0 constant, 1 linear, ...).
    width_range : (float, float), optional
        Smallest and largest FWHM, eV; default from 2 channels to the window's width hi - lo.
    min_significance : float
        Peaks below this many standard deviations (see ``GainLossFit.significance``) count as absent.

    Returns
    -------
    GainLossFit

    Raises
    ------
    ValueError
        No gain (or loss) side on the energy axis for the window, a window with too few channels,
        spectra not of shape (n_replicas, n, n_energy), a single replica without `noise_variance`
        (no intervals), non-finite values, a non-positive noise variance, or bad options.

    Notes
    -----
    Model on the window, with Legendre polynomials P_j on each side and the unit-height pseudo-Voigt
    V(u) = (1 - eta) exp(-4 ln2 u^2) + eta / (1 + 4 u^2):

        I(E) = sum_j b_j,side P_j(|E|) + h_g V((E - E_g) / w_g) + h_l V((E - E_l) / w_l),

    fitted by weighted least squares (trust-region reflective, heights >= 0). The median spectrum is
    fitted from several starts (the highest channel of the loss side and its mirror, or the highest
    of the gain side, times three widths); every replica from the best of them. A peak's significance
    is sqrt(chi^2 rise) when it is removed and the rest refitted. Intensities are areas in counts,
    h w ((1 - eta) sqrt(pi / (4 ln 2)) + eta pi / 2) / dispersion, h in counts per channel.

    Examples
    --------
    >>> from stemml_core.synthetic.gain import simulate_gain_loss
    >>> s, truth = simulate_gain_loss(0.15, 0.01, temperature=900.0, dose=None)
    >>> clean = 1e7 * (truth.gain + truth.loss)  # ZLP removed, counts for 1e7 electrons
    >>> fit = fit_gain_loss(clean[None], truth.energy, noise_variance=np.maximum(clean, 1.0)[None])
    >>> np.round(fit.energy[0], 3), np.round(fit.ratio[0] / truth.ratio, 2)
    (array([0.15]), array([1.]))
    """
    if shape not in _SHAPES:
        raise ValueError(f"shape={shape!r}; expected one of {_SHAPES}")
    if not isinstance(background_order, (int, np.integer)) or isinstance(background_order, bool) \
            or background_order < 0:
        raise ValueError(f"background_order={background_order!r}; expected an int >= 0 (polynomial order)")
    if not float(min_significance) >= 0.0:
        raise ValueError(f"min_significance={min_significance!r}; expected a number of standard deviations >= 0")
    energy = np.asarray(energy, dtype=np.float64)
    if energy.ndim != 1:
        raise ValueError(f"energy has shape {energy.shape}; expected the channel centres (eV), shape (n_energy,)")
    energy = _check_energy(energy)
    spectra = np.asarray(spectra, dtype=np.float64)
    if spectra.ndim not in (2, 3) or spectra.shape[-1] != energy.size:
        raise ValueError(f"spectra have shape {spectra.shape}; expected (n_replicas, n_pixels, {energy.size}) to "
                         "match energy")
    if spectra.ndim == 2 or spectra.shape[0] < 2:
        if noise_variance is None:
            raise ValueError(
                f"spectra of shape {spectra.shape} hold one replica per pixel: no intervals, and no noise estimate; "
                "expected a replica stack (n_replicas >= 2, n_pixels, n_energy), e.g. from inelastic_replicas, or "
                "pass noise_variance (counts²)"
            )
        spectra = spectra.reshape(-1, *spectra.shape[-2:])
    if not np.all(np.isfinite(spectra)):
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(spectra))[0])
        raise ValueError(f"spectra contain NaN or infinite values (first at index {index}); expected finite counts")
    window, inside = _check_window(energy, window, background_order)
    step = energy[1] - energy[0]
    w_lo, w_hi = (2.0 * step, window[1] - window[0]) if width_range is None else (float(v) for v in width_range)
    if not 0.0 < w_lo < w_hi:
        raise ValueError(f"width_range=({w_lo:g}, {w_hi:g}) eV; expected 0 < smallest FWHM < largest FWHM")
    n_rep, n = spectra.shape[:2]

    y = spectra[..., inside]
    e = energy[inside]
    sides = (e > 0).astype(int)  # 0 gain, 1 loss
    median = np.median(y, axis=0)
    if noise_variance is not None:
        extra = np.asarray(noise_variance, dtype=np.float64)
        try:
            variance = np.broadcast_to(extra, (n, energy.size))[:, inside]
        except ValueError:
            raise ValueError(f"noise_variance has shape {extra.shape}; expected a shape broadcastable to "
                             f"(n_pixels, n_energy) = {(n, energy.size)}, counts²") from None
    else:
        variance = uniform_filter1d(np.var(y, axis=0, ddof=1), _NOISE_SMOOTHING, axis=-1, mode="nearest")
    if not np.all(np.isfinite(variance)) or np.any(variance <= 0):
        raise ValueError("the noise variance is zero, negative or not finite in some channel (the replicas agree "
                         "exactly?); expected a positive variance, counts²: pass noise_variance")
    inv_sigma = 1.0 / np.sqrt(variance)

    # Background: Legendre polynomials in |E| over the window, one set per side.
    t = (np.abs(e) - 0.5 * (window[0] + window[1])) / (0.5 * (window[1] - window[0]))
    legendre = np.polynomial.legendre.legvander(t, background_order)
    n_b = legendre.shape[1]
    basis = np.zeros((e.size, 2 * n_b))
    basis[sides == 0, :n_b] = legendre[sides == 0]
    basis[sides == 1, n_b:] = legendre[sides == 1]
    layout = _layout(2 * n_b, shape, tie_shape)
    low = np.full(layout.size, -np.inf)
    high = np.full(layout.size, np.inf)
    for side, (a, b) in enumerate(((-window[1], -window[0]), (window[0], window[1]))):
        low[layout.centre[side]], high[layout.centre[side]] = a, b
        low[layout.width[side]], high[layout.width[side]] = w_lo, w_hi
        if layout.eta[side] is not None:
            low[layout.eta[side]], high[layout.eta[side]] = 0.0, 1.0
        low[layout.height[side]] = 0.0
    free_all = np.ones(layout.size, dtype=bool)
    widths = np.geomspace(max(w_lo, 4.0 * step), min(w_hi, 0.25 * (window[1] - window[0])), 3)

    out = {name: np.full((len(PERCENTILES), n), np.nan) for name in _QUANTITIES}
    significance = np.full((n, 2), np.nan)
    for p in range(n):
        args = (median[p], inv_sigma[p], e, basis, layout)
        best, best_chi2 = None, np.inf
        loss_side, gain_side = np.flatnonzero(sides == 1), np.flatnonzero(sides == 0)
        loss_start = e[loss_side[np.argmax(median[p, loss_side])]]
        gain_starts = {-loss_start, e[gain_side[np.argmax(median[p, gain_side])]]}
        for gain_start in sorted(gain_starts):
            for w in widths:
                x0 = np.zeros(layout.size)
                x0[layout.centre[0]], x0[layout.centre[1]] = gain_start, loss_start
                x0[layout.width[0]] = x0[layout.width[1]] = w
                for side in (0, 1):
                    if layout.eta[side] is not None:
                        x0[layout.eta[side]] = 0.5
                    rows = sides == side
                    x0[layout.height[side]] = max(float(np.max(median[p, rows]) - np.median(median[p, rows])), 0.0)
                params, chi2 = _solve(*args, x0, low, high, free_all)
                if chi2 < best_chi2:
                    best, best_chi2 = params, chi2
        if best is None:
            continue
        for side in (0, 1):  # significance: refit without this peak
            x0 = best.copy()
            x0[layout.height[side]] = 0.0
            free = free_all.copy()
            for index in (layout.centre[side], layout.height[side]):
                free[index] = False
            if layout.width[side] != layout.width[1 - side]:
                free[layout.width[side]] = False
                if layout.eta[side] is not None:
                    free[layout.eta[side]] = False
            chi2 = _solve(*args, x0, low, high, free)[1]
            significance[p, side] = math.sqrt(max(chi2 - best_chi2, 0.0)) if np.isfinite(chi2) else np.inf
        if not significance[p, 1] >= min_significance:
            continue
        if n_rep > 1:
            fits = np.array([_solve(y[m, p], inv_sigma[p], e, basis, layout, best, low, high, free_all)[0]
                             for m in range(n_rep)])
        else:
            fits = best[None]
        values = _derived(fits, layout, step, gain_found=significance[p, 0] >= min_significance)
        with np.errstate(all="ignore"):
            for name in _QUANTITIES:
                column = values[name]
                # the temperature only where (nearly) every replica's ratio is in (0, 1): not for ratio ~ 1
                needed = 0.84 if name == "temperature" else 0.0
                if np.any(np.isfinite(column)) and np.mean(np.isfinite(column)) >= needed:
                    out[name][:, p] = np.nanpercentile(column, PERCENTILES)
    return GainLossFit(significance=significance, window=window, shape=shape, **out)


def _derived(fits, layout, step, *, gain_found):
    """Per replica: every quantity of GainLossFit (NaN where undefined)."""
    gain_area, loss_area = _area(fits, layout, 0, step), _area(fits, layout, 1, step)
    gain_energy = fits[:, layout.centre[0]] if gain_found else np.full(len(fits), np.nan)
    loss_energy = fits[:, layout.centre[1]]
    energy = 0.5 * (loss_energy - gain_energy)
    with np.errstate(all="ignore"):
        ratio = gain_area / loss_area
        log_ratio = np.log(ratio)
        temperature = np.where((ratio > 0) & (ratio < 1), -energy / (BOLTZMANN_EV * log_ratio), np.nan)
    eta = (np.full(len(fits), layout.fixed_eta) if layout.eta[1] is None else fits[:, layout.eta[1]])
    return {"gain_energy": gain_energy, "loss_energy": loss_energy, "energy": energy,
            "width": fits[:, layout.width[1]], "eta": eta, "gain_intensity": gain_area,
            "loss_intensity": loss_area, "ratio": ratio, "temperature": temperature}


# --------------------------------------------------------------------------
# HyperSpy-aware wrapper
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class GainLossMaps:
    """Result of :func:`map_gain_loss`: maps whose axes are the input's navigation axes (a Signal2D for a
    scan, a Signal1D for a line scan), with their calibration.

    Every quantity is a :class:`~stemml_core.eels.thickness.ReplicaInterval` (median, 16th and 84th
    percentile over the replicas, each such a map); NaN where no significant loss peak was found (the
    gain energy, the mean energy and the temperature also where no significant gain peak was).

    Attributes
    ----------
    gain_energy, loss_energy, energy : ReplicaInterval
        Gain-peak centre (negative), loss-peak centre, and their mean distance from 0, eV.
    width : ReplicaInterval
        Observed FWHM, eV.
    gain_intensity, loss_intensity : ReplicaInterval
        Integrated counts of each peak.
    ratio : ReplicaInterval
        Gain/loss intensity ratio.
    temperature : ReplicaInterval
        Detailed-balance temperature, K.
    gain_significance, loss_significance : hyperspy.signals.Signal2D
        Significance of each peak in the median spectrum, standard deviations.
    window : (float, float)
        lo, hi of the fitted channels lo <= |E| <= hi, eV.
    n_replicas : int
        Replicas per pixel.
    """

    gain_energy: ReplicaInterval
    loss_energy: ReplicaInterval
    energy: ReplicaInterval
    width: ReplicaInterval
    gain_intensity: ReplicaInterval
    loss_intensity: ReplicaInterval
    ratio: ReplicaInterval
    temperature: ReplicaInterval
    gain_significance: BaseSignal
    loss_significance: BaseSignal
    window: tuple
    n_replicas: int


_MAP_QUANTITIES = {
    "gain_energy": ("gain-peak energy", "Energy loss (eV)"),
    "loss_energy": ("loss-peak energy", "Energy loss (eV)"),
    "energy": ("excitation energy", "Energy (eV)"),
    "width": ("peak FWHM", "FWHM (eV)"),
    "gain_intensity": ("gain-peak intensity", "Intensity (counts)"),
    "loss_intensity": ("loss-peak intensity", "Intensity (counts)"),
    "ratio": ("gain/loss ratio", "Gain/loss ratio"),
    "temperature": ("detailed-balance temperature", "Temperature (K)"),
}


def _gain_loss_block(block, *, variance, pixel, zlp, energy, inside, options, random_state):
    """Per pixel of ``block``: the quantities' percentiles (3 each), then the two significances."""
    spectra = inelastic_replicas(block, zlp, energy, inside, variance=variance, pixel=pixel,
                                 random_state=random_state)
    fit = fit_gain_loss(spectra, energy[inside], **options)
    columns = [getattr(fit, name)[k] for name in _MAP_QUANTITIES for k in range(len(PERCENTILES))]
    return np.column_stack(columns + [fit.significance[:, 0], fit.significance[:, 1]])


def map_gain_loss(
    signal,
    zlp,
    *,
    window=(0.06, 0.4),
    shape: str = "pseudo_voigt",
    tie_shape: bool = True,
    background_order: int = 1,
    width_range=None,
    min_significance: float = 5.0,
    random_state: int = 0,
    block_pixels: int = 64,
    progress: bool = True,
) -> GainLossMaps:
    """Map the gain and loss peaks of a spectrum image, with 68 % intervals over Monte Carlo replicas.

    Replica r of a pixel is its spectrum plus a draw of its counting noise minus ZLP replica r of
    `zlp`, scaled to the pixel's ZLP core; :func:`fit_gain_loss` fits every replica.

    Parameters
    ----------
    signal : exspy.signals.EELSSpectrum
        Spectra, counts, with navigation axes, on the energy axis of `zlp` (eV, gains negative); eager
        or lazy. The noise variance is ``metadata.Signal.Noise_properties.variance`` when set, else
        Poisson.
    zlp : VacuumZLP
        Fitted on the vacuum pixels (``VacuumZLP().fit(signal, vacuum=mask)``).
    window, shape, tie_shape, background_order, width_range, min_significance
        See :func:`fit_gain_loss`.
    random_state : int
        Seed of the noise draws (with each pixel's flat index: any blocking gives the same maps).
    block_pixels : int
        Pixels per block of in-memory input.
    progress : bool
        Show a text progress bar.

    Returns
    -------
    GainLossMaps

    Raises
    ------
    ValueError
        A signal without navigation axes or with an energy axis other than the ZLP model's, no gain or
        loss side on the axis for the window, non-finite counts, or bad options.

    Notes
    -----
    Cost: vacuum pixels (no significant loss peak) take a few fits, a specimen pixel one fit per
    replica more. Measured on one core of the project's 2-core machine: the 16 x 24 sample of
    :func:`~stemml_core.synthetic.gain.gain_loss_sample` (280 specimen pixels, 251 channels) with 24
    replicas in about 40 s.

    Examples
    --------
    >>> from stemml_core.synthetic.gain import gain_loss_sample
    >>> signal, truth = gain_loss_sample((4, 10), random_state=0)
    >>> zlp = VacuumZLP(n_replicas=8, random_state=0).fit(signal, vacuum=truth.vacuum)
    >>> maps = map_gain_loss(signal, zlp, progress=False)
    >>> maps.energy.median.data.shape, type(maps.ratio.median).__name__
    ((4, 10), 'Signal2D')
    """
    from ..blocks import compute_map, map_pixels, navigation_map

    check_is_fitted(zlp, "reference_")
    energy = check_replica_input(signal, zlp.energy_, random_state, "map_gain_loss")
    am = signal.axes_manager
    (_, hi), _ = _check_window(energy, window, background_order if isinstance(background_order, int) else 0)
    # the replicas cover -hi..hi in one piece (a uniform axis); fit_gain_loss picks the window from it
    inside = np.abs(energy) <= hi + 0.5 * (energy[1] - energy[0])
    if not signal._lazy and not np.all(np.isfinite(signal.data)):
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(np.asarray(signal.data)))[0])
        raise ValueError(f"the signal contains NaN or infinite counts (first at index {index}); expected finite counts")
    options = dict(window=window, shape=shape, tie_shape=tie_shape, background_order=background_order,
                   width_range=width_range, min_significance=min_significance)
    # validates the options on a tiny problem before the long part
    fit_gain_loss(np.zeros((2, 1, energy.size)), energy, noise_variance=1.0, **options)

    nav_shape = tuple(am.navigation_shape[::-1])
    extra = {"variance": noise_variance(signal), "pixel": np.arange(int(np.prod(nav_shape))).reshape(nav_shape)}
    n_columns = len(_MAP_QUANTITIES) * len(PERCENTILES) + 2
    mapped = map_pixels(signal, _gain_loss_block, output_shape=(n_columns,), extra=extra, block_pixels=block_pixels,
                        progress=progress, description="gain/loss", zlp=zlp, energy=energy, inside=inside,
                        options=options, random_state=int(random_state))
    values = compute_map(mapped, progress=progress, description="gain/loss").reshape(*nav_shape, n_columns)

    def one(column, title, quantity):
        return navigation_map(values[..., column], signal, title=title, quantity=quantity).T

    labels = ("median", "16th percentile", "84th percentile")
    intervals = {}
    for i, (name, (title, quantity)) in enumerate(_MAP_QUANTITIES.items()):
        intervals[name] = ReplicaInterval(*(one(i * len(PERCENTILES) + k, f"{title} ({label})", quantity)
                                            for k, label in enumerate(labels)))
    return GainLossMaps(
        **intervals,
        gain_significance=one(-2, "gain-peak significance", "Significance (sigma)"),
        loss_significance=one(-1, "loss-peak significance", "Significance (sigma)"),
        window=tuple(float(v) for v in window),
        n_replicas=int(zlp.reference_.shape[0]),
    )
