"""Registration of two scans of one region, and the fit of one mapped quantity against another.

Two scans of the same region taken one after the other (a 4D-STEM scan and a spectrum image, say)
are offset by drift. :func:`register_maps` finds the offset from two maps that both see the specimen
(a virtual dark-field image and a relative-thickness map) by FFT cross-correlation with sub-pixel
refinement. :func:`line_fit` then fits ``y = intercept + slope x`` through pixels matched this way,
with the uncertainties of both maps, and gives the slope a 68 % interval.
"""

from __future__ import annotations

import numpy as np

__all__ = ["register_maps", "line_fit"]


def _prepared(values):
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError("register_maps expects two 2D maps")
    finite = np.isfinite(values)
    if finite.sum() < 2:
        raise ValueError("a map needs at least two finite pixels")
    return np.where(finite, values, 0.0), finite.astype(np.float64)


def _parabola_peak(minus, centre, plus):
    denominator = minus - 2.0 * centre + plus
    return 0.0 if denominator >= 0 else float(np.clip(0.5 * (minus - plus) / denominator, -0.5, 0.5))


def register_maps(reference_map, moving_map, *, max_shift=None, min_overlap=0.3) -> tuple[float, float]:
    """Offset between two maps of one region, by FFT cross-correlation refined to a fraction of a pixel.

    The score of every trial shift is the Pearson correlation of the two maps over their overlap
    only (masked normalized cross-correlation computed with FFTs, Padfield, IEEE Trans. Image
    Process. 21, 2706 (2012)), so that maps of different quantities with the same contrast sign
    (bright specimen, dark vacuum, say) can be compared and the shrinking overlap of larger shifts
    does not pull the peak towards zero. NaN pixels are left out. The maps are zero-padded to twice
    their size, so nothing wraps around. The integer peak is refined by a parabola through it and
    its two neighbours along each axis.

    Parameters
    ----------
    reference_map, moving_map : array_like
        2D maps ``(rows, cols)``, possibly of different shapes, same pixel size.
    max_shift : float, optional
        Largest offset searched along each axis, px; None: any.
    min_overlap : float
        Shifts whose overlap holds fewer than this fraction of the smaller map's finite pixels
        are not considered.

    Returns
    -------
    tuple of float
        ``(shift_rows, shift_cols)`` in pixels: pixel ``(r, c)`` of ``moving_map`` shows what
        pixel ``(r + shift_rows, c + shift_cols)`` of ``reference_map`` shows.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> field = rng.normal(size=(40, 40))
    >>> [round(s, 1) for s in register_maps(field[5:35, 5:35], field[7:37, 2:32])]
    [2.0, -3.0]
    """
    reference, reference_mask = _prepared(reference_map)
    moving, moving_mask = _prepared(moving_map)
    shape = tuple(2 * max(a, b) for a, b in zip(reference.shape, moving.shape))
    moving_conj = [np.conj(np.fft.rfft2(a, shape)) for a in (moving_mask, moving, moving**2)]

    def correlate(a, b):  # result[d] = sum_r a[r + d] b[r]
        return np.fft.irfft2(np.fft.rfft2(a, shape) * b, shape)

    overlap = correlate(reference_mask, moving_conj[0])
    sum_r, sum_m = correlate(reference, moving_conj[0]), correlate(reference_mask, moving_conj[1])
    sum_rm = correlate(reference, moving_conj[1])
    sum_rr, sum_mm = correlate(reference**2, moving_conj[0]), correlate(reference_mask, moving_conj[2])
    enough = overlap > min_overlap * min(reference_mask.sum(), moving_mask.sum())
    n = np.where(enough, overlap, 1.0)
    variance = np.clip(sum_rr - sum_r**2 / n, 0.0, None) * np.clip(sum_mm - sum_m**2 / n, 0.0, None)
    cross = np.where(enough & (variance > 0), (sum_rm - sum_r * sum_m / n) / np.sqrt(np.where(variance > 0, variance, 1.0)),
                     -np.inf)
    if max_shift is not None:
        lags = [np.fft.fftfreq(n, 1.0 / n) for n in shape]
        outside = (np.abs(lags[0])[:, None] > max_shift) | (np.abs(lags[1])[None, :] > max_shift)
        cross = np.where(outside, -np.inf, cross)
    peak = np.unravel_index(int(np.argmax(cross)), shape)
    shift = []
    for axis, n in enumerate(shape):
        index = list(peak)
        values = []
        for step in (-1, 0, 1):
            index[axis] = (peak[axis] + step) % n
            values.append(cross[tuple(index)])
        fraction = _parabola_peak(*values) if np.all(np.isfinite(values)) else 0.0
        lag = peak[axis] if peak[axis] < n // 2 else peak[axis] - n
        shift.append(float(lag + fraction))
    return shift[0], shift[1]


def _weighted_line(x, y, x_var, y_var, iterations=50):
    """York's fit of ``y = a + b x`` with errors in both variables (York et al., Am. J. Phys. 72, 367 (2004))."""
    slope = np.polyfit(x, y, 1)[0]
    for _ in range(iterations):
        weight = 1.0 / (y_var + slope**2 * x_var)
        xm, ym = np.average(x, weights=weight), np.average(y, weights=weight)
        u, v = x - xm, y - ym
        beta = weight * (u * y_var + slope * v * x_var)
        new = np.sum(weight * beta * v) / np.sum(weight * beta * u)
        converged = np.isclose(new, slope, rtol=1e-10, atol=0.0)
        slope = new
        if converged:
            break
    weight = 1.0 / (y_var + slope**2 * x_var)
    xm, ym = np.average(x, weights=weight), np.average(y, weights=weight)
    return ym - slope * xm, slope


