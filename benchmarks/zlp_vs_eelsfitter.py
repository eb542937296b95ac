"""Speed and accuracy of stemml's ``ZLPEnsemble`` against the reference implementation, EELSFitter.

One synthetic spectrum image (``stemml_core.synthetic.lowloss.flake_sample``, fixed seed) is given to both tools
in the same process, with the same number of clusters, replicas and network (2-10-15-5-1). Printed:

- time to a trained ensemble: stemml's ``fit`` (median of ``--repeats``), EELSFitter at its defaults (1000 epochs,
  Adam, lr 1e-3) and, from one longer EELSFitter run, at more epochs (snapshots of the same run);
- time of the per-pixel subtraction (ZLP median and 68 % band at every pixel, all replicas), on the image and on
  a larger one (``--big``, issue 4's 100 x 100 pixels x 100 replicas);
- accuracy against the generator's noise-free truth (see ``score``);
- the ratios, the machine and the settings.

EELSFitter's training is a Python loop over independent replicas and its subtraction a Python loop over
independent pixels, so where the script trains fewer replicas or times fewer pixels than asked (``--ef-long-*``,
``--big-ef-pixels``, a time cap), it scales the measured time linearly and labels the number "extrapolated".

Usage::

    python benchmarks/zlp_vs_eelsfitter.py --quick                 # smoke test, < ~2 min
    python benchmarks/zlp_vs_eelsfitter.py --replicas 100 --nav 24 32 --repeats 3 --device cpu
    python benchmarks/zlp_vs_eelsfitter.py ... --device cpu cuda   # also stemml on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("MPLBACKEND", "Agg")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import eelsfitter_runner as efr  # noqa: E402
from machine import load_avg, machine_info, write_json  # noqa: E402

HIDDEN = (10, 15, 5)  # EELSFitter's MultilayerPerceptron, fixed in its code
_BIG_KEYS = ("est", "zlp_median", "zlp_low", "zlp_high", "de1", "de2")  # not written to the JSON


# ---------------------------------------------------------------------------------------------------------------
# machine and settings
# ---------------------------------------------------------------------------------------------------------------

def zlp_machine_info():
    return machine_info(
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        eelsfitter=efr.eelsfitter_version(),
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------------------------

def score(energy, data, truth_zlp, truth_inel, med, low, high, de1, de2, above=5.0):
    """Accuracy of a ZLP median and 68 % band against the noise-free truth.

    ``de1``/``de2`` are per-pixel maps (eV). Window W = [dE1, dE2] of each pixel; window A = (dE2, dE2 + above].

    - ``chi2_band``: mean over W of ((median - true ZLP) / half-width of the 68 % band)^2 (issue 4: < 2), over the
      channels where the band has a width; ``zero_band`` is the fraction of W where it has none (EELSFitter's
      matched ZLP is clipped to the data, so where every replica overshoots, all equal the data there);
    - ``coverage68``: fraction of channels in W with the true ZLP inside the 68 % band (issue 4: 55-85 %);
    - ``err_noise``: RMS over W of (median - true ZLP) / sqrt(true counts), i.e. the ZLP error in units of the
      channel's counting noise (independent of the band, so comparable between tools; < 1 = below the noise);
    - ``inel_err_noise``: RMS over A of (data - median - true inelastic) / sqrt(true counts) (1 = pure noise);
    - ``inel_bias``: sum over A of (data - median - true inelastic) / sum of true inelastic, specimen pixels;
    - ``inel_coverage68``: fraction of channels in A with the true inelastic inside data - band.
    """
    e = energy[None, None, :]
    w = (e >= de1[..., None]) & (e <= de2[..., None])
    a = (e > de2[..., None]) & (e <= de2[..., None] + above)
    total = np.maximum(truth_zlp + truth_inel, 1.0)
    half = (high - low) / 2.0
    wide = w & (half > 0)
    diff = med - truth_zlp
    sub = data - med
    res = sub - truth_inel
    specimen = (truth_inel.sum(-1) > 0)[..., None] & a
    out = {
        "chi2_band": float(np.mean((diff[wide] / half[wide]) ** 2)) if wide.any() else float("nan"),
        "zero_band": float(1.0 - wide.sum() / max(w.sum(), 1)),
        "coverage68": float(np.mean((truth_zlp[w] >= low[w]) & (truth_zlp[w] <= high[w]))),
        "err_noise": float(np.sqrt(np.mean(diff[w] ** 2 / total[w]))),
        "inel_err_noise": float(np.sqrt(np.mean(res[a] ** 2 / total[a]))),
        "inel_bias": float(res[specimen].sum() / truth_inel[specimen].sum()) if specimen.any() else float("nan"),
        "inel_coverage68": float(np.mean((truth_inel[a] >= data[a] - high[a]) & (truth_inel[a] <= data[a] - low[a]))),
        "n_channels_W": int(w.sum()),
    }
    return out


# ---------------------------------------------------------------------------------------------------------------
# stemml
# ---------------------------------------------------------------------------------------------------------------

def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _field(x):
    return np.asarray(x.data if hasattr(x, "data") and hasattr(x, "axes_manager") else x, dtype=np.float64)


def stemml_pixel_windows(est, signal):
    """Per-pixel dE1/dE2 maps of a fitted ZLPEnsemble: each pixel's nearest cluster centre in ln N_tot."""
    from stemml_core.segment import log_total_intensity

    log_ntot = log_total_intensity(signal.data)
    centers = np.asarray(est.cluster_centers_, float)
    labels = np.argmin(np.abs(log_ntot[..., None] - centers), axis=-1)
    return np.asarray(est.de1_)[labels], np.asarray(est.de2_)[labels], labels


