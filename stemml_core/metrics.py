"""Scores of a recovered quantity against a known truth, shared by tests, notebooks and benchmarks.

Every score ignores positions where either side is NaN (no result, or no truth,
such as strain in vacuum) and says how many positions it used.
"""

from __future__ import annotations

import numpy as np

__all__ = ["band_coverage", "chi2_per_point", "regression"]


def _paired(*arrays):
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    arrays = [np.broadcast_to(a, shape).ravel() for a in arrays]
    keep = np.logical_and.reduce([np.isfinite(a) for a in arrays])
    return [a[keep] for a in arrays]


def band_coverage(truth, low, high) -> float:
    """Fraction of positions where ``low <= truth <= high`` (e.g. 0.68 expected for a 68 % band).

    Parameters
    ----------
    truth, low, high : array_like
        Broadcastable arrays in the same units.

    Returns
    -------
    float
        Coverage in [0, 1]; NaN when no position is finite on all three.
    """
    t, lo, hi = _paired(truth, low, high)
    return float(np.mean((lo <= t) & (t <= hi))) if t.size else float("nan")


def chi2_per_point(model, truth, sigma) -> float:
    """Mean of ``((model - truth) / sigma)²`` over the finite positions (dimensionless)."""
    m, t, s = _paired(model, truth, sigma)
    if np.any(s <= 0):
        raise ValueError("sigma must be positive where finite")
    return float(np.mean(((m - t) / s) ** 2)) if m.size else float("nan")


def regression(estimate, truth) -> dict[str, float]:
    """RMSE, bias, slope and correlation of ``estimate`` against ``truth``.

    A map shrunk toward zero can have a small RMSE; its slope (least-squares
    fit of ``estimate = slope * truth + offset``) and correlation show it.

    Returns
    -------
    dict
        ``rmse`` and ``bias`` in the units of the inputs, ``slope``,
        ``correlation`` (Pearson r) and ``n`` (positions used).
    """
    e, t = _paired(estimate, truth)
    if e.size < 2:
        return {"rmse": float("nan"), "bias": float("nan"), "slope": float("nan"),
                "correlation": float("nan"), "n": int(e.size)}
    spread = np.std(t)
    slope = float(np.polyfit(t, e, 1)[0]) if spread > 0 else float("nan")
    corr = float(np.corrcoef(t, e)[0, 1]) if spread > 0 and np.std(e) > 0 else float("nan")
    return {"rmse": float(np.sqrt(np.mean((e - t) ** 2))), "bias": float(np.mean(e - t)),
            "slope": slope, "correlation": corr, "n": int(e.size)}
