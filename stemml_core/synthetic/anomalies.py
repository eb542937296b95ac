"""Samples with planted anomalies and their ground truth, for testing anomaly detection.

Two generators start from the project's default samples and plant, at known pixels, data that
no model of the rest of the scan explains:

- :func:`lowloss_anomalies`: the low-loss flake of :func:`~stemml_core.synthetic.flake_sample`
  with a contamination hump (a broad Gaussian near 6 eV, Poisson noise added) in a few flake
  pixels and a spike (one channel multiplied by 10, a cosmic ray or a hot pixel) in one pixel;
- :func:`diffraction_anomalies`: the strained flake of
  :func:`~stemml_core.synthetic.strained_flake` with patterns of a rotated grain (another
  orientation, a second phase) at a few positions and a mis-tilted block whose Bragg disks are
  brighter on one side of the pattern than on the other.

Like every generator of :mod:`stemml_core.synthetic`, they return ``(signal, truth)`` and never
import the analyses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stemml_core.synthetic.diffraction import strained_flake
from stemml_core.synthetic.lowloss import flake_sample

__all__ = ["AnomalyTruth", "diffraction_anomalies", "lowloss_anomalies"]


@dataclass(frozen=True)
class AnomalyTruth:
    """Where anomalies were planted.

    Attributes
    ----------
    anomalous : numpy.ndarray
        ``(rows, cols)`` bool, True at every planted pixel.
    kind : numpy.ndarray
        ``(rows, cols)`` int, 0 for clean pixels and ``k`` for the anomaly ``kinds[k - 1]``.
    kinds : tuple of str
        Names of the anomaly kinds, in the order of their codes in ``kind``.
    sample : object
        Ground truth of the clean sample (:class:`~stemml_core.synthetic.LowLossTruth` or
        :class:`~stemml_core.synthetic.StrainTruth`).
    params : dict
        The generator's settings.
    """

    anomalous: np.ndarray
    kind: np.ndarray
    kinds: tuple
    sample: object
    params: dict


def _pick(candidates: np.ndarray, count: int, rng: np.random.Generator, name: str) -> np.ndarray:
    """``count`` distinct flat indices drawn from the True entries of ``candidates``."""
    pool = np.flatnonzero(candidates)
    if not 0 <= count <= pool.size:
        raise ValueError(f"{name}={count}; expected 0 to {pool.size} (the candidate pixels of the sample).")
    return rng.choice(pool, size=count, replace=False)


def lowloss_anomalies(
    nav_shape: tuple[int, int] = (24, 32),
    *,
    n_contaminated: int = 4,
    hump_energy: float = 6.0,
    hump_width: float = 1.5,
    hump_fraction: float = 0.5,
    n_spikes: int = 1,
    spike_factor: float = 10.0,
    dose: float = 1e6,
    random_state: int | None = 0,
):
    """Low-loss spectrum image of the default flake with a contamination hump and a spike planted.

    Parameters
    ----------
    nav_shape : tuple of int
        ``(rows, cols)`` of the spectrum image, as :func:`~stemml_core.synthetic.flake_sample`.
    n_contaminated : int
        Flake pixels (drawn at random) that get the contamination hump.
    hump_energy, hump_width : float
        Centre and standard deviation of the Gaussian hump, eV.
    hump_fraction : float
        Height of the hump as a fraction of the pixel's mean counts within ``hump_width`` of
        ``hump_energy``; Poisson noise of the hump's counts is added.
    n_spikes : int
        Further pixels (drawn among the other flake pixels) with one channel between 10 and 40 eV
        multiplied by ``spike_factor``.
    spike_factor : float
        Factor of the spiked channel.
    dose : float
        Incident electrons per spectrum (:func:`~stemml_core.synthetic.flake_sample`).
    random_state : int or None
        Seed of the sample, of the choice of pixels and of the hump's noise.

    Returns
    -------
    signal : exspy.signals.EELSSpectrum
        ``(rows, cols, n_energy)`` float32 counts, energy in eV.
    truth : AnomalyTruth
        ``kinds = ("contamination", "spike")``.

    Examples
    --------
    >>> signal, truth = lowloss_anomalies((12, 16), n_contaminated=2)
    >>> int(truth.anomalous.sum()), truth.kinds
    (3, ('contamination', 'spike'))
    """
    rng = np.random.default_rng(random_state)
    signal, sample = flake_sample(nav_shape, dose=dose, random_state=int(rng.integers(2**31)))
    energy = signal.axes_manager.signal_axes[0].axis
    flat = signal.data.reshape(-1, energy.size)
    flake = ~sample.vacuum.ravel()
    contaminated = _pick(flake, n_contaminated, rng, "n_contaminated")
    flake[contaminated] = False
    spiked = _pick(flake, n_spikes, rng, "n_spikes")
    window = np.abs(energy - hump_energy) <= hump_width
    shape = np.exp(-0.5 * ((energy - hump_energy) / hump_width) ** 2)
    for index in contaminated:
        hump = hump_fraction * max(float(flat[index, window].mean()), 0.0) * shape
        flat[index] += rng.poisson(hump).astype(flat.dtype)
    band = np.flatnonzero((energy >= 10.0) & (energy <= 40.0))
    for index in spiked:
        flat[index, rng.choice(band)] *= spike_factor
    kind = np.zeros(flat.shape[0], int)
    kind[contaminated], kind[spiked] = 1, 2
    kind = kind.reshape(sample.vacuum.shape)
    params = {"n_contaminated": n_contaminated, "hump_energy": hump_energy, "hump_width": hump_width,
              "hump_fraction": hump_fraction, "n_spikes": n_spikes, "spike_factor": spike_factor,
              "dose": dose, "random_state": random_state}
    signal.metadata.General.title = "Synthetic low-loss flake with planted anomalies"
    return signal, AnomalyTruth(kind > 0, kind, ("contamination", "spike"), sample, params)


def diffraction_anomalies(
    scan_shape: tuple[int, int] = (24, 24),
    *,
    detector_shape: tuple[int, int] = (64, 64),
    n_rotated: int = 4,
    rotation: float = 15.0,
    tilted_block: tuple[int, int] = (2, 2),
    tilt_strength: float = 0.6,
    dose: float = 1e5,
    random_state: int | None = 0,
):
    """4D-STEM scan of the strained flake with a rotated grain and a mis-tilted block planted.

    Parameters
    ----------
    scan_shape : tuple of int
        ``(rows, cols)`` scan positions.
    detector_shape : tuple of int
        ``(H, W)`` detector pixels.
    n_rotated : int
        Crystal positions (drawn at random) whose pattern is that of the same flake turned by
        ``rotation``: another grain or phase.
    rotation : float
        Orientation of the rotated patterns' lattice, degrees counter-clockwise.
    tilted_block : tuple of int
        ``(rows, cols)`` of a block of crystal positions (placed at random) whose patterns are
        multiplied by ``1 + tilt_strength * (kx - kx0) / (W / 2)`` (``kx0`` the pattern centre,
        column ``W // 2``): disks on one side brighter, as in a locally mis-tilted crystal. No
        positions are tilted when either side is 0.
    tilt_strength : float
        Slope of that intensity ramp across half the detector, in [0, 1).
    dose : float
        Expected electrons per pattern; Poisson noise is drawn after planting.
    random_state : int or None
        Seed of the choice of positions and of the noise.

    Returns
    -------
    signal : hyperspy.signals.Signal2D
        ``(rows, cols, H, W)`` float32 counts, calibrated as
        :func:`~stemml_core.synthetic.simulate_4dstem`.
    truth : AnomalyTruth
        ``kinds = ("rotated", "tilted")``.

    Examples
    --------
    >>> signal, truth = diffraction_anomalies((12, 12), detector_shape=(32, 32), n_rotated=2)
    >>> int(truth.anomalous.sum()), truth.kinds
    (6, ('rotated', 'tilted'))
    """
    if not 0 <= tilt_strength < 1:
        raise ValueError(f"tilt_strength={tilt_strength!r}; expected a value in [0, 1).")
    rng = np.random.default_rng(random_state)
    signal, sample = strained_flake(scan_shape, detector_shape=detector_shape, dose=None, random_state=0)
    rotated, _ = strained_flake(scan_shape, detector_shape=detector_shape, dose=None, random_state=0,
                                orientation=rotation)
    rows, cols = scan_shape
    crystal = ~sample.vacuum
    kind = np.zeros(scan_shape, int)
    block_rows, block_cols = tilted_block
    if block_rows > 0 and block_cols > 0:
        # Top-left corners whose whole block lies on crystal.
        corners = np.zeros(scan_shape, bool)
        for r in range(rows - block_rows + 1):
            for c in range(cols - block_cols + 1):
                corners[r, c] = crystal[r:r + block_rows, c:c + block_cols].all()
        corner = _pick(corners, 1, rng, "tilted_block")[0]
        r, c = divmod(int(corner), cols)
        kind[r:r + block_rows, c:c + block_cols] = 2
    picked = _pick(crystal & (kind == 0), n_rotated, rng, "n_rotated")
    kind.ravel()[picked] = 1
    data = np.array(signal.data, dtype=np.float64)
    data[kind == 1] = rotated.data[kind == 1]
    width = detector_shape[1]
    ramp = 1.0 + tilt_strength * (np.arange(width) - width // 2) / (width / 2)
    data[kind == 2] *= ramp
    signal.data = rng.poisson(data * dose).astype(np.float32)
    params = {"n_rotated": n_rotated, "rotation": rotation, "tilted_block": tuple(tilted_block),
              "tilt_strength": tilt_strength, "dose": dose, "random_state": random_state}
    signal.metadata.General.title = "Synthetic strained flake with planted anomalies (4D-STEM)"
    return signal, AnomalyTruth(kind > 0, kind, ("rotated", "tilted"), sample, params)
