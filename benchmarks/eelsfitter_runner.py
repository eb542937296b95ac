"""Run the reference implementation, EELSFitter (PyPI ``eelsfitter``, import ``EELSFitter``), on a spectrum image.

This module drives EELSFitter's *own* pipeline the way its documentation and the docstring of
``EELSFitter.core.spectral_image.SpectralImage`` intend, so that ``zlp_vs_eelsfitter.py`` can time it and score it
against the synthetic generator's truth:

1. ``SpectralImage(data, deltaE=...)``: EELSFitter builds its own energy axis from the bin width, with 0 eV at the
   maximum of the image-averaged spectrum (``set_eaxis``). Its documented entry point is ``load_dmfile`` (a
   ``.dm4``/``.dm3`` file read with ncempy), which ends in exactly this constructor call; building the object from
   the numpy array skips only the file parsing, so no temporary ``.dm4`` (which nothing here could write) is needed.
   Energies it reports (dE1, dE2, FWHM) are mapped back to the caller's axis by the offset of that maximum.
2. ``SpectralImage.train_zlp_models(n_clusters=..., seed=..., n_replica=..., n_epochs=..., path_to_models=...)``:
   k-means on ``log_zlp`` (its default), per-cluster dE1 (kneedle) and dE2 (log10 extrapolation to one count),
   then one replica after another in a Python loop: one random spectrum per cluster, ``train_test_split`` 75/25
   by energy point, a fresh ``MultilayerPerceptron`` (2-10-15-5-1), Adam at ``lr`` for exactly ``n_epochs``;
   the *final* weights are saved (EELSFitter keeps no best-validation weights). Its files (``hyperparameters.txt``,
   ``scale_var.txt``, ``nn_replicas``, ``costs_*.txt``) go to a temporary directory, removed afterwards unless
   ``workdir`` is given. ``training_report_step=0`` switches off its per-replica PDF loss plots (matplotlib
   figures that are never closed); ``display_step=None`` its per-epoch printing. Nothing else is changed.
3. ``SpectralImage.load_zlp_models(path_to_models)``: reads those files back, re-clusters the image on the saved
   centroids and drops replicas whose final cost exceeds EELSFitter's rule (mean + 5 x 68th percentile).
4. Per-pixel subtraction: for every pixel, ``get_pixel_matched_zlp_models(i, j, signal=...)`` (every kept network
   evaluated at the pixel's ``log_zlp`` intensity, then ``match_zlp_to_signal``: the data itself inside the
   FWHM window, a sigmoid blend up to dE1, the network between dE1 and dE2, zero above dE2, and everything
   clipped to the signal), the 16/50/84th percentiles over replicas, and ``subtract_zlp(signal, median)``. This
   is the body of ``SpectralImage.subtract_image`` plus two more percentiles (to get the 68% band, which
   ``subtract_image`` does not return); ``subtract_image`` itself also writes an ``.npy`` to the working
   directory and prints every row, which is why it is not called directly.

Workarounds, all small and none touching EELSFitter's numerics:

- Headless: ``MPLBACKEND=Agg`` is set before EELSFitter (which imports pyplot) is imported; its chatter on stdout
  is redirected to a log file in the model directory (``quiet=True``).
- Reproducibility: EELSFitter draws spectra with ``random``, splits with numpy's global RNG (through scikit-learn)
  and initialises with torch's global RNG; all three are seeded from ``seed`` before training, and k-means gets
  ``seed`` (which EELSFitter then runs once instead of ten times).
- Snapshots (``snapshot_epochs``): to score EELSFitter at several epoch counts from one training run, a global
  torch optimizer *pre-step* hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``) copies the
  weights after k updates together with EELSFitter's own train/test cost of exactly those weights (both
  already computed by its loop) and the wall time so far. Adam without a schedule does not depend on
  ``n_epochs``, so the weights after k of N epochs are those of a k-epoch run. Each snapshot is written as an
  EELSFitter model directory (same ``hyperparameters.txt``/``scale_var.txt``, its own ``nn_replicas`` and
  ``costs_*.txt``) and goes through steps 3-4 unchanged.
- Subtraction timing with more replicas than were trained (``time_subtraction(..., n_models=M)``): the cost of
  step 4 does not depend on the weights, so the model file is padded by cycling through the trained replicas.
  Only timings come from such a directory, never accuracy.

Replicas in EELSFitter are independent and trained one after the other, so the time for M replicas is the
measured time for R replicas times M/R plus the (measured) one-off setup; callers that extrapolate must say so.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

__all__ = ["EELSFitterResult", "run_eelsfitter", "evaluate_models", "time_subtraction", "eelsfitter_version"]


def eelsfitter_version():
    """EELSFitter's installed distribution version (its ``EELSFitter.version.__version__`` still says 0.7.1)."""
    from importlib.metadata import PackageNotFoundError, version

    for name in ("EELSFitter", "eelsfitter"):
        try:
            return version(name)
        except PackageNotFoundError:
            pass
    from EELSFitter.version import __version__

    return __version__


