"""A 1D MoS2 nanostructure low-loss spectrum image with ground truth (after van der Lippe et al. 2024).

A bent nanoribbon (straight segment, quarter-circle arc, straight segment) a few pixels wide lies on vacuum.
Excitons sit at its ends and along its sides, the pi plasmon in its inner region, and the indirect band gap
narrows where the arc strains it. The spectra come from :func:`~stemml_core.synthetic.lowloss.simulate_lowloss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from stemml_core.synthetic.lowloss import _MOS2_EXCITONS, LowLossTruth, _checked, simulate_lowloss

__all__ = ["NanostructureTruth", "nanostructure_sample"]

REGION_NAMES = ("vacuum", "end", "side", "inner", "curved")
# Reference geometry for nav_shape (32, 48), px; scaled by min(rows / 32, cols / 48).
_START = (8.0, 8.0)  # (row, col) of the first end
_FIRST_LENGTH, _RADIUS, _SECOND_LENGTH, _HALF_WIDTH = 20.0, 10.0, 8.0, 3.2
_CENTRELINE_STEP = 0.01  # px between centreline samples
_BULK_BAND_GAP = 1.2  # eV, bulk MoS2 indirect gap (van der Lippe 2024)
_GAP_EXPONENT = 1.5  # indirect
_EXCITON_SHIFT = 0.02  # eV, amplitude of the smooth shift along the structure
_PLASMON = ("plasmon", 8.3, 2.5, 0.6)  # name, energy eV, FWHM eV, height per unit t/lambda
_RESERVED = ("thickness", "band_gap", "gap_exponent", "t_over_lambda", "peaks")


@dataclass(frozen=True)
class NanostructureTruth:
    """Ground truth of :func:`nanostructure_sample`.

    Maps have the navigation shape ``(rows, cols)`` and are NaN in vacuum unless stated otherwise.

    Attributes
    ----------
    lowloss : LowLossTruth
        Truth of the spectra: ``loss_function``, ``t_over_lambda``, ``band_gap`` (eV), ``gap_exponent``
        (1.5), ``vacuum`` and ``peaks`` with the Gaussian excitons ``"A"``, ``"B"``, ``"C"`` and the
        Lorentzian ``"plasmon"`` (energy and FWHM in eV, height in Im[-1/eps]; exciton amplitude exactly 0
        where a pixel has no exciton).
    strain : numpy.ndarray, shape (rows, cols)
        Uniaxial strain along the centreline, dimensionless (0.01 = 1 %), tensile positive; 0 outside the
        arc.
    deformation_potential : float
        dEg/d(strain), eV per unit strain (-10 eV = -0.1 eV per %).
    unstrained_band_gap : float
        Band gap where the strain is 0, eV; ``lowloss.band_gap = unstrained_band_gap +
        deformation_potential * strain``.
    regions : numpy.ndarray of int, shape (rows, cols)
        Index into `region_names`: 0 vacuum, 1 end, 2 side, 3 inner, 4 curved (never NaN).
    region_names : tuple of str
        ``("vacuum", "end", "side", "inner", "curved")``.
    arc_length : numpy.ndarray, shape (rows, cols)
        Arc length of the nearest centreline point from the first end, nm.
    distance : numpy.ndarray, shape (rows, cols)
        Distance from the centreline, nm.
    centreline : numpy.ndarray, shape (n_points, 2)
        Densely sampled centreline, (y, x) in nm, in the frame of the signal's navigation axes.
    length : float
        Length of the centreline, nm.
    half_width : float
        Half width of the structure, nm.
    """

    lowloss: LowLossTruth
    strain: np.ndarray
    deformation_potential: float
    unstrained_band_gap: float
    regions: np.ndarray
    region_names: tuple
    arc_length: np.ndarray
    distance: np.ndarray
    centreline: np.ndarray
    length: float
    half_width: float

    def mask(self, name):
        """Boolean map, shape (rows, cols), of the region `name` (one of `region_names`)."""
        if name not in self.region_names:
            raise ValueError(f"name={name!r} is not a region; expected one of {self.region_names}.")
        return self.regions == self.region_names.index(name)


def nanostructure_sample(
    nav_shape=(32, 48),
    *,
    dose=1e6,
    random_state=0,
    exciton_amplitude=0.1,
    deformation_potential=-10.0,
    max_strain=0.015,
    **kwargs,
):
    """A bent 1D MoS2 nanoribbon on vacuum with localised excitons and a strain-narrowed band gap.

    Geometry (rows y, cols x, in px for the default `nav_shape`; everything scales with
    ``u = min(rows / 32, cols / 48)``): the centreline runs from (y, x) = (8, 8) 20 px along +x, turns
    towards +y on a quarter circle of radius 10 px and runs 8 px along +y; total length L = 43.7 px. Pixels
    within the half width w = 3.2 px of it (round caps at the ends) are specimen, about 22 % of the scan.
    With s the arc length of the nearest centreline point and r the distance from it:

    - regions: *end* where min(s, L - s) <= w; else *curved* in the arc; else *side* where r > w / 2;
      else *inner*.
    - t/lambda = 0.3 + 0.7 sqrt(1 - (r / w)^2) (a round wire: 1.0 on the centreline, 0.3 at the rim).
    - excitons A (1.88 eV, FWHM 0.08 eV), B (2.03 eV, 0.10 eV), C (2.90 eV, 0.30 eV), Gaussian, with
      heights `exciton_amplitude` times 1, 0.8, 0.5 times a weight: max(end, 0.6 side) for A and B,
      max(0.6 end, side) for C, where end = clip(2 (1 - min(s, L - s) / w), 0, 1) and
      side = clip(4 r / w - 2, 0, 1). The weight is exactly 0 in the *inner* region. All three energies
      shift by 0.02 cos(pi s / L) eV (+20 meV at the first end, -20 meV at the second).
    - pi plasmon: a Lorentzian peak ``"plasmon"`` at 8.3 eV, FWHM 2.5 eV, height 0.6 t/lambda, so strongest
      in the inner region; the Drude pi term of :func:`simulate_lowloss` is off unless
      ``pi_plasmon_weight`` is passed. The Lorentzian's tail adds about 0.02 t/lambda to Im[-1/eps] near 2 eV.
    - strain: strain = max_strain sin^2(pi (s - L1) / La) in the arc (L1 = 20 px, La = 15.7 px), 0
      elsewhere, the same across the width.
    - band gap: Eg = 1.2 eV + deformation_potential * strain, indirect (b = 1.5).

    Parameters
    ----------
    nav_shape : tuple of int
        ``(rows, cols)``, rows >= 16, cols >= 24.
    dose : float or None
        Incident electrons per spectrum; None for noise-free spectra (see :func:`simulate_lowloss`).
    random_state : int, numpy.random.Generator or None
        Seeds the noise (and any ZLP drift) through the int seed handed to :func:`simulate_lowloss`
        (recorded in ``truth.lowloss.params["random_state"]``); the structure itself is fixed. A given seed
        gives the same data.
    exciton_amplitude : float
        Height of the A exciton in Im[-1/eps] where its weight is 1, >= 0 (0 keeps the peaks with zero
        height).
    deformation_potential : float
        dEg/d(strain), eV per unit strain (default -10 eV = -0.1 eV per % tensile strain, the order of the
        -0.12 eV per % measured for the indirect gap of bilayer MoS2 [Conley2013]_). The band gap must stay
        > 0.
    max_strain : float
        Peak uniaxial strain in the arc, dimensionless, in [0, 0.1] (default 0.015: the gap drops by
        0.15 eV).
    **kwargs
        Further settings of :func:`simulate_lowloss` (``energy_range``, ``zlp_fwhm``, ``pixel_size``, ...);
        not the maps it builds (``thickness``, ``band_gap``, ``gap_exponent``, ``t_over_lambda``,
        ``peaks``). The recorded range must reach 8.3 eV.

    Returns
    -------
    signal : exspy.signals.EELSSpectrum, shape (rows, cols, n_energy)
        float32 counts, navigation axes y, x in nm.
    truth : NanostructureTruth
        Ground truth; the spectra's truth is ``truth.lowloss``.

    Raises
    ------
    ValueError
        If `nav_shape` is too small, a setting is out of range, a reserved map is passed in `kwargs`, or
        :func:`simulate_lowloss` rejects a setting.

    References
    ----------
    .. [vanderLippe2024] S. van der Lippe, A. Brokkelkamp, J. Rojo and S. Conesa-Boj, Adv. Funct. Mater.
       33, 2307610 (2024).
    .. [Conley2013] H. J. Conley, B. Wang, J. I. Ziegler, R. F. Haglund, S. T. Pantelides and
       K. I. Bolotin, Nano Lett. 13, 3626 (2013).

    Examples
    --------
    >>> s, truth = nanostructure_sample(dose=None, energy_range=(-1.0, 12.0))
    >>> s.data.shape, round(float(truth.lowloss.vacuum.mean()), 2)
    ((32, 48, 521), 0.78)
    >>> round(float(np.nanmin(truth.lowloss.band_gap)), 2), truth.region_names[1]
    (1.05, 'end')
    """
    if len(nav_shape) != 2 or int(nav_shape[0]) < 16 or int(nav_shape[1]) < 24:
        raise ValueError(f"nav_shape={nav_shape!r} is too small; expected (rows, cols) with rows >= 16, cols >= 24.")
    exciton_amplitude = _checked("exciton_amplitude", exciton_amplitude, "", low=0.0, closed=True)
    max_strain = _checked("max_strain", max_strain, "", low=0.0, high=0.1)
    lowest_gap = _BULK_BAND_GAP + min(float(deformation_potential) * max_strain, 0.0)
    if not (math.isfinite(float(deformation_potential)) and lowest_gap > 0.0):
        raise ValueError(
            f"deformation_potential={deformation_potential!r} eV with max_strain={max_strain!r} gives a band gap of "
            f"{lowest_gap:.3g} eV in the arc; expected a finite deformation_potential with "
            f"deformation_potential * max_strain > -{_BULK_BAND_GAP} eV."
        )
    deformation_potential = float(deformation_potential)
    reserved = sorted(set(_RESERVED) & set(kwargs))
    if reserved:
        raise ValueError(
            f"{reserved[0]}= is set by nanostructure_sample itself; expected none of {_RESERVED} in the keyword "
            "arguments (use exciton_amplitude, deformation_potential and max_strain to change the sample)."
        )

    rows, cols = int(nav_shape[0]), int(nav_shape[1])
    u = min(rows / 32.0, cols / 48.0)
    first, radius, arc = _FIRST_LENGTH * u, _RADIUS * u, 0.5 * np.pi * _RADIUS * u
    length, half_width = first + arc + _SECOND_LENGTH * u, _HALF_WIDTH * u
    centreline, s, r = _nearest_centreline(rows, cols, u, first, radius, arc, length)

    specimen = r <= half_width
    from_end = np.minimum(s, length - s)
    in_arc = (s > first) & (s < first + arc)
    regions = np.select(
        [~specimen, from_end <= half_width, in_arc, r > half_width / 2], [0, 1, 4, 2], default=3
    )
    chord = np.sqrt(np.clip(1.0 - (r / half_width) ** 2, 0.0, 1.0))
    t_over_lambda = np.where(specimen, 0.3 + 0.7 * chord, 0.0)
    strain = np.where(in_arc, max_strain * np.sin(np.pi * (s - first) / arc) ** 2, 0.0)
    band_gap = _BULK_BAND_GAP + deformation_potential * strain

    end = np.clip(2.0 * (1.0 - from_end / half_width), 0.0, 1.0)
    side = np.clip(4.0 * r / half_width - 2.0, 0.0, 1.0)
    weight = {"A": np.maximum(end, 0.6 * side), "C": np.maximum(0.6 * end, side)}
    weight["B"] = weight["A"]
    shift = _EXCITON_SHIFT * np.cos(np.pi * s / length)
    peaks = {
        name: {"energy": energy + shift, "width": fwhm, "amplitude": exciton_amplitude * relative * weight[name]}
        for name, energy, fwhm, relative in _MOS2_EXCITONS
    }
    name, energy, fwhm, height = _PLASMON
    peaks[name] = {"energy": energy, "width": fwhm, "amplitude": height * t_over_lambda, "shape": "lorentzian"}

    kwargs.setdefault("pi_plasmon_weight", 0.0)
    kwargs.setdefault("title", "Synthetic 1D MoS2 nanostructure, low-loss EELS")
    rng = np.random.default_rng(random_state)
    signal, lowloss = simulate_lowloss(
        None, band_gap, _GAP_EXPONENT, t_over_lambda=t_over_lambda, peaks=peaks, dose=dose,
        random_state=int(rng.integers(2**63)), **kwargs,
    )
    nm = lowloss.params["pixel_size"]
    truth = NanostructureTruth(
        lowloss=lowloss,
        strain=np.where(specimen, strain, np.nan),
        deformation_potential=deformation_potential,
        unstrained_band_gap=_BULK_BAND_GAP,
        regions=regions,
        region_names=REGION_NAMES,
        arc_length=np.where(specimen, s * nm, np.nan),
        distance=np.where(specimen, r * nm, np.nan),
        centreline=centreline * nm,
        length=length * nm,
        half_width=half_width * nm,
    )
    return signal, truth


def _nearest_centreline(rows, cols, u, first, radius, arc, length):
    """Sampled centreline (n, 2) as (row, col) px, and each pixel's nearest arc length s and distance r, px."""
    s_line = np.linspace(0.0, length, int(np.ceil(length / _CENTRELINE_STEP)) + 1)
    phi = np.clip((s_line - first) / radius, 0.0, 0.5 * np.pi)
    line_row = _START[0] * u + radius * (1.0 - np.cos(phi)) + np.clip(s_line - first - arc, 0.0, None)
    line_col = _START[1] * u + np.minimum(s_line, first) + radius * np.sin(phi)
    centreline = np.column_stack([line_row, line_col])
    pixels = np.stack(np.mgrid[0:rows, 0:cols], axis=-1).reshape(-1, 2).astype(float)
    r, nearest = cKDTree(centreline).query(pixels)
    return centreline, s_line[nearest].reshape(rows, cols), r.reshape(rows, cols)
