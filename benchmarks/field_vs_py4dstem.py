"""Speed and accuracy of stemml's CoM field mapping against py4DSTEM (DPC) and pyxem (beam shift) on identical data.

One synthetic dataset (``stemml_core.synthetic.polar_bilayer``: a phase-object bilayer with triangular polar
domains and a hole, 3 mrad probe, scan rotated by ``--rotation`` degrees and flipped (``--no-flip`` to keep it),
a linear descan of up to 2.8 px, Poisson noise at ``--dose``; fixed seed) is analysed by

- stemml, in this process: ``field_map(signal, vacuum=<the hole>)`` (CoM, robust descan plane, rotation and
  flip from the curl, half-turn from the vacuum, field, iCoM, charge, DPC);
- py4DSTEM 0.14.18 in its own virtual environment (``benchmarks/.venv-py4dstem``, made by
  ``benchmarks/py4dstem_env.sh``), as a subprocess on the same array (``field_runner.py --tool py4dstem``):
  ``DPC(...).preprocess()`` (CoM, least-squares plane, rotation and transpose from the curl over its angle grid)
  and ``reconstruct()`` (iterative DPC phase), at settings ``defaults`` and ``vectorized_fine``;
- pyxem 0.21 in the same environment (``field_runner.py --tool pyxem``): ``get_direct_beam_position
  ("center_of_mass")``, ``get_linear_plane()``, ``rotate_beam_shifts`` with the **true** rotation and flip
  (pyxem has no rotation finder), ``phase_retrieval("kottler", mirroring=True)``.

Printed:

- patterns per second of the CoM pass alone, of the field maps (array to CoM/field in the scan frame, descan and
  rotation included), and of the whole pipeline with the integrated potential (stemml: ``field_map`` does it all
  in one call, so its field and pipeline rates are the same number); ``--repeats`` runs, medians; process start,
  imports and reading the ``.npy`` are not timed;
- the scan rotation and flip each tool used against the truth; the median and 90th percentile of the angle
  between measured and true CoM (= field) direction over the positions where the true field exceeds 3 times the
  CoM noise (stemml's median Poisson error; the same positions for every tool); the correlation of each tool's
  integrated potential with the probe-averaged true potential;
- for py4DSTEM, whose curl minimum cannot tell ``theta`` from ``theta + 180`` and which keeps the angle inside its
  grid (-89..89 degrees), the same scores after the half-turn is chosen by stemml's rule (potential higher on the
  specimen than in the vacuum) where its own choice differs;
- the machine (CPU, cores, load average before and after) and every setting.

Before that, a conventions check: noise-free data without descan, two transforms (37 degrees flipped, -120 degrees
not flipped), every tool given the true transform (py4DSTEM ``force_com_rotation``/``force_com_transpose``
converted by ``field_runner.py``), and py4DSTEM also finding its own: every tool's CoM must point within 1 degree
(median) of stemml's with the true transform, up to a half-turn, which is reported (``--skip-validation`` skips
it, ``--validate-only`` stops there). The comparison is between tools, not with the truth: on this small noise-free
scan every tool's descan plane takes up part of the fields (a median error of about 5 degrees for all of them).

Usage::

    .venv/bin/python benchmarks/field_vs_py4dstem.py --quick          # 32 x 32 scan, 64 x 64 px, 1 repeat
    .venv/bin/python benchmarks/field_vs_py4dstem.py --scan 64 64 --detector 128 --repeats 3 \
        --json results/field_vs_py4dstem.json
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

from machine import load_avg, machine_info, write_json  # noqa: E402

PEER_VENV = os.path.join(HERE, ".venv-py4dstem")
VALIDATION_CASES = {"37 deg, flipped": (37.0, True), "-120 deg, not flipped": (-120.0, False)}
VALIDATION_TOLERANCE_DEG = 1.0


# ---------------------------------------------------------------------------------------------------------------
# data and scoring
# ---------------------------------------------------------------------------------------------------------------

def make_dataset(scan, detector, k_pixel_size, dose, rotation, flip, seed, descan=2.0):
    from stemml_core.synthetic import polar_bilayer

    return polar_bilayer(tuple(scan), detector_shape=(detector, detector), k_pixel_size=k_pixel_size, dose=dose,
                         scan_rotation=rotation, flip=flip, random_state=seed, descan=descan)


def write_dataset(directory, signal, truth) -> None:
    os.makedirs(directory, exist_ok=True)
    np.save(os.path.join(directory, "data.npy"), np.ascontiguousarray(signal.data, dtype=np.float32))
    np.save(os.path.join(directory, "vacuum.npy"), np.asarray(truth.vacuum, bool))
    meta = {"k_pixel_size": truth.params["k_pixel_size_inv_nm"], "scan_step": truth.params["scan_step_nm"],
            "beam_energy": truth.params["beam_energy_kev"], "given_rotation": truth.scan_rotation,
            "given_flip": truth.flip}
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)


def strong_positions(truth, noise) -> np.ndarray:
    """Where the true CoM exceeds 3 x ``noise`` (1/nm): the positions every tool's direction is scored on."""
    return np.linalg.norm(truth.com, axis=-1) > 3 * noise