@dataclass
class Prediction:
    """Per-pixel output of EELSFitter's matched-ZLP subtraction (arrays of shape (rows, cols, n_energy))."""

    zlp_median: np.ndarray
    zlp_low: np.ndarray
    zlp_high: np.ndarray
    inelastic: np.ndarray  # signal - zlp_median, as subtract_image returns it
    raw_median: np.ndarray | None  # network median without matching (diagnostic)
    de1: np.ndarray  # (rows, cols), of each pixel's cluster, in the caller's energy axis
    de2: np.ndarray
    cluster_labels: np.ndarray
    n_models_kept: int
    subtract_time_s: float  # the timed per-pixel loop (step 4)
    load_time_s: float  # load_zlp_models (step 3)


@dataclass
class EELSFitterResult:
    """What :func:`run_eelsfitter` measured."""

    n_replicas: int
    n_epochs: int
    n_clusters: int
    lr: float
    train_time_s: float  # train_zlp_models wall time (clustering + hyperparameters + all replicas + file merge)
    setup_time_s: float  # train_time_s before the first replica's first step (clustering, dE1/dE2, scaling)
    replica_times_s: np.ndarray  # per replica: its first optimiser step to the next one's (the last: to the end)
    loss_train: np.ndarray  # EELSFitter's final cost per replica
    loss_test: np.ndarray
    de1: np.ndarray  # per cluster, caller's energy axis
    de2: np.ndarray
    fwhm: np.ndarray
    cluster_centroids: np.ndarray
    energy_offset: float  # caller's energy of EELSFitter's 0 eV
    model_dir: str | None  # kept only when workdir was given
    prediction: Prediction | None
    snapshots: dict = field(default_factory=dict)  # epoch -> dict(time_s, loss_train, loss_test, prediction)
    torch_threads: int = 0  # during training

    def time_to_epoch(self, epoch):
        """Training wall time of the whole ensemble up to ``epoch`` (setup + each replica's first ``epoch`` epochs)."""
        if epoch == self.n_epochs:
            return self.train_time_s
        return self.setup_time_s + float(np.sum(self.snapshots[epoch]["replica_times_s"]))


class _Recorder:
    """Global optimiser pre-step hook: per-replica step counts, wall times and weight snapshots."""

    def __init__(self, image, snapshot_epochs):
        self.image = image
        self.snapshot_epochs = sorted(set(int(e) for e in snapshot_epochs))
        self.optimizer = None
        self.steps = 0
        self.t_first = None
        self.starts = []
        self.replica_times = np.zeros(0)
        self.snapshots = {e: {"states": [], "loss_train": [], "loss_test": [], "replica_times_s": []}
                          for e in self.snapshot_epochs}

    def __call__(self, optimizer, args, kwargs):
        now = time.perf_counter()
        if optimizer is not self.optimizer:  # a new replica: EELSFitter makes one Adam per replica
            self.optimizer, self.steps, self.t_first = optimizer, 0, now
            self.starts.append(now)
        # Before step number steps+1 the weights have had `steps` updates; EELSFitter has just computed their
        # train cost (loss_train_n[-1]) and, at the end of the previous epoch, their test cost (loss_test_n[-1]).
        k = self.steps
        if k in self.snapshots and k > 0:
            trainer = self.image.train_zlps
            snap = self.snapshots[k]
            snap["states"].append(copy.deepcopy(trainer.model.state_dict()))
            snap["loss_train"].append(trainer.loss_train_n[-1])
            snap["loss_test"].append(trainer.loss_test_n[-1])
            snap["replica_times_s"].append(now - self.t_first)
        self.steps += 1

    def finish(self, t_end):
        """Per-replica time: from its first optimiser step to the next replica's first step (or ``t_end``)."""
        self.optimizer = None
        self.replica_times = np.diff(np.asarray(self.starts + [t_end])) if self.starts else np.zeros(0)


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _quiet(path, enabled=True):
    if not enabled:
        yield
        return
    with open(path, "a") as log, contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _energy_offset(data, energy):
    """Caller's energy at EELSFitter's 0 eV (the channel of the maximum of the image-averaged spectrum)."""
    return float(energy[int(np.argmax(np.average(data, axis=(0, 1))))])


