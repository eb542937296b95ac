"""The dielectric function from low-loss EELS: Fourier-log deconvolution and Kramers–Kronig analysis.

Layers, bottom to top:

- array functions (numpy in, numpy out): :func:`fourier_log_deconvolution` gives the single-scattering
  distribution (SSD) of spectra with a ZLP model; :func:`kramers_kronig` turns an SSD into ε = ε1 + iε2;
- the HyperSpy wrapper :func:`dielectric_function` for selected pixels or cluster-averaged spectra, with a
  model ZLP or a stack of ZLP replicas, returning a :class:`DielectricResult` of median and 68 % interval.

Both array functions are written here rather than taken from exspy, because exspy gets the numbers wrong
without any warning on the low-loss data this project handles:

- ``EELSSpectrum.fourier_log_deconvolution`` applies a Hann taper to 2 % of the channels at *both* ends of
  the spectrum. With a range that starts 1 eV below the ZLP (the synthetic data here, and many
  recordings) the taper covers the ZLP, so the SSD comes out twice too large below the plasmon and
  negative above it. Here nothing is tapered, and the FFT is padded to four times the length, which
  keeps the circular wrap-around of the plural-scattering series out of the recorded range.
- ``EELSSpectrum.kramers_kronig_analysis`` uses an FFT sine transform padded only to twice the length.
  Its periodic images of the loss function sit just beyond the end of the range, so ε2 of a Drude metal
  recorded to 100 eV is 8 % off in the plasmon region. It has no cut-off correction, and ``full_output``
  changes the return type. Here the principal-value integral is a linear (not circular) discrete
  convolution with Maclaurin's rule :cite:`OhtaIshida1988`. The loss function beyond the range end is
  extrapolated as a power law A E^-r fitted to the last part of the range, and the integral of that tail
  is added semi-analytically (closed form plus a quadrature of a smooth remainder).

Not modelled: surface losses, retardation (Cherenkov) losses and the momentum dispersion of ε. The SSD,
and hence ε, keeps the resolution of the data, because it is reconvolved with the ZLP.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import dask.array as da
import numpy as np
from scipy import constants, fft, signal as scipy_signal

from ..blocks import map_pixels
from .thickness import (
    ReplicaInterval,
    _energy_axis,
    _block_zlp,
    _microscope_parameters,
    _replica_percentiles,
    _titled,
    _zlp_source,
)

__all__ = ["DielectricResult", "dielectric_function", "fourier_log_deconvolution", "kramers_kronig"]

_M0C2_EV = constants.physical_constants["electron mass energy equivalent in MeV"][0] * 1e6
_BOHR_RADIUS_NM = constants.physical_constants["Bohr radius"][0] * 1e9
#: FFT length of the Fourier-log deconvolution, in units of the spectrum length.
FFT_PADDING = 4
#: Above this t/λ the Fourier-log deconvolution of a spectrum recorded to ~100 eV loses accuracy (0.3 % at
#: t/λ = 2, 6 % at 2.5, 27 % at 3 on the synthetic data; a range to 400 eV stays below 0.1 % to t/λ = 3.5),
#: because the plural scattering beyond the range end and the branch of the complex log matter.
MAX_T_OVER_LAMBDA = 2.0
#: Replica-spectrum-channel values per block of pixels in the wrapper (bounds the memory of the FFTs).
_BLOCK_VALUES = 2**21
_TAILS = ("power_law", None)
#: Bins of the tail window whose means the power law is fitted to.
_TAIL_BINS = 8
#: Gauss-Legendre nodes of the tail's contribution to Re[1/ε].
_TAIL_NODES = 64
_QUANTITIES = (
    ("eps1", "ε1"),
    ("eps2", "ε2"),
    ("loss_function", "Im(-1/ε)"),
    ("single_scattering", "Single scattering (counts)"),
)


@dataclass(frozen=True)
class DielectricResult:
    """Dielectric function of each spectrum, with its 68 % interval over the ZLP replicas.

    Each field is a :class:`~stemml_core.eels.thickness.ReplicaInterval` of spectra with the input's
    navigation and energy axes. ε1, ε2 and Im(−1/ε) are NaN at energy losses below half a channel.

    Attributes
    ----------
    eps1, eps2 : ReplicaInterval
        Real and imaginary parts of ε, dimensionless.
    loss_function : ReplicaInterval
        Im(−1/ε), dimensionless.
    single_scattering : ReplicaInterval
        Single-scattering distribution from :func:`fourier_log_deconvolution`, counts per channel.
    """

    eps1: ReplicaInterval
    eps2: ReplicaInterval
    loss_function: ReplicaInterval
    single_scattering: ReplicaInterval


# --------------------------------------------------------------------------
# Array functions
# --------------------------------------------------------------------------


def fourier_log_deconvolution(spectra, zlp, *, axis=-1):
    """Single-scattering distribution of low-loss spectra by Fourier-log deconvolution.

    Parameters
    ----------
    spectra : array_like, shape (..., n_energy)
        Low-loss spectra including the ZLP, counts per channel, on a uniform energy axis.
    zlp : array_like, shape (..., n_energy)
        ZLP model of each spectrum on the same channels, counts; the leading shapes broadcast (a stack of
        replicas ``(n_replicas, ..., n_energy)`` gives one SSD per replica).
    axis : int
        The energy axis of both arrays.

    Returns
    -------
    numpy.ndarray, shape: broadcast shape with the energy axis at `axis`
        SSD S(E) in counts per channel, on the input channels (float64). It is reconvolved with the ZLP
        shape, so it keeps the resolution of the data, and it is normalised as in Egerton: its sum is
        N_ZLP t/λ.

    Raises
    ------
    ValueError
        If the energy axes differ in length, the shapes do not broadcast, or a ZLP integral is <= 0.

    Warns
    -----
    RuntimeWarning
        For spectra with ln(N_tot / N_ZLP) > ``MAX_T_OVER_LAMBDA``, where the result loses accuracy.

    Notes
    -----
    With J and Z the discrete Fourier transforms of the spectrum and of the ZLP (zero-padded to
    ``FFT_PADDING`` times the length), the Fourier-log relation of :cite:`Egerton2011` §4.1.1, reconvolved
    with the ZLP:

        S = IFFT[Z ln(J / Z)].

    Frequencies where J or Z vanish contribute 0. The spectra need no taper: they must contain the whole
    ZLP, and the reconvolution with Z damps the noise at high frequency.

    References
    ----------
    Egerton2011

    Examples
    --------
    >>> from stemml_core.synthetic.lowloss import single_spectrum
    >>> s, truth = single_spectrum(dose=None)
    >>> ssd = fourier_log_deconvolution(s.data, truth.zlp)
    >>> round(float(ssd.sum() / truth.zlp.sum()), 3)  # t/λ within the recorded range
    0.495
    """
    spectra = np.moveaxis(np.asarray(spectra, dtype=np.float64), axis, -1)
    zlp = np.moveaxis(np.asarray(zlp, dtype=np.float64), axis, -1)
    n_energy = spectra.shape[-1]
    if zlp.shape[-1] != n_energy:
        raise ValueError(
            f"spectra have {n_energy} channels and zlp {zlp.shape[-1]}; expected the ZLP on the same channels."
        )
    try:
        np.broadcast_shapes(spectra.shape, zlp.shape)
    except ValueError:
        raise ValueError(
            f"spectra of shape {spectra.shape} and zlp of shape {zlp.shape} do not broadcast; expected the "
            "same shape, or replicas (n_replicas, *spectra.shape)."
        ) from None
    n_zlp = zlp.sum(axis=-1)
    if not np.all(np.isfinite(n_zlp) & (n_zlp > 0.0)):
        raise ValueError(f"a ZLP integral is {float(np.min(n_zlp))!r}; expected a ZLP model with a positive area.")
    with np.errstate(divide="ignore", invalid="ignore"):
        thick = np.log(spectra.sum(axis=-1) / n_zlp) > MAX_T_OVER_LAMBDA
    if np.any(thick):
        warnings.warn(
            f"{int(np.sum(thick))} spectrum/spectra have t/λ > {MAX_T_OVER_LAMBDA}; their Fourier-log "
            "deconvolution is unreliable unless the energy range extends far beyond the plasmon.",
            RuntimeWarning,
            stacklevel=2,
        )
    n_fft = fft.next_fast_len(FFT_PADDING * n_energy, real=True)
    z = fft.rfft(zlp, n_fft)
    j = fft.rfft(spectra, n_fft)
    with np.errstate(divide="ignore", invalid="ignore"):
        product = z * np.log(j / z)
    product = np.where(np.isfinite(product), product, 0.0)
    ssd = fft.irfft(product, n_fft)[..., :n_energy]
    return np.moveaxis(ssd, -1, axis)


def kramers_kronig(
    ssd,
    energy,
    *,
    beam_energy,
    collection_angle,
    zlp_integral=None,
    thickness=None,
    refractive_index=None,
    tail="power_law",
    tail_window=0.2,
    axis=-1,
):
    """Dielectric function ε = ε1 + iε2 from single-scattering distributions (Kramers–Kronig analysis).

    Parameters
    ----------
    ssd : array_like, shape (..., n_energy)
        Single-scattering distribution, counts per channel, normalised as by
        :func:`fourier_log_deconvolution` (its sum is N_ZLP t/λ).
    energy : array_like, shape (n_energy,)
        Channel centres, eV, uniform and increasing.
    beam_energy : float
        Incident electron energy E0, keV.
    collection_angle : float
        Collection semi-angle β, mrad.
    zlp_integral : float or array_like, shape (...), optional
        ZLP area N_ZLP, counts, > 0; required with `thickness`.
    thickness : float or array_like, shape (...), optional
        Specimen thickness t, nm, > 0: normalise by the absolute scale of the SSD.
    refractive_index : float or array_like, shape (...), optional
        Static refractive index n > 1 (``np.inf`` for a metal): normalise by the Kramers–Kronig sum rule.
        Give exactly one of `thickness` and `refractive_index`.
    tail : {"power_law", None}
        Extrapolate Im(−1/ε) beyond the last channel as A E^-r, or stop at the range end.
    tail_window : float
        Fraction of the positive energy range, at its end, to which A E^-r is fitted; in (0, 1).
    axis : int
        The energy axis of `ssd`.

    Returns
    -------
    numpy.ndarray of complex128, shape of `ssd`
        ε on the input channels; NaN at energy losses below half a channel, and for spectra whose
        normalisation fails (see Warns).

    Raises
    ------
    ValueError
        If both or neither of `thickness` and `refractive_index` are given, `thickness` <= 0 or lacks
        `zlp_integral`, `zlp_integral` <= 0, `refractive_index` <= 1, the energy axis is not uniform and
        increasing or has fewer than 10 channels above 0 eV, or a setting is out of range.

    Warns
    -----
    RuntimeWarning
        If the power-law fit fails for some spectra (non-positive intensity in the window, or r <= 1: the
        range ends before the loss function decays). Their tail is then left out. Also, with
        `refractive_index`, if the sum-rule integral of a spectrum is <= 0; ε of that spectrum is NaN.

    Notes
    -----
    Following :cite:`Egerton2011` §4.2, with θ_E = E / (γ m0 v²) and K the normalisation constant:

        Im[−1/ε(E)] = S(E) / (ΔE K ln[1 + (β / θ_E)²]),
        K = t N_ZLP / (π a0 m0 v²)                      (known thickness, from eq. 4.26), or
        K = ∫ S / (ΔE ln[1 + (β/θ_E)²]) dE/E / (π/2 (1 − 1/n²))   (known n: the Kramers–Kronig sum rule),
        Re[1/ε(E)] = 1 − (2/π) P∫_0^∞ Im[−1/ε(E')] E' / (E'² − E²) dE',
        ε = (Re[1/ε] + i Im[−1/ε]) / (Re[1/ε]² + Im[−1/ε]²).

    The principal value is split as E'/(E'² − E²) = [1/(E' − E) + 1/(E' + E)] / 2: the singular part
    follows Maclaurin's rule (channels at odd distance, weight 2ΔE) :cite:`OhtaIshida1988`, and the regular
    part is a plain sum. Both are linear convolutions done by FFT, so there are no periodic images. The
    tail A E^-r above E_end (the upper edge of the last channel) adds

        ∫_{E_end}^∞ A E'^(-r-1) dE' = A E_end^(-r) / r                                  to the sum rule,
        −(2A / (π E_end^r)) ∫_0^1 u^(r-1) / (1 − (E/E_end)² u²) du                      to Re[1/ε].

    The last integral is (r/2)⁻¹ ₂F₁(1, r/2; 1 + r/2; x). This is the degenerate case c = a + b, in which
    scipy's ``hyp2f1`` returns wrong values near x = 1 (negative, and differing with the array shape).
    It is therefore evaluated as artanh(√x)/√x plus the Gauss–Legendre quadrature of the smooth remainder
    (u^(r-1) − 1) / (1 − x u²), to a relative accuracy of about 1e-5.

    Measured on noise-free Drude spectra (Ep = 22 eV, Γ = 5 eV) recorded to 100 eV, ε2 is within 0.1 %
    of the analytic values in 15–30 eV with or without the tail. Recorded to 40 eV, the error in 5–36 eV
    falls from 23 % to 6 % with the tail.

    References
    ----------
    Egerton2011, OhtaIshida1988

    Examples
    --------
    >>> import numpy as np
    >>> from stemml_core.synthetic.lowloss import single_spectrum
    >>> s, truth = single_spectrum(thickness=50.0, pi_plasmon_weight=0.0, onset_amplitude=0.0, dose=None)
    >>> eps = kramers_kronig(truth.single_scattering, truth.energy, beam_energy=200.0, collection_angle=20.0,
    ...                      zlp_integral=1.0, thickness=50.0)
    >>> at = np.argmin(np.abs(truth.energy - 22.0))
    >>> round(float(eps[at].imag), 2), round(22.0**2 * 5.0 / (22.0 * (22.0**2 + 5.0**2)), 2)  # Drude ε2
    (0.22, 0.22)
    """
    ssd = np.moveaxis(np.asarray(ssd, dtype=np.float64), axis, -1)
    energy = _checked_energy(energy, ssd.shape[-1])
    beam_energy = _checked_positive("beam_energy", beam_energy, "keV")
    collection_angle = _checked_positive("collection_angle", collection_angle, "mrad")
    _check_normalisation(thickness, refractive_index)
    if thickness is not None and zlp_integral is None:
        raise ValueError("thickness normalisation needs zlp_integral, the ZLP area N_ZLP in counts.")
    if tail not in _TAILS:
        raise ValueError(f"tail={tail!r} is unknown; expected one of {_TAILS}.")
    if not 0.0 < float(tail_window) < 1.0:
        raise ValueError(f"tail_window={tail_window!r} is out of range; expected a fraction in (0, 1).")

    dispersion = energy[1] - energy[0]
    positive = energy > dispersion / 2.0
    e = energy[positive]
    m0v2 = _M0C2_EV * (1.0 - 1.0 / (1.0 + beam_energy * 1e3 / _M0C2_EV) ** 2)  # eV, for the thickness norm
    angular = angular_factor(e, beam_energy, collection_angle)
    loss = ssd[..., positive] / (dispersion * angular)  # K Im[-1/eps]
    e_end = e[-1] + dispersion / 2.0
    # Without a tail A = 0; r = 2 then only keeps the tail terms finite.
    amplitude, exponent = _power_law_tail(e, loss, tail_window) if tail else (np.zeros(loss.shape[:-1]), 2.0)

    if refractive_index is not None:
        n = np.asarray(refractive_index, dtype=np.float64)
        sum_rule = (loss / e).sum(axis=-1) * dispersion + amplitude * e_end**-exponent / exponent
        if np.any(~(sum_rule > 0.0)):
            warnings.warn(
                f"{int(np.sum(~(sum_rule > 0.0)))} spectrum/spectra have a sum-rule integral <= 0 (no "
                "inelastic signal); their ε is NaN.",
                RuntimeWarning,
                stacklevel=2,
            )
        norm = np.where(sum_rule > 0.0, sum_rule, np.nan) / (np.pi / 2.0 * (1.0 - 1.0 / n**2))
    else:
        norm = _checked_array("thickness", thickness, "nm") * _checked_array("zlp_integral", zlp_integral, "counts")
        norm = norm / (np.pi * _BOHR_RADIUS_NM * m0v2)
    norm = np.broadcast_to(norm, loss.shape[:-1])[..., None]
    loss = loss / norm
    amplitude = amplitude[..., None] / norm
    exponent = np.broadcast_to(exponent, amplitude.shape[:-1])[..., None]

    real_inverse = (
        1.0
        - _principal_value(loss, e, dispersion) / np.pi
        - 2.0 * amplitude / (np.pi * e_end**exponent) * _tail_integral((e / e_end) ** 2, exponent)
    )
    eps = np.full(loss.shape[:-1] + (energy.size,), np.nan + 1j * np.nan)
    eps[..., positive] = (real_inverse + 1j * loss) / (real_inverse**2 + loss**2)
    return np.moveaxis(eps, -1, axis)


def angular_factor(energy, beam_energy, collection_angle):
    """``ln(1 + (beta / theta_E)^2)`` with ``theta_E = E / (gamma m0 v^2)`` (Egerton eq. 4.26): the share of
    single scattering at loss ``energy`` (eV, > 0) that a collection semi-angle ``beta``
    (``collection_angle``, mrad) takes in at ``beam_energy`` (keV); dimensionless."""
    gamma = 1.0 + beam_energy * 1e3 / _M0C2_EV
    gamma_m0v2 = gamma * _M0C2_EV * (1.0 - 1.0 / gamma**2)  # eV
    return np.log1p((collection_angle * 1e-3 * gamma_m0v2 / np.asarray(energy, dtype=np.float64)) ** 2)


def _principal_value(loss, e, dispersion):
    """P∫_0^E_end loss(E') 2E' / (E'² − E²) dE' at every channel E of the grid e = e[0] + k ΔE (eV)."""
    n = e.size
    offset = np.arange(-(n - 1), n)
    odd = offset % 2 == 1
    maclaurin = np.zeros(offset.size)
    maclaurin[odd] = 2.0 / offset[odd]  # 2ΔE / ((j - i) ΔE) for j - i odd
    singular = -scipy_signal.fftconvolve(loss, maclaurin[(None,) * (loss.ndim - 1)], axes=-1)[..., n - 1 : 2 * n - 1]
    regular_kernel = dispersion / (2.0 * e[0] + dispersion * np.arange(2 * n - 1))  # ΔE / (E_i + E_j)
    regular = scipy_signal.fftconvolve(loss[..., ::-1], regular_kernel[(None,) * (loss.ndim - 1)], axes=-1)
    return singular + regular[..., n - 1 : 2 * n - 1]


def _tail_integral(x, exponent):
    """∫_0^1 u^(r-1) / (1 − x u²) du for x in [0, 1), shape (n_energy,), and r > 1, shape (..., 1)."""
    nodes, weights = np.polynomial.legendre.leggauss(_TAIL_NODES)
    u, w = (nodes + 1.0) / 2.0, weights / 2.0
    root = np.sqrt(x)
    singular = np.arctanh(root) / np.where(root > 0.0, root, 1.0) + (root == 0.0)  # ∫ du / (1 − x u²)
    remainder = ((u ** (exponent - 1.0) - 1.0) * w) @ (1.0 / (1.0 - x[:, None] * u**2)).T
    return singular + remainder


def _power_law_tail(e, loss, tail_window):
    """(A, r) of loss ≈ A E^-r over the last `tail_window` of the range.

    The window is cut into ``_TAIL_BINS`` bins; a straight line fitted to ln(bin mean) against ln(bin
    centre) gives r and A. Averaging first keeps noisy channels that scatter below 0 usable. Spectra where
    the fit fails (a bin mean <= 0, r <= 1) get A = 0 (no tail, with r = 2 as a finite placeholder) and a
    RuntimeWarning.
    """
    first = int(np.searchsorted(e, e[-1] - tail_window * (e[-1] - e[0])))
    bins = np.array_split(np.arange(first, e.size), min(_TAIL_BINS, e.size - first))
    centres = np.log([e[b].mean() for b in bins])
    values = np.stack([loss[..., b].mean(axis=-1) for b in bins], axis=-1).reshape(-1, len(bins))
    valid = np.all(values > 0.0, axis=1)
    log_amplitude, slope = np.polynomial.polynomial.polyfit(
        centres, np.log(np.where(valid[:, None], values, 1.0)).T, 1
    )
    exponent = -slope
    valid &= exponent > 1.0
    if not np.all(valid):
        warnings.warn(
            f"the power-law tail A E^-r failed for {int(np.sum(~valid))} spectrum/spectra (intensity <= 0 or "
            f"r <= 1 between {e[first]:.4g} and {e[-1]:.4g} eV); their loss function stops at the range "
            "end, which biases ε near the end and the refractive-index normalisation.",
            RuntimeWarning,
            stacklevel=3,
        )
    shape = loss.shape[:-1]
    amplitude = np.where(valid, np.exp(log_amplitude), 0.0).reshape(shape)
    return amplitude, np.where(valid, exponent, 2.0).reshape(shape)


# --------------------------------------------------------------------------
# HyperSpy wrapper
# --------------------------------------------------------------------------


def dielectric_function(signal, zlp, *, thickness=None, refractive_index=None, tail="power_law", tail_window=0.2):
    """Single-scattering distribution and dielectric function of spectra, with intervals over ZLP replicas.

    Meant for selected pixels (``signal.inav[...]``) or cluster-averaged spectra (a signal whose
    navigation axis runs over clusters), but any navigation shape works.

    Parameters
    ----------
    signal : exspy.signals.EELSSpectrum
        Low-loss spectra with the ZLP, shape ``(*nav, n_energy)``, counts; energy axis uniform in eV;
        metadata with the beam energy (keV) and collection angle (mrad); eager or lazy.
    zlp : hyperspy signal or array_like
        A model ZLP with the shape of ``signal.data``, or a stack of ZLP replicas of shape
        ``(n_replicas, *signal.data.shape)``; counts on the signal's channels; numpy or dask.
    thickness : float, array_like of shape nav, or navigation signal, optional
        Thickness in nm, > 0 (e.g. ``estimate_thickness(signal, zlp, mean_free_path=...).median``).
    refractive_index : float, optional
        Static refractive index n > 1, ``np.inf`` for a metal. Give exactly one of `thickness` and
        `refractive_index`.
    tail, tail_window
        Extrapolation beyond the range end, see :func:`kramers_kronig`.

    Returns
    -------
    DielectricResult
        ε1, ε2, Im(−1/ε) and the SSD, each a :class:`~stemml_core.eels.thickness.ReplicaInterval` of
        signals with the input's navigation and energy axes; lazy when an input is lazy.

    Raises
    ------
    ValueError
        If the energy axis is not a uniform axis in eV, the ZLP's shape or axis does not match, a
        microscope parameter is missing from the metadata, or the normalisation is invalid (see
        :func:`kramers_kronig`).

    Notes
    -----
    Per replica r: S_r = :func:`fourier_log_deconvolution` (spectrum, ZLP_r), then ε_r =
    :func:`kramers_kronig` (S_r) with N_ZLP,r; the result holds the 50th, 16th and 84th percentiles over r
    at every energy. The Warns of both functions apply.

    References
    ----------
    Egerton2011, Brokkelkamp2022

    Examples
    --------
    >>> import numpy as np
    >>> from stemml_core.synthetic.lowloss import single_spectrum
    >>> s, truth = single_spectrum(thickness=50.0, pi_plasmon_weight=0.0, onset_amplitude=0.0, dose=None)
    >>> result = dielectric_function(s, truth.zlp, thickness=50.0)
    >>> eps2 = result.eps2.median
    >>> round(float(eps2.isig[22.0].data[0]), 2)
    0.22
    """
    energy = _energy_axis(signal)
    beam_energy, collection_angle = _microscope_parameters(signal, ("beam_energy", "collection_angle"))
    extra, source, n_replicas = _zlp_source(signal, zlp, energy)
    if np.ndim(refractive_index) != 0:
        raise ValueError(f"refractive_index has shape {np.shape(refractive_index)}; expected one number.")
    if hasattr(thickness, "axes_manager"):
        thickness = thickness.data
    _check_normalisation(thickness, refractive_index)
    if thickness is not None:
        extra["thickness"] = _thickness_map(thickness, signal.data.shape[:-1])
    energy_axis = signal.axes_manager.signal_axes[0].get_axis_dictionary()
    out = map_pixels(
        signal,
        _dielectric_block,
        output_shape=(len(_QUANTITIES) * 3, energy.size),
        output_axes=[{"size": len(_QUANTITIES) * 3}, energy_axis],
        extra=extra,
        block_pixels=max(1, _BLOCK_VALUES // ((1 + n_replicas) * energy.size)),
        energy=energy,
        beam_energy=beam_energy,
        collection_angle=collection_angle,
        refractive_index=refractive_index,
        tail=tail,
        tail_window=tail_window,
        **source,
    )
    fields = {}
    for q, (name, quantity) in enumerate(_QUANTITIES):
        fields[name] = ReplicaInterval(*(
            _titled(out.isig[:, 3 * q + k], signal, quantity, label)
            for k, label in enumerate(("median", "low", "high"))
        ))
    return DielectricResult(**fields)


def _dielectric_block(block, *, energy, refractive_index, thickness=None, zlp=None, model=None, channels=None,
                      **settings):
    """(n, n_energy) spectra -> (n, 12, n_energy): percentiles of ε1, ε2, Im(-1/ε), SSD over the ZLP replicas."""
    spectra = block[:, None]
    zlps = _block_zlp(block, zlp=zlp, model=model, channels=channels)
    ssd = fourier_log_deconvolution(spectra, zlps)
    eps = kramers_kronig(
        ssd, energy, zlp_integral=zlps.sum(axis=-1),
        thickness=None if thickness is None else thickness[:, None], refractive_index=refractive_index,
        **settings,
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = np.imag(-1.0 / eps)
    quantities = np.stack([eps.real, eps.imag, loss, ssd], axis=1)  # (n, 4, n_replicas, n_energy)
    band = np.moveaxis(_replica_percentiles(quantities, axis=2), -1, 2)  # (n, 4, 3, n_energy)
    return band.reshape(block.shape[0], len(_QUANTITIES) * 3, energy.size)


def _thickness_map(thickness, nav_shape):
    """A thickness (nm) as a navigation-shaped map: one value is repeated, a map must have the shape nav."""
    xp = da if isinstance(thickness, da.Array) else np
    values = thickness if xp is da else np.asarray(thickness, dtype=np.float64)
    if values.size == 1:
        values = xp.reshape(values, ())
    if values.shape not in ((), nav_shape):
        raise ValueError(f"thickness has shape {values.shape}; expected one value or the navigation shape {nav_shape}.")
    return xp.broadcast_to(values, nav_shape)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _check_normalisation(thickness, refractive_index):
    """Raise unless exactly one of a positive thickness (nm) and a refractive index > 1 is given."""
    if (thickness is None) == (refractive_index is None):
        raise ValueError(
            f"thickness={thickness!r} and refractive_index={refractive_index!r}: expected exactly one of them "
            "(thickness in nm, or the static refractive index n > 1, np.inf for a metal)."
        )
    if thickness is not None:
        if not isinstance(thickness, da.Array):  # a lazy thickness map is checked when computed
            _checked_array("thickness", thickness, "nm")
    else:
        n = np.asarray(refractive_index, dtype=np.float64)
        if not np.all(n > 1.0):
            raise ValueError(
                f"refractive_index={refractive_index!r} is invalid; expected n > 1 (np.inf for a metal): the sum "
                "rule normalises by 1 - 1/n², which vanishes at n = 1."
            )


def _checked_array(name, values, unit):
    array = np.asarray(values, dtype=np.float64)
    bad = ~(np.isfinite(array) & (array > 0.0))
    if np.any(bad):
        raise ValueError(
            f"{name}={float(array[bad].flat[0])!r} {unit} (in {int(bad.sum())} spectrum/spectra) is invalid; "
            f"expected a finite value > 0 {unit}."
        )
    return array


def _checked_positive(name, value, unit):
    return float(_checked_array(name, value, unit))


def _checked_energy(energy, n_energy):
    energy = np.asarray(energy, dtype=np.float64)
    if energy.shape != (n_energy,):
        raise ValueError(f"energy has shape {energy.shape}; expected ({n_energy},), one value per channel (eV).")
    step = np.diff(energy)
    if not (np.all(step > 0.0) and np.ptp(step) <= 1e-3 * step.mean()):
        raise ValueError("the energy axis is not uniform and increasing; expected a constant dispersion (eV).")
    if np.sum(energy > step[0] / 2.0) < 10:
        raise ValueError(
            f"the energy axis ends at {energy[-1]:.4g} eV with fewer than 10 channels above 0 eV; expected a "
            "low-loss range that extends beyond the plasmon."
        )
    return energy
