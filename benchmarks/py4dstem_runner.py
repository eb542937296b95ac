"""py4DSTEM's standard strain pipeline on a dataset written by ``strain_vs_py4dstem.py``; runs in its own venv.

py4DSTEM 0.14.18 pins numpy 1.26 and scikit-learn 1.4, so it lives in ``benchmarks/.venv-py4dstem``
(``bash benchmarks/py4dstem_env.sh``) and this script is started there as a subprocess. It imports nothing from
stemml. Usage::

    benchmarks/.venv-py4dstem/bin/python benchmarks/py4dstem_runner.py IN_DIR OUT_DIR \
        [--settings poly poly_sigma0 multicorr16 multicorr64] [--repeats 3] [--edge-boundary PX] [--kernel-outer K]

``--edge-boundary`` and ``--kernel-outer`` override the two geometry settings below (the conventions check of
``strain_vs_py4dstem.py`` uses ``--edge-boundary 20``; kernel outer radius 2 r and ``edgeBoundary`` 20 were
less accurate on the flake at 1e6 electrons than the defaults used here).

Input (``IN_DIR``, written by the main script)
---------------------------------------------
- ``data.npy``: ``(rows, cols, H, W)`` float32 counts, stemml's axis order (scan row = y, scan column = x;
  detector row = ky, detector column = kx; ``ky`` grows with the row, as in
  :mod:`stemml_core.synthetic.diffraction`).
- ``vacuum.npy``: ``(rows, cols)`` bool, the scan positions averaged into the vacuum probe (a user's ROI on the
  vacuum; the main script passes the generator's vacuum mask eroded by one position).
- ``reference.npy``: ``(rows, cols)`` bool, the unstrained reference region (the same mask stemml gets).
- ``meta.json``: ``k_pixel_size`` ``[ky, kx]`` in 1/nm (must be square: py4DSTEM has one Q pixel size).

The pipeline (py4DSTEM 0.14's strain tutorial, every setting named)
------------------------------------------------------------------
1. ``DataCube(data)``; ``get_vacuum_probe(ROI=vacuum)`` (aligned average); ``Probe.measure_disk`` gives the
   probe radius ``r`` and centre; ``Probe.get_kernel(mode="sigmoid", origin=centre, radii=(r, 4 r))`` (the
   tutorial's radii).
2. ``find_Bragg_disks(template=kernel, corrPower=1, sigma_dp=0, sigma_cc=<setting>, subpixel=<setting>,
   upsample_factor=<setting>, minAbsoluteIntensity=0, minRelativeIntensity=1e-3, relativeToPeak=0,
   minPeakSpacing=2 r, edgeBoundary=ceil(r) + 2, maxNumPeaks=100)``: the relative floor drops the
   numerical-noise maxima (1e-13 of the direct beam) of noise-free and vacuum patterns and keeps every
   disk of the third order at 2e4 electrons; ``edgeBoundary`` drops disks cut by the detector edge (as stemml
   does); ``minPeakSpacing`` is one disk diameter.
3. Origin: ``measure_origin()`` (brightest peak = direct beam, per pattern), ``fit_origin(fitfunction=
   "parabola")``; ``QR_rotation = 0`` degrees and ``QR_flip = False`` (the generator's scan and detector
   frames coincide), ``setcal()``. The Q pixel size is left at 1 (pixels): strain is a ratio.
4. ``StrainMap(bragg)``; ``choose_basis_vectors(index_origin, index_g1, index_g2, subpixel="multicorr",
   minSpacing=2 r, minRelativeIntensity=1e-3, relativeToPeak=1, maxNumPeaks=100)``: the Bragg vector map's
   maxima of all orders become the indexed directions, so every detected disk within ``max_peak_spacing``
   of one enters the fit (with the default ``maxNumPeaks=10`` only the first order and three second-order
   disks would). The indices are chosen as a user would from its figure: the origin is the maximum nearest
   the calibrated origin, ``g1`` the nearest other maximum and ``g2`` the nearest maximum at 50-70 degrees
   from ``g1`` — a primitive pair. (py4DSTEM's automatic choice weights distance by cos^2 of the angle to
   ``g1`` and picks the second-order disk at 90 degrees on a hexagonal lattice: a non-primitive pair whose
   rounding mis-indexes half the disks; the JSON records what it would have picked.)
5. ``fit_basis_vectors(max_peak_spacing=r)`` (intensity-weighted least squares with a free origin per
   pattern, at least 5 indexed peaks), ``get_strain(gvects=reference)`` (reference = median ``g1``, ``g2``
   over the reference region's fitted patterns; ``coordinate_rotation=0``). ``StrainMap.show_strain``, a
   figure that ``get_strain`` always draws, is replaced by a no-op so that drawing is not timed; the figure
   of ``choose_basis_vectors`` is drawn (Agg) and timed, there being no switch for it.

Conventions and their conversion to stemml's (exact, not to first order)
-----------------------------------------------------------------------
- **Axes.** py4DSTEM's ``(Rx, Ry, Qx, Qy)`` are the array's axes in order, so ``Rx`` = scan row (stemml y),
  ``Ry`` = scan column (x), ``qx`` = detector row (stemml ``ky``), ``qy`` = detector column (``kx``). Its
  vectors and tensors are in ``(qx, qy)`` = stemml's ``(y, x)`` component order; this ``(x, y)`` swap turns a
  right-handed frame into a left-handed one, which flips the sign of every rotation.
- **py4DSTEM's strain** (``get_strain_from_reference_g1g2``): with ``M`` = rows ``g1_ref``, ``g2_ref`` and
  ``alpha`` = rows ``g1``, ``g2`` (``(qx, qy)`` components), ``beta = lstsq(M, alpha).T``, i.e. in column
  form ``beta = G_q G0_q^-1`` (``G_q`` the basis vectors as columns), and
  ``e_xx = 1 - beta[0,0]``, ``e_yy = 1 - beta[1,1]``, ``e_xy = -(beta[0,1] + beta[1,0]) / 2`` (tensor shear:
  half the engineering shear), ``theta = (beta[0,1] - beta[1,0]) / 2`` (rad). ``coordinate_rotation=0``
  leaves them unchanged (``get_rotated_strain_map`` with x axis (1, 0) is the identity, ``flip_theta=False``).
- **stemml's** (``stemml_core.synthetic.diffraction``): ``G = F^-T G0`` and ``F = (G0 G^-1)^T``,
  ``eps = sym(F) - I``, ``theta = (F[0,1] - F[1,0]) / 2``, all in ``(x, y)`` order.
- **Conversion.** The four outputs fix ``beta`` exactly:
  ``beta = [[1 - e_xx, theta - e_xy], [-theta - e_xy, 1 - e_yy]]``. Since ``G_q = F_q^-T G0_q`` in any frame,
  ``beta = F_q^-T``, so ``F_q = beta^-T`` (the deformation gradient in ``(y, x)`` order) and
  ``F = P F_q P`` with ``P = [[0, 1], [1, 0]]``; stemml's components follow from ``F``. To first order this
  is ``exx = e_yy``, ``eyy = e_xx``, ``exy = e_xy``, ``theta = -theta_py4DSTEM``; the exact form matters at
  the accuracy goal: py4DSTEM's ``1 - beta`` is the strain of ``F^-1``, so a 2 % stretch reads 1.96 %
  (4e-4 low, about the whole 5e-4 RMSE budget).
- **Check.** The runner recomputes ``beta`` from the fitted ``g1g2_map`` and the reference vectors and
  records the largest difference from the inverted outputs (``inversion_check``); ``strain_vs_py4dstem.py
  --validate`` runs this runner on noise-free pure rotation, pure shear and uniaxial cases and compares with
  the generator's truth.
- Positions where py4DSTEM's fit failed (its ``mask`` = 0: vacuum, fewer than 5 indexed peaks) are NaN.

Output (``OUT_DIR``)
--------------------
``<setting>.npz`` with ``exx, eyy, exy, theta`` (stemml's conventions, rad), the raw ``p4_e_xx, p4_e_yy,
p4_e_xy, p4_theta, p4_mask`` and ``n_peaks`` (detected peaks per pattern); ``result.json`` with versions,
settings, per-stage timings of every repeat and their medians.
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

SETTINGS = {
    # name: find_Bragg_disks arguments that differ between settings
    "poly": {"subpixel": "poly", "sigma_cc": 2, "upsample_factor": 16},  # sigma_cc=2 is the default
    "poly_sigma0": {"subpixel": "poly", "sigma_cc": 0, "upsample_factor": 16},
    "multicorr16": {"subpixel": "multicorr", "sigma_cc": 2, "upsample_factor": 16},
    "multicorr64": {"subpixel": "multicorr", "sigma_cc": 2, "upsample_factor": 64},
}
MIN_RELATIVE = 1e-3
KERNEL_OUTER = 4.0  # outer radius of the sigmoid kernel's negative annulus, in probe radii (the tutorial's 4)
FIT_ORIGIN = "parabola"


def detection_kwargs(setting: str, radius: float, edge_boundary: int | None = None) -> dict:
    """Every argument of ``find_Bragg_disks`` except the template."""
    return {
        "corrPower": 1.0,
        "sigma_dp": 0,
        "minAbsoluteIntensity": 0,
        "minRelativeIntensity": MIN_RELATIVE,
        "relativeToPeak": 0,
        "minPeakSpacing": 2 * radius,
        "edgeBoundary": int(np.ceil(radius)) + 2 if edge_boundary is None else int(edge_boundary),
        "maxNumPeaks": 100,
        "CUDA": False,
        **SETTINGS[setting],
    }


def to_stemml(e_xx, e_yy, e_xy, theta):
    """py4DSTEM's ``(e_xx, e_yy, e_xy, theta)`` (``(qx, qy)`` frame) to stemml's ``(exx, eyy, exy, theta)``.

    Exact: ``beta = F_q^-T`` is rebuilt from the four numbers, ``F_q = beta^-T``, ``F = P F_q P`` (see the
    module docstring)."""
    e_xx, e_yy, e_xy, theta = (np.asarray(a, dtype=float) for a in (e_xx, e_yy, e_xy, theta))
    beta = np.stack([np.stack([1 - e_xx, theta - e_xy], -1), np.stack([-theta - e_xy, 1 - e_yy], -1)], -2)
    f_q = np.swapaxes(np.linalg.inv(beta), -1, -2)
    f = f_q[..., ::-1, ::-1]  # P F_q P: swap both indices, (y, x) -> (x, y)
    exx = f[..., 0, 0] - 1
    eyy = f[..., 1, 1] - 1
    exy = (f[..., 0, 1] + f[..., 1, 0]) / 2
    rot = (f[..., 0, 1] - f[..., 1, 0]) / 2
    return exx, eyy, exy, rot


def _primitive_indices(g, origin):
    """(index_origin, index_g1, index_g2) of the BVM maxima ``g``: a primitive pair at 50-70 degrees."""
    dx, dy = g["x"] - origin[0], g["y"] - origin[1]
    dist = np.hypot(dx, dy)
    i0 = int(np.argmin(dist))
    others = np.flatnonzero(np.arange(len(dist)) != i0)
    dx, dy = g["x"] - g["x"][i0], g["y"] - g["y"][i0]
    dist = np.hypot(dx, dy)
    i1 = int(others[np.argmin(dist[others])])
    angle = np.degrees(np.abs(np.angle((dx + 1j * dy) * np.conj(dx[i1] + 1j * dy[i1]))))
    ok = (angle > 50) & (angle < 70) & (np.arange(len(dist)) != i0)
    if not ok.any():
        raise RuntimeError("no Bragg vector map maximum at 50-70 degrees from g1: not a hexagonal lattice?")
    i2 = int(np.flatnonzero(ok)[np.argmin(dist[ok])])
    return i0, i1, i2


def _auto_choice(g, origin):
    """What ``choose_basis_vectors`` picks with no indices (its code): angle between its g1 and g2."""
    g_dists = np.hypot(g["x"] - origin[0], g["y"] - origin[1])
    g_angles = np.angle(g["x"] - origin[0] + 1j * (g["y"] - origin[1]))
    i0 = np.argmin(g_dists)
    g_dists[i0] = 2 * np.max(g_dists)
    i1 = np.argmin(g_dists)
    g_dists[i1] = 2 * np.max(g_dists)
    i2 = np.argmin(g_dists * (np.cos(g_angles - g_angles[i1]) ** 2 + 0.1))
    v1 = complex(g["x"][i1] - g["x"][i0], g["y"][i1] - g["y"][i0])
    v2 = complex(g["x"][i2] - g["x"][i0], g["y"][i2] - g["y"][i0])
    return {"angle_deg": float(np.degrees(abs(np.angle(v2 * np.conj(v1))))), "length_ratio": abs(v2) / abs(v1)}


def run_once(data, vacuum, reference, setting, edge_boundary=None, kernel_outer=KERNEL_OUTER):
    """One full pipeline; returns (maps dict, timings dict, info dict)."""
    import matplotlib.pyplot as plt
    import py4DSTEM
    from py4DSTEM.preprocess.utils import get_maxima_2D

    times = {}
    t = time.perf_counter()
    datacube = py4DSTEM.DataCube(data=data)
    probe = datacube.get_vacuum_probe(ROI=vacuum)
    radius, qx0, qy0 = probe.measure_disk(plot=False)
    probe.get_kernel(mode="sigmoid", origin=(qx0, qy0), radii=(radius, kernel_outer * radius))
    times["probe"] = time.perf_counter() - t

    kwargs = detection_kwargs(setting, radius, edge_boundary)
    t = time.perf_counter()
    bragg = datacube.find_Bragg_disks(template=probe.kernel, **kwargs)
    times["detection"] = time.perf_counter() - t

    t = time.perf_counter()
    bragg.measure_origin()
    bragg.fit_origin(fitfunction=FIT_ORIGIN, plot=False)
    bragg.calibration.set_QR_rotation_degrees(0.0)
    bragg.calibration.set_QR_flip(False)
    bragg.setcal()
    times["origin"] = time.perf_counter() - t

    t = time.perf_counter()
    strainmap = py4DSTEM.StrainMap(braggvectors=bragg)
    basis_kwargs = dict(subpixel="multicorr", upsample_factor=16, sigma=0, minSpacing=2 * radius,
                        minRelativeIntensity=MIN_RELATIVE, relativeToPeak=1, maxNumPeaks=100, edgeBoundary=1)
    bvm_maxima = get_maxima_2D(strainmap.bvm.data, **basis_kwargs)
    index_origin, index_g1, index_g2 = _primitive_indices(bvm_maxima, strainmap.origin)
    strainmap.choose_basis_vectors(index_g1=index_g1, index_g2=index_g2, index_origin=index_origin, **basis_kwargs)
    plt.close("all")
    times["basis"] = time.perf_counter() - t

    t = time.perf_counter()
    strainmap.fit_basis_vectors(max_peak_spacing=radius)
    plt.close("all")
    times["fit"] = time.perf_counter() - t

    t = time.perf_counter()
    strainmap.show_strain = lambda *a, **k: (None, None)  # display only; not part of the computation
    strainmap.get_strain(gvects=reference, coordinate_rotation=0)
    times["strain"] = time.perf_counter() - t
    times["pipeline"] = sum(times[k] for k in ("probe", "detection", "origin", "basis", "fit", "strain"))
    plt.close("all")

    e_xx, e_yy, e_xy, theta, mask = (np.array(strainmap.data[i]) for i in range(5))
    ok = mask.astype(bool) & np.isfinite(strainmap.data[:4]).all(axis=0)
    exx, eyy, exy, rot = to_stemml(*(np.where(ok, a, 0.0) for a in (e_xx, e_yy, e_xy, theta)))  # no fit: beta = 0
    maps = {"exx": exx, "eyy": eyy, "exy": exy, "theta": rot,
            "p4_e_xx": e_xx, "p4_e_yy": e_yy, "p4_e_xy": e_xy, "p4_theta": theta, "p4_mask": ok}
    for name in ("exx", "eyy", "exy", "theta"):
        maps[name] = np.where(ok, maps[name], np.nan)
    maps["n_peaks"] = np.array([[len(bragg.raw[i, j].data) for j in range(data.shape[1])]
                                for i in range(data.shape[0])])

    # independent check of the inversion: beta from the fitted vectors and the reference vectors
    g1g2 = strainmap.g1g2_map
    g = np.stack([np.stack([g1g2.get_slice(n).data for n in ("g1x", "g2x")], -1),
                  np.stack([g1g2.get_slice(n).data for n in ("g1y", "g2y")], -1)], -2)  # columns g1, g2
    sel = reference & ok
    g0 = np.median(g[sel], axis=0)
    beta = g[ok] @ np.linalg.inv(g0)
    rebuilt = np.stack([np.stack([1 - e_xx, theta - e_xy], -1), np.stack([-theta - e_xy, 1 - e_yy], -1)], -2)[ok]
    info = {
        "probe_radius_px": float(radius),
        "probe_centre_px": [float(qx0), float(qy0)],
        "detection_kwargs": {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in kwargs.items()},
        "basis_kwargs": basis_kwargs,
        "max_peak_spacing_px": float(radius),
        "kernel": {"mode": "sigmoid", "radii_px": [float(radius), float(kernel_outer * radius)]},
        "fit_origin": FIT_ORIGIN,
        "bvm_maxima": int(len(bvm_maxima)),
        "indexed_directions": int(len(strainmap.braggdirections.data)),
        "basis_px_qxqy": {"g1": [float(v) for v in strainmap.g1], "g2": [float(v) for v in strainmap.g2]},
        "automatic_basis_choice": _auto_choice(bvm_maxima, strainmap.origin),
        "fitted_patterns": int(ok.sum()),
        "inversion_check": float(np.abs(beta - rebuilt).max()) if ok.any() else None,
    }
    return maps, times, info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--settings", nargs="+", default=["poly", "poly_sigma0", "multicorr16"],
                        choices=sorted(SETTINGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernel-outer", type=float, default=KERNEL_OUTER,
                        help="outer radius of the sigmoid kernel, probe radii")
    parser.add_argument("--edge-boundary", type=int, help="find_Bragg_disks' edgeBoundary, px (default ceil(r) + 2)")
    args = parser.parse_args(argv)

    import py4DSTEM

    data = np.load(os.path.join(args.input, "data.npy"))
    vacuum = np.load(os.path.join(args.input, "vacuum.npy"))
    reference = np.load(os.path.join(args.input, "reference.npy"))
    with open(os.path.join(args.input, "meta.json")) as f:
        meta = json.load(f)
    if not np.isclose(*meta["k_pixel_size"]):
        raise SystemExit(f"non-square detector pixels {meta['k_pixel_size']}: py4DSTEM has one Q pixel size")
    os.makedirs(args.output, exist_ok=True)

    result = {"py4DSTEM": py4DSTEM.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
              "patterns": int(data.shape[0] * data.shape[1]), "settings": {}}
    for setting in args.settings:
        (maps, _, info), runs, medians = repeat(
            lambda: run_once(data, vacuum, reference, setting, args.edge_boundary, args.kernel_outer), data, setting,
            args.repeats, quiet_stdout=True)
        np.savez(os.path.join(args.output, f"{setting}.npz"), **maps)
        # for the validation table only: the first-order reading (exx = e_yy, eyy = e_xx, exy = e_xy, theta = -theta)
        np.savez(os.path.join(args.output, f"{setting}_first_order.npz"),
                 **{name: np.where(maps["p4_mask"], sign * maps[source], np.nan) for name, source, sign in
                    (("exx", "p4_e_yy", 1), ("eyy", "p4_e_xx", 1), ("exy", "p4_e_xy", 1), ("theta", "p4_theta", -1))})
        record(result, args.output, setting, info, runs, medians)


if __name__ == "__main__":
    main()
