"""Low-loss EELS analyses: ZLP removal, thickness, band gap, dielectric function, features."""

from .bandgap import BandGapResult, estimate_band_gap, fit_onset, onset_curve, resolution_from
from .denoise import pool_spectra
from .dielectric import DielectricResult, dielectric_function, fourier_log_deconvolution, kramers_kronig
from .thickness import ReplicaInterval, estimate_thickness, log_ratio, mean_free_path
from .zlp import ZLPEnsemble

__all__ = [
    "BandGapResult",
    "DielectricResult",
    "ReplicaInterval",
    "ZLPEnsemble",
    "dielectric_function",
    "estimate_band_gap",
    "estimate_thickness",
    "fit_onset",
    "fourier_log_deconvolution",
    "kramers_kronig",
    "log_ratio",
    "mean_free_path",
    "onset_curve",
    "pool_spectra",
    "resolution_from",
]
