"""A low-loss spectrum image with every kind of spectral feature planted, and its ground truth.

:func:`feature_sample` builds a flake on vacuum whose loss function carries, over the whole low-loss
range, the features a feature search must find (:func:`~stemml_core.synthetic.lowloss.simulate_lowloss`
does the physics):

============  ===========  ===========  ====================================================
feature       profile      energy (eV)  where
============  ===========  ===========  ====================================================
defect        Gaussian     0.80         chosen pixels (a 3 x 3 patch and two single pixels)
A, B          Gaussian     1.88, 2.03   excitons, upper half of the flake, shifting by 20 meV
interband     Gaussian     2.90         interband transition, upper half of the flake
surface       Drude        Ep / sqrt 2  surface plasmon, within 4 pixels of the flake's edge
bulk          Drude        Ep = 20      bulk plasmon, the whole flake (the forward model's own)
============  ===========  ===========  ====================================================

The defect state sits in the middle of the 1.5 eV (indirect) band gap. The lower half of the flake away
from its edge carries the bulk plasmon alone: with the vacuum these are the pixels free of any other
feature.

For each feature the truth holds its maps (energy, width, height in Im[-1/eps]), a mask of the pixels
where it is planted and its height in counts relative to the noise of the channel at its energy (the
square root of the counts there, and the read noise), so that accuracy can be scored on the features a
detector can be asked to find.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stemml_core.synthetic.lowloss import LowLossTruth, _checked, simulate_lowloss

__all__ = ["FEATURES", "FeatureTruth", "feature_sample"]

#: Planted features: name -> (profile, energy eV or None for the plasmons, width eV (FWHM, or the
#: damping for Drude profiles)).
FEATURES = {
    "defect": ("gaussian", 0.80, 0.12),
    "A": ("gaussian", 1.88, 0.08),
    "B": ("gaussian", 2.03, 0.10),
    "interband": ("gaussian", 2.90, 0.30),
    "surface": ("drude", None, None),
    "bulk": ("drude", None, None),
}
_BAND_GAP = 1.5  # eV, indirect
_EXCITON_SHIFT = 0.02  # eV, amplitude of the smooth shift of A, B and the interband transition along x
_EDGE_REACH = 4.0  # px: the surface plasmon is planted up to this distance from the edge


@dataclass(frozen=True)
class FeatureTruth:
    """Ground truth of :func:`feature_sample`; maps have the navigation shape ``(rows, cols)``.

    Attributes
    ----------
    lowloss : LowLossTruth
        Truth of the spectra (noise-free ZLP and inelastic counts, loss function, thickness, ...).
    features : dict
        Name -> dict with ``energy`` (eV), ``width`` (eV: FWHM of a Gaussian, damping Gamma of a
        Drude term, about its FWHM) and ``amplitude`` (height in Im[-1/eps]) maps, NaN where the
        feature is absent; ``mask`` (bool, where it is planted); ``height`` (its height in counts per
        channel, approximately: single scattering at its energy, attenuated by exp(-t/lambda) and, for a
        Gaussian, lowered by the resolution); ``snr`` (``height`` over the noise of that channel,
        standard deviations; 0 where absent) and ``shape`` (``"gaussian"`` or ``"drude"``).
    feature_free : numpy.ndarray of bool
        Pixels with no planted feature but the bulk plasmon: the vacuum, and the lower half of the
        flake beyond the surface plasmon's reach and away from the defect pixels.
    vacuum : numpy.ndarray of bool
        Pixels without specimen.
    params : dict
        The settings, JSON-serialisable.
    """

    lowloss: LowLossTruth
    features: dict
    feature_free: np.ndarray
    vacuum: np.ndarray
    params: dict


def feature_sample(nav_shape=(16, 24), *, dose=1e8, plasmon_energy=20.0, plasmon_width=3.5,
                   surface_amplitude=1.5, exciton_amplitude=0.3, defect_amplitude=0.15,
                   energy_range=(-1.0, 28.0), dispersion=0.025, random_state=0, **kwargs):
    """A flake with defect states, excitons, an interband transition and surface and bulk plasmons.

    Parameters
    ----------
    nav_shape : tuple of int
        ``(rows, cols)``, rows >= 6 and cols >= 10. Vacuum fills the first 20 % of the columns; the
        flake's t/lambda rises from 0.25 at its edge to 0.45 at the last column.
    dose : float or None
        Incident electrons per spectrum; None for noise-free spectra per electron.
    plasmon_energy, plasmon_width : float
        Bulk plasmon energy Ep and damping Gamma, eV. The surface plasmon of the flake's edge is the
        Drude term at Ep / sqrt(2) with the same damping.
    surface_amplitude : float
        Height of the surface plasmon at the edge in Im[-1/eps] (the bulk plasmon's is Ep / Gamma);
        it decays as exp(-d / 1.5) with the distance d (pixels) from the edge and stops beyond 4.
    exciton_amplitude : float
        Height of the A exciton in Im[-1/eps]; B has 0.8 times, the interband transition 0.6 times.
    defect_amplitude : float
        Height of the mid-gap defect state in Im[-1/eps].
    energy_range, dispersion
        Recorded range and channel width, eV (see :func:`simulate_lowloss`).
    random_state : int or None
        Seed of the noise and of the two single defect pixels.
    **kwargs
        Further settings of :func:`simulate_lowloss` (``zlp_fwhm``, ``read_noise``, ...).

    Returns
    -------
    signal : exspy.signals.EELSSpectrum, shape (rows, cols, n_energy)
        float32 counts.
    truth : FeatureTruth

    Raises
    ------
    ValueError
        A navigation shape that is too small, a bad amplitude, or a setting
        :func:`simulate_lowloss` rejects.

    Examples
    --------
    >>> signal, truth = feature_sample((8, 12), dose=None)
    >>> sorted(truth.features), int(truth.features["defect"]["mask"].sum())
    (['A', 'B', 'bulk', 'defect', 'interband', 'surface'], 11)
    >>> round(float(truth.features["surface"]["energy"][0, 3]), 3)  # 20 / sqrt(2) eV
    14.142
    """
    if len(nav_shape) != 2 or int(nav_shape[0]) < 6 or int(nav_shape[1]) < 10:
        raise ValueError(f"nav_shape={nav_shape!r} is too small; expected (rows, cols) with rows >= 6, cols >= 10")
    for name, value in (("surface_amplitude", surface_amplitude), ("exciton_amplitude", exciton_amplitude),
                        ("defect_amplitude", defect_amplitude)):
        _checked(name, value, "", low=0.0)
    _checked("plasmon_energy", plasmon_energy, "eV", low=4.0)
    _checked("plasmon_width", plasmon_width, "eV", low=0.0)
    rows, cols = int(nav_shape[0]), int(nav_shape[1])
    rng = np.random.default_rng(random_state)
    row, col = np.mgrid[0:rows, 0:cols].astype(float)
    edge = int(round(0.2 * cols))
    vacuum = col < edge
    distance = col - edge  # px from the edge, >= 0 on the flake
    t_over_lambda = np.where(vacuum, 0.0, 0.25 + 0.2 * distance / max(cols - 1 - edge, 1))
    upper = ~vacuum & (row < rows // 2)
    near_edge = ~vacuum & (distance < _EDGE_REACH)

    # Defect pixels: a 3 x 3 patch in the lower half, away from the edge, and two single pixels drawn
    # in the upper half (where the excitons are).
    defect = np.zeros((rows, cols), dtype=bool)
    r0, c0 = rows // 2 + (rows - rows // 2) // 2, edge + int(_EDGE_REACH) + (cols - edge - int(_EDGE_REACH)) // 2
    defect[r0 - 1: r0 + 2, c0 - 1: c0 + 2] = True
    upper_choice = np.flatnonzero(upper.ravel() & ~defect.ravel())
    defect.ravel()[rng.choice(upper_choice, size=2, replace=False)] = True

    shift = _EXCITON_SHIFT * np.sin(np.pi * distance / max(cols - edge, 1))
    surface_energy = plasmon_energy / math.sqrt(2.0)
    specs = {
        "defect": (FEATURES["defect"][1], FEATURES["defect"][2], defect_amplitude, defect),
        "A": (FEATURES["A"][1] + shift, FEATURES["A"][2], exciton_amplitude, upper),
        "B": (FEATURES["B"][1] + shift, FEATURES["B"][2], 0.8 * exciton_amplitude, upper),
        "interband": (FEATURES["interband"][1] + shift, FEATURES["interband"][2], 0.6 * exciton_amplitude, upper),
        "surface": (surface_energy, plasmon_width, surface_amplitude * np.exp(-distance / 1.5), near_edge),
    }
    peaks = {}
    for name, (energy, width, amplitude, mask) in specs.items():
        peaks[name] = {"energy": np.broadcast_to(energy, (rows, cols)).astype(float),
                       "width": np.broadcast_to(width, (rows, cols)).astype(float),
                       "amplitude": np.where(mask, amplitude, 0.0), "shape": FEATURES[name][0]}
    kwargs.setdefault("title", "Synthetic flake with low-loss features")
    kwargs.setdefault("pi_plasmon_weight", 0.0)
    signal, lowloss = simulate_lowloss(
        None, np.where(vacuum, np.nan, _BAND_GAP), np.where(vacuum, np.nan, 1.5), t_over_lambda=t_over_lambda,
        peaks=peaks, dose=dose, energy_range=energy_range, dispersion=dispersion, plasmon_energy=plasmon_energy,
        plasmon_width=plasmon_width, random_state=None if random_state is None else int(rng.integers(2**63)),
        **kwargs,
    )

    # Heights in counts: single scattering per unit Im[-1/eps] at the feature's energy, attenuated by
    # exp(-t/lambda), and (Gaussians) lowered by the resolution; noise: sqrt(counts) and read noise.
    e = lowloss.energy
    total = lowloss.zlp + lowloss.inelastic
    per_loss = np.divide(lowloss.single_scattering, lowloss.loss_function, out=np.zeros_like(total),
                         where=lowloss.loss_function > 0)
    attenuation = np.exp(-lowloss.t_over_lambda)
    read = 0.0 if dose is None else float(lowloss.params["read_noise"])
    features = {}
    planted = {name: (p["energy"], p["width"], p["amplitude"], p["shape"]) for name, p in peaks.items()}
    planted["bulk"] = (np.full((rows, cols), float(plasmon_energy)), np.full((rows, cols), float(plasmon_width)),
                       np.where(vacuum, 0.0, plasmon_energy / plasmon_width), "drude")
    for name, (energy, width, amplitude, shape) in planted.items():
        mask = amplitude > 0
        channel = np.clip(np.searchsorted(e, energy), 0, e.size - 1)
        at = np.take_along_axis(per_loss, channel[..., None], axis=-1)[..., 0]
        counts = np.take_along_axis(total, channel[..., None], axis=-1)[..., 0]
        broadening = width / np.hypot(width, lowloss.zlp_fwhm) if shape == "gaussian" else 1.0
        height = np.where(mask, amplitude * at * attenuation * broadening, 0.0)
        noise = np.sqrt(np.clip(counts, 0.0, None) + read**2)
        features[name] = {
            "energy": np.where(mask, energy, np.nan), "width": np.where(mask, width, np.nan),
            "amplitude": np.where(mask, amplitude, np.nan), "mask": mask, "height": height,
            "snr": np.divide(height, noise, out=np.zeros_like(height), where=noise > 0) if dose is not None
            else np.where(mask, np.inf, 0.0),
            "shape": shape,
        }
    feature_free = vacuum | (~vacuum & ~upper & ~near_edge & ~defect)
    params = {"nav_shape": [rows, cols], "dose": dose, "plasmon_energy": float(plasmon_energy),
              "plasmon_width": float(plasmon_width), "surface_amplitude": float(surface_amplitude),
              "exciton_amplitude": float(exciton_amplitude), "defect_amplitude": float(defect_amplitude),
              "band_gap": _BAND_GAP, "energy_range": list(energy_range), "dispersion": float(dispersion),
              "random_state": random_state}
    return signal, FeatureTruth(lowloss=lowloss, features=features, feature_free=feature_free, vacuum=vacuum,
                                params=params)