def line_fit(x, y, x_std=None, y_std=None, *, y_replicas=None, n_boot=1000, block=None, random_state=None) -> dict:
    """Fit ``y = intercept + slope x`` with uncertainties in both variables; 68 % intervals by bootstrap.

    The fit is York's least squares with errors in both variables (York et al., Am. J. Phys. 72,
    367 (2004)), each point weighted by ``1 / (σy² + slope² σx²)``: unlike ordinary least squares it
    is not pulled towards zero slope by the scatter of ``x``. With no ``x_std`` it is weighted least
    squares, with no uncertainties at all ordinary least squares. The interval is the 16th to 84th percentile of the fits to ``n_boot`` resamples
    of the points. Neighbouring pixels of smoothed maps are not independent: pass ``block`` (the
    2D shape of the maps the points come from, with ``x`` and ``y`` given as maps) to resample
    whole 3 × 3 blocks of pixels instead of single points.

    When ``y`` is the median over Monte Carlo replicas that share an error across points (the band
    gaps of one ZLP replica in every pixel), resampling points cannot show that shared error. Pass the
    replicas as ``y_replicas``: every bootstrap resample then also resamples the replicas and fits the
    median over them, so that the interval carries both the scatter of the points and the spread of
    the replicas.

    Parameters
    ----------
    x, y : array_like
        Points (any shape, flattened); positions where any input is NaN are left out.
    x_std, y_std : array_like, optional
        One-standard-deviation uncertainties of ``x`` and ``y``, broadcastable to them.
    y_replicas : array_like, optional
        ``(n_replicas, *y.shape)`` replicas whose median over the first axis is ``y`` (NaN where a
        replica has no value); at least two.
    n_boot : int
        Bootstrap resamples.
    block : int, optional
        Side, pixels, of the square blocks resampled together (``x`` and ``y`` must then be 2D maps);
        None: single points.
    random_state : int, numpy.random.Generator or None
        Seed of the resampling.

    Returns
    -------
    dict
        ``slope``, ``intercept``, their 68 % intervals ``slope_low``, ``slope_high``,
        ``intercept_low``, ``intercept_high``, and ``n`` (points used).

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> x = rng.uniform(-1, 1, 500)
    >>> fit = line_fit(x, 2.0 + 3.0 * x + rng.normal(0, 0.1, 500), y_std=0.1, n_boot=200, random_state=0)
    >>> round(fit["slope"], 1), bool(fit["slope_high"] - fit["slope_low"] < 0.05)
    (3.0, True)
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    shape = np.broadcast_shapes(x.shape, y.shape)
    x_var = np.broadcast_to(np.zeros(()) if x_std is None else np.asarray(x_std, dtype=np.float64) ** 2, shape)
    y_var = np.broadcast_to(np.ones(()) if y_std is None else np.asarray(y_std, dtype=np.float64) ** 2, shape)
    x, y = np.broadcast_to(x, shape), np.broadcast_to(y, shape)
    if y_replicas is not None:
        y_replicas = np.asarray(y_replicas, dtype=np.float64)
        if y_replicas.ndim < 1 or y_replicas.shape[1:] != y.shape or y_replicas.shape[0] < 2:
            raise ValueError(f"y_replicas has shape {y_replicas.shape}; expected (n_replicas >= 2, *{y.shape}), "
                             "the shape of y with the replicas first")
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(x_var) & np.isfinite(y_var) & (y_var + x_var > 0)
    if keep.sum() < 3:
        raise ValueError("line_fit needs at least three finite points")
    if block is not None:
        if len(shape) != 2:
            raise ValueError("block resampling needs x and y as 2D maps")
        rows, cols = np.indices(shape)
        group = (rows // int(block)) * (-(-shape[1] // int(block))) + cols // int(block)
    else:
        group = np.arange(int(np.prod(shape))).reshape(shape)
    x, y, x_var, y_var, group = (a[keep] for a in (x, y, x_var, y_var, group))
    if y_replicas is not None:
        y_replicas = y_replicas[:, keep]
    if x_std is None and y_std is None:
        y_var = np.ones_like(y_var)
    intercept, slope = _weighted_line(x, y, x_var, y_var)
    rng = np.random.default_rng(random_state)
    labels, members = np.unique(group, return_inverse=True)
    order = np.argsort(members, kind="stable")
    starts = np.searchsorted(members[order], np.arange(len(labels) + 1))
    draws = []
    for _ in range(int(n_boot)):
        chosen = rng.integers(len(labels), size=len(labels))
        index = np.concatenate([order[starts[k]:starts[k + 1]] for k in chosen])
        y_draw = y[index]
        if y_replicas is not None:
            picked = y_replicas[rng.integers(len(y_replicas), size=len(y_replicas))][:, index]
            if not np.isfinite(picked).any(axis=0).all():  # points none of the drawn replicas has
                index = index[np.isfinite(picked).any(axis=0)]
                picked = picked[:, np.isfinite(picked).any(axis=0)]
            y_draw = np.nanmedian(picked, axis=0)
        if index.size > 2 and np.ptp(x[index]) > 0:
            draws.append(_weighted_line(x[index], y_draw, x_var[index], y_var[index]))
    draws = np.asarray(draws)
    (i_low, s_low), (i_high, s_high) = np.percentile(draws, [16, 84], axis=0)
    return {"slope": float(slope), "intercept": float(intercept), "slope_low": float(s_low),
            "slope_high": float(s_high), "intercept_low": float(i_low), "intercept_high": float(i_high),
            "n": int(keep.sum())}