def run_stemml(signal, args, device, log):
    """Fit and subtract ``--repeats`` times; timings of every repeat, outputs of the first."""
    from stemml_core.eels.zlp import ZLPEnsemble

    fit_times, sub_times, out = [], [], None
    for rep in range(args.repeats):
        est = ZLPEnsemble(n_replicas=args.replicas, hidden=HIDDEN, n_clusters=args.clusters, device=device,
                          progress=False, random_state=args.seed)
        _sync(device)
        t0 = time.perf_counter()
        est.fit(signal)
        _sync(device)
        fit_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sub = est.subtract(signal)
        _sync(device)
        sub_times.append(time.perf_counter() - t0)
        log(f"  stemml[{device}] repeat {rep + 1}: fit {fit_times[-1]:.2f} s, subtract {sub_times[-1]:.2f} s, "
            f"kept {int(np.sum(est.kept_))}/{args.replicas}, load {load_avg()}")
        if out is None:
            zlp = est.predict(signal)
            de1, de2, labels = stemml_pixel_windows(est, signal)
            out = {
                "est": est,
                "zlp_median": _field(zlp.median), "zlp_low": _field(zlp.low), "zlp_high": _field(zlp.high),
                "de1": de1, "de2": de2,
                "de1_clusters": np.asarray(est.de1_, float).tolist(),
                "de2_clusters": np.asarray(est.de2_, float).tolist(),
                "kept": int(np.sum(est.kept_)),
                "chi2_replicas": np.asarray(est.chi2_, float),
            }
        del sub
    out["fit_times_s"] = fit_times
    out["subtract_times_s"] = sub_times
    return out


def time_stemml_subtract(est, signal, repeats, device):
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        sub = est.subtract(signal)
        _sync(device)
        times.append(time.perf_counter() - t0)
        del sub
    return times


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------

