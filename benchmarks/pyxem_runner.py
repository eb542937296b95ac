"""pyxem's strain pipeline on a dataset written by ``strain_vs_py4dstem.py``; runs in ``benchmarks/.venv-py4dstem``.

pyxem 0.21 installs beside py4DSTEM 0.14.18 (``benchmarks/py4dstem_env.sh``). Same input and output files as
``py4dstem_runner.py`` (``data.npy``, ``vacuum.npy`` (unused), ``reference.npy``, ``meta.json``; ``<setting>.npz``
and ``result.json``). Usage::

    benchmarks/.venv-py4dstem/bin/python benchmarks/pyxem_runner.py IN_DIR OUT_DIR [--settings com xc] [--repeats 3]

The pipeline (pyxem's strain-mapping workflow; every setting named)
------------------------------------------------------------------
1. ``Diffraction2D(data)`` with the detector axes calibrated (1/nm, 0 at pixel ``(H // 2, W // 2)``).
2. ``center_direct_beam(method="center_of_mass", mask=(W // 2, H // 2, 2 r), subpixel=True)``: the direct
   beam is moved to the detector centre by interpolation (pyxem's strain fit has no per-pattern origin, so
   descan must be removed here). ``r`` is the disk radius from the mean pattern's central disk (area above
   half its maximum).
3. ``template_match_disk(disk_r=r, subtract_min=False)`` (normalised cross-correlation, skimage) and
   ``get_diffraction_vectors(threshold_abs=THRESHOLD, min_distance=2 r)`` (hyperspy's ``local_max``).
4. ``subpixel_refine(signal, method, square_size=SQUARE)``: ``"center-of-mass"`` (setting ``com``) or
   ``"cross-correlation"`` with ``disk_r=r, upsample_factor=16`` (setting ``xc``).
5. Unstrained vectors: for each vector of the reference region's pattern with the most vectors (direct beam
   left out), the median of the nearest vector within ``r`` over the region's patterns (kept where at least
   half have one): the median over the same region as stemml's and py4DSTEM's reference. (Template matching
   the region's mean pattern instead gave spurious vectors: the normalised cross-correlation divides by the
   near-zero local spread of the averaged background.) ``get_strain_maps(unstrained_vectors, distance=r)``
   (each unstrained vector's nearest measured vector within ``r``; least squares over all of them).
   Vectors closer than ``ceil(r) + 2 + SQUARE / 2`` px to the detector edge are dropped after refinement
   (a centre-of-mass square cut by the edge is biased).

Conventions and their conversion to stemml's (exact)
----------------------------------------------------
- **Axes.** The diffraction vectors' columns are ``["ky", "kx", "intensity"]`` (hyperspy's ``find_peaks``
  returns ``(row, col)``): pyxem's vectors and tensors are in stemml's ``(y, x)`` order, so the conversion
  swaps both indices (``P F P``, ``P = [[0, 1], [1, 0]]``), which also flips the sign of a rotation. ``ky``
  grows with the row in both. The runner reads the column names and refuses any other order.
- **pyxem's strain** (``get_DisplacementGradientMap``, ``DisplacementGradientMap.get_strain_maps``): with
  the vectors as rows, ``L = lstsq(Vu, Vs)`` (``Vs = Vu L``), i.e. in column form ``G = L^T G0`` and, since
  ``G = F^-T G0``, ``L = F^-1``. The right polar decomposition ``L = R U`` gives ``e11 = 1 / U[0,0] - 1``,
  ``e22 = 1 / U[1,1] - 1``, ``e12 = U[0,1]``, ``theta = -asin(R[1,0])`` (rad).
- **Conversion.** ``U = [[1 / (1 + e11), e12], [e12, 1 / (1 + e22)]]``,
  ``R = [[cos t, sin t], [-sin t, cos t]]`` (t = pyxem's theta), ``F_yx = (R U)^-1`` in ``(y, x)`` order,
  ``F = P F_yx P``, and stemml's ``exx, eyy, exy, theta`` follow from ``F`` (``eps = sym(F) - I``,
  ``theta = (F01 - F10) / 2``). pyxem's ``e12`` is the off-diagonal of ``U`` (the stretch of ``F^-1``),
  opposite in sign to the tensor shear, and its ``e11`` is ``1 / U00 - 1``, not a component of ``sym(F)``.
- **Workaround.** ``subpixel_refine`` raises ``IndexError`` on a pattern with a single vector (vacuum: only
  the direct beam); such patterns get their vector twice (it matches no unstrained vector, so it never
  enters the fit).
- Positions with fewer than two matched vectors (vacuum) are NaN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
from runner_common import record, repeat  # noqa: E402

THRESHOLD = 0.3  # template-match (normalised cross-correlation) floor for a peak
SETTINGS = {
    "com": {"method": "center-of-mass"},
    "xc": {"method": "cross-correlation", "upsample_factor": 16},
}


def to_stemml(e11, e22, e12, theta, columns=("ky", "kx")):
    """pyxem's ``(e11, e22, e12, theta)`` to stemml's ``(exx, eyy, exy, theta)`` (exact; module docstring).

    ``columns``: the vectors' first two column names; ``("ky", "kx")`` (pyxem 0.21) means the (y, x) frame."""
    e11, e22, e12, theta = (np.asarray(a, dtype=float) for a in (e11, e22, e12, theta))
    u = np.stack([np.stack([1 / (1 + e11), e12], -1), np.stack([e12, 1 / (1 + e22)], -1)], -2)
    c, s = np.cos(theta), np.sin(theta)
    r = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)
    f = np.linalg.inv(r @ u)
    if tuple(columns) == ("ky", "kx"):
        f = f[..., ::-1, ::-1]  # P F P: (y, x) -> (x, y)
    elif tuple(columns) != ("kx", "ky"):
        raise ValueError(f"unexpected vector columns {columns}")
    return f[..., 0, 0] - 1, f[..., 1, 1] - 1, (f[..., 0, 1] + f[..., 1, 0]) / 2, (f[..., 0, 1] - f[..., 1, 0]) / 2


