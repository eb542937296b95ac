"""Speed and accuracy of stemml's nanobeam strain mapping against py4DSTEM (and pyxem) on identical data.

One synthetic dataset (``stemml_core.synthetic.strained_flake``: MoS2 flake with a vacuum edge, four Gaussian
strain/rotation features, descan drift, Poisson noise; fixed seed) is analysed by

- stemml, in this process: ``strain_map(signal, reference=<mask>)``;
- py4DSTEM 0.14.18 in its own virtual environment (``benchmarks/.venv-py4dstem``, made by
  ``benchmarks/py4dstem_env.sh``), as a subprocess on the same arrays (``py4dstem_runner.py``), at each named
  setting of ``find_Bragg_disks`` (``subpixel='poly'`` with its default ``sigma_cc=2``, ``'poly'`` with
  ``sigma_cc=0``, ``'multicorr'`` with an upsample factor);
- pyxem 0.21 in the same environment (``pyxem_runner.py``) when it is installed there;
- a map of zeros (the baseline every estimate must beat).

Both tools get the same reference region (the flake's unstrained bottom-left corner, x < 0.35 of the width and
y > 0.7 of the height): strain is relative to the median basis there. Printed, per dose (``--dose`` and
``--low-dose``):

- patterns per second of disk detection alone (stemml: ``find_disks`` on every pattern, blocks of 256, with the
  template ``strain_map`` made; py4DSTEM: ``find_Bragg_disks``) and of the whole pipeline from the in-memory
  array to strain maps (medians of ``--repeats``; process start, imports and file reading excluded);
- RMSE, slope and correlation of exx, eyy, exy (RMSE in %) and theta (RMSE in degrees) against the generator's
  probe-averaged truth over the crystal positions a tool fitted, and how many it fitted;
- the machine (CPU, cores, load average before and after) and every setting.

Before that it checks the conversion of each peer's conventions (axis order, rotation sign, strain
definition, shear factor) on noise-free uniform deformations (pure rotation of 2 degrees, pure shear exy = 2 %,
tensile exx = +4 %, compressive eyy = -4 %; large, so that a first-order reading of a peer's outputs, shown
beside, fails) against the generator's truth (``--skip-validation`` skips it, ``--validate-only`` stops there).

Usage::

    .venv/bin/python benchmarks/strain_vs_py4dstem.py --quick          # 16 x 16 scan, 1 repeat
    .venv/bin/python benchmarks/strain_vs_py4dstem.py --scan 32 32 --detector 128 --dose 1e6 --repeats 3 \
        --json results/strain_vs_py4dstem.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("MPLBACKEND", "Agg")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
from scipy.ndimage import binary_erosion  # noqa: E402

from machine import load_avg, machine_info, write_json  # noqa: E402

COMPONENTS = ("exx", "eyy", "exy", "theta")
PEER_VENV = os.path.join(HERE, ".venv-py4dstem")
# Validation deformations: large enough that a first-order conversion (e.g. 1 - 1/(1 + e) read as e) errs by
# ~e relative (4 %), far above the sub-pixel bias of the detection (~1e-4 absolute, 0.3 % relative here).
VALIDATION_STRAIN = 0.04
VALIDATION_ROTATION_DEG = 2.0
VALIDATION_TOLERANCE = 0.01  # largest error of any component, relative to the case's largest component
# py4DSTEM's correlation is periodic: a disk within ~4 r (the sigmoid kernel's outer radius) of the detector edge
# interacts with the disks at the opposite edge. At +4 % exx the third-order disks along kx move inside the
# benchmark's edgeBoundary (ceil(r) + 2 = 7 px) and bias exx by -3 %; the conventions check keeps them out.
VALIDATION_PEER_ARGS = {"py4DSTEM": ("--edge-boundary", "20")}


# ---------------------------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------

def flake_reference(shape) -> np.ndarray:
    """The strained flake's unstrained corner: x < 0.35 of the width, y > 0.7 of the height."""
    rows, cols = np.indices(shape)
    return (cols < 0.35 * shape[1]) & (rows > 0.7 * shape[0])


def vacuum_roi(vacuum: np.ndarray) -> np.ndarray:
    """The vacuum positions one step away from the crystal (the ROI a user draws for py4DSTEM's probe)."""
    inner = binary_erosion(vacuum, border_value=1)
    return inner if inner.sum() >= 4 else vacuum