def _check(data, energy):
    data = np.asarray(data, dtype=np.float64)
    energy = np.asarray(energy, dtype=np.float64)
    if data.ndim != 3 or data.shape[-1] != energy.size:
        raise ValueError(f"data must be (rows, cols, n_energy) with n_energy = {energy.size}; got {data.shape}")
    steps = np.diff(energy)
    if not np.allclose(steps, steps[0], rtol=1e-6, atol=0):
        raise ValueError("EELSFitter needs a uniform energy axis")
    return data, energy, float(steps[0])


def run_eelsfitter(data, energy, *, n_clusters=5, n_replicas=100, n_epochs=1000, lr=1e-3, seed=0,
                   snapshot_epochs=(), predict=True, time_predict=True, return_raw=True, workdir=None, quiet=True,
                   train_threads=None):
    """Train an EELSFitter ZLP ensemble on a spectrum image and, optionally, subtract it from every pixel.

    Parameters
    ----------
    data : array (rows, cols, n_energy)
        Counts. Copied; never modified.
    energy : array (n_energy,)
        Uniform energy-loss axis, eV.
    n_clusters, n_replicas, n_epochs, lr, seed
        EELSFitter's settings (its defaults: 1000 epochs, lr 1e-3; 5 clusters and 100 replicas are its
        documented example values).
    snapshot_epochs : iterable of int
        Also score the ensemble after these numbers of epochs (< n_epochs) of the same training run.
    predict : bool
        Run the per-pixel subtraction on ``data`` with the trained models (and every snapshot).
    time_predict : bool
        Time that subtraction for the final models with EELSFitter's own percentile call (snapshots are never
        timed; see :func:`evaluate_models`).
    return_raw : bool
        Also return the unmatched network median per pixel (computed outside the timed loop).
    workdir : str or None
        Keep EELSFitter's files here; by default a temporary directory that is removed.
    train_threads : int or None
        torch threads during training only (restored afterwards); None keeps the current setting.

    Returns
    -------
    EELSFitterResult
    """
    from EELSFitter.core.spectral_image import SpectralImage

    data, energy, delta_e = _check(data, energy)
    offset = _energy_offset(data, energy)
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="eelsfitter_")
        root = tmp
    else:
        root = os.path.abspath(workdir)
        os.makedirs(root, exist_ok=True)
    model_dir = os.path.join(root, "models") + os.sep
    log = os.path.join(root, "eelsfitter.log")
    try:
        snapshot_epochs = [int(e) for e in snapshot_epochs if 0 < int(e) < n_epochs]
        with _quiet(log, quiet):
            image = SpectralImage(np.copy(data), deltaE=delta_e)
            image.output_path = root + os.sep
            recorder = _Recorder(image, snapshot_epochs)
            threads_before = torch.get_num_threads()
            if train_threads:
                torch.set_num_threads(int(train_threads))
            threads_used = torch.get_num_threads()
            handle = register_optimizer_step_pre_hook(recorder)
            _seed_everything(seed)
            try:
                t0 = time.perf_counter()
                image.train_zlp_models(n_clusters=n_clusters, seed=seed, n_replica=n_replicas, n_epochs=n_epochs,
                                       lr=lr, path_to_models=model_dir, display_step=None, training_report_step=0)
            finally:
                t_end = time.perf_counter()
                handle.remove()
                recorder.finish(t_end)
                torch.set_num_threads(threads_before)
            train_time = t_end - t0
        trainer = image.train_zlps
        replica_times = recorder.replica_times
        result = EELSFitterResult(
            n_replicas=n_replicas, n_epochs=n_epochs, n_clusters=n_clusters, lr=lr,
            train_time_s=train_time, setup_time_s=train_time - float(replica_times.sum()),
            replica_times_s=replica_times,
            loss_train=np.asarray(trainer.loss_train_reps, float), loss_test=np.asarray(trainer.loss_test_reps, float),
            de1=np.asarray(trainer.de1, float) + offset, de2=np.asarray(trainer.de2, float) + offset,
            fwhm=np.asarray(trainer.fwhm, float), cluster_centroids=np.asarray(trainer.cluster_centroids, float),
            energy_offset=offset, model_dir=None if tmp else model_dir, prediction=None,
            torch_threads=threads_used,
        )
        for epoch in snapshot_epochs:
            snap = recorder.snapshots[epoch]
            snap_dir = os.path.join(root, f"models_epoch{epoch}") + os.sep
            _write_model_dir(model_dir, snap_dir, snap["states"], snap["loss_train"], snap["loss_test"])
            result.snapshots[epoch] = {
                "replica_times_s": np.asarray(snap["replica_times_s"]),
                "loss_train": np.asarray(snap["loss_train"]), "loss_test": np.asarray(snap["loss_test"]),
                "prediction": None, "model_dir": snap_dir,
            }
        if predict:
            result.prediction = evaluate_models(model_dir, data, energy, return_raw=return_raw, timed=time_predict,
                                                quiet=quiet, log=log)
            for epoch in snapshot_epochs:
                result.snapshots[epoch]["prediction"] = evaluate_models(
                    result.snapshots[epoch]["model_dir"], data, energy, return_raw=return_raw, timed=False,
                    quiet=quiet, log=log)
        return result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_model_dir(src, dst, states, loss_train, loss_test):
    """An EELSFitter model directory with the hyperparameters of ``src`` and the given replicas and costs."""
    os.makedirs(dst, exist_ok=True)
    for name in ("hyperparameters.txt", "scale_var.txt"):
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    torch.save({f"model_{i + 1}": s for i, s in enumerate(states)}, os.path.join(dst, "nn_replicas"))
    np.savetxt(os.path.join(dst, "costs_train.txt"), np.asarray(loss_train, float))
    np.savetxt(os.path.join(dst, "costs_test.txt"), np.asarray(loss_test, float))


