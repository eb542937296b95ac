"""The fast electron of the microscope: wavelength and interaction constant.

Used alike by the forward models (:mod:`stemml_core.synthetic`) and the analyses
(:mod:`stemml_core.diffraction`), so that both rest on one statement of the physics.
"""

from __future__ import annotations

from math import pi, sqrt

import numpy as np
from scipy import constants

__all__ = ["electron_wavelength", "interaction_constant"]

# CODATA 2018 values of the wavelength's constants (h, e and c exact).
_PLANCK = 6.62607015e-34  # J s
_ELECTRON_MASS = 9.1093837015e-31  # kg
_ELEMENTARY_CHARGE = 1.602176634e-19  # C
_SPEED_OF_LIGHT = 299792458.0  # m/s


def _checked_beam_energy(beam_energy) -> float:
    if not np.isfinite(beam_energy) or beam_energy <= 0:
        raise ValueError(f"beam_energy={beam_energy!r} keV; expected a positive number such as 200.0.")
    return float(beam_energy)


def electron_wavelength(beam_energy: float) -> float:
    """Relativistic electron wavelength.

    Parameters
    ----------
    beam_energy : float
        Beam energy (accelerating voltage times e), keV.

    Returns
    -------
    float
        Wavelength, nm.

    Raises
    ------
    ValueError
        A beam energy that is not a positive number.

    Notes
    -----
    ``lambda = h / sqrt(2 m0 e V (1 + e V / (2 m0 c^2)))``.

    Examples
    --------
    >>> round(electron_wavelength(200.0) * 1e3, 4)  # pm
    2.5079
    """
    energy = _checked_beam_energy(beam_energy) * 1e3 * _ELEMENTARY_CHARGE  # J
    momentum = sqrt(2 * _ELECTRON_MASS * energy * (1 + energy / (2 * _ELECTRON_MASS * _SPEED_OF_LIGHT**2)))
    return _PLANCK / momentum * 1e9


def interaction_constant(beam_energy: float) -> float:
    """Interaction constant ``sigma`` of the phase-object approximation.

    Parameters
    ----------
    beam_energy : float
        keV.

    Returns
    -------
    float
        rad / (V nm): a projected potential ``V`` (V nm) shifts the electron's phase by ``sigma V``.

    Raises
    ------
    ValueError
        A beam energy that is not a positive number.

    Notes
    -----
    ``sigma = 2 pi m e lambda / h^2`` with the relativistic mass ``m = m0 + e U / c^2`` and
    wavelength (Kirkland, *Advanced Computing in Electron Microscopy*, eq. 5.6).

    Examples
    --------
    >>> round(interaction_constant(200.0), 6)  # 7.29e-4 rad / (V A)
    0.007288
    """
    wavelength = electron_wavelength(beam_energy) * 1e-9  # m
    mass = constants.m_e + beam_energy * 1e3 * constants.e / constants.c**2
    return 2 * pi * mass * constants.e * wavelength / constants.h**2 * 1e-9