def _disk_radius(mean_pattern):
    """Radius (px) of the brightest disk of the mean pattern: area above half its maximum."""
    from scipy import ndimage

    above = mean_pattern > mean_pattern.max() / 2
    labels, _ = ndimage.label(above)
    peak = labels[np.unravel_index(np.argmax(mean_pattern), mean_pattern.shape)]
    return float(np.sqrt((labels == peak).sum() / np.pi))


def _unstrained(refined, reference, tolerance):
    """Unstrained vectors: each vector of the reference region's first pattern (direct beam left out), replaced by
    the median of the nearest vector within ``tolerance`` of every reference pattern (stemml and py4DSTEM take
    the median basis over the same region)."""
    positions = np.argwhere(reference)
    vectors = [np.asarray(refined.data[tuple(p)], dtype=float)[:, :2] for p in positions]
    seed = max(vectors, key=len)
    seed = seed[np.linalg.norm(seed, axis=1) > tolerance]
    out = []
    for v0 in seed:
        near = [v[np.argmin(np.linalg.norm(v - v0, axis=1))] for v in vectors if len(v)]
        near = [v for v in near if np.linalg.norm(v - v0) <= tolerance]
        if len(near) >= len(vectors) / 2:
            out.append(np.median(near, axis=0))
    return np.array(out)


