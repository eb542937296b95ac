"""CoM, field and iCoM maps of py4DSTEM 0.14.18 or pyxem 0.21 on one dataset, in stemml's conventions.

Runs inside ``benchmarks/.venv-py4dstem`` (``py4dstem_env.sh``), called by ``field_vs_py4dstem.py``::

    python field_runner.py INPUT OUTPUT --tool py4dstem --settings defaults vectorized_fine --repeats 3

``INPUT`` holds ``data.npy`` (float32 ``(rows, cols, H, W)`` counts) and ``meta.json`` (``k_pixel_size`` 1/nm,
``scan_step`` nm, ``beam_energy`` keV, and ``given_rotation`` / ``given_flip``: the scan-detector transform in
stemml's convention, used where a tool does not find it or when ``--given`` asks for it). ``OUTPUT`` receives
``<setting>.npz`` (``com_x``, ``com_y``: CoM in stemml's scan frame, x along the columns, 1/nm, descan removed;
``potential``: the tool's integrated CoM / phase, its own units) and ``result.json`` (versions, settings, the
rotation each tool used, timings of every repeat).

stemml's conventions (``stemml_core.diffraction.field``): a scan vector ``v = (x, y)`` appears on the detector
as ``k = R(phi) S v`` with ``R(phi) = [[cos, sin], [-sin, cos]]`` acting on ``(kx, ky)`` and ``S = diag(1, -1)``
when flipped; the analysis applies ``v = S R(phi)^T k``.

py4DSTEM (``py4DSTEM.process.phase.DPC``)
-----------------------------------------
- Data ``(Rx, Ry, Qx, Qy)`` = ``(rows, cols, H, W)``; R calibrated in A (``10 * scan_step``), Q in A^-1
  (``k_pixel_size / 10``); ``energy`` in eV.
- ``preprocess(fit_function="plane", plot_center_of_mass=False, plot_rotation=False, ...)``: CoM of every
  pattern in detector pixels along ``(Qx, Qy)`` = ``(ky, kx)``, a least-squares plane over the scan removed
  (descan), times the Q pixel size; then the rotation ``theta`` and ``transpose`` minimising the mean
  absolute curl (central differences) over ``rotation_angles_deg`` (default ``-89 .. 89`` in 1 degree steps)
  for both transpose states. Its outputs ``_com_x``, ``_com_y`` lie along ``(Rx, Ry)`` = ``(y, x)``:
  ``(y, x) = [[cos t, -sin t], [sin t, cos t]] n`` with ``n = (ky, kx)``, or ``(kx, ky)`` when transposed.
- **Conversion (exact).** Comparing with ``v = S R(phi)^T k``: no flip is ``theta = -phi``, no transpose;
  a flip is ``theta = phi + 90`` with transpose. Hence ``phi = -theta`` (no transpose) or ``theta - 90``
  (transpose), ``flip = transpose``, and stemml's ``(com_x, com_y) = 10 * (_com_y, _com_x)`` (1/nm).
- **Half-turn.** The curl is the same at ``theta`` and ``theta + 180``; py4DSTEM keeps the one inside its
  angle range (by default ``-89 .. 89``), whatever the physics. The benchmark scores that choice as it is
  (and separately with the half-turn chosen by stemml's vacuum rule, see ``field_vs_py4dstem.py``).
- ``reconstruct(progress_bar=False)``: its iterative DPC phase (default 64 iterations, step 0.5,
  backtracking, padding factor 2): the ``potential`` output (rad; ``d phase / dx = com``).
- Settings: ``defaults`` (per-pattern CoM loop, ``vectorized_com_calculation=False``, its default; 1 degree
  grid); ``vectorized_fine`` (``vectorized_com_calculation=True``, angles ``-89 .. 89`` in 0.1 degree steps).
- Timings: ``com`` = ``_calculate_intensities_center_of_mass(fit_function=None)`` alone (the CoM pass, a
  private method timed separately), ``fields`` = ``DataCube`` + ``DPC(...).preprocess(...)`` (CoM, plane,
  rotation: the field maps in the scan frame), ``icom`` = ``reconstruct``; ``pipeline`` = fields + icom.

pyxem (``Diffraction2D.get_direct_beam_position(method="center_of_mass")``, ``BeamShift``)
------------------------------------------------------------------------------------------
- The patterns become a ``Diffraction2D`` (detector axes in 1/nm, scan axes in nm);
  ``get_direct_beam_position("center_of_mass")`` gives per pattern ``shift = (W / 2, H / 2) - CoM`` in
  pixels, ``(x, y)`` = ``(kx, ky)`` order: **minus** the CoM.
- ``get_linear_plane()`` (least-squares planes, no mask) is the descan, subtracted.
- pyxem finds neither rotation nor flip: it is **given** stemml's convention's truth, ``rotate_beam_shifts(phi)``
  (``x' = x cos - y sin``, ``y' = x sin + y cos``: exactly ``R(phi)^T``), then ``y -> -y`` when flipped.
  ``com = -shift * k_pixel_size`` (1/nm).
- ``phase_retrieval(method="kottler", mirroring=True)`` on the CoM signal: the ``potential`` output
  (arbitrary scale: its Fourier grid has no step).
- Setting ``com``. Timings: ``com`` = ``get_direct_beam_position``, ``fields`` = com + plane + rotation,
  ``icom`` = ``phase_retrieval``; ``pipeline`` = fields + icom.
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

PY4DSTEM_SETTINGS = {
    "defaults": {"vectorized_com_calculation": False, "rotation_angles_deg": None},
    "vectorized_fine": {"vectorized_com_calculation": True, "rotation_angles_deg": (-89.0, 89.0, 0.1)},
}
PYXEM_SETTINGS = {"com": {}}


def py4dstem_transform(rotation_deg: float, flip: bool) -> tuple[float, bool]:
    """stemml's ``(scan_rotation, flip)`` as py4DSTEM's ``(theta, transpose)`` (module docstring)."""
    theta = rotation_deg + 90.0 if flip else -rotation_deg
    return float((theta + 180.0) % 360.0 - 180.0), bool(flip)


def stemml_transform(theta_deg: float, transpose: bool) -> tuple[float, bool]:
    """py4DSTEM's ``(theta, transpose)`` as stemml's ``(scan_rotation, flip)``."""
    phi = theta_deg - 90.0 if transpose else -theta_deg
    return float((phi + 180.0) % 360.0 - 180.0), bool(transpose)


def run_py4dstem(data, meta, setting, given):
    import py4DSTEM
    from py4DSTEM.process.phase import DPC

    options = PY4DSTEM_SETTINGS[setting]
    angles = options["rotation_angles_deg"]
    angles = None if angles is None else np.arange(angles[0], angles[1] + angles[2] / 2, angles[2])
    kwargs = dict(fit_function="plane", vectorized_com_calculation=options["vectorized_com_calculation"],
                  plot_center_of_mass=False, plot_rotation=False, rotation_angles_deg=angles)
    if given:
        theta, transpose = py4dstem_transform(meta["given_rotation"], meta["given_flip"])
        kwargs.update(force_com_rotation=theta, force_com_transpose=transpose)
    times = {}

    t = time.perf_counter()
    datacube = py4DSTEM.DataCube(data=data)
    datacube.calibration.set_R_pixel_size(10.0 * meta["scan_step"])
    datacube.calibration.set_R_pixel_units("A")
    datacube.calibration.set_Q_pixel_size(meta["k_pixel_size"] / 10.0)
    datacube.calibration.set_Q_pixel_units("A^-1")
    dpc = DPC(datacube=datacube, energy=meta["beam_energy"] * 1e3, verbose=False)
    dpc.preprocess(**kwargs)
    times["fields"] = time.perf_counter() - t

    t = time.perf_counter()
    dpc.reconstruct(progress_bar=False)
    times["icom"] = time.perf_counter() - t
    times["pipeline"] = times["fields"] + times["icom"]

    # the CoM pass alone (private method, same arguments as preprocess, no plane fit)
    intensities = dpc._extract_intensities_and_calibrations_from_datacube(datacube, require_calibrations=False)
    t = time.perf_counter()
    dpc._calculate_intensities_center_of_mass(intensities, fit_function=None,
                                              vectorized_calculation=options["vectorized_com_calculation"])
    times["com"] = time.perf_counter() - t

    theta = float(np.degrees(dpc._rotation_best_rad))
    transpose = bool(dpc._rotation_best_transpose)
    rotation, flip = stemml_transform(theta, transpose)
    maps = {"com_x": 10.0 * np.asarray(dpc._com_y, dtype=float), "com_y": 10.0 * np.asarray(dpc._com_x, dtype=float),
            "potential": np.asarray(dpc.object_phase, dtype=float)}
    grid = "default -89..89 step 1" if angles is None else (
        f"{angles[0]:g}..{angles[-1]:.4g} step {angles[1] - angles[0]:.3g}")
    info = {"theta_deg": theta, "transpose": transpose, "scan_rotation_deg": rotation, "flip": flip,
            "rotation": "given (force_com_rotation/transpose)" if given else "found (curl, its angle grid)",
            "angles": grid, "vectorized_com_calculation": options["vectorized_com_calculation"],
            "reconstruct": "defaults (64 iterations)"}
    return maps, times, info, py4DSTEM.__version__


def run_pyxem(data, meta, setting, given):
    import pyxem as pxm

    times = {}
    rows, cols, height, width = data.shape
    k = meta["k_pixel_size"]
    t = time.perf_counter()
    signal = pxm.signals.Diffraction2D(data)
    for axis, name in zip(signal.axes_manager.navigation_axes, ("x", "y")):
        axis.name, axis.units, axis.scale, axis.offset = name, "nm", meta["scan_step"], 0.0
    for axis, name, n in zip(signal.axes_manager.signal_axes, ("kx", "ky"), (width, height)):
        axis.name, axis.units, axis.scale, axis.offset = name, "1/nm", k, -(n // 2) * k
    shifts = signal.get_direct_beam_position(method="center_of_mass")
    times["com"] = time.perf_counter() - t
    corrected = shifts - shifts.get_linear_plane()
    rotated = corrected.rotate_beam_shifts(meta["given_rotation"])
    com = rotated * (-k)  # shift = -CoM (px) -> CoM in 1/nm
    if meta["given_flip"]:
        com.data[..., 1] *= -1
    times["fields"] = time.perf_counter() - t
    t = time.perf_counter()
    potential = com.phase_retrieval(method="kottler", mirroring=True)
    times["icom"] = time.perf_counter() - t
    times["pipeline"] = times["fields"] + times["icom"]
    maps = {"com_x": np.asarray(com.data[..., 0], dtype=float), "com_y": np.asarray(com.data[..., 1], dtype=float),
            "potential": np.asarray(potential.data, dtype=float)}
    info = {"scan_rotation_deg": float(meta["given_rotation"]), "flip": bool(meta["given_flip"]),
            "rotation": "given (pyxem has no rotation finder): rotate_beam_shifts + y reversed when flipped",
            "descan": "get_linear_plane() (least squares, no mask)", "phase_retrieval": "kottler, mirroring=True"}
    return maps, times, info, pxm.__version__


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--tool", choices=("py4dstem", "pyxem"), required=True)
    parser.add_argument("--settings", nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--given", action="store_true", help="use meta.json's rotation and flip (conventions check)")
    args = parser.parse_args(argv)

    data = np.load(os.path.join(args.input, "data.npy"))
    with open(os.path.join(args.input, "meta.json")) as f:
        meta = json.load(f)
    run, known = (run_py4dstem, PY4DSTEM_SETTINGS) if args.tool == "py4dstem" else (run_pyxem, PYXEM_SETTINGS)
    settings = args.settings or list(known)
    os.makedirs(args.output, exist_ok=True)
    result = {"numpy": np.__version__, "python": sys.version.split()[0], "patterns": int(data.shape[0] * data.shape[1]),
              "settings": {}}
    for setting in settings:
        if setting not in known:
            raise SystemExit(f"unknown {args.tool} setting {setting!r}; known: {sorted(known)}")
        (maps, _, info, version), runs, medians = repeat(lambda: run(data, meta, setting, args.given), data,
                                                         setting, args.repeats)
        result["version"] = version
        np.savez(os.path.join(args.output, f"{setting}.npz"), **maps)
        record(result, args.output, setting, info, runs, medians)


if __name__ == "__main__":
    main()