def score(com_x, com_y, potential, truth, strong) -> dict:
    """Direction error (degrees) of the CoM where ``strong``; correlation of the potential with the truth."""
    measured = np.asarray(com_x) + 1j * np.asarray(com_y)
    expected = truth.com[..., 0] + 1j * truth.com[..., 1]
    error = np.degrees(np.abs(np.angle(measured[strong] / expected[strong])))
    r = np.corrcoef(np.ravel(potential), np.ravel(truth.potential_avg))[0, 1]
    return {"direction_median_deg": float(np.median(error)), "direction_p90_deg": float(np.percentile(error, 90)),
            "icom_r": float(r), "scored_positions": int(strong.sum())}


def direction_difference(maps, reference, strong) -> float:
    """Median angle (degrees) between two tools' CoM where ``strong``."""
    a = np.asarray(maps["com_x"]) + 1j * np.asarray(maps["com_y"])
    b = np.asarray(reference["com_x"]) + 1j * np.asarray(reference["com_y"])
    return float(np.median(np.degrees(np.abs(np.angle(a[strong] / b[strong])))))


def rotation_error(found, true) -> float:
    return float(abs((found - true + 180.0) % 360.0 - 180.0))


# ---------------------------------------------------------------------------------------------------------------
# the tools
# ---------------------------------------------------------------------------------------------------------------

def run_stemml(signal, truth, repeats, log, given=False):
    from stemml_core.diffraction import center_of_mass, field_map

    kwargs = dict(scan_rotation=truth.scan_rotation, flip=truth.flip) if given else {}
    pipeline = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = field_map(signal, vacuum=truth.vacuum, progress=False, **kwargs)
        pipeline.append(time.perf_counter() - t)
    patterns = np.asarray(signal.data).reshape(-1, *signal.data.shape[2:])
    ky, kx = (np.asarray(a.axis) for a in signal.axes_manager.signal_axes[::-1])
    com = []
    for _ in range(repeats):
        t = time.perf_counter()
        for start in range(0, len(patterns), 1024):  # field_map's block size
            center_of_mass(patterns[start:start + 1024], ky, kx)
        com.append(time.perf_counter() - t)
    median = {"com": float(np.median(com)), "fields": float(np.median(pipeline)),
              "pipeline": float(np.median(pipeline))}
    log(f"stemml: field_map {median['pipeline']:.3f} s, CoM pass {median['com']:.3f} s (median of {repeats})")
    maps = {"com_x": result.com_x.data, "com_y": result.com_y.data, "potential": result.potential.data}
    info = {"scan_rotation_deg": result.scan_rotation, "flip": result.flip,
            "rotation": "given" if given else f"found (curl; half-turn: {result.rotation.half_turn})",
            "noise_inv_nm": float(np.median(result.com_error.data))}
    return maps, {"median": median, "runs": {"com": com, "pipeline": pipeline}}, info


