"""Deconvolution of low-loss spectra: Richardson–Lucy by the ZLP, next to Fourier-log deconvolution.

Two deconvolutions remove different things from a recorded low-loss spectrum
``I = Z ⊛ (δ + P)``, where ``Z`` is the zero-loss peak (the instrument resolution
times ``I0 exp(-t/λ)``) and ``P = Σ_n (J1 / I0)^(⊛n) / n!`` the unbroadened plural
scattering of the single-scattering distribution ``J1`` :cite:`Egerton2011`:

- Richardson–Lucy (RL) by the unit-area ZLP shape ``R = Z / ∫Z`` (exspy's
  ``EELSSpectrum.richardson_lucy_deconvolution``, :cite:`Gloter2003`) sharpens the
  whole spectrum: it removes the resolution broadening but keeps the plural
  scattering, so its inelastic part estimates ``I0 exp(-t/λ) P``
  (:func:`unbroadened_inelastic` gives that from a generator's truth). It is
  iterative, keeps counts non-negative and amplifies noise with the iterations.
- Fourier-log deconvolution (:func:`~stemml_core.eels.dielectric.fourier_log_deconvolution`)
  removes the plural scattering and, as written in this project, reconvolves with
  the ZLP: it gives ``exp(-t/λ) R ⊛ J1``, single scattering at the resolution of the data.
- Both together, RL of the Fourier-log result by ``R``, give ``exp(-t/λ) J1``: the
  single-scattering distribution without broadening, the generator's
  ``single_scattering`` times ``exp(-t/λ)``.

:func:`convolve` applies a PSF with the same alignment as exspy's RL (the PSF's
maximum is the zero lag), to build the like-for-like truth of each result.
"""

from __future__ import annotations

import numpy as np
from scipy import fft
from scipy.signal import fftconvolve

__all__ = ["convolve", "richardson_lucy", "unbroadened_inelastic"]