def write_dataset(directory, data, vacuum, reference, k_pixel_size) -> None:
    os.makedirs(directory, exist_ok=True)
    np.save(os.path.join(directory, "data.npy"), np.ascontiguousarray(data, dtype=np.float32))
    np.save(os.path.join(directory, "vacuum.npy"), np.asarray(vacuum, bool))
    np.save(os.path.join(directory, "reference.npy"), np.asarray(reference, bool))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"k_pixel_size": [float(v) for v in k_pixel_size]}, f)


def validation_dataset(detector):
    """Noise-free blocks, each simulated with a uniform deformation (so the probe average is exact), side by side.

    Rows: one 2-row band per case; columns: 4 vacuum, 4 unstrained (the reference), 4 deformed. No descan.
    Returns (signal, truth maps (rows, cols) per component, vacuum, reference, deformed mask, case per row)."""
    import hyperspy.api as hs

    from stemml_core.synthetic import simulate_4dstem

    theta = np.deg2rad(VALIDATION_ROTATION_DEG)
    e = VALIDATION_STRAIN
    cases = {
        f"rotation +{VALIDATION_ROTATION_DEG:g} deg": [[np.cos(theta) - 1, np.sin(theta)],
                                                      [-np.sin(theta), np.cos(theta) - 1]],
        f"shear exy +{e / 2:.0%}": [[0.0, e / 2], [e / 2, 0.0]],
        f"tensile exx +{e:.0%}": [[e, 0.0], [0.0, 0.0]],
        f"compressive eyy -{e:.0%}": [[0.0, 0.0], [0.0, -e]],
    }
    block = (2, 4)
    common = dict(detector_shape=(detector, detector), dose=None, descan=0.0)
    zeros = np.zeros(block + (2, 2))
    vac_signal, _ = simulate_4dstem(zeros, vacuum=np.ones(block, bool), **common)
    ref_signal, _ = simulate_4dstem(zeros, **common)
    bands, truth_bands = [], []
    for gradient in cases.values():
        sig, truth = simulate_4dstem(np.broadcast_to(np.asarray(gradient), block + (2, 2)).copy(), **common)
        bands.append(np.concatenate([vac_signal.data, ref_signal.data, sig.data], axis=1))
        truth_bands.append({c: np.concatenate([np.full(block, np.nan), np.zeros(block), getattr(truth, c + "_avg")],
                                              axis=1) for c in COMPONENTS})
    data = np.concatenate(bands, axis=0)
    truth = {c: np.concatenate([t[c] for t in truth_bands], axis=0) for c in COMPONENTS}
    cols = np.arange(data.shape[1])
    vacuum = np.broadcast_to(cols < 4, data.shape[:2]).copy()
    reference = np.broadcast_to((cols >= 4) & (cols < 8), data.shape[:2]).copy()
    deformed = np.broadcast_to(cols >= 8, data.shape[:2]).copy()
    axes = [a.get_axis_dictionary() for a in ref_signal.axes_manager._axes]
    for axis, n in zip(axes[:2], data.shape[:2]):
        axis["size"] = n
    signal = hs.signals.Signal2D(data, axes=axes, metadata=ref_signal.metadata.as_dictionary())
    return signal, truth, vacuum, reference, deformed, list(cases)


# ---------------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------------

def score(maps: dict, truth_maps: dict, crystal: np.ndarray) -> dict:
    """RMSE (strain in %, theta in degrees), bias, slope, correlation per component over the crystal positions
    the tool fitted; ``fitted``/``crystal`` counts."""
    from stemml_core.metrics import regression

    fitted = crystal & np.all([np.isfinite(maps[c]) for c in COMPONENTS], axis=0)
    out = {"fitted": int(fitted.sum()), "crystal": int(crystal.sum())}
    for c in COMPONENTS:
        unit = np.degrees(1.0) if c == "theta" else 100.0
        r = regression(np.where(fitted, maps[c], np.nan), np.where(crystal, truth_maps[c], np.nan))
        out[c] = {"rmse": r["rmse"] * unit, "bias": r["bias"] * unit, "slope": r["slope"],
                  "correlation": r["correlation"], "n": r["n"]}
    return out


