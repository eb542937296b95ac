"""Specimen thickness from low-loss EELS: the log-ratio t/λ and the inelastic mean free path λ.

Layers, bottom to top:

- array functions: :func:`log_ratio` (numpy in, numpy out) and :func:`mean_free_path` (the formulas of
  :cite:`Iakoubovskii2008` and :cite:`Malis1988`, in nm);
- the HyperSpy wrapper :func:`estimate_thickness`, which takes a model ZLP or a stack of ZLP replicas and
  always returns a :class:`ReplicaInterval` of navigation maps (eager or lazy, like its input).

What comes from exspy and what does not:

- The Iakoubovskii mean free path is exspy's ``iMFP_Iakoubovskii`` times ``iMFP_angular_correction``; their
  product is eq. 9 of :cite:`Iakoubovskii2008` with the convergence and collection angles (checked against
  the published values in ``tests/eels/test_thickness.py``).
- The Malis formula is not in exspy and is written here; with a convergence angle it uses exspy's
  ``effective_angle``, as Egerton's program IMFP does :cite:`Egerton2011`.
- ``EELSSpectrum.estimate_thickness`` is not used. It takes one ZLP, so it gives no interval over replicas.
  A missing microscope parameter raises a RuntimeError that does not name the key. When both ``density``
  and ``mean_free_path`` are given, it applies the Iakoubovskii angular correction to the λ the user
  supplied. It only logs when the absolute thickness cannot be computed. The log-ratio itself is one line.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import dask.array as da
import numpy as np
from exspy.utils.eels import effective_angle, iMFP_angular_correction, iMFP_Iakoubovskii
from hyperspy.signal import BaseSignal

from ..blocks import map_pixels

__all__ = ["ReplicaInterval", "estimate_thickness", "log_ratio", "mean_free_path"]

#: Percentiles over the ZLP replicas: median, then the 68 % interval.
PERCENTILES = (50.0, 16.0, 84.0)
_FORMULAS = ("iakoubovskii", "malis")
#: Spectrum-channel values per block of pixels (bounds the memory of a block, 128 MB in float64).
_BLOCK_VALUES = 2**24
#: Metadata key and unit of each microscope parameter, named as in ``set_microscope_parameters``.
_METADATA = {
    "beam_energy": ("Acquisition_instrument.TEM.beam_energy", "keV"),
    "collection_angle": ("Acquisition_instrument.TEM.Detector.EELS.collection_angle", "mrad"),
    "convergence_angle": ("Acquisition_instrument.TEM.convergence_angle", "mrad"),
}


@dataclass(frozen=True)
class ReplicaInterval:
    """Median and 68 % interval of a quantity over the ZLP replicas.

    Each field is a HyperSpy signal with the input's navigation axes (and, for spectra, its energy axis),
    lazy when the input was lazy. With a single model ZLP, ``low`` and ``high`` equal ``median``: the
    interval then carries no ZLP uncertainty.

    Attributes
    ----------
    median : hyperspy.signal.BaseSignal
        50th percentile over the replicas.
    low, high : hyperspy.signal.BaseSignal
        16th and 84th percentiles.
    """

    median: BaseSignal
    low: BaseSignal
    high: BaseSignal


# --------------------------------------------------------------------------
# Array functions
# --------------------------------------------------------------------------


def log_ratio(spectra, zlp, *, axis=-1):
    """Relative thickness t/λ = ln(N_tot / N_ZLP) of low-loss spectra (log-ratio method).

    Parameters
    ----------
    spectra : array_like, shape (..., n_energy)
        Low-loss spectra including the zero-loss peak, counts per channel.
    zlp : array_like, shape (..., n_energy)
        Zero-loss peak model of each spectrum, counts per channel, on the same channels. The leading
        shapes broadcast: a stack of replicas ``(n_replicas, ..., n_energy)`` gives one t/λ per replica.
    axis : int
        The energy axis of both arrays.

    Returns
    -------
    numpy.ndarray, shape: broadcast of the leading shapes
        t/λ, dimensionless (float64); NaN (with a RuntimeWarning) where a spectrum's total is <= 0.

    Raises
    ------
    ValueError
        If the energy axes differ in length, the leading shapes do not broadcast, or a ZLP integral is
        <= 0 or not finite.

    Notes
    -----
    N_tot and N_ZLP are the sums over all channels of the spectrum and of the ZLP
    :cite:`Egerton2011` (§5.1). A spectrum recorded to E_max misses the scattering above E_max, so
    t/λ comes out low by the fraction of J1 beyond E_max (< 2 % up to t/λ = 1.5 for a MoS2-like loss
    function recorded to 100 eV).

    References
    ----------
    Egerton2011

    Examples
    --------
    >>> from stemml_core.synthetic.lowloss import single_spectrum
    >>> s, truth = single_spectrum(dose=None)
    >>> round(float(log_ratio(s.data, truth.zlp)), 3), round(float(truth.t_over_lambda), 3)
    (0.494, 0.496)
    """
    spectra = np.asarray(spectra, dtype=np.float64)
    zlp = np.asarray(zlp, dtype=np.float64)
    if spectra.shape[axis] != zlp.shape[axis]:
        raise ValueError(
            f"spectra have {spectra.shape[axis]} channels along axis {axis} and zlp {zlp.shape[axis]}; "
            "expected the ZLP on the spectra's energy channels."
        )
    n_total = spectra.sum(axis=axis)
    n_zlp = zlp.sum(axis=axis)
    try:
        np.broadcast_shapes(n_total.shape, n_zlp.shape)
    except ValueError:
        raise ValueError(
            f"spectra of shape {spectra.shape} and zlp of shape {zlp.shape} do not broadcast; expected the "
            "same shape, or replicas (n_replicas, *spectra.shape)."
        ) from None
    if not np.all(np.isfinite(n_zlp) & (n_zlp > 0.0)):
        bad = np.flatnonzero(~(np.isfinite(n_zlp) & (n_zlp > 0.0)))
        raise ValueError(
            f"the ZLP integral is {float(n_zlp.flat[bad[0]])!r} in {bad.size} spectrum/spectra; expected a "
            "ZLP model with a positive area."
        )
    empty = ~(n_total > 0.0)
    if np.any(empty):
        warnings.warn(
            f"{int(empty.sum())} spectrum/spectra have a total <= 0 counts; their t/λ is NaN.",
            RuntimeWarning,
            stacklevel=2,
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(empty, np.nan, np.log(n_total / n_zlp))


def mean_free_path(
    beam_energy, collection_angle, *, density=None, z_eff=None, convergence_angle=None, formula="iakoubovskii"
):
    """Total inelastic mean free path λ (nm) from a published parameterisation.

    Parameters
    ----------
    beam_energy : float
        Incident electron energy E0, keV, > 0.
    collection_angle : float
        Spectrometer collection semi-angle β, mrad, > 0.
    density : float, optional
        Specimen density ρ, g/cm³, > 0; required by, and only used with, ``formula="iakoubovskii"``.
    z_eff : float, optional
        Effective atomic number Z_eff = Σ f_i Z_i^1.3 / Σ f_i Z_i^0.3 (f_i atomic fractions), > 0;
        required by, and only used with, ``formula="malis"``.
    convergence_angle : float, optional
        Probe convergence semi-angle α, mrad, >= 0; None means parallel illumination (α = 0).
    formula : {"iakoubovskii", "malis"}
        Parameterisation of :cite:`Iakoubovskii2008` (from the density) or of :cite:`Malis1988` (from
        the effective atomic number).

    Returns
    -------
    float
        λ in nm for the given angles.

    Raises
    ------
    ValueError
        If `formula` is unknown, its material parameter is missing or the other one is given, or a
        value is out of range.

    Notes
    -----
    Iakoubovskii et al. (eq. 9), E0 in keV, angles in mrad, ρ in g/cm³, θ_C = 20 mrad,
    F = (1 + E0/1022) / (1 + E0/511)², θ_E = 5.5 ρ^0.3 / (F E0):

        1/λ = 11 ρ^0.3 / (200 F E0) ln[(α² + β² + 2θ_E² + |α² − β²|) θ_C²
                                        / ((α² + β² + 2θ_C² + |α² − β²|) θ_E²)].

    Malis et al., with E_m = 7.6 Z_eff^0.36 eV:

        λ = 106 F E0 / (E_m ln(2 β* E0 / E_m)),

    where β* = β for α = 0; otherwise the effective collection angle of Egerton's program IMFP, evaluated
    at the mean energy loss 13.5 Z_eff / 2 eV :cite:`Egerton2011`. Both fit measured λ to about ±20 %
    (Malis et al.). A crystal near a zone axis can deviate further.

    References
    ----------
    Iakoubovskii2008, Malis1988, Egerton2011

    Examples
    --------
    >>> round(mean_free_path(200.0, 20.0, density=5.06), 1)  # MoS2
    130.9
    >>> round(mean_free_path(200.0, 20.0, z_eff=26.4, formula="malis"), 1)
    91.7
    """
    if formula not in _FORMULAS:
        raise ValueError(f"formula={formula!r} is unknown; expected one of {_FORMULAS}.")
    beam_energy = _positive("beam_energy", beam_energy, "keV")
    collection_angle = _positive("collection_angle", collection_angle, "mrad")
    alpha = 0.0 if convergence_angle is None else float(convergence_angle)
    if not (np.isfinite(alpha) and alpha >= 0.0):
        raise ValueError(f"convergence_angle={convergence_angle!r} mrad is invalid; expected >= 0 mrad or None.")
    needed, other = ("density", "z_eff") if formula == "iakoubovskii" else ("z_eff", "density")
    values = {"density": density, "z_eff": z_eff}
    if values[needed] is None or values[other] is not None:
        raise ValueError(
            f"formula={formula!r} takes {needed} and not {other} (got density={density!r}, z_eff={z_eff!r}); "
            f"pass {needed}=... only."
        )
    if formula == "iakoubovskii":
        density = _positive("density", density, "g/cm³")
        return float(
            iMFP_Iakoubovskii(density, beam_energy)
            * iMFP_angular_correction(density, beam_energy, alpha, collection_angle)
        )
    z_eff = _positive("z_eff", z_eff, "")
    mean_loss = 7.6 * z_eff**0.36  # eV
    beta = effective_angle(beam_energy, 13.5 * z_eff / 2.0, alpha, collection_angle) if alpha > 0 else collection_angle
    f = (1.0 + beam_energy / 1022.0) / (1.0 + beam_energy / 511.0) ** 2
    return float(106.0 * f * beam_energy / (mean_loss * np.log(2.0 * beta * beam_energy / mean_loss)))


# --------------------------------------------------------------------------
# HyperSpy wrapper
# --------------------------------------------------------------------------


def estimate_thickness(signal, zlp, *, mean_free_path=None, density=None, z_eff=None, progress=True):
    """Map of t/λ, or of the thickness t in nm, by the log-ratio method, with its interval over ZLP replicas.

    Parameters
    ----------
    signal : exspy.signals.EELSSpectrum
        Low-loss spectrum image with the ZLP, shape ``(*nav, n_energy)``, counts; energy axis in eV;
        eager or lazy.
    zlp : ZLPEnsemble, hyperspy signal or array_like
        A fitted :class:`~stemml_core.eels.zlp.ZLPEnsemble`, fitted on a part of the signal's energy
        axis (e.g. -1 to 9 eV of a spectrum recorded to 100 eV; the ZLP is zero beyond it); or a model
        ZLP with the shape of ``signal.data`` (e.g. the median of a ZLP ensemble); or a stack of ZLP
        replicas of shape ``(n_replicas, *signal.data.shape)``; counts, on the signal's energy
        channels. Numpy or dask.
    mean_free_path : float, optional
        Known λ in nm: the maps are then t = λ t/λ in nm.
    density : float, optional
        Density in g/cm³: λ from :cite:`Iakoubovskii2008` with the beam energy, collection and
        convergence angles from the signal's metadata.
    z_eff : float, optional
        Effective atomic number: λ from :cite:`Malis1988` with the beam energy, collection and
        convergence angles from the signal's metadata.

    At most one of `mean_free_path`, `density` and `z_eff` may be given; with none, the maps are t/λ.
    progress : bool
        Progress bar over the blocks of pixels of an in-memory signal.

    Returns
    -------
    ReplicaInterval
        ``median``, ``low``, ``high``: navigation maps (signal dimension 0) with the input's navigation
        axes, lazy when the signal or the ZLP is lazy. ``metadata.Signal.quantity`` is ``"t/λ"``
        (dimensionless) or ``"Thickness (nm)"``.

    Raises
    ------
    ValueError
        If the energy axis is not a uniform axis in eV, the ZLP's shape or energy axis does not match the
        signal, a ZLP integral is <= 0, more than one of `mean_free_path`, `density`, `z_eff` is given,
        `mean_free_path` is <= 0, or a microscope parameter that λ needs is missing from the metadata.

    Notes
    -----
    Per replica r, t/λ_r = ln(N_tot / N_ZLP,r) (:func:`log_ratio`); the maps are the 50th, 16th and
    84th percentiles over r. The formula λ describes real materials to about ±20 % and does not know
    the loss function of a given specimen: for the synthetic MoS2-like samples of
    :mod:`stemml_core.synthetic.lowloss` (λ ≈ 101 nm at 200 keV, β = 20 mrad) Iakoubovskii with
    ρ = 5.06 g/cm³ gives 131 nm and Malis with Z_eff = 26.4 gives 95 nm.

    References
    ----------
    Egerton2011, Iakoubovskii2008, Malis1988

    Examples
    --------
    >>> from stemml_core.synthetic.lowloss import flake_sample
    >>> s, truth = flake_sample((6, 10), dose=None)
    >>> result = estimate_thickness(s, truth.zlp)
    >>> result.median.metadata.Signal.quantity, result.median.data.shape
    ('t/λ', (6, 10))
    """
    _energy_axis(signal)
    options = {"mean_free_path": mean_free_path, "density": density, "z_eff": z_eff}
    given = [name for name, value in options.items() if value is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} were given; expected at most one way to obtain the mean free path.")
    if mean_free_path is not None:
        scale = _positive("mean_free_path", mean_free_path, "nm")
    elif given:
        scale = _formula_mean_free_path(signal, density=density, z_eff=z_eff)
    else:
        scale = 1.0
    energy = _energy_axis(signal)
    extra, source, n_replicas = _zlp_source(signal, zlp, energy)
    out = map_pixels(
        signal, _log_ratio_interval, output_shape=(len(PERCENTILES),), extra=extra,
        block_pixels=max(1, _BLOCK_VALUES // ((1 + n_replicas) * energy.size)), progress=progress,
        description="t/λ", scale=scale, **source,
    )
    quantity = "Thickness (nm)" if given else "t/λ"
    return ReplicaInterval(*(
        _titled(out.isig[k], signal, quantity, name) for k, name in enumerate(("median", "low", "high"))
    ))


def _formula_mean_free_path(signal, *, density, z_eff):
    """λ (nm) by Iakoubovskii (density given) or Malis (z_eff given) with the signal's microscope parameters."""
    beam_energy, collection_angle, convergence_angle = _microscope_parameters(
        signal, ("beam_energy", "collection_angle", "convergence_angle")
    )
    return mean_free_path(
        beam_energy, collection_angle, density=density, z_eff=z_eff, convergence_angle=convergence_angle,
        formula="iakoubovskii" if density is not None else "malis",
    )


