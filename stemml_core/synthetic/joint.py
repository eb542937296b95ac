"""A joint synthetic sample: a 4D-STEM scan and a low-loss spectrum image of one strained flake.

The band gap follows the local strain through a deformation potential ``D``:
``Eg = Eg0 + D (exx + eyy)``. The spectrum image is recorded on a grid of the same scan step but
shifted by a known ``offset`` in scan steps, as two scans of one region taken one after the other
are; registering the two scans recovers it.

The default ``D = -5 eV`` per unit of ``exx + eyy`` (about -0.1 eV per % of biaxial strain) is the
order measured for the direct gap of MoS2 under biaxial strain (Lloyd et al., Nano Lett. 16, 5836
(2016), -99 meV/%); it is illustrative here, where the gap is indirect (b = 3/2).
"""

from __future__ import annotations

from dataclasses import dataclass

import hyperspy.api as hs
import numpy as np

from stemml_core._frozen import ReadOnlyArrays
from stemml_core.synthetic.diffraction import StrainTruth, _gradient_from_components, simulate_4dstem
from stemml_core.synthetic.lowloss import LowLossTruth, simulate_lowloss

__all__ = ["JointTruth", "strain_and_lowloss"]


@dataclass(frozen=True)
class JointTruth(ReadOnlyArrays):
    """Ground truth of :func:`strain_and_lowloss`.

    Attributes
    ----------
    offset : tuple of float
        ``(rows, cols)`` in scan steps: spectrum-image pixel ``(r, c)`` sits at 4D-STEM scan
        position ``(r + offset[0], c + offset[1])``.
    deformation_potential : float
        ``D``, eV per unit of ``exx + eyy``.
    band_gap0 : float
        ``Eg0``, eV: the gap of the unstrained flake.
    exx, eyy : numpy.ndarray
        ``(rows, cols)`` point strain at the spectrum-image pixels (dimensionless), NaN in vacuum.
    band_gap : numpy.ndarray
        ``(rows, cols)`` eV, ``Eg0 + D (exx + eyy)`` at the spectrum-image pixels, NaN in vacuum.
    vacuum : numpy.ndarray
        ``(rows, cols)`` bool, vacuum at the spectrum-image pixels.
    strain : StrainTruth
        Truth of the 4D-STEM scan (on its own grid).
    lowloss : LowLossTruth
        Truth of the spectrum image.
    params : dict
        The generator's settings.
    """

    offset: tuple
    deformation_potential: float
    band_gap0: float
    exx: np.ndarray
    eyy: np.ndarray
    band_gap: np.ndarray
    vacuum: np.ndarray
    strain: StrainTruth
    lowloss: LowLossTruth
    params: dict


def _fields(height, width, amplitude):
    """Biaxial strain and vacuum callables ``f(y, x)`` (nm) of the joint flake."""
    sigma = 0.2 * min(height, width)
    bumps = ((amplitude, 0.3 * width, 0.55 * height), (-amplitude, 0.65 * width, 0.5 * height))

    def biaxial(y, x):
        value = np.zeros(np.broadcast_shapes(np.shape(y), np.shape(x)))
        for a, x0, y0 in bumps:
            value = value + a * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))
        return value

    def gradient(y, x):
        e = biaxial(y, x)
        zero = np.zeros_like(e)
        return _gradient_from_components(e, e, zero, zero)

    def vacuum(y, x):
        edge = y < height * (0.15 + 0.05 * np.sin(2 * np.pi * x / width))
        hole = (x - 0.8 * width) ** 2 + (y - 0.78 * height) ** 2 < (0.1 * min(height, width)) ** 2
        return edge | hole

    return biaxial, gradient, vacuum


