"""Energy-gain and energy-loss peak pairs around the zero-loss peak, with ground truth.

A monochromated beam (ZLP FWHM of a few tens of meV) meets an excitation of energy Ev in the specimen:
a vibration (phonon) or, in photon-induced EELS, the quanta of an illuminating light field. An electron
loses Ev with probability P (the loss peak at +Ev) or gains it with probability P r (the gain peak at
-Ev), r the gain/loss ratio: exp(-Ev / kT) for a vibration in thermal equilibrium at temperature T
(detailed balance, the basis of EELS thermometry, :cite:`Idrobo2018`), about 1 for first-order
photon-induced sidebands. The recorded spectrum per incident electron is

    I(E) = (1 - P (1 + r)) R(E) + P (R * L)(E - Ev) + P r (R * L)(E + Ev),

R the unit-area resolution function (the ZLP shape of :mod:`stemml_core.synthetic.lowloss`, a split
pseudo-Voigt), L a unit-area Lorentzian line of FWHM ``line_width`` (the excitation's lifetime width)
and ``*`` a convolution: both peaks are copies of the resolution function, broadened by the line.
Counts per channel are densities times the dispersion at the channel centres, times the dose, plus
Poisson and Gaussian read noise. Vacuum pixels (P = 0) hold the ZLP alone.

Every generator returns ``(signal, truth)``: an exspy ``EELSSpectrum`` and a :class:`GainLossTruth`.
This module does not import the analyses (:mod:`stemml_core.eels`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
from scipy import constants
from scipy.signal import fftconvolve

from .lowloss import _checked, _checked_tail, _eels_signal, _navigation_maps, _require, _zero_loss_peak

__all__ = ["BOLTZMANN_EV", "GainLossTruth", "gain_loss_sample", "simulate_gain_loss"]

#: Boltzmann constant, eV/K.
BOLTZMANN_EV = constants.k / constants.e
# Fine grid of the resolution-line convolution: this many points per channel.
_OVERSAMPLE = 8
# The convolution kernel reaches this far (eV) beyond the largest lag needed.
_KERNEL_MARGIN = 2.0


@dataclass(frozen=True)
class GainLossTruth:
    """Ground truth of a simulated gain/loss spectrum image.

    ``nav`` is the navigation shape, ``(rows, cols)``, ``(cols,)`` or ``()``. Spectra are noise-free
    counts per channel for ``dose`` incident electrons (per electron when ``dose`` is None); the
    recorded data is ``zlp + gain + loss`` plus noise.

    Attributes
    ----------
    energy : numpy.ndarray, shape (n_energy,)
        Channel centres, eV (negative: energy gain).
    zlp : numpy.ndarray, shape (*nav, n_energy)
        Zero-loss peak, (1 - P (1 + r)) R(E) times dose and dispersion, counts.
    gain, loss : numpy.ndarray, shape (*nav, n_energy)
        The gain peak at -Ev and the loss peak at +Ev, counts; zero in vacuum.
    excitation_energy : numpy.ndarray, shape nav
        Ev, eV: the loss peak sits at +Ev, the gain peak at -Ev. NaN in vacuum.
    line_width : float
        FWHM of the Lorentzian line L, eV (before the instrument resolution).
    loss_probability : numpy.ndarray, shape nav
        P, per incident electron; 0 in vacuum.
    loss_intensity, gain_intensity : numpy.ndarray, shape nav
        Integrated counts of each peak over all energies, dose P and dose P r (P and P r when ``dose``
        is None); 0 in vacuum.
    ratio : numpy.ndarray, shape nav
        Gain/loss intensity ratio r; NaN in vacuum.
    temperature : numpy.ndarray, shape nav
        T, K, with r = exp(-Ev / (k T)), where the ratio was given as a temperature; NaN otherwise and
        in vacuum.
    vacuum : numpy.ndarray of bool, shape nav
        True where P = 0.
    zlp_fwhm : float
        FWHM of the resolution function R, eV.
    dose : float or None
        Incident electrons per spectrum; None for noise-free spectra per electron.
    params : dict
        Every scalar setting used, JSON-serialisable.
    """

    energy: np.ndarray
    zlp: np.ndarray
    gain: np.ndarray
    loss: np.ndarray
    excitation_energy: np.ndarray
    line_width: float
    loss_probability: np.ndarray
    loss_intensity: np.ndarray
    gain_intensity: np.ndarray
    ratio: np.ndarray
    temperature: np.ndarray
    vacuum: np.ndarray
    zlp_fwhm: float
    dose: float | None
    params: dict


def simulate_gain_loss(
    excitation_energy,
    loss_probability,
    *,
    ratio=None,
    temperature=None,
    line_width=0.005,
    energy_range=(-0.5, 0.5),
    dispersion=0.004,
    zlp_fwhm=0.04,
    zlp_tail=(0.02, 0.05),
    beam_energy=60.0,
    convergence_angle=30.0,
    collection_angle=25.0,
    dose=1e7,
    read_noise=1.0,
    pixel_size=1.0,
    title="Synthetic gain/loss EELS",
    random_state=None,
):
    """Simulate spectra with an energy-gain and an energy-loss peak around a monochromated ZLP.

    Parameters
    ----------
    excitation_energy : float or array_like, shape nav
        Ev, eV, > 0, with both -Ev and +Ev on the energy axis (ignored, may be NaN, in vacuum).
        ``nav`` is ``(rows, cols)``, ``(cols,)`` or ``()``.
    loss_probability : float or array_like, shape nav
        P, probability per incident electron of the loss, >= 0; 0 marks vacuum. P (1 + r) must be
        below 1.
    ratio : float or array_like, shape nav, optional
        Gain/loss ratio r >= 0 (about 1 for photon-induced sidebands). Exactly one of `ratio` and
        `temperature` is given.
    temperature : float or array_like, shape nav, optional
        Specimen temperature T, K, > 0: r = exp(-Ev / (k T)) (detailed balance of a vibration).
    line_width : float
        FWHM of the Lorentzian line of the excitation, eV, > 0.
    energy_range : tuple of float
        ``(first, last)`` channel centre, eV, with first < 0 < last.
    dispersion : float
        Channel width, eV, > 0.
    zlp_fwhm : float
        FWHM of the resolution function R, eV, in [0.005, 1].
    zlp_tail : tuple of float
        Lorentzian fraction of R on the (gain, loss) side, each in [0, 1].
    beam_energy, convergence_angle, collection_angle : float
        Microscope metadata: keV, mrad, mrad (they do not enter the model).
    dose : float or None
        Incident electrons per spectrum, > 0; None for noise-free spectra per incident electron.
    read_noise : float
        Standard deviation of the Gaussian detector noise, counts, >= 0 (not added when `dose` is None).
    pixel_size : float
        Scale of the navigation axes, nm, > 0.
    title : str
        ``metadata.General.title`` of the signal.
    random_state : int, numpy.random.Generator or None
        Seed of the noise.

    Returns
    -------
    signal : exspy.signals.EELSSpectrum, shape (*nav, n_energy)
        float32 counts; signal axis "Energy loss" (eV), navigation axes "y", "x" (nm).
    truth : GainLossTruth

    Raises
    ------
    ValueError
        A setting out of range, maps of different shapes, both or neither of `ratio` and `temperature`,
        a specimen pixel whose -Ev or +Ev lies off the energy axis, or P (1 + r) >= 1.

    Examples
    --------
    >>> s, truth = simulate_gain_loss([0.0, 0.15], [0.0, 0.01], temperature=800.0, dose=None)
    >>> s.data.shape, bool(truth.vacuum[0]), round(float(truth.ratio[1]), 3)
    ((2, 251), True, 0.114)
    """
    settings = {
        "line_width": _checked("line_width", line_width, "eV", low=0.0),
        "dispersion": _checked("dispersion", dispersion, "eV", low=0.0),
        "zlp_fwhm": _checked("zlp_fwhm", zlp_fwhm, "eV", low=0.005, high=1.0),
        "zlp_tail": _checked_tail(zlp_tail),
        "beam_energy": _checked("beam_energy", beam_energy, "keV", low=0.0),
        "convergence_angle": _checked("convergence_angle", convergence_angle, "mrad", low=0.0, closed=True),
        "collection_angle": _checked("collection_angle", collection_angle, "mrad", low=0.0),
        "dose": None if dose is None else _checked("dose", dose, "electrons", low=0.0),
        "read_noise": _checked("read_noise", read_noise, "counts", low=0.0, closed=True),
        "pixel_size": _checked("pixel_size", pixel_size, "nm", low=0.0),
        "random_state": (
            int(random_state) if isinstance(random_state, numbers.Integral)
            else None if random_state is None else type(random_state).__name__
        ),
    }
    bounds = tuple(float(e) for e in energy_range)
    if len(bounds) != 2 or not bounds[0] < 0.0 < bounds[1]:
        raise ValueError(
            f"energy_range={energy_range!r} eV does not contain 0; expected (first, last) with first < 0 < last, "
            "so that the gain side (E < 0), the ZLP and the loss side (E > 0) are recorded."
        )
    settings["energy_range"] = bounds
    if (ratio is None) == (temperature is None):
        raise ValueError(
            f"ratio={ratio!r} and temperature={temperature!r}: expected exactly one of them (the gain/loss ratio, "
            "or the temperature in K for r = exp(-Ev / kT))."
        )
    first, last = bounds
    named = {"excitation_energy": excitation_energy, "loss_probability": loss_probability}
    named["ratio" if temperature is None else "temperature"] = ratio if temperature is None else temperature
    nav, maps = _navigation_maps(named)
    p = maps["loss_probability"]
    _require("loss_probability", p, nav, np.isfinite(p) & (p >= 0.0), "a probability >= 0 (0 marks vacuum)")
    vacuum = p == 0.0
    ev = maps["excitation_energy"]
    reach = min(-first, last)
    _require("excitation_energy", ev, nav, vacuum | ((ev > 0.0) & (ev < reach)),
             f"an energy in (0, {reach:g}) eV, so that the gain peak at -Ev and the loss peak at +Ev both lie on "
             f"the energy axis [{first:g}, {last:g}] eV")
    if temperature is None:
        r = maps["ratio"]
        _require("ratio", r, nav, vacuum | (np.isfinite(r) & (r >= 0.0)), "a gain/loss ratio >= 0")
        kelvin = np.full(p.shape, np.nan)
    else:
        kelvin = maps["temperature"]
        _require("temperature", kelvin, nav, vacuum | (np.isfinite(kelvin) & (kelvin > 0.0)), "a temperature > 0 K")
        with np.errstate(all="ignore"):
            r = np.exp(-ev / (BOLTZMANN_EV * kelvin))
    r = np.where(vacuum, 0.0, r)
    _require("loss_probability", p, nav, p * (1.0 + r) < 1.0, "P (1 + r) < 1 (the ZLP keeps some electrons)")

    n_energy = math.floor((last - first) / settings["dispersion"] + 1e-9) + 1
    energy = first + settings["dispersion"] * np.arange(n_energy)
    incident = 1.0 if dose is None else settings["dose"]
    step = settings["dispersion"]
    # R * L on a fine grid of lags, then interpolated at E -+ Ev (unit area, 1/eV).
    half = (last - first) + reach + _KERNEL_MARGIN
    fine_step = step / _OVERSAMPLE
    fine = fine_step * np.arange(-math.ceil(half / fine_step), math.ceil(half / fine_step) + 1)  # symmetric about 0
    resolution = _zero_loss_peak(fine, settings["zlp_fwhm"], settings["zlp_tail"])
    gamma = settings["line_width"]
    line = (gamma / (2.0 * np.pi)) / (fine**2 + (gamma / 2.0) ** 2)
    kernel = fftconvolve(resolution, line, mode="same") * (step / _OVERSAMPLE)

    zlp = incident * step * (1.0 - p * (1.0 + r))[:, None] * _zero_loss_peak(energy, settings["zlp_fwhm"],
                                                                               settings["zlp_tail"])[None]
    shift = np.where(vacuum, 0.0, ev)
    loss = np.stack([np.interp(energy - e, fine, kernel) for e in shift]) * (incident * step * p)[:, None]
    gain = np.stack([np.interp(energy + e, fine, kernel) for e in shift]) * (incident * step * p * r)[:, None]
    total = zlp + loss + gain
    if dose is None:
        counts = total
    else:
        rng = np.random.default_rng(random_state)
        counts = rng.poisson(total) + settings["read_noise"] * rng.standard_normal(total.shape)

    shape = (*nav, n_energy)
    truth = GainLossTruth(
        energy=energy,
        zlp=zlp.reshape(shape),
        gain=gain.reshape(shape),
        loss=loss.reshape(shape),
        excitation_energy=np.where(vacuum, np.nan, ev).reshape(nav),
        line_width=gamma,
        loss_probability=p.reshape(nav).copy(),
        loss_intensity=(incident * p).reshape(nav),
        gain_intensity=(incident * p * r).reshape(nav),
        ratio=np.where(vacuum, np.nan, r).reshape(nav),
        temperature=np.where(vacuum, np.nan, kelvin).reshape(nav),
        vacuum=vacuum.reshape(nav),
        zlp_fwhm=settings["zlp_fwhm"],
        dose=settings["dose"],
        params=settings,
    )
    return _eels_signal(counts.reshape(shape), energy, nav, settings, title), truth


def gain_loss_sample(nav_shape=(16, 24), *, mode="vibrational", dose=1e7, random_state=0, **kwargs):
    """The project's gain/loss sample: a specimen beside vacuum with smoothly varying peak pairs.

    Layout (rows y, cols x): vacuum on the low-x side up to a gently wavy edge at about 25 % of the
    columns; on the specimen, d pixels from the edge,

    - the excitation energy Ev rises from 0.12 eV (top row) to 0.20 eV (bottom row), with a ripple of
      +-5 meV along x;
    - the loss probability P = 0.004 + 0.008 (1 - exp(-d / 4)) grows from the edge inward;
    - ``mode="vibrational"``: a hot spot, T = 700 K + 600 K exp(-rho^2 / (2 s^2)) with rho the distance
      from a point two thirds across the specimen and s a fifth of the columns, gives the ratio
      r = exp(-Ev / kT) (about 0.035 to 0.26); ``mode="photon"``: photon-induced sidebands, r = 1 everywhere,
      ``truth.temperature`` NaN.

    Parameters
    ----------
    nav_shape : tuple of int
        ``(rows, cols)``, rows >= 2, cols >= 8.
    mode : {"vibrational", "photon"}
        How the gain/loss ratio arises (see above).
    dose : float or None
        Incident electrons per spectrum; None for noise-free spectra per electron.
    random_state : int, numpy.random.Generator or None
        Seed of the edge's waviness and of the noise.
    **kwargs
        Further settings of :func:`simulate_gain_loss` (``zlp_fwhm``, ``line_width``, ``dispersion``, ...).

    Returns
    -------
    signal : exspy.signals.EELSSpectrum, shape (rows, cols, n_energy)
    truth : GainLossTruth

    Raises
    ------
    ValueError
        A too small `nav_shape`, an unknown `mode` or an invalid setting.

    Examples
    --------
    >>> s, truth = gain_loss_sample(random_state=0)
    >>> s.data.shape, round(float(truth.vacuum.mean()), 2)
    ((16, 24, 251), 0.27)
    """
    if len(nav_shape) != 2 or int(nav_shape[0]) < 2 or int(nav_shape[1]) < 8:
        raise ValueError(f"nav_shape={nav_shape!r} is too small; expected (rows, cols) with rows >= 2, cols >= 8.")
    if mode not in ("vibrational", "photon"):
        raise ValueError(f"mode={mode!r} is unknown; expected 'vibrational' (r = exp(-Ev/kT)) or 'photon' (r = 1).")
    rows, cols = int(nav_shape[0]), int(nav_shape[1])
    rng = np.random.default_rng(random_state)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    row, col = np.mgrid[0:rows, 0:cols].astype(float)
    edge = 0.25 * cols + 0.04 * cols * np.sin(2.0 * np.pi * row / rows + phase)
    distance = col - edge
    vacuum = distance < 0.0
    inside = np.where(vacuum, 0.0, distance)
    ev = 0.12 + 0.08 * row / (rows - 1) + 0.005 * np.sin(2.0 * np.pi * col / cols)
    p = np.where(vacuum, 0.0, 0.004 + 0.008 * (1.0 - np.exp(-inside / 4.0)))
    kwargs.setdefault("title", f"Synthetic gain/loss EELS ({mode})")
    if mode == "vibrational":
        centre_row, centre_col = 0.5 * (rows - 1), edge.mean() + 2.0 / 3.0 * (cols - edge.mean())
        rho2 = (row - centre_row) ** 2 + (col - centre_col) ** 2
        kelvin = 700.0 + 600.0 * np.exp(-rho2 / (2.0 * (cols / 5.0) ** 2))
        ratio_kwargs = {"temperature": np.where(vacuum, np.nan, kelvin)}
    else:
        ratio_kwargs = {"ratio": np.where(vacuum, np.nan, 1.0)}
    return simulate_gain_loss(np.where(vacuum, np.nan, ev), p, dose=dose, random_state=int(rng.integers(2**63)),
                              **ratio_kwargs, **kwargs)