# ---------------------------------------------------------------------------------------------------------------
# the tools
# ---------------------------------------------------------------------------------------------------------------

def stemml_maps(result) -> dict:
    return {c: np.asarray(getattr(result, c).data, float) for c in COMPONENTS}


def run_stemml(signal, reference, repeats, log, workers=None) -> tuple[dict, dict]:
    """strain_map timed ``repeats`` times, then disk detection alone with its template, both on ``workers``
    threads (None: strain_map's default, one per available core)."""
    from concurrent.futures import ThreadPoolExecutor

    from stemml_core.diffraction import find_disks, strain_map

    pipeline = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = strain_map(signal, reference=reference, workers=workers, progress=False)
        pipeline.append(time.perf_counter() - t)
    patterns = np.asarray(signal.data).reshape(-1, *signal.data.shape[2:])
    threads = workers or len(os.sched_getaffinity(0))
    detection = []
    for _ in range(repeats):
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:  # strain_map's block size, blocks side by side
            counts = sum(int(found.counts.sum()) for found in pool.map(
                lambda start: find_disks(patterns[start:start + 256], result.template), range(0, len(patterns), 256)))
        detection.append(time.perf_counter() - t)
    timings = {"pipeline": pipeline, "detection": detection, "threads": threads,
               "median": {"pipeline": float(np.median(pipeline)), "detection": float(np.median(detection))}}
    log(f"stemml ({threads} thread(s)): pipeline {timings['median']['pipeline']:.3f} s, detection "
        f"{timings['median']['detection']:.3f} s (median of {repeats}; {counts} disks)")
    return stemml_maps(result), timings


def peer_python() -> str | None:
    python = os.path.join(PEER_VENV, "bin", "python")
    return python if os.path.exists(python) else None