QUICK = dict(replicas=4, nav=(12, 16), repeats=1, ef_replicas=None, ef_epochs=200, ef_long_replicas=2,
             ef_long_epochs=1000, ef_snapshots=[500], ef_long_cap=60.0, big=(20, 20), big_ef_pixels=40)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--replicas", type=int, default=100, help="replicas of both tools")
    p.add_argument("--nav", type=int, nargs=2, default=(24, 32), metavar=("ROWS", "COLS"),
                   help="spectrum image both tools are trained on")
    p.add_argument("--repeats", type=int, default=3, help="repeats of every stemml timing and of EELSFitter's "
                   "subtraction timing on --big (medians are reported)")
    p.add_argument("--device", nargs="+", default=["cpu"], help="stemml device(s): cpu and/or cuda")
    p.add_argument("--clusters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and of both tools")
    p.add_argument("--dose", type=float, default=1e6, help="incident electrons per spectrum")
    p.add_argument("--energy-range", type=float, nargs=2, default=(-1.0, 9.0), metavar=("EMIN", "EMAX"),
                   help="energy axis of the sample, eV (default: the low-loss window -1 to 9 eV, where ln N_tot is a thickness proxy)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both tools (0 = torch's default)")
    p.add_argument("--ef-train-threads", type=int, default=None,
                   help="torch threads of EELSFitter's training only (default: --threads); its subtraction uses "
                   "--threads")
    p.add_argument("--ef-replicas", type=int, default=None,
                   help="replicas EELSFitter trains at its defaults (default: --replicas; fewer = extrapolated)")
    p.add_argument("--ef-epochs", type=int, default=1000, help="EELSFitter's epochs (its default)")
    p.add_argument("--ef-long-replicas", type=int, default=10, help="replicas of the long EELSFitter run "
                   "(0 skips it); its times are extrapolated to --replicas")
    p.add_argument("--ef-long-epochs", type=int, default=20000, help="epochs of the long run at most")
    p.add_argument("--ef-snapshots", type=int, nargs="*", default=[2000, 5000, 10000],
                   help="also score the long run after these epochs")
    p.add_argument("--ef-long-cap", type=float, default=900.0, help="wall-time cap (s) of the long run: its epochs "
                   "are lowered to fit, from the per-epoch cost measured at the defaults")
    p.add_argument("--big", type=int, nargs=2, default=(100, 100), metavar=("ROWS", "COLS"),
                   help="image for the subtraction timing (0 0 skips it)")
    p.add_argument("--big-ef-pixels", type=int, default=200, help="pixels of --big EELSFitter subtracts per timing "
                   "(whole rows; extrapolated to all pixels)")
    p.add_argument("--skip-stemml", action="store_true")
    p.add_argument("--skip-eelsfitter", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke test; sets the defaults to " +
                   ", ".join(f"{k}={v}" for k, v in QUICK.items()) + " (explicit options still win)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--report-from", default=None, metavar="JSON",
                   help="only print the table of an earlier run's --json file (runs nothing)")
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if args.ef_replicas is None:
        args.ef_replicas = args.replicas
    # EELSFitter's load_zlp_models selects no network from a single replica (see README, open problems)
    if not args.skip_eelsfitter and args.ef_replicas < 2:
        p.error("--ef-replicas must be at least 2 (EELSFitter keeps no network from a single replica)")
    if args.ef_long_replicas == 1:
        p.error("--ef-long-replicas must be 0 (skip) or at least 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.report_from:
        with open(args.report_from) as f:
            res = json.load(f)
        saved = argparse.Namespace(**res["settings"])
        for lg in [res["eelsfitter"].get("long")]:
            if lg:
                lg["snapshots"] = {int(k): v for k, v in sorted(lg["snapshots"].items(), key=lambda kv: int(kv[0]))}
        print(report(res, saved))
        return res
    t_start = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    devices = []
    for d in args.device:
        if d.startswith("cuda") and not torch.cuda.is_available():
            log(f"device {d!r} requested but torch.cuda.is_available() is False: skipped")
            continue
        devices.append(d)

    from stemml_core.synthetic.lowloss import flake_sample

    gen_kwargs = {} if args.energy_range is None else {"energy_range": tuple(args.energy_range)}
    info = zlp_machine_info()
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    results = {"machine": info, "settings": settings, "load_avg_start": load_avg()}
    log(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
        f"EELSFitter {info['eelsfitter']}, GPU {info['gpu']}, load {load_avg()}")

    signal, truth = flake_sample(tuple(args.nav), dose=args.dose, random_state=args.seed, **gen_kwargs)
    energy = np.asarray(truth.energy, float)
    data = np.asarray(signal.data, float)
    tz, ti = np.asarray(truth.zlp, float), np.asarray(truth.inelastic, float)
    n_pix = int(np.prod(args.nav))
    log(f"sample: flake_sample{tuple(args.nav)}, dose {args.dose:g}, seed {args.seed}: {n_pix} pixels x "
        f"{energy.size} channels, {energy[0]:g} to {energy[-1]:g} eV")
    results["sample"] = {"nav": list(args.nav), "n_energy": int(energy.size),
                         "energy_range": [float(energy[0]), float(energy[-1])], "dose": args.dose}

    big = None
    if args.big[0] > 0 and args.big[1] > 0:
        big_signal, _ = flake_sample(tuple(args.big), dose=args.dose, random_state=args.seed + 1, **gen_kwargs)
        big = big_signal
        log(f"big sample for subtraction timing: flake_sample{tuple(args.big)} (seed {args.seed + 1})")

    def checkpoint():
        if args.json:
            partial = dict(results)
            partial["stemml"] = {d: {k: v for k, v in o.items() if k not in _BIG_KEYS} for d, o in stemml.items()}
            partial["eelsfitter"] = ef
            write_json(args.json, partial)

    # ------------------------------------------------------------------ stemml
    stemml, ef = {}, {}
    if not args.skip_stemml:
        for device in devices:
            log(f"stemml ZLPEnsemble on {device}: {args.replicas} replicas, {args.clusters} clusters, x{args.repeats}")
            out = run_stemml(signal, args, device, log)
            out["score_own"] = score(energy, data, tz, ti, out["zlp_median"], out["zlp_low"], out["zlp_high"],
                                     out["de1"], out["de2"])
            if big is not None:
                out["big_subtract_times_s"] = time_stemml_subtract(out["est"], big, args.repeats, device)
                log(f"  stemml[{device}] subtract {args.big[0]}x{args.big[1]} px x {args.replicas} replicas: "
                    f"{out['big_subtract_times_s']}")
            stemml[device] = out
            checkpoint()
    ref = stemml.get("cpu") or (next(iter(stemml.values())) if stemml else None)

    # ------------------------------------------------------------------ EELSFitter
    if not args.skip_eelsfitter:
        import tempfile

        work = tempfile.mkdtemp(prefix="bench_eelsfitter_")
        log(f"EELSFitter at its defaults: {args.ef_replicas} replicas x {args.ef_epochs} epochs (files in {work})")
        r = efr.run_eelsfitter(data, energy, n_clusters=args.clusters, n_replicas=args.ef_replicas,
                               n_epochs=args.ef_epochs, seed=args.seed, workdir=os.path.join(work, "defaults"),
                               train_threads=args.ef_train_threads)
        p = r.prediction
        per_epoch = float(np.median(r.replica_times_s)) / args.ef_epochs
        train_full = r.setup_time_s + float(np.sum(r.replica_times_s)) * args.replicas / args.ef_replicas
        ef["defaults"] = {
            "n_replicas_trained": r.n_replicas, "epochs": r.n_epochs, "train_time_s": r.train_time_s,
            "setup_time_s": r.setup_time_s, "replica_time_median_s": float(np.median(r.replica_times_s)),
            "per_epoch_ms": per_epoch * 1e3, "train_threads": r.torch_threads,
            "train_time_for_replicas_s": train_full, "extrapolated": args.ef_replicas != args.replicas,
            "subtract_time_s": p.subtract_time_s, "n_kept": p.n_models_kept,
            "loss_train": r.loss_train.tolist(), "loss_test": r.loss_test.tolist(),
            "de1_clusters": r.de1.tolist(), "de2_clusters": r.de2.tolist(),
            "score_own": score(energy, data, tz, ti, p.zlp_median, p.zlp_low, p.zlp_high, p.de1, p.de2),
        }
        if p.raw_median is not None:
            ef["defaults"]["raw_err_noise_own"] = score(energy, data, tz, ti, p.raw_median, p.zlp_low, p.zlp_high,
                                                        p.de1, p.de2)["err_noise"]
        if ref is not None:
            ef["defaults"]["score_common"] = score(energy, data, tz, ti, p.zlp_median, p.zlp_low, p.zlp_high,
                                                   ref["de1"], ref["de2"])
        log(f"  trained in {r.train_time_s:.1f} s ({per_epoch * 1e3:.2f} ms/epoch/replica), subtraction of "
            f"{n_pix} px x {p.n_models_kept} kept replicas {p.subtract_time_s:.1f} s, load {load_avg()}")
        ef_model_dir = r.model_dir
        del r, p
        checkpoint()

        if args.ef_long_replicas > 0:
            epochs = args.ef_long_epochs
            budget = int(max(0.0, args.ef_long_cap - 5.0) / (per_epoch * args.ef_long_replicas))
            if budget < epochs:
                log(f"  long run capped by --ef-long-cap {args.ef_long_cap:g} s: {epochs} -> {budget} epochs")
                epochs = budget
            snaps = sorted({s for s in [args.ef_epochs, *args.ef_snapshots] if 0 < s < epochs})
            if epochs > args.ef_epochs:
                log(f"EELSFitter long run: {args.ef_long_replicas} replicas x {epochs} epochs, snapshots {snaps}")
                r = efr.run_eelsfitter(data, energy, n_clusters=args.clusters, n_replicas=args.ef_long_replicas,
                                       n_epochs=epochs, seed=args.seed, snapshot_epochs=snaps,
                                       time_predict=False, workdir=os.path.join(work, "long"),
                                       train_threads=args.ef_train_threads)
                ef["long"] = {"n_replicas_trained": r.n_replicas, "epochs": epochs, "train_time_s": r.train_time_s,
                              "setup_time_s": r.setup_time_s, "snapshots": {}}
                stages = [(k, r.snapshots[k]["prediction"], r.snapshots[k]["loss_train"],
                           r.snapshots[k]["replica_times_s"]) for k in snaps]
                stages.append((epochs, r.prediction, r.loss_train, r.replica_times_s))
                for k, pk, loss, rtimes in stages:
                    t_rep = float(np.sum(rtimes))
                    row = {
                        "train_time_measured_s": r.setup_time_s + t_rep,
                        "train_time_for_replicas_s": r.setup_time_s + t_rep * args.replicas / r.n_replicas,
                        "extrapolated": r.n_replicas != args.replicas,
                        "n_kept": pk.n_models_kept, "loss_train_median": float(np.median(loss)),
                        "loss_train_max": float(np.max(loss)),
                        "score_own": score(energy, data, tz, ti, pk.zlp_median, pk.zlp_low, pk.zlp_high, pk.de1,
                                           pk.de2),
                    }
                    if ref is not None:
                        row["score_common"] = score(energy, data, tz, ti, pk.zlp_median, pk.zlp_low, pk.zlp_high,
                                                    ref["de1"], ref["de2"])
                    ef["long"]["snapshots"][k] = row
                log(f"  long run trained in {r.train_time_s:.1f} s, load {load_avg()}")
                del r
                checkpoint()
            else:
                log("  long run skipped: the cap leaves no more epochs than the defaults")

        if big is not None:
            log(f"EELSFitter subtraction timing on {args.big[0]}x{args.big[1]} px: first {args.big_ef_pixels} px "
                f"x {args.replicas} replicas, x{args.repeats}")
            t = efr.time_subtraction(ef_model_dir, np.asarray(big.data), energy, n_models=args.replicas,
                                     max_pixels=args.big_ef_pixels, repeats=args.repeats)
            per_px = float(np.median(t["times_s"])) / t["n_pixels"]
            ef["big_subtract"] = {**t, "per_pixel_s": per_px, "total_s": per_px * t["n_pixels_total"],
                                  "extrapolated": t["n_pixels"] != t["n_pixels_total"]}
            log(f"  {t['n_pixels']} px: {t['times_s']} s -> {per_px * 1e3:.1f} ms/px, "
                f"{per_px * t['n_pixels_total']:.0f} s for {t['n_pixels_total']} px, load {load_avg()}")

        import shutil

        shutil.rmtree(work, ignore_errors=True)

    results["stemml"] = {d: {k: v for k, v in o.items() if k not in _BIG_KEYS} for d, o in stemml.items()}
    results["eelsfitter"] = ef
    results["load_avg_end"] = load_avg()
    results["wall_time_s"] = time.perf_counter() - t_start
    print(report(results, args))
    if args.json:
        write_json(args.json, results)
        log(f"results written to {args.json}")
    return results



# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------

def _fmt_t(s, extrapolated=False):
    if s is None or not np.isfinite(s):
        return "-"
    txt = f"{s:.3g} s" if s < 100 else f"{s:.0f} s"
    if s >= 600:
        txt += f" ({s / 60:.0f} min)"
    return txt + (" *" if extrapolated else "")


def _fmt_score(sc):
    if sc is None:
        return "-"
    zb = f" ({sc['zero_band']:.0%} zero-width)" if sc.get("zero_band", 0) > 0 else ""
    return (f"chi2/pt {sc['chi2_band']:.3g}{zb} | cover68 {sc['coverage68']:.0%} | ZLP err {sc['err_noise']:.3g} sigma_N | "
            f"inel err {sc['inel_err_noise']:.3g} sigma_N, bias {sc['inel_bias']:+.2%}")


def report(res, args):
    m, st, ef = res["machine"], res["stemml"], res["eelsfitter"]
    R = args.replicas
    npx = int(np.prod(args.nav))
    big_px = int(np.prod(args.big))
    lines = []
    add = lines.append
    add("")
    add("=" * 118)
    add(f"ZLP ensemble: stemml ZLPEnsemble vs EELSFitter {m['eelsfitter']}   ({m['date']})")
    add(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} thread(s), "
        f"GPU: {m['gpu']}; load average at start {res['load_avg_start']}, at end {res['load_avg_end']}")
    if ef.get("defaults", {}).get("train_threads") not in (None, m["torch_threads"]):
        add(f"EELSFitter trained with {ef['defaults']['train_threads']} torch thread(s)")
    s = res["sample"]
    add(f"data: flake_sample {s['nav'][0]}x{s['nav'][1]} px, {s['n_energy']} channels "
        f"({s['energy_range'][0]:g} to {s['energy_range'][1]:g} eV), dose {s['dose']:g}, seed {args.seed}; "
        f"{args.clusters} clusters, {R} replicas, network 2-10-15-5-1")
    add("times: medians of repeats; '*' = extrapolated linearly from fewer replicas/pixels (see JSON/README)")
    add("-" * 118)
    add(f"{'':44s}{'time to trained ensemble':>26s}{'subtract ' + str(npx) + ' px':>22s}"
        f"{'subtract ' + str(big_px) + ' px':>24s}")
    for dev, o in st.items():
        bt = float(np.median(o["big_subtract_times_s"])) if "big_subtract_times_s" in o else None
        add(f"{'stemml [' + dev + ']':44s}{_fmt_t(float(np.median(o['fit_times_s']))):>26s}"
            f"{_fmt_t(float(np.median(o['subtract_times_s']))):>22s}{_fmt_t(bt):>24s}")
    d = ef.get("defaults")
    bs = ef.get("big_subtract")
    if d:
        add(f"{'EELSFitter, ' + str(d['epochs']) + ' epochs (defaults)':44s}"
            f"{_fmt_t(d['train_time_for_replicas_s'], d['extrapolated']):>26s}"
            f"{_fmt_t(d['subtract_time_s']) + (' (' + str(d['n_kept']) + ' kept)' if d['n_kept'] != R else ''):>22s}"
            f"{_fmt_t(bs['total_s'], bs['extrapolated']) if bs else '-':>24s}")
    lg = ef.get("long")
    if lg:
        for k, row in lg["snapshots"].items():
            add(f"{'EELSFitter, ' + str(k) + ' epochs (' + str(lg['n_replicas_trained']) + ' replicas run)':44s}"
                f"{_fmt_t(row['train_time_for_replicas_s'], row['extrapolated']):>26s}")
    add("-" * 118)
    add("accuracy vs noise-free truth; own = each tool's own per-pixel [dE1, dE2], common = stemml's windows")
    add("  chi2/pt: ((median - true ZLP) / 68% half-width)^2 on [dE1,dE2] (goal < 2); cover68: true ZLP inside the "
        "68% band (goal 55-85%);")
    add("  ZLP err: RMS (median - true ZLP)/sqrt(true counts) on [dE1,dE2]; inel err/bias: data - median vs true "
        "inelastic on (dE2, dE2+5 eV]")
    for dev, o in st.items():
        add(f"  stemml [{dev}] ({o['kept']}/{R} kept)  own:    {_fmt_score(o['score_own'])}")
    if d:
        add(f"  EELSFitter {d['epochs']} ep ({d['n_kept']}/{d['n_replicas_trained']} kept)  own: "
            f"{_fmt_score(d['score_own'])}")
        if "score_common" in d:
            add(f"  {'':32s}common: {_fmt_score(d['score_common'])}")
    if lg:
        for k, row in lg["snapshots"].items():
            add(f"  EELSFitter {k} ep ({row['n_kept']}/{lg['n_replicas_trained']} kept, median loss "
                f"{row['loss_train_median']:.3g})  own: {_fmt_score(row['score_own'])}")
            if "score_common" in row:
                add(f"  {'':32s}common: {_fmt_score(row['score_common'])}")
    for dev, o in st.items():
        add(f"  stemml [{dev}] dE1 per cluster {np.round(o['de1_clusters'], 3).tolist()} eV, "
            f"dE2 {np.round(o['de2_clusters'], 3).tolist()} eV")
    if d:
        add(f"  EELSFitter dE1 per cluster {np.round(d['de1_clusters'], 3).tolist()} eV, "
            f"dE2 {np.round(d['de2_clusters'], 3).tolist()} eV")
    add("-" * 118)
    add("ratios (EELSFitter / stemml)")
    for dev, o in st.items():
        fit = float(np.median(o["fit_times_s"]))
        sub = float(np.median(o["subtract_times_s"]))
        if d:
            add(f"  [{dev}] training, EELSFitter at defaults: {d['train_time_for_replicas_s'] / fit:.3g}x"
                f"{' *' if d['extrapolated'] else ''}")
            add(f"  [{dev}] subtraction {npx} px x {R} replicas: {d['subtract_time_s'] / sub:.3g}x"
                f"{' (EELSFitter kept ' + str(d['n_kept']) + ')' if d['n_kept'] != R else ''}")
        if bs and "big_subtract_times_s" in o:
            add(f"  [{dev}] subtraction {big_px} px x {R} replicas: "
                f"{bs['total_s'] / float(np.median(o['big_subtract_times_s'])):.3g}x{' *' if bs['extrapolated'] else ''}")
        if lg:
            target = o["score_own"]["err_noise"]
            reached = [(k, row) for k, row in lg["snapshots"].items()
                       if row.get("score_common", row["score_own"])["err_noise"] <= target]
            if reached:
                k, row = reached[0]
                add(f"  [{dev}] time to stemml's ZLP accuracy (err {target:.3g} sigma_N): EELSFitter needs {k} epochs, "
                    f"{row['train_time_for_replicas_s'] / fit:.3g}x{' *' if row['extrapolated'] else ''}")
            else:
                k, row = list(lg["snapshots"].items())[-1]
                add(f"  [{dev}] EELSFitter does not reach stemml's ZLP accuracy (err {target:.3g} sigma_N) within "
                    f"{k} epochs: ratio > {row['train_time_for_replicas_s'] / fit:.3g}x"
                    f"{' *' if row['extrapolated'] else ''}")
    add("=" * 118)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
