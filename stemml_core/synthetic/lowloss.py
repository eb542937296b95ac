"""Low-loss EELS spectra and spectrum images from a physical forward model, with ground truth.

The model follows Egerton (2011), ch. 3-4:

1. An energy-loss function Im[-1/eps(E)] per pixel: a Drude bulk plasmon, a weaker Drude "pi plasmon", a
   band-gap onset A (E - Eg)^b with a smooth roll-off, optional excitonic peaks and an optional smooth
   sub-gap (surface/Cherenkov-like) term.
2. The single-scattering distribution J1(E) in absolute units from the thickness t and the collection
   semi-angle (Egerton eq. 4.26); t/lambda follows from t and the loss function.
3. Plural scattering by Poisson statistics in Fourier space, broadened by the instrument resolution (the
   unit-area zero-loss peak shape).
4. Poisson counting noise at a given dose plus Gaussian read noise.

Every generator returns ``(signal, truth)``: an exspy ``EELSSpectrum`` and a :class:`LowLossTruth`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from exspy.signals import EELSSpectrum
from scipy import constants, fft

__all__ = ["LowLossTruth", "flake_sample", "simulate_lowloss", "single_spectrum"]

_M0C2_EV = constants.physical_constants["electron mass energy equivalent in MeV"][0] * 1e6
_BOHR_RADIUS_NM = constants.physical_constants["Bohr radius"][0] * 1e9
# Areas of the height-1, FWHM-1 profiles over one half line (u >= 0).
_GAUSS_HALF_AREA = 0.5 * math.sqrt(math.pi / (4.0 * math.log(2.0)))
_LORENTZ_HALF_AREA = math.pi / 4.0
# The plural-scattering grid runs this far (eV) past the recorded range, so that losses just above the
# last channel still reach it through the resolution function.
_LOSS_GRID_MARGIN = 1.0
# t/lambda integrates J1 from the end of that grid to this energy (eV) on a logarithmic grid.
_TAIL_END = 1e5
_TAIL_POINTS = 256
# Pixels per block of the vectorised computation (bounds the memory of the FFTs).
_BLOCK = 64
_PEAK_KEYS = ("energy", "width", "amplitude")
_PEAK_SHAPES = ("gaussian", "lorentzian", "drude")
# Bulk MoS2 excitons (name, energy eV, FWHM eV, relative amplitude) used by flake_sample.
_MOS2_EXCITONS = (("A", 1.88, 0.08, 1.0), ("B", 2.03, 0.10, 0.8), ("C", 2.90, 0.30, 0.5))


@dataclass(frozen=True)
class LowLossTruth:
    """Ground truth of a simulated low-loss spectrum image.

    ``nav`` is the navigation shape: ``(rows, cols)``, ``(cols,)`` or ``()`` for one spectrum. All spectra
    are noise-free and in counts per channel for ``dose`` incident electrons (per one electron when
    ``dose`` is None); the noisy data is ``zlp + inelastic`` plus noise.

    Attributes
    ----------
    energy : numpy.ndarray, shape (n_energy,)
        Channel centres, eV.
    zlp : numpy.ndarray, shape (*nav, n_energy)
        Zero-loss peak, I0 exp(-t/lambda) R(E - zlp_shift), counts.
    inelastic : numpy.ndarray, shape (*nav, n_energy)
        Single plus plural scattering, broadened by the resolution R, counts. Zero in vacuum.
    single_scattering : numpy.ndarray, shape (*nav, n_energy)
        Single-scattering distribution J1(E) times the dispersion, counts, *not* broadened by the
        resolution and not attenuated by exp(-t/lambda) (Egerton eq. 4.26); zero for E <= 0.
    loss_function : numpy.ndarray, shape (*nav, n_energy)
        Im[-1/eps(E)] used, dimensionless; zero for E <= 0 and in vacuum.
    thickness : numpy.ndarray, shape nav
        Specimen thickness, nm (0 in vacuum).
    t_over_lambda : numpy.ndarray, shape nav
        Exact t/lambda = integral of J1 over 0 < E < 100 keV divided by I0 (0 in vacuum).
    band_gap : numpy.ndarray, shape nav
        Onset energy Eg, eV; NaN in vacuum.
    gap_exponent : numpy.ndarray, shape nav
        Onset exponent b (0.5 direct, 1.5 indirect); NaN in vacuum.
    vacuum : numpy.ndarray of bool, shape nav
        True where the thickness is 0.
    zlp_fwhm : float
        Full width at half maximum of the resolution function R, eV.
    zlp_shift : numpy.ndarray, shape nav
        Energy of the ZLP centre in each pixel, eV: a drift that shifts the whole recorded spectrum
        (``zlp`` and ``inelastic``), while ``single_scattering`` and ``loss_function`` stay unshifted.
    dose : float or None
        Incident electrons per spectrum I0; None for noise-free spectra per incident electron.
    peaks : dict
        Peak name -> ``dict(energy=map eV, width=map eV (FWHM), amplitude=map, shape=str)``; each map
        has shape nav and is NaN in vacuum. Empty when no peaks were simulated.
    params : dict
        Every scalar setting used, JSON-serialisable, for provenance.
    """

    energy: np.ndarray
    zlp: np.ndarray
    inelastic: np.ndarray
    single_scattering: np.ndarray
    loss_function: np.ndarray
    thickness: np.ndarray
    t_over_lambda: np.ndarray
    band_gap: np.ndarray
    gap_exponent: np.ndarray
    vacuum: np.ndarray
    zlp_fwhm: float
    zlp_shift: np.ndarray
    dose: float | None
    peaks: dict
    params: dict


def simulate_lowloss(
    thickness,
    band_gap,
    gap_exponent,
    *,
    t_over_lambda=None,
    energy_range=(-1.0, 100.0),
    dispersion=0.025,
    zlp_fwhm=0.1,
    zlp_tail=(0.05, 0.15),
    zlp_shift_sigma=0.0,
    beam_energy=200.0,
    convergence_angle=15.0,
    collection_angle=20.0,
    plasmon_energy=22.0,
    plasmon_width=5.0,
    pi_plasmon_energy=8.3,
    pi_plasmon_width=2.5,
    pi_plasmon_weight=0.2,
    onset_amplitude=0.05,
    onset_rolloff=2.0,
    subgap_amplitude=0.0,
    peaks=None,
    dose=1e6,
    read_noise=1.0,
    pixel_size=1.0,
    title="Synthetic low-loss EELS",
    random_state=None,
):
    """Simulate low-loss EELS spectra of a semiconductor with known thickness and band gap.

    Parameters
    ----------
    thickness : float or array_like, shape nav
        Specimen thickness, nm, >= 0; 0 marks vacuum. ``nav`` is ``(rows, cols)``, ``(cols,)`` or ``()``.
        Pass None together with `t_over_lambda` to have the thickness solved for.
    band_gap : float or array_like, shape nav
        Onset energy Eg, eV, > 0 (ignored, may be NaN, in vacuum).
    gap_exponent : float or array_like, shape nav
        Onset exponent b > 0: 0.5 for a direct, 1.5 for an indirect gap (ignored in vacuum).
    t_over_lambda : float or array_like, shape nav, optional
        Relative thickness instead of `thickness`; t is then t_over_lambda times the mean free path of
        each pixel's loss function.
    energy_range : tuple of float
        ``(first, last)`` channel centre, eV; must contain 0. The default reaches 100 eV, so that the
        log-ratio t/lambda of noise-free data loses less than 2 % up to t/lambda = 1.5.
    dispersion : float
        Channel width, eV, > 0.
    zlp_fwhm : float
        Full width at half maximum of the resolution function (the ZLP), eV, in [0.01, 1].
    zlp_tail : tuple of float
        Lorentzian fraction of the ZLP on the (gain, loss) side, each in [0, 1]; the larger loss-side
        fraction gives the heavier tail on the energy-loss side.
    zlp_shift_sigma : float
        Standard deviation of a random per-pixel shift of the whole spectrum (ZLP drift), eV, >= 0.
    beam_energy : float
        Incident electron energy E0, keV.
    convergence_angle : float
        Probe semi-angle, mrad (metadata only: the model treats `collection_angle` as the effective
        collection semi-angle).
    collection_angle : float
        Collection semi-angle beta, mrad.
    plasmon_energy, plasmon_width : float
        Drude bulk plasmon energy Ep and damping Gamma, eV (MoS2-like: 22 and 5 eV).
    pi_plasmon_energy, pi_plasmon_width : float
        Energy and damping of the weaker Drude term of the pi plasmon, eV (MoS2: 8.3 eV).
    pi_plasmon_weight : float
        Weight of the pi-plasmon term relative to a full Drude term, >= 0 (0 switches it off).
    onset_amplitude : float
        A of the onset term A (E - Eg)^b, eV^-b, >= 0.
    onset_rolloff : float
        Energy above Eg where the onset term turns over, eV, > 0.
    subgap_amplitude : float
        Peak height of the smooth sub-gap (surface/Cherenkov-like) term, >= 0; 0 switches it off.
    peaks : dict, optional
        Name -> ``dict(energy=, width=, amplitude=, shape="gaussian")``: extra loss-function peaks
        (excitons). ``energy`` (eV, inside the recorded loss range), ``width`` (FWHM, eV, > 0) and
        ``amplitude`` (peak height in Im[-1/eps], >= 0) are scalars or maps of shape nav; ``shape`` is
        ``"gaussian"``, ``"lorentzian"`` or ``"drude"``: the Drude term of a plasmon (or a surface
        plasmon) scaled to height ``amplitude`` at E = ``energy``, ``amplitude Gamma / Ep D(E; Ep, Gamma)``
        with ``Ep = energy`` and the damping ``Gamma = width`` (close to the FWHM when Gamma << Ep).
    dose : float or None
        Incident electrons per spectrum I0, > 0. None gives noise-free spectra per incident electron.
    read_noise : float
        Standard deviation of the Gaussian detector noise, counts, >= 0 (not added when `dose` is None).
    pixel_size : float
        Scale of the navigation axes, nm, > 0.
    title : str
        ``metadata.General.title`` of the signal.
    random_state : int, numpy.random.Generator or None
        Seed for the ZLP shifts and the noise; ``truth.params`` records an int seed as given and a
        Generator by its type name only.

    Returns
    -------
    signal : exspy.signals.EELSSpectrum, shape (*nav, n_energy)
        float32 counts; signal axis "Energy loss" (eV), navigation axes "y" (rows), "x" (cols) in nm.
    truth : LowLossTruth
        Noise-free components and the parameter maps.

    Raises
    ------
    ValueError
        If a setting is out of range, a map has the wrong shape, a non-vacuum pixel lacks a valid band gap
        or exponent, or both or neither of `thickness` and `t_over_lambda` are given.

    Notes
    -----
    Loss function (dimensionless), with the Drude term D(E; Ep, Gamma) = E Gamma Ep^2 /
    ((E^2 - Ep^2)^2 + (E Gamma)^2) and x = E - Eg:

        Im[-1/eps] = D(E; Ep, Gamma) + w_pi D(E; E_pi, Gamma_pi)
                     + A x^b / (1 + (x / E_r)^(b + 2)) [x > 0]
                     + A_s (E / E_s) exp(1 - E / E_s),   E_s = 0.7 Eg
                     + sum of peaks.

    The roll-off changes the onset by a relative (x / E_r)^(b + 2) only, so near Eg it is a pure power
    law. Single scattering (Egerton eq. 4.26), E in eV, theta_E = E / (gamma m0 v^2):

        J1(E) = I0 t / (pi a0 m0 v^2) Im[-1/eps(E)] ln(1 + (beta / theta_E)^2),

    with relativistic v and gamma from E0. t/lambda = integral of J1 dE / I0, computed on the recorded
    grid plus a logarithmic grid up to 100 keV. The spectrum is the Poisson sum of plural scattering,
    evaluated by FFT on a grid padded against wrap-around:

        I(E) = I0 exp(-t/lambda) R(E - c) (*) [delta + sum_n (J1 / I0)^(*n) / n!],

    whose first term is the ZLP and the rest the inelastic signal. The resolution R (unit area) is a
    split pseudo-Voigt in u = (E - c) / FWHM: (1 - eta) exp(-4 ln2 u^2) + eta / (1 + 4 u^2), eta the
    gain- or loss-side tail fraction; both parts have FWHM 1 in u, so the FWHM is exactly `zlp_fwhm`.
    Counts per channel are densities times the dispersion at the channel centres.

    References
    ----------
    .. [Egerton2011] R. F. Egerton, Electron Energy-Loss Spectroscopy in the Electron Microscope, 3rd ed.
       (Springer, 2011), eqs. (3.43), (4.26), (4.8).
    .. [RaffertyBrown1998] B. Rafferty and L. M. Brown, Phys. Rev. B 58, 10326 (1998).

    Examples
    --------
    >>> import numpy as np
    >>> s, truth = simulate_lowloss(np.array([[0.0, 40.0]]), 1.5, 1.5, dose=None)
    >>> s.data.shape, bool(truth.vacuum[0, 0]), round(float(truth.t_over_lambda[0, 1]), 2)
    ((1, 2, 4041), True, 0.4)
    """
    settings = {
        "energy_range": _checked_range(energy_range),
        "dispersion": _checked("dispersion", dispersion, "eV", low=0.0),
        "zlp_fwhm": _checked("zlp_fwhm", zlp_fwhm, "eV", low=0.01, high=1.0),
        "zlp_tail": _checked_tail(zlp_tail),
        "zlp_shift_sigma": _checked("zlp_shift_sigma", zlp_shift_sigma, "eV", low=0.0, closed=True),
        "beam_energy": _checked("beam_energy", beam_energy, "keV", low=0.0),
        "convergence_angle": _checked("convergence_angle", convergence_angle, "mrad", low=0.0, closed=True),
        "collection_angle": _checked("collection_angle", collection_angle, "mrad", low=0.0),
        "plasmon_energy": _checked("plasmon_energy", plasmon_energy, "eV", low=0.0),
        "plasmon_width": _checked("plasmon_width", plasmon_width, "eV", low=0.0),
        "pi_plasmon_energy": _checked("pi_plasmon_energy", pi_plasmon_energy, "eV", low=0.0),
        "pi_plasmon_width": _checked("pi_plasmon_width", pi_plasmon_width, "eV", low=0.0),
        "pi_plasmon_weight": _checked("pi_plasmon_weight", pi_plasmon_weight, "", low=0.0, closed=True),
        "onset_amplitude": _checked("onset_amplitude", onset_amplitude, "eV^-b", low=0.0, closed=True),
        "onset_rolloff": _checked("onset_rolloff", onset_rolloff, "eV", low=0.0),
        "subgap_amplitude": _checked("subgap_amplitude", subgap_amplitude, "", low=0.0, closed=True),
        "dose": None if dose is None else _checked("dose", dose, "electrons", low=0.0),
        "read_noise": _checked("read_noise", read_noise, "counts", low=0.0, closed=True),
        "pixel_size": _checked("pixel_size", pixel_size, "nm", low=0.0),
        "random_state": (
            int(random_state) if isinstance(random_state, numbers.Integral)
            else None if random_state is None else type(random_state).__name__
        ),
    }
    first, last = settings["energy_range"]
    peak_shapes = _checked_peaks(peaks, last)
    if (thickness is None) == (t_over_lambda is None):
        raise ValueError(
            f"thickness={thickness!r} and t_over_lambda={t_over_lambda!r}: expected exactly one of them "
            "(thickness in nm, or t_over_lambda to solve for the thickness)."
        )
    size_name, size_map = ("thickness", thickness) if t_over_lambda is None else ("t_over_lambda", t_over_lambda)
    named_maps = {size_name: size_map, "band_gap": band_gap, "gap_exponent": gap_exponent}
    for name in peak_shapes:
        named_maps |= {_peak_key(name, key): peaks[name][key] for key in _PEAK_KEYS}
    nav, maps = _navigation_maps(named_maps)

    size = maps[size_name]
    _require(size_name, size, nav, np.isfinite(size) & (size >= 0.0), "a finite value >= 0 (0 marks vacuum)")
    vacuum = size == 0.0
    for name, expected in (("band_gap", "> 0 eV"), ("gap_exponent", "> 0 (0.5 direct, 1.5 indirect)")):
        valid = vacuum | (np.isfinite(maps[name]) & (maps[name] > 0.0))
        _require(name, maps[name], nav, valid, f"{expected} where the thickness is > 0")
    peak_checks = {
        "energy": (lambda v: (v > 0.0) & (v < last), f"an energy inside the recorded loss range (0, {last}) eV"),
        "width": (lambda v: v > 0.0, "a FWHM > 0 eV"),
        "amplitude": (lambda v: v >= 0.0, "a height >= 0"),
    }
    for name in peak_shapes:
        for key, (is_valid, expected) in peak_checks.items():
            values = maps[_peak_key(name, key)]
            _require(_peak_key(name, key), values, nav, is_valid(values), expected)

    dispersion = settings["dispersion"]
    energy = first + dispersion * np.arange(math.floor((last - first) / dispersion + 1e-9) + 1)
    settings["incident_electrons"] = incident = 1.0 if dose is None else settings["dose"]
    rng = np.random.default_rng(random_state)
    shift = settings["zlp_shift_sigma"] * rng.standard_normal(vacuum.shape)

    n_pixels, n_energy = vacuum.size, energy.size
    zlp, inelastic, single, loss = (np.zeros((n_pixels, n_energy)) for _ in range(4))
    thickness_map, tau = np.zeros(n_pixels), np.zeros(n_pixels)
    for start in range(0, n_pixels, _BLOCK):
        block = slice(start, start + _BLOCK)
        block_peaks = [
            tuple(maps[_peak_key(name, key)][block] for key in _PEAK_KEYS) + (shape,)
            for name, shape in peak_shapes.items()
        ]
        (zlp[block], inelastic[block], single[block], loss[block], thickness_map[block], tau[block]) = (
            _simulate_block(
                energy, size[block], size_name, maps["band_gap"][block], maps["gap_exponent"][block],
                block_peaks, shift[block], settings,
            )
        )
    zlp, inelastic, single = incident * zlp, incident * inelastic, incident * single

    total = zlp + inelastic
    if dose is None:
        counts = total
    else:
        counts = rng.poisson(total) + settings["read_noise"] * rng.standard_normal(total.shape)

    spectra_shape = (*nav, n_energy)
    truth = LowLossTruth(
        energy=energy,
        zlp=zlp.reshape(spectra_shape),
        inelastic=inelastic.reshape(spectra_shape),
        single_scattering=single.reshape(spectra_shape),
        loss_function=loss.reshape(spectra_shape),
        thickness=thickness_map.reshape(nav),
        t_over_lambda=tau.reshape(nav),
        band_gap=np.where(vacuum, np.nan, maps["band_gap"]).reshape(nav),
        gap_exponent=np.where(vacuum, np.nan, maps["gap_exponent"]).reshape(nav),
        vacuum=vacuum.reshape(nav),
        zlp_fwhm=settings["zlp_fwhm"],
        zlp_shift=shift.reshape(nav),
        dose=settings["dose"],
        peaks={
            name: {key: np.where(vacuum, np.nan, maps[_peak_key(name, key)]).reshape(nav) for key in _PEAK_KEYS}
            | {"shape": shape}
            for name, shape in peak_shapes.items()
        },
        params=settings,
    )
    return _eels_signal(counts.reshape(spectra_shape), energy, nav, settings, title), truth


def flake_sample(nav_shape=(24, 32), *, dose=1e6, random_state=0, exciton_amplitude=0.0, **kwargs):
    """The project's default sample: a MoS2/WS2-like flake with vacuum, terraces and a band-gap edge.

    Layout (rows y, cols x): vacuum on the low-x side up to a gently wavy edge at about 22 % of the
    columns (so 20-25 % of the pixels); then four terraces, parallel to the edge but slightly tilted,
    with t/lambda = 0.3, 0.7, 1.1 and 1.5 at increasing distance from the edge (the thickness is solved
    per pixel). The band gap is 1.5 eV inside and rises to 1.9 eV at the edge, Eg = 1.5 + 0.4 exp(-d / 3),
    d the distance from the edge in pixels. The thinnest terrace (at the edge) has a direct gap
    (b = 0.5), the others an indirect gap (b = 1.5).

    Parameters
    ----------
    nav_shape : tuple of int
        ``(rows, cols)``, rows >= 1, cols >= 8.
    dose : float or None
        Incident electrons per spectrum; None for noise-free spectra (see :func:`simulate_lowloss`).
    random_state : int, numpy.random.Generator or None
        Seed for the edge's waviness and the terraces' tilt, and for the noise seed handed to
        :func:`simulate_lowloss` (recorded in ``truth.params["random_state"]``); a given seed gives the
        same sample.
    exciton_amplitude : float
        When > 0, adds the MoS2 A (1.88 eV) and B (2.03 eV) excitons with heights exciton_amplitude and
        0.8 exciton_amplitude at the flake edge, decaying as exp(-d / 3) inward, and the C feature
        (2.9 eV) with height 0.5 exciton_amplitude everywhere on the flake.
    **kwargs
        Further settings of :func:`simulate_lowloss` (``zlp_fwhm``, ``dispersion``, ...).

    Returns
    -------
    signal : exspy.signals.EELSSpectrum, shape (rows, cols, n_energy)
        float32 counts.
    truth : LowLossTruth
        Ground truth; the terraces are the distinct values of ``truth.t_over_lambda``.

    Raises
    ------
    ValueError
        If `nav_shape` is too small or a setting is invalid.

    Examples
    --------
    >>> s, truth = flake_sample(random_state=0)
    >>> s.data.shape, round(float(truth.vacuum.mean()), 2)
    ((24, 32, 4041), 0.24)
    """
    if len(nav_shape) != 2 or int(nav_shape[0]) < 1 or int(nav_shape[1]) < 8:
        raise ValueError(f"nav_shape={nav_shape!r} is too small; expected (rows, cols) with rows >= 1, cols >= 8.")
    _checked("exciton_amplitude", exciton_amplitude, "", low=0.0, closed=True)
    rows, cols = int(nav_shape[0]), int(nav_shape[1])
    rng = np.random.default_rng(random_state)
    phase, tilt = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(-0.15, 0.15)
    row, col = np.mgrid[0:rows, 0:cols].astype(float)
    edge = 0.22 * cols + 0.04 * cols * np.sin(2.0 * np.pi * row / rows + phase)
    distance = col - edge  # px from the edge, positive on the flake
    vacuum = distance < 0.0
    width = 0.78 * cols
    terrace = np.digitize(distance + tilt * (row - rows / 2), width * np.array([0.2, 0.45, 0.7]))
    inside = np.where(vacuum, 0.0, distance)
    t_over_lambda = np.where(vacuum, 0.0, np.array([0.3, 0.7, 1.1, 1.5])[terrace])
    band_gap = np.where(vacuum, np.nan, 1.5 + 0.4 * np.exp(-inside / 3.0))
    gap_exponent = np.where(vacuum, np.nan, np.where(terrace == 0, 0.5, 1.5))
    peaks = None
    if exciton_amplitude > 0:
        profile = {"A": np.exp(-inside / 3.0), "B": np.exp(-inside / 3.0), "C": 1.0}
        peaks = {
            name: {"energy": e, "width": w, "amplitude": exciton_amplitude * relative * profile[name]}
            for name, e, w, relative in _MOS2_EXCITONS
        }
    kwargs.setdefault("title", "Synthetic MoS2-like flake, low-loss EELS")
    return simulate_lowloss(
        None, band_gap, gap_exponent, t_over_lambda=t_over_lambda, peaks=peaks, dose=dose,
        random_state=int(rng.integers(2**63)), **kwargs,
    )


def single_spectrum(thickness=50.0, band_gap=1.5, gap_exponent=1.5, **kwargs):
    """One low-loss spectrum (no navigation axes) of a MoS2-like specimen.

    Parameters
    ----------
    thickness : float
        nm (the default gives t/lambda of about 0.5 with the default settings).
    band_gap : float
        eV.
    gap_exponent : float
        0.5 direct, 1.5 indirect.
    **kwargs
        Settings of :func:`simulate_lowloss` (``dose``, ``random_state``, ...).

    Returns
    -------
    signal : exspy.signals.EELSSpectrum, shape (n_energy,)
    truth : LowLossTruth
        With scalar (0-d) maps.

    Examples
    --------
    >>> s, truth = single_spectrum(dose=None)
    >>> s.axes_manager.navigation_dimension, round(float(truth.t_over_lambda), 2)
    (0, 0.5)
    """
    return simulate_lowloss(float(thickness), float(band_gap), float(gap_exponent), **kwargs)


def _simulate_block(energy, size, size_name, band_gap, gap_exponent, peaks, shift, settings):
    """Spectra of a block of pixels, per incident electron (one row per pixel)."""
    dispersion = settings["dispersion"]
    m0v2, gamma_m0v2 = _kinematics(settings["beam_energy"])
    beta_gm0v2 = settings["collection_angle"] * 1e-3 * gamma_m0v2  # eV; beta / theta_E = this / E
    per_nm = 1.0 / (np.pi * _BOHR_RADIUS_NM * m0v2)  # 1 / (nm eV)

    def angular_loss(e):  # Im[-1/eps] ln(1 + (beta / theta_E)^2), e > 0
        return _loss_function(e, band_gap, gap_exponent, peaks, settings) * np.log1p((beta_gm0v2 / e) ** 2)

    n_loss = math.ceil((energy[-1] + _LOSS_GRID_MARGIN) / dispersion)
    grid = angular_loss(dispersion * np.arange(1, n_loss + 1))  # (n_pix, n_loss), E = k dE, k >= 1
    tail_energy = np.geomspace((n_loss + 0.5) * dispersion, _TAIL_END, _TAIL_POINTS)
    integral = grid.sum(axis=1) * dispersion + np.trapezoid(angular_loss(tail_energy), tail_energy, axis=1)
    if size_name == "thickness":
        thickness, tau = size, per_nm * size * integral
    else:  # the Drude term makes the integral > 0
        thickness, tau = size / (per_nm * integral), size

    # Plural scattering on the loss grid E = k dE (k = 0..n_loss), convolved with R sampled at the lags
    # E_i - k dE, i.e. at energy[0] + m dE for m = -n_loss .. n_energy - 1.
    n_energy = energy.size
    single_grid = np.zeros((size.size, n_loss + 1))
    single_grid[:, 1:] = per_nm * thickness[:, None] * grid * dispersion
    lags = energy[0] + dispersion * np.arange(-n_loss, n_energy)
    resolution = _zero_loss_peak(lags - shift[:, None], settings["zlp_fwhm"], settings["zlp_tail"]) * dispersion
    # Twice the linear-convolution length: only plural scattering beyond ~6 times the highest recorded
    # loss could wrap around (relative error < 1e-6 up to t/lambda = 4).
    n_fft = fft.next_fast_len(2 * (n_energy + 2 * n_loss), real=True)
    plural = fft.irfft(
        np.expm1(fft.rfft(single_grid, n_fft)) * fft.rfft(resolution, n_fft), n_fft
    )[:, n_loss : n_loss + n_energy]
    attenuation = np.exp(-tau)[:, None]
    zlp = attenuation * resolution[:, n_loss:]
    inelastic = np.maximum(attenuation * plural, 0.0)  # clips FFT round-off of order 1e-16

    loss = np.zeros((size.size, n_energy))
    single = np.zeros((size.size, n_energy))
    positive = energy > 0.0
    loss[:, positive] = _loss_function(energy[positive], band_gap, gap_exponent, peaks, settings)
    loss[size == 0.0] = 0.0
    single[:, positive] = (
        per_nm * thickness[:, None] * loss[:, positive] * np.log1p((beta_gm0v2 / energy[positive]) ** 2)
        * dispersion
    )
    return zlp, inelastic, single, loss, thickness, tau


def _loss_function(energy, band_gap, gap_exponent, peaks, settings):
    """Im[-1/eps] (dimensionless), shape (n_pix, n_energy), for energies > 0 eV.

    NaN band gaps (vacuum) give zero onset and sub-gap terms.
    """
    e = energy[None, :]
    eg, b = np.nan_to_num(band_gap)[:, None], np.nan_to_num(gap_exponent, nan=1.0)[:, None]
    bulk = _drude(e, settings["plasmon_energy"], settings["plasmon_width"])
    pi = _drude(e, settings["pi_plasmon_energy"], settings["pi_plasmon_width"])
    loss = bulk + settings["pi_plasmon_weight"] * pi
    above = np.clip(e - eg, 0.0, None)
    onset = above**b / (1.0 + (above / settings["onset_rolloff"]) ** (b + 2.0))
    loss = loss + settings["onset_amplitude"] * np.where(eg > 0.0, onset, 0.0)
    if settings["subgap_amplitude"] > 0:
        ratio = e / np.where(eg > 0.0, 0.7 * eg, np.inf)
        loss = loss + settings["subgap_amplitude"] * ratio * np.exp(1.0 - ratio)
    for centre, width, amplitude, shape in peaks:
        u = (e - centre[:, None]) / width[:, None]
        if shape == "gaussian":
            profile = np.exp(-4.0 * np.log(2.0) * u**2)
        elif shape == "lorentzian":
            profile = 1.0 / (1.0 + 4.0 * u**2)
        else:  # unit-height Drude term: width is the damping Gamma, height 1 at E = energy
            profile = _drude(e, centre[:, None], width[:, None]) * width[:, None] / centre[:, None]
        loss = loss + amplitude[:, None] * profile
    return loss


def _drude(energy, plasmon_energy, width):
    """Drude loss function E Gamma Ep^2 / ((E^2 - Ep^2)^2 + (E Gamma)^2), dimensionless."""
    return energy * width * plasmon_energy**2 / ((energy**2 - plasmon_energy**2) ** 2 + (energy * width) ** 2)


def _zero_loss_peak(energy, fwhm, tail):
    """Unit-area resolution function R(E), 1/eV: split pseudo-Voigt with FWHM exactly `fwhm`.

    ``tail = (gain, loss)`` are the Lorentzian fractions for E < 0 and E >= 0.
    """
    u = energy / fwhm
    eta = np.where(u < 0.0, tail[0], tail[1])
    shape = (1.0 - eta) * np.exp(-4.0 * np.log(2.0) * u**2) + eta / (1.0 + 4.0 * u**2)
    area = fwhm * ((2.0 - tail[0] - tail[1]) * _GAUSS_HALF_AREA + (tail[0] + tail[1]) * _LORENTZ_HALF_AREA)
    return shape / area


def _kinematics(beam_energy):
    """m0 v^2 and gamma m0 v^2 in eV for a beam energy in keV (relativistic)."""
    gamma = 1.0 + beam_energy * 1e3 / _M0C2_EV
    m0v2 = _M0C2_EV * (1.0 - 1.0 / gamma**2)
    return m0v2, gamma * m0v2


def _eels_signal(data, energy, nav, settings, title):
    """Wrap counts of shape (*nav, n_energy) in a calibrated float32 EELSSpectrum."""
    axes = [
        {"name": name, "units": "nm", "scale": settings["pixel_size"], "offset": 0.0, "size": n, "navigate": True}
        for name, n in zip(("y", "x")[2 - len(nav) :], nav)
    ]
    axes.append(
        {"name": "Energy loss", "units": "eV", "scale": settings["dispersion"], "offset": float(energy[0]),
         "size": energy.size, "navigate": False}
    )
    signal = EELSSpectrum(data.astype(np.float32), axes=axes)
    signal.set_microscope_parameters(
        beam_energy=settings["beam_energy"],
        convergence_angle=settings["convergence_angle"],
        collection_angle=settings["collection_angle"],
    )
    signal.metadata.General.title = title
    signal.metadata.Signal.quantity = "Intensity (counts)"
    return signal


def _checked(name, value, unit, *, low, high=None, closed=False):
    """Return ``float(value)``, or raise a ValueError if it is not finite and above `low`.

    Above means ``> low`` (``>= low`` with `closed`); with `high`, the range is ``[low, high]``.
    """
    number = float(value)
    if high is not None:
        valid, expected = low <= number <= high, f"{low} <= {name} <= {high}"
    else:
        valid, expected = (number >= low, f"{name} >= {low}") if closed else (number > low, f"{name} > {low}")
    if not (math.isfinite(number) and valid):
        unit = f" {unit}" if unit else ""
        raise ValueError(f"{name}={value!r}{unit} is out of range; expected {expected}{unit}.")
    return number


def _checked_range(energy_range):
    """Return ``(first, last)`` in eV, or raise a ValueError unless first < 0 < last."""
    bounds = tuple(float(e) for e in energy_range)
    if len(bounds) != 2 or not bounds[0] < 0.0 < bounds[1]:
        raise ValueError(
            f"energy_range={energy_range!r} eV does not contain 0; expected (first, last) with first < 0 < last "
            "so that the zero-loss peak is recorded."
        )
    return bounds


def _checked_tail(zlp_tail):
    """Return the (gain, loss) Lorentzian fractions, or raise a ValueError."""
    tail = tuple(float(eta) for eta in zlp_tail)
    if len(tail) != 2 or not all(0.0 <= eta <= 1.0 for eta in tail):
        raise ValueError(f"zlp_tail={zlp_tail!r} is invalid; expected (gain_side, loss_side), each in [0, 1].")
    return tail


def _checked_peaks(peaks, last):
    """Return ``{name: shape}`` after checking the structure of `peaks`; the values are checked as maps."""
    if peaks is None:
        return {}
    if not isinstance(peaks, Mapping):
        raise ValueError(f"peaks={peaks!r} is not a dict; expected {{name: dict(energy=, width=, amplitude=)}}.")
    shapes = {}
    for name, spec in peaks.items():
        if not isinstance(spec, Mapping) or not set(_PEAK_KEYS) <= set(spec):
            raise ValueError(
                f"peaks[{name!r}]={spec!r} lacks keys; expected a dict with energy (eV, in (0, {last})), "
                "width (FWHM, eV) and amplitude (height in Im[-1/eps]), optionally shape."
            )
        shapes[name] = spec.get("shape", "gaussian")
        if shapes[name] not in _PEAK_SHAPES:
            raise ValueError(f"peaks[{name!r}]['shape']={shapes[name]!r} is unknown; expected one of {_PEAK_SHAPES}.")
    return shapes


def _peak_key(name, key):
    return f"peaks[{name!r}][{key!r}]"


def _navigation_maps(named_maps):
    """Broadcast scalars and equal-shaped maps to one navigation shape; return (nav, flat float maps)."""
    arrays = {name: np.asarray(value, dtype=float) for name, value in named_maps.items()}
    shapes = {array.shape for array in arrays.values() if array.ndim}
    if len(shapes) > 1:
        listing = ", ".join(f"{name} {array.shape}" for name, array in arrays.items())
        raise ValueError(f"maps of different shapes: {listing}; expected scalars or one navigation shape.")
    nav = shapes.pop() if shapes else ()
    if len(nav) > 2 or 0 in nav:
        raise ValueError(f"navigation shape {nav} is invalid; expected (rows, cols), (cols,) or () with pixels.")
    return nav, {name: np.broadcast_to(array, nav).ravel() for name, array in arrays.items()}


def _require(name, values, nav, valid, expected):
    """Raise a ValueError naming the first pixel where `valid` is False (NaN counts as invalid)."""
    bad = np.flatnonzero(~valid)
    if bad.size:
        pixel = tuple(int(i) for i in np.unravel_index(bad[0], nav))
        raise ValueError(
            f"{name}={float(values[bad[0]])!r} at pixel {pixel} (and {bad.size - 1} more) is invalid; "
            f"expected {expected}."
        )
