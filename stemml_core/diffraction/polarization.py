"""Polar domains, their polarization sign with an uncertainty from the dose, and domain walls.

From the maps of :func:`~stemml_core.diffraction.field.field_map`: the integrated-CoM potential
is clustered into two levels (scikit-learn k-means), each connected region of one level is a
domain, a domain's polarization sign is the sign of its potential relative to the midpoint of
the two levels, and the walls are where the level changes. The uncertainty of every domain's
level, sign and mean field comes from re-drawing the CoM noise of the dose (a parametric
bootstrap through the same integration).

Model behind the sign: a polar domain shifts the projected potential by ``+V_dom`` or
``-V_dom`` (e.g. the out-of-plane polarization of AB and BA stacking in a rhombohedral or
marginally twisted bilayer), so the in-plane field ``E = -grad V`` is localised at the walls and
points across them from the + to the - domain (:func:`stemml_core.synthetic.polar_bilayer`).
The field therefore marks walls, not domains, and the clustering uses the potential alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import pi

import numpy as np
from hyperspy.signal import BaseSignal
from scipy import ndimage

from stemml_core._frozen import ReadOnlyArrays
from stemml_core.blocks import navigation_map
from stemml_core.diffraction.field import FieldResult, integrate_gradient
from stemml_core.segment import SortedKMeans

__all__ = ["PolarizationResult", "domain_walls", "polarization_map"]

MIN_SEPARATION = 4.0
"""Smallest distance of the two potential levels, in per-pixel potential noise, for domains to exist."""


@dataclass(frozen=True)
class PolarizationResult(ReadOnlyArrays):
    """Domains, polarization signs and walls from :func:`polarization_map`.

    Maps are HyperSpy signals with the input's scan axes and no signal axis; per-domain arrays
    are indexed by ``domain id - 1``.

    Attributes
    ----------
    sign : hyperspy.signal.BaseSignal
        int8 polarization sign of each scan position, +1 (higher potential) or -1; 0 where
        unassigned (vacuum and its margin).
    domains : hyperspy.signal.BaseSignal
        int id of the connected domain of each position, ``1 .. n``; 0 where unassigned.
    walls : hyperspy.signal.BaseSignal
        bool, assigned positions with an assigned 4-neighbour of the other sign (both sides of
        every wall).
    level : numpy.ndarray
        ``(n,)`` mean iCoM potential of each domain less ``midpoint``, V nm.
    level_error : numpy.ndarray
        ``(n,)`` standard deviation of ``level`` over the noise draws, V nm.
    domain_sign : numpy.ndarray
        ``(n,)`` int8 sign of each domain (that of its level cluster).
    confidence : numpy.ndarray
        ``(n,)`` fraction of the noise draws in which the domain's level has ``domain_sign``.
    mean_field : numpy.ndarray
        ``(n, 2)`` mean projected field ``(Ex, Ey)`` over each domain, V.
    mean_field_error : numpy.ndarray
        ``(n, 2)`` its standard deviation over the draws, V.
    size : numpy.ndarray
        ``(n,)`` scan positions in each domain.
    midpoint : float
        Mean of the two level clusters' centres, V nm (the potential's zero as in the input).
    separation : float
        Distance of the two cluster centres, V nm.
    potential_noise : float
        Median over the scan of the per-position standard deviation of the iCoM potential over
        the noise draws, V nm.
    """

    sign: BaseSignal
    domains: BaseSignal
    walls: BaseSignal
    level: np.ndarray
    level_error: np.ndarray
    domain_sign: np.ndarray
    confidence: np.ndarray
    mean_field: np.ndarray
    mean_field_error: np.ndarray
    size: np.ndarray
    midpoint: float
    separation: float
    potential_noise: float


def domain_walls(labels) -> np.ndarray:
    """Positions next to a different label: both sides of every wall.

    Parameters
    ----------
    labels : array_like
        ``(rows, cols)`` int labels; negative values are unassigned and never make a wall.

    Returns
    -------
    numpy.ndarray
        ``(rows, cols)`` bool, True where an assigned position has an assigned 4-neighbour with
        another label.

    Examples
    --------
    >>> domain_walls([[0, 0, 1], [0, -1, 1]]).astype(int)
    array([[0, 1, 1],
           [0, 0, 0]])
    """
    labels = np.asarray(labels)
    walls = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        first = np.take(labels, np.arange(labels.shape[axis] - 1), axis=axis)
        second = np.take(labels, np.arange(1, labels.shape[axis]), axis=axis)
        change = (first != second) & (first >= 0) & (second >= 0)
        before, after = [slice(None)] * labels.ndim, [slice(None)] * labels.ndim
        before[axis], after[axis] = slice(0, -1), slice(1, None)
        walls[tuple(before)] |= change
        walls[tuple(after)] |= change
    return walls


def polarization_map(
    result: FieldResult,
    *,
    vacuum=None,
    margin: float = 1.0,
    n_draws: int = 100,
    random_state=None,
) -> PolarizationResult:
    """Polar domains, their sign with an uncertainty, and walls from a field map.

    Parameters
    ----------
    result : FieldResult
        From :func:`~stemml_core.diffraction.field.field_map`.
    vacuum : array_like, optional
        ``(rows, cols)`` bool, vacuum positions: left unassigned with a ``margin`` around them.
    margin : float
        Distance from the vacuum within which positions stay unassigned, nm (the probe and the
        specimen edge blur the potential there).
    n_draws : int
        Noise draws for the uncertainties (at least 2).
    random_state : int, numpy.random.Generator or None
        Seed of the k-means initialisation and of the noise draws.

    Returns
    -------
    PolarizationResult
        Sign, domain and wall maps; per-domain level, sign, confidence, mean field, with errors.

    Raises
    ------
    ValueError
        A bad ``vacuum`` or ``n_draws``, fewer than 4 assigned positions, or no domain contrast:
        the two potential levels closer than ``MIN_SEPARATION`` times the potential's noise
        (all vacuum, or a uniform specimen).

    Notes
    -----
    1. The iCoM potential of the assigned positions is clustered by k-means into two levels
       (:class:`~stemml_core.segment.SortedKMeans`: 0 the lower, 1 the higher, whatever the
       seed); in one dimension the boundary is the mean of the two centres, which for a
       symmetric wall profile is the wall's centre line.
    2. Sign -1 for the lower level, +1 for the higher; each connected region (4-connectivity)
       of one sign is a domain, numbered in raster order of its first position.
    3. Uncertainty: ``n_draws`` times, the CoM is re-drawn as ``CoM + N(0, err^2)`` with the
       Poisson standard error ``err`` of every position and component
       (:func:`~stemml_core.diffraction.field.center_of_mass`), integrated again, and every
       domain's mean potential is taken less the draw's midpoint; the spread gives
       ``level_error``, the agreement of the signs ``confidence``. At the doses of CoM imaging
       the CoM noise is Gaussian to a good approximation, so this propagates the dose's Poisson
       noise without re-reading the patterns.

    Examples
    --------
    >>> from stemml_core.diffraction.field import field_map
    >>> from stemml_core.synthetic import polar_bilayer
    >>> signal, truth = polar_bilayer((16, 16), scan_step=1.0, random_state=0)
    >>> fields_ = field_map(signal, vacuum=truth.vacuum, progress=False)
    >>> polar = polarization_map(fields_, vacuum=truth.vacuum, n_draws=20, random_state=0)
    >>> assigned = polar.sign.data != 0
    >>> bool(np.mean(polar.sign.data[assigned] == truth.domains[assigned]) > 0.9)
    True
    """
    if not isinstance(result, FieldResult):
        raise ValueError(f"result is a {type(result).__name__}; expected the FieldResult of field_map.")
    potential = np.asarray(result.potential.data, dtype=float)
    shape = potential.shape
    if not (isinstance(n_draws, (int, np.integer)) and n_draws >= 2):
        raise ValueError(f"n_draws={n_draws!r}; expected an integer of at least 2.")
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"margin={margin!r} nm; expected a non-negative distance.")
    assigned = np.ones(shape, dtype=bool)
    if vacuum is not None:
        vacuum = np.asarray(vacuum)
        if vacuum.shape != shape or vacuum.dtype != bool:
            raise ValueError(f"vacuum is a {vacuum.dtype} array of shape {vacuum.shape}; expected a bool mask of "
                             f"the scan shape {shape} (True in vacuum).")
        if vacuum.any():
            assigned = ndimage.distance_transform_edt(~vacuum, sampling=result.scan_step) > margin
    if assigned.sum() < 4:
        raise ValueError(f"{int(assigned.sum())} scan positions lie outside the vacuum and its {margin} nm margin; "
                         "expected a specimen region of at least 4 positions.")

    model = SortedKMeans(n_clusters=2, n_init=10, random_state=random_state)
    values = potential[assigned].reshape(-1, 1)
    labels = np.full(shape, -1)
    labels[assigned] = model.fit(values).labels_
    centres = model.cluster_centers_[:, 0]
    midpoint, separation = float(centres.mean()), float(centres[1] - centres[0])
    sign = np.where(labels < 0, 0, 2 * labels - 1).astype(np.int8)
    domains = np.zeros(shape, dtype=int)
    for value in (-1, 1):
        components = ndimage.label(sign == value)[0]
        domains = np.where(components > 0, components + domains.max(), domains)
    found, first = np.unique(domains[domains > 0], return_index=True)  # first: in raster order of the positives
    order = found[np.argsort(first)]
    renumber = np.zeros(domains.max() + 1, dtype=int)
    renumber[order] = np.arange(1, len(order) + 1)
    domains = renumber[domains]
    index = np.arange(1, len(order) + 1)
    domain_sign = np.array([sign[domains == k][0] for k in index], dtype=np.int8)

    sigma = result.interaction_constant
    com = result.com
    error = np.asarray(result.com_error.data, dtype=float)[..., None]
    rng = np.random.default_rng(random_state)
    level_draws = np.empty((n_draws, len(index)))
    field_draws = np.empty((n_draws, len(index), 2))
    potential_draws = np.empty((n_draws,) + shape)
    for draw in range(n_draws):
        noisy = com + error * rng.standard_normal(com.shape)
        drawn = 2 * pi / sigma * integrate_gradient(noisy, result.scan_step)
        centre = (drawn[sign == -1].mean() + drawn[sign == 1].mean()) / 2
        level_draws[draw] = ndimage.mean(drawn - centre, domains, index)
        field_draws[draw] = -2 * pi / sigma * np.stack(
            [ndimage.mean(noisy[..., axis], domains, index) for axis in range(2)], axis=-1)
        potential_draws[draw] = drawn - drawn[assigned].mean()
    potential_noise = float(np.median(potential_draws.std(axis=0)[assigned]))
    if not separation > MIN_SEPARATION * potential_noise:
        raise ValueError(
            f"no domain contrast: the two potential levels are {separation:.3g} V nm apart, "
            f"{separation / potential_noise:.1f} times the potential's noise ({potential_noise:.3g} V nm); expected at "
            f"least {MIN_SEPARATION} (all vacuum, a uniform specimen, or too low a dose)."
        )
    level = ndimage.mean(potential - midpoint, domains, index)
    field = np.stack([result.field_x.data, result.field_y.data], axis=-1)
    mean_field = np.stack([ndimage.mean(field[..., axis], domains, index) for axis in range(2)], axis=-1)

    def nav(data, title, quantity):
        return navigation_map(data, result.potential, title=title, quantity=quantity)

    return PolarizationResult(
        sign=nav(sign, "Polarization sign", "Sign"),
        domains=nav(domains, "Polar domains", "Domain"),
        walls=nav(domain_walls(labels), "Domain walls", "Wall"),
        level=np.asarray(level, dtype=float),
        level_error=level_draws.std(axis=0),
        domain_sign=domain_sign,
        confidence=(np.sign(level_draws) == domain_sign).mean(axis=0),
        mean_field=np.asarray(mean_field, dtype=float).reshape(len(index), 2),
        mean_field_error=field_draws.std(axis=0),
        size=np.asarray(ndimage.sum(np.ones(shape), domains, index), dtype=int),
        midpoint=midpoint,
        separation=separation,
        potential_noise=potential_noise,
    )