def _log_ratio_interval(block, *, scale, **source):
    """(n, n_energy) spectra -> (n, 3): percentiles of scale * t/λ over the ZLP replicas."""
    return _replica_percentiles(scale * log_ratio(block[:, None], _block_zlp(block, **source)), axis=1)


# --------------------------------------------------------------------------
# Helpers shared with dielectric.py
# --------------------------------------------------------------------------


def _replica_percentiles(values, *, axis):
    """Median, 16th and 84th percentiles over `axis`, as the last axis (size 3)."""
    return np.moveaxis(np.percentile(values, PERCENTILES, axis=axis), 0, -1)


def _microscope_parameters(signal, names):
    """Values of the named microscope parameters from `signal`'s metadata; ValueError naming a missing one."""
    values = []
    for name in names:
        key, unit = _METADATA[name]
        value = signal.metadata.get_item(key)
        if value is None:
            raise ValueError(
                f"metadata {key} ({unit}) is missing; set it with "
                f"s.set_microscope_parameters({name}=...) (an EELSSpectrum; s.set_signal_type('EELS') first)."
            )
        values.append(float(value))
    return values


def _is_model(zlp):
    """True for a fitted ZLP ensemble (anything with ``predict_replicas`` and ``energy_``)."""
    return hasattr(zlp, "predict_replicas") and hasattr(zlp, "energy_")