def strain_and_lowloss(
    scan_shape: tuple[int, int] = (24, 32),
    *,
    offset: tuple[float, float] = (2.0, 3.0),
    deformation_potential: float = -5.0,
    band_gap0: float = 1.6,
    strain_amplitude: float = 0.01,
    t_over_lambda: float = 0.7,
    scan_step: float = 1.0,
    dose_4dstem: float | None = 1e6,
    dose_eels: float | None = 1e7,
    detector_shape: tuple[int, int] = (96, 96),
    energy_range: tuple[float, float] = (-1.0, 100.0),
    random_state: int | None = 0,
) -> tuple[hs.signals.Signal2D, hs.signals.Signal1D, JointTruth]:
    """A strained MoS2-like flake seen by nanobeam 4D-STEM and by low-loss EELS.

    Layout, in fractions of the 4D-STEM field of view (``x`` across, ``y`` down): vacuum above
    ``y = 0.15 + 0.05 sin(2 pi x)`` and in a hole of radius 0.1 of the smaller side at
    ``(0.8, 0.78)``; biaxial strain ``exx = eyy`` made of a tensile Gaussian bump
    (``+strain_amplitude``) at ``(0.3, 0.55)`` and a compressive one at ``(0.65, 0.5)``, both of
    width ``0.2`` of the smaller side, so ``exx + eyy`` spans about ``±2 strain_amplitude`` and the
    gap ``±2 |D| strain_amplitude`` (±0.1 eV at the defaults). The flake has ``t/λ =
    t_over_lambda`` everywhere and an indirect gap (b = 3/2).

    Parameters
    ----------
    scan_shape : tuple of int
        ``(rows, cols)`` of both scans.
    offset : tuple of float
        ``(rows, cols)`` scan steps: the spectrum image's pixel ``(r, c)`` lies at 4D-STEM scan
        position ``(r + offset[0], c + offset[1])``.
    deformation_potential : float
        ``D``, eV per unit of ``exx + eyy``.
    band_gap0 : float
        Gap of the unstrained flake, eV.
    strain_amplitude : float
        Peak biaxial strain of the bumps (0.01 = 1 %).
    t_over_lambda : float
        Relative thickness of the flake.
    scan_step : float
        nm, both scans.
    dose_4dstem, dose_eels : float or None
        Electrons per pattern and per spectrum; None for noise-free data.
    detector_shape : tuple of int
        4D-STEM detector pixels.
    energy_range : tuple of float
        First and last channel of the spectra, eV.
    random_state : int or None
        Seed of both scans' noise.

    Returns
    -------
    patterns : hyperspy.signals.Signal2D
        ``(rows, cols, H, W)`` 4D-STEM scan (see :func:`simulate_4dstem`).
    spectra : exspy.signals.EELSSpectrum
        ``(rows, cols, n_energy)`` low-loss spectrum image (see :func:`simulate_lowloss`).
    truth : JointTruth

    Examples
    --------
    >>> dp, eels, truth = strain_and_lowloss((12, 16), dose_4dstem=None, dose_eels=None, detector_shape=(48, 48))
    >>> dp.data.shape[:2] == eels.data.shape[:2] == (12, 16), truth.offset
    (True, (2.0, 3.0))
    """
    rows, cols = int(scan_shape[0]), int(scan_shape[1])
    height, width = rows * scan_step, cols * scan_step
    biaxial, gradient, vacuum = _fields(height, width, strain_amplitude)
    rng = np.random.default_rng(random_state)
    seed_4d, seed_eels = (int(s) for s in rng.integers(2**63, size=2))
    patterns, strain = simulate_4dstem(
        gradient, scan_shape=(rows, cols), vacuum=vacuum, scan_step=scan_step, detector_shape=detector_shape,
        dose=dose_4dstem, random_state=seed_4d,
    )
    patterns.metadata.General.title = "Synthetic strained MoS2 flake (4D-STEM)"

    offset = (float(offset[0]), float(offset[1]))
    row, col = np.mgrid[0:rows, 0:cols].astype(float)
    y, x = (row + offset[0]) * scan_step, (col + offset[1]) * scan_step
    empty = vacuum(y, x)
    e = np.where(empty, np.nan, biaxial(y, x))
    band_gap = band_gap0 + deformation_potential * (e + e)
    spectra, lowloss = simulate_lowloss(
        None, band_gap, np.where(empty, np.nan, 1.5), t_over_lambda=np.where(empty, 0.0, t_over_lambda),
        energy_range=energy_range, dose=dose_eels, pixel_size=scan_step, random_state=seed_eels,
        title="Synthetic strained MoS2 flake (low-loss EELS)",
    )
    params = {
        "sample": "strain_and_lowloss", "scan_shape": (rows, cols), "offset_steps": offset,
        "deformation_potential_eV": deformation_potential, "band_gap0_eV": band_gap0,
        "strain_amplitude": strain_amplitude, "t_over_lambda": t_over_lambda, "scan_step_nm": scan_step,
        "dose_4dstem": dose_4dstem, "dose_eels": dose_eels, "random_state": random_state,
    }
    truth = JointTruth(offset, float(deformation_potential), float(band_gap0), e, e.copy(), band_gap, empty,
                       strain, lowloss, params)
    return patterns, spectra, truth