def _load(model_dir, data, energy, quiet, log):
    from EELSFitter.core.spectral_image import SpectralImage

    data, energy, delta_e = _check(data, energy)
    with _quiet(log, quiet):
        image = SpectralImage(np.copy(data), deltaE=delta_e)
        image.output_path = os.path.dirname(log) + os.sep
        t0 = time.perf_counter()
        image.load_zlp_models(path_to_models=model_dir)
        load_time = time.perf_counter() - t0
    return image, data, energy, load_time


def _percentiles_fast(matched):
    """Same values as ``np.nanpercentile(matched, [16, 50, 84], axis=0)``, without its per-channel Python loop."""
    if np.isnan(matched).any():
        return np.nanpercentile(matched, [16, 50, 84], axis=0)
    return np.percentile(matched, [16, 50, 84], axis=0)


def evaluate_models(model_dir, data, energy, *, return_raw=True, timed=True, quiet=True, log=None):
    """EELSFitter's per-pixel matched-ZLP subtraction on every pixel of ``data`` (step 4 of the module docstring).

    Returns a :class:`Prediction`; ``subtract_time_s`` is the wall time of the per-pixel loop alone. With
    ``timed=False`` (accuracy only) the percentiles use ``np.percentile`` where no replica is NaN: the same
    numbers, but not EELSFitter's cost (its ``np.nanpercentile`` loops over channels in Python and dominates the
    per-pixel time), so ``subtract_time_s`` is then NaN.
    """
    log = log or os.path.join(os.path.dirname(model_dir.rstrip(os.sep)), "eelsfitter.log")
    image, data, energy, load_time = _load(model_dir, data, energy, quiet, log)
    rows, cols, n_e = data.shape
    med = np.empty((rows, cols, n_e))
    low = np.empty_like(med)
    high = np.empty_like(med)
    inel = np.empty_like(med)
    with _quiet(log, quiet):
        t0 = time.perf_counter()
        for i in range(rows):
            for j in range(cols):
                signal = image.get_pixel_signal(i, j)
                matched = image.get_pixel_matched_zlp_models(i, j, signal=signal)
                if timed:
                    low[i, j], med[i, j], high[i, j] = np.nanpercentile(matched, [16, 50, 84], axis=0)
                else:
                    low[i, j], med[i, j], high[i, j] = _percentiles_fast(matched)
                inel[i, j] = image.subtract_zlp(signal, med[i, j])
        subtract_time = time.perf_counter() - t0 if timed else float("nan")
        raw = None
        if return_raw:
            raw = np.empty_like(med)
            for i in range(rows):
                for j in range(cols):
                    signal = image.get_pixel_signal(i, j)
                    m = int(np.argmax(signal))
                    preds = image.get_zlp_models(int_i=np.sum(signal[m - 1:m + 2]))
                    raw[i, j] = _percentiles_fast(preds)[1]
    offset = _energy_offset(data, energy)
    labels = np.asarray(image.cluster_labels, int)
    return Prediction(
        zlp_median=med, zlp_low=low, zlp_high=high, inelastic=inel, raw_median=raw,
        de1=np.asarray(image.dE1)[labels] + offset, de2=np.asarray(image.dE2)[labels] + offset,
        cluster_labels=labels, n_models_kept=len(image.zlp_models),
        subtract_time_s=subtract_time, load_time_s=load_time,
    )


