"""Low-loss EELS analyses: ZLP removal, thickness, band gap, dielectric function, features."""

from .dielectric import DielectricResult, dielectric_function, fourier_log_deconvolution, kramers_kronig
from .thickness import ReplicaInterval, estimate_thickness, log_ratio, mean_free_path
from .zlp import ZLPEnsemble

__all__ = [
    "DielectricResult",
    "ReplicaInterval",
    "ZLPEnsemble",
    "dielectric_function",
    "estimate_thickness",
    "fourier_log_deconvolution",
    "kramers_kronig",
    "log_ratio",
    "mean_free_path",
]