def _zlp_source(signal, zlp, energy):
    """How the blocks of :func:`map_pixels` get their ZLP replicas: (extra inputs, settings, n_replicas).

    A stack of replicas travels with the pixels as an extra input of shape (*nav, n_replicas,
    n_energy); a fitted ZLP ensemble is evaluated block by block on the channels it was fitted
    on (a contiguous part of the signal's axis), and is zero on the others.
    """
    if _is_model(zlp):
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(zlp)
        fitted = zlp.energy_
        first = int(np.argmin(np.abs(energy - fitted[0])))
        channels = slice(first, first + fitted.size)
        inside = energy[channels]
        if inside.shape != fitted.shape or not np.allclose(inside, fitted, atol=1e-3 * (fitted[1] - fitted[0])):
            raise ValueError(
                f"the ZLP model was fitted on {fitted.size} channels from {fitted[0]:.4g} to {fitted[-1]:.4g} eV, "
                f"which are not channels of the signal's energy axis ({energy[0]:.4g} to {energy[-1]:.4g} eV, "
                f"{energy.size} channels); expected the same dispersion and a sub-range of the axis."
            )
        return {}, {"model": zlp, "channels": channels}, int(np.sum(zlp.kept_))
    replicas = _zlp_replicas(signal, zlp, energy)
    xp = da if isinstance(replicas, da.Array) else np
    return {"zlp": xp.moveaxis(replicas, 0, -2)}, {}, replicas.shape[0]