def time_subtraction(model_dir, data, energy, *, n_models=None, max_pixels=None, repeats=1, quiet=True):
    """Wall time of EELSFitter's per-pixel subtraction (median matched ZLP and 68% band) on ``data``.

    Parameters
    ----------
    model_dir : str
        An EELSFitter model directory (from ``run_eelsfitter(..., workdir=...)``).
    n_models : int or None
        Pad the ensemble to this many networks by cycling through the trained ones (timing only; the cost does
        not depend on the weights). All padded replicas carry the same cost, so EELSFitter's rejection keeps
        them all.
    max_pixels : int or None
        Time only the first this-many pixels (whole rows, row-major); the caller extrapolates linearly.
    repeats : int
        Repeat the timed loop; every wall time is returned.

    Returns
    -------
    dict with ``times_s`` (list), ``n_pixels`` timed, ``n_pixels_total``, ``n_models`` (kept by EELSFitter),
    ``load_time_s``.
    """
    data = np.asarray(data)
    rows, cols, _ = data.shape
    root = tempfile.mkdtemp(prefix="eelsfitter_sub_")
    log = os.path.join(root, "eelsfitter.log")
    try:
        src = model_dir
        if n_models is not None:
            states = torch.load(os.path.join(model_dir, "nn_replicas"))
            keys = sorted(states, key=lambda k: int(k.split("_")[1]))
            padded = [states[keys[i % len(keys)]] for i in range(n_models)]
            src = os.path.join(root, "padded") + os.sep
            _write_model_dir(model_dir, src, padded, np.ones(n_models), np.ones(n_models))
        n_rows = rows if max_pixels is None else max(1, min(rows, -(-int(max_pixels) // cols)))
        sub = data[:n_rows]
        image, sub, _, load_time = _load(src, sub, energy, quiet, log)
        n_e = sub.shape[-1]
        out = np.empty((3, n_e))
        times = []
        with _quiet(log, quiet):
            for _ in range(repeats):
                t0 = time.perf_counter()
                for i in range(n_rows):
                    for j in range(cols):
                        signal = image.get_pixel_signal(i, j)
                        matched = image.get_pixel_matched_zlp_models(i, j, signal=signal)
                        out[:] = np.nanpercentile(matched, [16, 50, 84], axis=0)
                        image.subtract_zlp(signal, out[1])
                times.append(time.perf_counter() - t0)
        return {"times_s": times, "n_pixels": n_rows * cols, "n_pixels_total": rows * cols,
                "n_models": len(image.zlp_models), "load_time_s": load_time}
    finally:
        shutil.rmtree(root, ignore_errors=True)