def _unit_psf(psf, n_energy, nav_shape):
    """The PSF as float64 (..., n_energy), clipped at 0 and normalised to unit sum, checked."""
    values = np.asarray(getattr(psf, "data", psf), dtype=np.float64)
    if values.ndim == 0 or values.shape[-1] != n_energy:
        raise ValueError(
            f"psf has shape {values.shape}; expected the spectra's {n_energy} channels on its last axis (the ZLP "
            "sampled on the same energy axis, its maximum at zero loss)"
        )
    if values.ndim > 1 and values.shape[:-1] != tuple(nav_shape):
        raise ValueError(
            f"psf has navigation shape {values.shape[:-1]}; expected one PSF of {n_energy} channels or one per "
            f"spectrum, navigation shape {tuple(nav_shape)}"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError("psf has NaN or infinite values; expected a finite ZLP")
    values = np.clip(values, 0.0, None)
    total = values.sum(axis=-1, keepdims=True)
    if not np.all(total > 0):
        raise ValueError("a psf has no positive values; expected a ZLP with a positive area")
    return values / total


def convolve(spectra, psf):
    """Convolve spectra with a PSF whose maximum marks zero shift, on the same channels.

    The alignment of exspy's Richardson–Lucy: channel ``i`` of the result is
    ``Σ_j psf[j] x[i - j + argmax(psf)]``, the PSF normalised to unit sum, so that
    ``richardson_lucy(convolve(x, psf), psf)`` tends to ``x``.

    Parameters
    ----------
    spectra : array_like, shape (..., n_energy)
        Spectra (or a hyperspy signal).
    psf : array_like, shape (n_energy,) or (..., n_energy)
        One PSF, or one per spectrum; non-negative, positive sum.

    Returns
    -------
    numpy.ndarray, shape (..., n_energy)
        float64.
    """
    x = np.asarray(getattr(spectra, "data", spectra), dtype=np.float64)
    kernel = _unit_psf(psf, x.shape[-1], x.shape[:-1])
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    kernels = np.broadcast_to(kernel, x.shape).reshape(-1, n)
    out = np.empty_like(rows)
    for i, (row, k) in enumerate(zip(rows, kernels)):
        centre = int(np.argmax(k))
        out[i] = fftconvolve(k, row)[centre:centre + n]
    return out.reshape(x.shape)


def richardson_lucy(signal, psf, iterations: int = 15, *, show_progressbar: bool = False):
    """Richardson–Lucy deconvolution of low-loss spectra by a ZLP, with exspy.

    A thin wrapper of exspy's ``EELSSpectrum.richardson_lucy_deconvolution`` that
    checks its input, normalises the PSF to unit area (exspy's iteration conserves
    the counts only then) and sets negative counts (read noise) to 0, which the
    multiplicative update needs.

    Parameters
    ----------
    signal : exspy EELSSpectrum or hyperspy Signal1D
        Spectra, counts, one energy axis; any navigation shape, in memory. Not modified.
    psf : array_like or hyperspy signal, shape (n_energy,) or (*nav, n_energy)
        The point-spread function on the same channels, e.g. the modelled ZLP of each
        spectrum (:meth:`~stemml_core.eels.zlp.ZLPEnsemble.predict`, padded with zeros
        where the spectra run beyond the model's axis). Its maximum marks zero shift.
    iterations : int
        RL iterations; more sharpen more and amplify the noise more (exspy's default 15).
    show_progressbar : bool
        exspy's progress bar over the spectra.

    Returns
    -------
    exspy.signals.EELSSpectrum
        Same axes and metadata, float64 counts: the ZLP sharpened towards a spike at
        zero loss, the inelastic signal without the resolution broadening but with its
        plural scattering (compare with :func:`unbroadened_inelastic`).

    Raises
    ------
    ValueError
        Not one signal axis, a PSF of other channels or navigation shape (naming the
        expected shape), a PSF without positive values, non-finite counts or
        ``iterations`` < 1.
    NotImplementedError
        A lazy signal (load it with ``signal.compute()`` first).

    Examples
    --------
    >>> from stemml_core.synthetic.lowloss import single_spectrum
    >>> s, truth = single_spectrum(dose=None, energy_range=(-1.0, 20.0))
    >>> sharp = richardson_lucy(s, truth.zlp, iterations=10)
    >>> bool(sharp.data.max() > s.data.max())
    True
    """
    from exspy.signals import EELSSpectrum

    am = signal.axes_manager
    if am.signal_dimension != 1:
        raise ValueError(f"the signal has {am.signal_dimension} signal axes; expected one energy axis (a Signal1D)")
    if signal._lazy:
        raise NotImplementedError("the signal is lazy; call signal.compute() (or crop it) first")
    if not (isinstance(iterations, (int, np.integer)) and not isinstance(iterations, bool) and iterations >= 1):
        raise ValueError(f"iterations={iterations!r}; expected an integer >= 1")
    data = np.asarray(signal.data, dtype=np.float64)
    if not np.all(np.isfinite(data)):
        raise ValueError("the spectra have NaN or infinite counts; expected finite counts")
    nav_shape = data.shape[:-1]
    kernel = _unit_psf(psf, data.shape[-1], nav_shape)
    work = signal._deepcopy_with_new_data(np.clip(data, 0.0, None))
    if not isinstance(work, EELSSpectrum):
        work.set_signal_type("EELS")
    kernel_signal = work._deepcopy_with_new_data(kernel) if kernel.ndim > 1 else EELSSpectrum(kernel)
    if kernel.ndim == 1:
        kernel_signal.axes_manager.signal_axes[0].update_from(am.signal_axes[0], ("scale", "offset", "units"))
    out = work.richardson_lucy_deconvolution(kernel_signal, iterations=int(iterations),
                                             show_progressbar=show_progressbar)
    out.metadata.General.title = f"{signal.metadata.General.title} (Richardson-Lucy, {int(iterations)} iterations)"
    return out


def unbroadened_inelastic(single_scattering, t_over_lambda, dose, energy):
    """The inelastic spectrum without resolution broadening: what RL by the ZLP should give.

    ``I0 exp(-t/λ) Σ_{n ≥ 1} (J1 / I0)^(⊛n) / n!``, the plural scattering of the
    single-scattering distribution on the loss grid, by FFT (padded against wrap-around).

    Parameters
    ----------
    single_scattering : array_like, shape (..., n_energy)
        ``J1`` in counts per channel for ``dose`` incident electrons, zero at losses <= 0
        (e.g. :class:`~stemml_core.synthetic.lowloss.LowLossTruth` ``.single_scattering``).
    t_over_lambda : array_like, shape (...)
        t/λ of each spectrum (``truth.t_over_lambda``; it includes losses beyond the axis).
    dose : float
        Incident electrons I0 (``truth.dose``).
    energy : array_like, shape (n_energy,)
        Energy loss, eV, uniform; it must contain 0 (to half a channel).

    Returns
    -------
    numpy.ndarray, shape (..., n_energy)
        Counts per channel, 0 at losses < 0.
    """
    j1 = np.asarray(single_scattering, dtype=np.float64)
    energy = np.asarray(energy, dtype=np.float64)
    step = energy[1] - energy[0]
    zero = int(np.argmin(np.abs(energy)))
    if j1.shape[-1] != energy.size or abs(energy[zero]) > step / 2 or not dose or dose <= 0:
        raise ValueError(f"single_scattering has {j1.shape[-1]} channels, the energy axis {energy.size} from "
                         f"{energy[0]:.3g} eV, dose={dose!r}; expected the same channels, an axis through 0 eV and "
                         "a dose > 0")
    loss = j1[..., zero:] / dose
    n_fft = fft.next_fast_len(2 * loss.shape[-1], real=True)
    plural = fft.irfft(np.expm1(fft.rfft(loss, n_fft)), n_fft)[..., :loss.shape[-1]]
    out = np.zeros_like(j1)
    out[..., zero:] = dose * np.exp(-np.asarray(t_over_lambda, dtype=np.float64))[..., None] * plural
    return out
