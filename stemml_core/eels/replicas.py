"""Monte Carlo replicas of the inelastic signal of every pixel.

Replica r of a pixel is its recorded spectrum plus a Gaussian draw of its counting
noise, minus the ZLP of the ensemble's replica r :cite:`Roest2021`: fitting every
replica and taking percentiles gives intervals that carry both the uncertainty of the
ZLP and the noise of the data. The noise draws are seeded by a user seed and the
pixel's flat index, so that any partition of the image into blocks (eager, lazy,
``dask.distributed``) gives the same numbers.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

__all__ = ["inelastic_replicas", "noise_variance"]


def check_replica_input(signal, model_energy, random_state, caller: str, *, image: bool = True) -> np.ndarray:
    """The checks every replica analysis of a spectrum image makes first; returns the energy axis, eV.

    ``signal`` must be a HyperSpy signal with one energy axis (and navigation axes when ``image``)
    equal to ``model_energy``, the axis the ZLP model was fitted on, and ``random_state`` a
    non-negative int (it seeds every pixel's noise draws). ``caller`` names the function in the
    messages.
    """
    from hyperspy.signal import BaseSignal

    if not isinstance(signal, BaseSignal) or signal.axes_manager.signal_dimension != 1:
        raise ValueError(f"{caller} got {type(signal).__name__}; expected an EELSSpectrum (one energy axis)")
    if image and signal.axes_manager.navigation_dimension == 0:
        raise ValueError(f"{caller} got a single spectrum; expected a spectrum image (navigation axes)")
    energy = np.asarray(signal.axes_manager.signal_axes[0].axis, dtype=np.float64)
    model_energy = np.asarray(model_energy, dtype=np.float64)
    if energy.shape != model_energy.shape or not np.allclose(energy, model_energy):
        raise ValueError(
            f"the signal's energy axis ({energy[0]:.4g} to {energy[-1]:.4g} eV, {energy.size} channels) "
            f"differs from the model's ({model_energy[0]:.4g} to {model_energy[-1]:.4g} eV, "
            f"{model_energy.size} channels); crop the signal as for the fit"
        )
    if not isinstance(random_state, (int, np.integer)) or isinstance(random_state, bool) or random_state < 0:
        raise ValueError(f"random_state={random_state!r}; expected a non-negative int (it seeds every pixel's draws)")
    return energy


def noise_variance(signal):
    """The per-channel noise variance of a signal's counts, counts² (numpy or dask, the data's shape).

    HyperSpy's ``metadata.Signal.Noise_properties.variance`` when set (a number or a
    signal, e.g. by :func:`~stemml_core.eels.denoise.pool_spectra`), else Poisson
    statistics with gain 1: ``max(I, 0)``.

    Raises
    ------
    ValueError
        A variance that is neither a number nor of the data's shape.
    """
    variance = signal.metadata.get_item("Signal.Noise_properties.variance")
    xp = da if signal._lazy else np
    if variance is None:
        return xp.clip(signal.data, 0, None)
    data = variance.data if hasattr(variance, "data") else variance
    if np.ndim(data) == 0:
        return xp.full(signal.data.shape, float(data))
    if tuple(data.shape) != tuple(signal.data.shape):
        raise ValueError(
            f"metadata.Signal.Noise_properties.variance has shape {tuple(data.shape)}; expected a number or "
            f"the data's shape {tuple(signal.data.shape)}"
        )
    return data


def inelastic_replicas(block, model, energy, inside, *, variance=None, pixel=None, random_state=0):
    """Replicas of the inelastic spectra of a block of pixels, on the channels ``inside``.

    Parameters
    ----------
    block : numpy.ndarray, shape (n, n_energy)
        Spectra, counts, on the model's energy axis.
    model : stemml_core.eels.zlp.ZLPEnsemble
        Fitted ensemble; one replica per kept network.
    energy : numpy.ndarray, shape (n_energy,)
        Energy loss, eV.
    inside : numpy.ndarray of bool, shape (n_energy,)
        Channels to return (e.g. a fit window).
    variance : numpy.ndarray, shape (n, n_energy), optional
        Noise variance of ``block``, counts²; None: no noise draws.
    pixel : numpy.ndarray of int, shape (n,)
        Flat index of each pixel in the image (seeds its draws); required with ``variance``.
    random_state : int
        Seed of the noise draws.

    Returns
    -------
    numpy.ndarray, shape (n_replicas, n, inside.sum())
        Counts.
    """
    replicas = block[None, :, inside] - model.predict_replicas(block, energy, channels=inside)
    if variance is not None:
        sigma = np.sqrt(np.clip(variance[:, inside], 0.0, None))
        for i in range(block.shape[0]):
            rng = np.random.default_rng([random_state, int(pixel[i])])
            replicas[:, i] += sigma[i] * rng.standard_normal((replicas.shape[0], sigma.shape[1]))
    return replicas