def run_once(data, reference, pixel_size, setting):
    import pyxem as pxm

    times = {}
    height, width = data.shape[2:]
    data = np.array(data, dtype=np.float32)  # a copy: center_direct_beam(inplace=True) writes into the array
    t = time.perf_counter()
    signal = pxm.signals.Diffraction2D(data)
    for axis, name, n in zip(signal.axes_manager.signal_axes, ("kx", "ky"), (width, height)):
        axis.name, axis.units, axis.scale, axis.offset = name, "1/nm", pixel_size, -(n // 2) * pixel_size
    radius = _disk_radius(data.mean(axis=(0, 1)))
    signal.center_direct_beam(method="center_of_mass", mask=(width // 2, height // 2, 2 * radius), subpixel=True,
                              inplace=True)
    if signal._lazy:
        signal.compute()
    times["centre"] = time.perf_counter() - t

    square = int(2 * np.ceil(1.5 * radius))  # even, about one disk diameter plus a margin
    edge = int(np.ceil(radius)) + 2 + square // 2  # the refinement square stays on the detector (py4DSTEM: ceil(r)+2)
    refine = dict(SETTINGS[setting], square_size=square)
    if refine["method"] == "cross-correlation":
        refine["disk_r"] = radius

    def vectors_of(sig):
        match = sig.template_match_disk(disk_r=radius, subtract_min=False, show_progressbar=False)
        found = match.get_diffraction_vectors(threshold_abs=THRESHOLD, min_distance=int(2 * radius),
                                              show_progressbar=False)
        for index in np.ndindex(found.data.shape):  # workaround: subpixel_refine fails on a one-vector pattern
            if found.data[index].shape[0] == 1:
                found.data[index] = np.vstack([found.data[index]] * 2)
        refined = found.subpixel_refine(sig, **refine)
        # drop disks near the detector edge (what filter_detector_edge means to do; it needs a detector_shape
        # that subpixel_refine's output lacks, and drops any vector whose first column is exactly 0)
        half = np.array([height // 2, width // 2])
        for index in np.ndindex(refined.data.shape):
            v = np.asarray(refined.data[index], dtype=float)
            px = v[:, :2] / pixel_size + half  # (row, col): columns are (ky, kx)
            inside = ((px >= edge) & (px <= np.array([height, width]) - 1 - edge)).all(axis=1)
            refined.data[index] = v[inside]
        return refined

    t = time.perf_counter()
    refined = vectors_of(signal)
    times["detection"] = time.perf_counter() - t

    t = time.perf_counter()
    ref_vectors = _unstrained(refined, reference, radius * pixel_size)
    strain = refined.get_strain_maps(unstrained_vectors=ref_vectors, distance=radius * pixel_size)
    times["strain"] = time.perf_counter() - t
    times["pipeline"] = times["centre"] + times["detection"] + times["strain"]

    raw = np.asarray(strain.data, dtype=float)  # (4, rows, cols): e11, e22, e12, theta
    counts = np.array([[np.isfinite(np.asarray(refined.data[i, j], dtype=float)).all(axis=-1).sum()
                        for j in range(data.shape[1])] for i in range(data.shape[0])])
    ok = np.isfinite(raw).all(axis=0) & (np.abs(raw[:2]) < 0.5).all(axis=0)
    safe = np.where(ok, raw, 0.0)
    columns = tuple(refined.column_names[:2])
    exx, eyy, exy, rot = to_stemml(*safe, columns=columns)
    maps = {"exx": exx, "eyy": eyy, "exy": exy, "theta": rot,
            "pyxem_e11": raw[0], "pyxem_e22": raw[1], "pyxem_e12": raw[2], "pyxem_theta": raw[3], "n_peaks": counts}
    for name in ("exx", "eyy", "exy", "theta"):
        maps[name] = np.where(ok, maps[name], np.nan)
    info = {"disk_radius_px": radius, "threshold_abs": THRESHOLD, "min_distance_px": int(2 * radius),
            "subpixel_refine": {k: (float(v) if isinstance(v, np.floating) else v) for k, v in refine.items()},
            "filter_detector_edge_px": edge, "unstrained_vectors": int(len(ref_vectors)),
            "vector_columns": list(columns), "fitted_patterns": int(ok.sum()),
            "centre_direct_beam": "center_of_mass, mask 2 r, subpixel interpolation"}
    return maps, times, info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--settings", nargs="+", default=["com", "xc"], choices=sorted(SETTINGS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import pyxem

    data = np.load(os.path.join(args.input, "data.npy"))
    reference = np.load(os.path.join(args.input, "reference.npy"))
    with open(os.path.join(args.input, "meta.json")) as f:
        meta = json.load(f)
    if not np.isclose(*meta["k_pixel_size"]):
        raise SystemExit(f"non-square detector pixels {meta['k_pixel_size']}: not handled by this runner")
    os.makedirs(args.output, exist_ok=True)
    result = {"pyxem": pyxem.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
              "patterns": int(data.shape[0] * data.shape[1]), "settings": {}}
    for setting in args.settings:
        (maps, _, info), runs, medians = repeat(
            lambda: run_once(data, reference, float(meta["k_pixel_size"][0]), setting), data, setting, args.repeats)
        np.savez(os.path.join(args.output, f"{setting}.npz"), **maps)
        np.savez(os.path.join(args.output, f"{setting}_raw.npz"),  # validation table only: outputs read as named
                 exx=maps["pyxem_e11"], eyy=maps["pyxem_e22"], exy=maps["pyxem_e12"], theta=maps["pyxem_theta"])
        record(result, args.output, setting, info, runs, medians)


if __name__ == "__main__":
    main()