def peer_has(module: str) -> bool:
    python = peer_python()
    if python is None:
        return False
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def run_peer(runner: str, in_dir: str, out_dir: str, settings, repeats, log, extra=()) -> dict | None:
    """Run a peer's runner in the peer venv; returns {setting: (maps, median timings, info)}."""
    python = peer_python()
    cmd = [python, os.path.join(HERE, runner), in_dir, out_dir, "--settings", *settings, "--repeats", str(repeats),
           *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log(f"{runner}: exit {proc.returncode} after {time.perf_counter() - t:.1f} s (process, imports, reading included)")
    for line in proc.stderr.splitlines():
        if ": probe" in line or ": detection" in line or "Error" in line or "error" in line:
            log("  " + line.strip())
    if proc.returncode != 0:
        log(proc.stderr[-3000:])
        return None
    with open(os.path.join(out_dir, "result.json")) as f:
        result = json.load(f)
    out = {"_meta": {k: v for k, v in result.items() if k != "settings"}}
    for setting, entry in result["settings"].items():
        with np.load(os.path.join(out_dir, f"{setting}.npz")) as z:
            maps = {c: z[c] for c in COMPONENTS}
        out[setting] = (maps, entry["median"], entry["info"], entry["timings"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# printing
# ---------------------------------------------------------------------------------------------------------------

def fmt_row(name, n_patterns, timings, s) -> str:
    def rate(key):
        t = timings.get(key) if timings else None
        return f"{n_patterns / t:9.0f}" if t else f"{'-':>9}"

    cells = []
    for c in COMPONENTS:
        r = s[c]
        rmse = f"{r['rmse']:.3f}{'°' if c == 'theta' else '%'}"
        slope = "  -  " if not np.isfinite(r["slope"]) else f"{r['slope']:5.2f}"
        corr = "  -  " if not np.isfinite(r["correlation"]) else f"{r['correlation']:5.2f}"
        cells.append(f"{rmse:>7} {slope} {corr}")
    return (f"{name:<34}{rate('detection')} {rate('pipeline')}  {s['fitted']:>4}/{s['crystal']:<4} "
            + " | ".join(cells))


def header() -> str:
    comp = " | ".join(f"{c + ' RMSE':>7} slope  corr" for c in COMPONENTS)
    return f"{'tool / setting':<34}{'detect/s':>9} {'pipe/s':>9}  {'fitted':>9} " + comp


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scan", nargs=2, type=int, default=[32, 32], metavar=("ROWS", "COLS"))
    p.add_argument("--detector", type=int, default=128, help="detector side, px (square)")
    p.add_argument("--dose", type=float, default=1e6, help="electrons per pattern")
    p.add_argument("--low-dose", type=float, default=2e4, help="second dose (0: skip)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of every tool and setting (medians)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--py4dstem-settings", nargs="+", default=["poly", "poly_sigma0", "multicorr16", "multicorr64"])
    p.add_argument("--pyxem-settings", nargs="+", default=["com"],
                   help="com (center-of-mass) and/or xc (cross-correlation; ~2 patterns/s, slow)")
    p.add_argument("--no-pyxem", action="store_true")
    p.add_argument("--skip-validation", action="store_true")
    p.add_argument("--validate-only", action="store_true", help="only the conventions check")
    p.add_argument("--quick", action="store_true",
                   help="16 x 16 scan, 1 repeat, py4DSTEM at poly and multicorr16 only")
    p.add_argument("--workdir", help="where the datasets and the peers' maps go (default: a temporary folder)")
    p.add_argument("--json", help="write every number here")
    args = p.parse_args(argv)
    if args.quick:
        args.scan, args.repeats = [16, 16], 1
        args.py4dstem_settings = ["poly", "multicorr16"]
    return args


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    from stemml_core.diffraction import strain_map
    from stemml_core.synthetic import strained_flake

    info = machine_info()
    have_py4dstem = peer_has("py4DSTEM")
    have_pyxem = not args.no_pyxem and peer_has("pyxem") and os.path.exists(os.path.join(HERE, "pyxem_runner.py"))
    results = {"machine": info, "settings": vars(args), "load_avg_start": load_avg(), "validation": {}, "doses": {}}
    log(f"machine: {info['cpu']}, {info['cores']} cores (affinity {info['affinity']}), load {load_avg()}")
    if not have_py4dstem:
        log(f"py4DSTEM not found in {PEER_VENV}: run `bash benchmarks/py4dstem_env.sh` first; stemml only")
    log(f"pyxem: {'yes' if have_pyxem else 'no'}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="strain_vs_py4dstem_")
    peers = []
    if have_py4dstem:
        peers.append(("py4DSTEM", "py4dstem_runner.py", args.py4dstem_settings))
    if have_pyxem:
        peers.append(("pyxem", "pyxem_runner.py", args.pyxem_settings))

    # ---- conventions: noise-free uniform deformations --------------------------------------------------------
    if not args.skip_validation:
        signal, truth, vacuum, reference, deformed, cases = validation_dataset(args.detector)
        directory = os.path.join(workdir, "validation")
        write_dataset(directory, signal.data, vacuum, reference, [a.scale for a in signal.axes_manager.signal_axes])
        tools = {"stemml": stemml_maps(strain_map(signal, reference=reference, progress=False))}
        for peer, runner, settings in peers:
            extra = VALIDATION_PEER_ARGS.get(peer, ())
            out = run_peer(runner, directory, os.path.join(directory, peer), settings, 1, log, extra)
            if out:
                for setting in settings:
                    tools[f"{peer} {setting}"] = out[setting][0]
                for suffix, label in (("first_order", "1st-order"), ("raw", "outputs as named")):
                    naive = os.path.join(directory, peer, f"{settings[-1]}_{suffix}.npz")
                    if os.path.exists(naive):  # what a first-order or literal reading of its outputs would give
                        with np.load(naive) as z:
                            tools[f"{peer} {settings[-1]} {label}"] = {c: z[c] for c in COMPONENTS}
        log("conventions (noise-free, median over each deformed block; stemml's conventions; theta in degrees):")
        print(f"    {'case':<22}{'tool':<30}" + "".join(f"{c:>10}" for c in COMPONENTS) + "   verdict")
        worst = {}
        for i, case in enumerate(cases):
            rows = slice(2 * i, 2 * i + 2)
            true = {c: float(np.nanmedian(truth[c][rows][deformed[rows]])) for c in COMPONENTS}
            line = {"truth": true}
            print(f"    {case:<22}{'truth':<30}" + "".join(
                f"{true[c] * (np.degrees(1) if c == 'theta' else 100):10.4f}" for c in COMPONENTS))
            for tool, maps in tools.items():
                est = {c: float(np.nanmedian(maps[c][rows][deformed[rows]])) for c in COMPONENTS}
                scale = max(abs(v) for v in true.values())
                err = max(abs(est[c] - true[c]) for c in COMPONENTS) / scale
                worst[tool] = max(worst.get(tool, 0.0), err)
                verdict = f"{'ok' if err < VALIDATION_TOLERANCE else 'off'} ({err:.1%})"
                line[tool] = {"estimate": est, "max_error_relative": err, "verdict": verdict}
                print(f"    {'':<22}{tool:<30}" + "".join(
                    f"{est[c] * (np.degrees(1) if c == 'theta' else 100):10.4f}" for c in COMPONENTS) + f"   {verdict}")
            results["validation"][case] = line
        log(f"verdict 'ok': every component within {VALIDATION_TOLERANCE:.0%} of the case's largest component "
            "(largest error in brackets). A conversion error (sign, axis swap, tensor/engineering shear, first-order "
            "strain) shows as in the '1st-order' and 'outputs as named' rows; an error in one case of one setting "
            "only is that setting's sub-pixel bias (py4DSTEM multicorr's +4 % exx, see README).")
        log("largest error per tool: " + ", ".join(f"{t} {w:.2%}" for t, w in worst.items()))

    if args.validate_only:
        if args.json:
            write_json(args.json, results)
        return results

    # ---- the benchmark --------------------------------------------------------------------------------------
    doses = [args.dose] + ([args.low_dose] if args.low_dose else [])
    for dose in doses:
        t = time.perf_counter()
        signal, truth = strained_flake(tuple(args.scan), detector_shape=(args.detector, args.detector), dose=dose,
                                       random_state=args.seed)
        n = int(np.prod(args.scan))
        log(f"dose {dose:g}: strained_flake({tuple(args.scan)}, detector {args.detector}, seed {args.seed}) "
            f"in {time.perf_counter() - t:.1f} s; {int(truth.vacuum.sum())} vacuum positions")
        crystal = ~truth.vacuum
        reference = flake_reference(truth.vacuum.shape)
        truth_maps = {c: np.asarray(getattr(truth, c + "_avg"), float) for c in COMPONENTS}
        entry = {"rows": {}}
        results["doses"][f"{dose:g}"] = entry

        for workers in (1, None):  # one thread, as the peers run, then one per core (strain_map's default)
            maps, timings = run_stemml(signal, reference, args.repeats, log, workers)
            label = "1 thr" if workers == 1 else f"default, {timings['threads']} thr"
            entry["rows"][f"stemml strain_map ({label})"] = {
                "timings": timings, "score": score(maps, truth_maps, crystal)}

        directory = os.path.join(workdir, f"dose_{dose:g}")
        write_dataset(directory, signal.data, vacuum_roi(truth.vacuum), reference,
                      truth.params["k_pixel_size_inv_nm"])
        del signal
        for peer, runner, settings in peers:
            out = run_peer(runner, directory, os.path.join(directory, peer), settings, args.repeats, log)
            if out is None:
                continue
            entry.setdefault("peer_versions", {})[peer] = out.pop("_meta")
            for setting, (peer_maps, median, peer_info, runs) in out.items():
                entry["rows"][f"{peer} {setting}"] = {"timings": {"median": median, "runs": runs}, "info": peer_info,
                                                      "score": score(peer_maps, truth_maps, crystal)}
        zeros = {c: np.zeros(args.scan) for c in COMPONENTS}
        entry["rows"]["map of zeros"] = {"timings": {}, "score": score(zeros, truth_maps, crystal)}

        print()
        print(f"dose {dose:g} e/pattern, {args.scan[0]} x {args.scan[1]} scan ({n} patterns), "
              f"{args.detector} x {args.detector} px; patterns/s = {n} / median of {args.repeats}; "
              "RMSE vs probe-averaged truth over the fitted crystal positions")
        print(header())
        for name, row in entry["rows"].items():
            print(fmt_row(name, n, row["timings"].get("median", {}), row["score"]))
        print()
        if args.json:
            write_json(args.json, results)

    results["load_avg_end"] = load_avg()
    log(f"load average at the start {results['load_avg_start']}, at the end {results['load_avg_end']}; "
        f"datasets and peer maps in {workdir}")
    if args.json:
        write_json(args.json, results)
    return results



if __name__ == "__main__":
    main()