def _block_zlp(block, *, zlp=None, model=None, channels=None):
    """The ZLP replicas of a block's pixels, (n, n_replicas, n_energy), from either source of :func:`_zlp_source`."""
    if model is None:
        return zlp
    out = np.zeros((block.shape[0], int(np.sum(model.kept_)), block.shape[1]))
    out[..., channels] = np.moveaxis(model.predict_replicas(block[:, channels], model.energy_), 0, 1)
    return out


def _energy_axis(signal):
    """The energy axis values (eV) of a signal with one uniform signal axis in eV; else ValueError."""
    axes = signal.axes_manager.signal_axes
    if len(axes) != 1:
        raise ValueError(f"the signal has {len(axes)} signal axes; expected one energy-loss axis (a Signal1D).")
    axis = axes[0]
    if axis.units != "eV":
        raise ValueError(
            f"the energy axis {axis.name!r} has units {axis.units!r}; expected 'eV'. Convert the scale and set "
            "signal.axes_manager.signal_axes[0].units = 'eV'."
        )
    if not axis.is_uniform:
        raise ValueError(f"the energy axis {axis.name!r} is not uniform; expected a constant dispersion (eV).")
    return np.asarray(axis.axis, dtype=np.float64)


def _zlp_replicas(signal, zlp, energy):
    """The ZLP as an array (n_replicas, *signal.data.shape), numpy or dask."""
    if isinstance(zlp, BaseSignal):
        zlp_energy = _energy_axis(zlp)
        if zlp_energy.shape != energy.shape or not np.allclose(zlp_energy, energy):
            raise ValueError(
                f"the ZLP's energy axis ({zlp_energy[0]:.4g} to {zlp_energy[-1]:.4g} eV, {zlp_energy.size} "
                f"channels) differs from the signal's ({energy[0]:.4g} to {energy[-1]:.4g} eV, {energy.size})."
            )
        zlp = zlp.data
    replicas = zlp if isinstance(zlp, da.Array) else np.asarray(zlp)
    shape = signal.data.shape
    if replicas.shape == shape:
        return replicas[None]
    if replicas.shape[1:] == shape:
        return replicas
    raise ValueError(
        f"zlp has shape {replicas.shape} and the signal's data {shape}; expected {shape} for a model ZLP or "
        f"(n_replicas, *{shape}) for a stack of replicas."
    )


def _positive(name, value, unit):
    number = float(value)
    if not (np.isfinite(number) and number > 0.0):
        unit = f" {unit}" if unit else ""
        raise ValueError(f"{name}={value!r}{unit} is invalid; expected a finite value > 0{unit}.")
    return number


def _titled(signal, source, quantity, name):
    """Set title and quantity of one output map."""
    label = {"median": "median", "low": "16th percentile", "high": "84th percentile"}[name]
    signal.metadata.General.title = f"{source.metadata.General.title}: {quantity} ({label} over ZLP replicas)"
    signal.metadata.Signal.quantity = quantity
    return signal