def peer_python() -> str | None:
    python = os.path.join(PEER_VENV, "bin", "python")
    return python if os.path.exists(python) else None


def peer_has(module: str) -> bool:
    python = peer_python()
    return python is not None and subprocess.run([python, "-c", f"import {module}"],
                                                 capture_output=True).returncode == 0


def run_peer(tool, in_dir, out_dir, settings, repeats, log, given=False) -> dict | None:
    cmd = [peer_python(), os.path.join(HERE, "field_runner.py"), in_dir, out_dir, "--tool", tool,
           "--settings", *settings, "--repeats", str(repeats)] + (["--given"] if given else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log(f"{tool}: exit {proc.returncode} after {time.perf_counter() - t:.1f} s (process, imports, reading included)")
    if proc.returncode != 0:
        log(proc.stderr[-3000:])
        return None
    with open(os.path.join(out_dir, "result.json")) as f:
        result = json.load(f)
    out = {"_version": result["version"]}
    for setting, entry in result["settings"].items():
        with np.load(os.path.join(out_dir, f"{setting}.npz")) as z:
            maps = {k: z[k] for k in z.files}
        out[setting] = (maps, {"median": entry["median"], "runs": entry["timings"]}, entry["info"])
    return out


def vacuum_half_turn(maps, vacuum) -> tuple[dict, bool]:
    """The maps turned by 180 degrees where their potential is higher in the vacuum than on the specimen."""
    potential = np.asarray(maps["potential"])
    if potential[vacuum].mean() <= potential[~vacuum].mean():
        return maps, False
    return {k: -np.asarray(v) for k, v in maps.items()}, True


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scan", nargs=2, type=int, default=[64, 64], metavar=("ROWS", "COLS"))
    p.add_argument("--detector", type=int, default=128, help="detector side, px (square)")
    p.add_argument("--k-pixel", type=float, default=None,
                   help="detector pixel, 1/nm (default 8 / detector: the disk's radius is 0.15 of the detector side)")
    p.add_argument("--dose", type=float, default=1e6, help="electrons per pattern")
    p.add_argument("--rotation", type=float, default=-25.37,
                   help="true scan-detector rotation, degrees (off the 1-degree grid of py4DSTEM's default search)")
    p.add_argument("--no-flip", action="store_true", help="keep the scan unflipped (default: flipped)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--py4dstem-settings", nargs="+", default=["defaults", "vectorized_fine"])
    p.add_argument("--no-pyxem", action="store_true")
    p.add_argument("--skip-validation", action="store_true")
    p.add_argument("--validate-only", action="store_true")
    p.add_argument("--quick", action="store_true", help="32 x 32 scan, 64 x 64 px, 1 repeat")
    p.add_argument("--workdir", help="where the datasets and the peers' maps go (default: a temporary folder)")
    p.add_argument("--json", help="write every number here")
    args = p.parse_args(argv)
    if args.quick:
        args.scan, args.detector, args.repeats = [32, 32], 64, 1
    if args.k_pixel is None:
        args.k_pixel = 8.0 / args.detector
    return args


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    info = machine_info()
    have_py4dstem = peer_has("py4DSTEM")
    have_pyxem = not args.no_pyxem and peer_has("pyxem")
    results = {"machine": info, "settings": vars(args), "load_avg_start": load_avg(), "validation": {}}
    log(f"machine: {info['cpu']}, {info['cores']} cores (affinity {info['affinity']}), load {load_avg()}")
    if not have_py4dstem:
        log(f"py4DSTEM not found in {PEER_VENV}: run `bash benchmarks/py4dstem_env.sh` first; stemml only")
    log(f"pyxem: {'yes' if have_pyxem else 'no'}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="field_vs_py4dstem_")
    peers = ([("py4dstem", args.py4dstem_settings)] if have_py4dstem else []) + (
        [("pyxem", ["com"])] if have_pyxem else [])

    # ---- conventions: noise-free, no descan, the true transform given ----------------------------------------
    if not args.skip_validation:
        log("conventions check (noise-free, no descan, 24 x 24 scan, 64 x 64 px): median angle (degrees) between each "
            "tool's CoM and stemml's with the true transform given, where |CoM_true| > 1e-3 1/nm; beside it the "
            "median error against the truth, which every tool shares here (the descan plane each fits to this small "
            "scan's fields)")
        for case, (rotation, flip) in VALIDATION_CASES.items():
            signal, truth = make_dataset((24, 24), 64, 0.125, None, rotation, flip, args.seed, descan=0.0)
            strong = strong_positions(truth, 1e-3 / 3)
            directory = os.path.join(workdir, "validation", case.replace(" ", "_").replace(",", ""))
            write_dataset(directory, signal, truth)
            rows = {}
            for given in (True, False):
                maps, _, tool_info = run_stemml(signal, truth, 1, lambda m: None, given=given)
                rows[f"stemml ({'given' if given else 'found'})"] = (maps, tool_info)
            for tool, settings in peers:
                for given in ((True, False) if tool == "py4dstem" else (True,)):
                    out = run_peer(tool, directory, os.path.join(directory, f"{tool}_{given}"), settings[:1], 1,
                                   lambda m: None, given=given)
                    if out:
                        maps, _, tool_info = out[settings[0]]
                        rows[f"{tool} {settings[0]} ({'given' if given else 'found'})"] = (maps, tool_info)
            entry = {}
            reference = rows["stemml (given)"][0]
            for name, (maps, tool_info) in rows.items():
                s = score(maps["com_x"], maps["com_y"], maps["potential"], truth, strong)
                difference = direction_difference(maps, reference, strong)
                half_turn = difference > 90.0  # the same axis, the other half-turn
                ok = min(difference, 180.0 - difference) < VALIDATION_TOLERANCE_DEG
                entry[name] = {"score": s, "info": tool_info, "median_difference_from_stemml_deg": difference,
                               "other_half_turn": bool(half_turn), "ok": bool(ok)}
                verdict = ("ok" if ok else "OFF") + (" (the other half-turn)" if half_turn else "")
                print(f"    {case:<22}{name:<34} rotation {tool_info['scan_rotation_deg']:8.2f} flip "
                      f"{str(tool_info['flip']):5}  vs stemml {difference:7.3f}  vs truth "
                      f"{s['direction_median_deg']:6.2f}  iCoM r {s['icom_r']:+.4f}  {verdict}")
            results["validation"][case] = entry
    if args.validate_only:
        if args.json:
            write_json(args.json, results)
        return results

    # ---- the benchmark --------------------------------------------------------------------------------------
    flip = not args.no_flip
    t = time.perf_counter()
    signal, truth = make_dataset(args.scan, args.detector, args.k_pixel, args.dose, args.rotation, flip, args.seed)
    n = int(np.prod(args.scan))
    log(f"polar_bilayer({tuple(args.scan)}, detector {args.detector} px of {args.k_pixel:g} 1/nm, dose {args.dose:g}, "
        f"rotation {args.rotation}, flip {flip}, seed {args.seed}) in {time.perf_counter() - t:.1f} s; "
        f"{signal.data.nbytes / 1e6:.0f} MB float32, {int(truth.vacuum.sum())} vacuum positions")
    rows = {}
    maps, timings, tool_info = run_stemml(signal, truth, args.repeats, log)
    rows["stemml field_map"] = (maps, timings, tool_info)
    noise = tool_info["noise_inv_nm"]
    strong = strong_positions(truth, noise)
    directory = os.path.join(workdir, "benchmark")
    write_dataset(directory, signal, truth)
    del signal
    versions = {}
    for tool, settings in peers:
        out = run_peer(tool, directory, os.path.join(directory, tool), settings, args.repeats, log)
        if out is None:
            continue
        versions[tool] = out.pop("_version")
        for setting, row in out.items():
            rows[f"{tool} {setting}"] = row
    entry = {"rows": {}, "peer_versions": versions, "noise_inv_nm": noise, "strong_fraction": float(strong.mean())}
    for name, (maps, timings, tool_info) in rows.items():
        row = {"timings": timings, "info": tool_info, "score": score(maps["com_x"], maps["com_y"], maps["potential"],
                                                                     truth, strong),
               "rotation_error_deg": rotation_error(tool_info["scan_rotation_deg"], truth.scan_rotation),
               "flip_right": bool(tool_info["flip"]) == truth.flip}
        if name.startswith("py4dstem"):
            turned, changed = vacuum_half_turn(maps, truth.vacuum)
            row["vacuum_half_turn_changed"] = changed
            row["score_vacuum_half_turn"] = score(turned["com_x"], turned["com_y"], turned["potential"], truth, strong)
        entry["rows"][name] = row
    results["benchmark"] = entry

    print()
    print(f"{args.scan[0]} x {args.scan[1]} scan ({n} patterns), {args.detector} x {args.detector} px, "
          f"dose {args.dose:g}, "
          f"true rotation {truth.scan_rotation} deg, flip {truth.flip}; patterns/s = {n} / median of {args.repeats}; "
          f"direction scored where |CoM_true| > 3 x {noise:.2e} 1/nm ({strong.mean():.0%} of the positions)")
    print(f"{'tool / setting':<28}{'CoM/s':>9}{'fields/s':>10}{'+iCoM/s':>10}  {'rotation':>9} {'rot err':>8} "
          f"{'flip':>5}"
          f"  {'dir med':>8} {'dir p90':>8} {'iCoM r':>8}")
    for name, row in entry["rows"].items():
        med = row["timings"]["median"]
        s = row["score"]
        print(f"{name:<28}{n / med['com']:9.0f}{n / med['fields']:10.0f}{n / med['pipeline']:10.0f}  "
              f"{row['info']['scan_rotation_deg']:9.2f} {row['rotation_error_deg']:8.2f} "
              f"{'ok' if row['flip_right'] else 'WRONG':>5}  {s['direction_median_deg']:8.2f} "
              f"{s['direction_p90_deg']:8.2f} {s['icom_r']:8.4f}")
        if row.get("vacuum_half_turn_changed"):
            v = row["score_vacuum_half_turn"]
            print(f"{'  after vacuum half-turn':<28}{'':29}  {'':9} {'':8} {'':>5}  {v['direction_median_deg']:8.2f} "
                  f"{v['direction_p90_deg']:8.2f} {v['icom_r']:8.4f}")
    stemml_rate = n / entry["rows"]["stemml field_map"]["timings"]["median"]["pipeline"]
    for name, row in entry["rows"].items():
        if name != "stemml field_map":
            med = row["timings"]["median"]
            print(f"ratio stemml / {name}: fields {stemml_rate / (n / med['fields']):.1f}x, with iCoM "
                  f"{stemml_rate / (n / med['pipeline']):.1f}x, CoM pass "
                  f"{(n / entry['rows']['stemml field_map']['timings']['median']['com']) / (n / med['com']):.1f}x")
    results["load_avg_end"] = load_avg()
    log(f"load average at the start {results['load_avg_start']}, at the end {results['load_avg_end']}; "
        f"datasets and peer maps in {workdir}")
    if args.json:
        write_json(args.json, results)
    return results



if __name__ == "__main__":
    main()
