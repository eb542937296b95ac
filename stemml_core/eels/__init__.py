"""Low-loss EELS analyses: ZLP removal, thickness, band gap, dielectric function, features."""

from .bandgap import BandGapResult, estimate_band_gap, fit_onset, onset_curve, onset_window, resolution_from
from .catalogue import (FeatureCatalogue, LowLossFeatureMaps, LowLossFeatures, feature_catalogue, identify_features,
                        map_lowloss_features)
from .deconvolution import richardson_lucy
from .denoise import Decomposition, decomposition_denoise, noise_edge, pool_spectra
from .dielectric import DielectricResult, dielectric_function, fourier_log_deconvolution, kramers_kronig
from .features import (FeatureFit, FeatureLabels, FeatureMap, FeatureMapResult, cluster_spectra, feature_curve,
                       find_features, label_features, map_features)
from .gain import GainLossFit, GainLossMaps, VacuumZLP, fit_gain_loss, map_gain_loss
from .replicas import inelastic_replicas, noise_variance
from .thickness import ReplicaInterval, estimate_thickness, log_ratio, mean_free_path
from .zlp import ZLPEnsemble

__all__ = [
    "BandGapResult",
    "Decomposition",
    "DielectricResult",
    "FeatureCatalogue",
    "FeatureFit",
    "FeatureLabels",
    "FeatureMap",
    "FeatureMapResult",
    "GainLossFit",
    "GainLossMaps",
    "LowLossFeatureMaps",
    "LowLossFeatures",
    "ReplicaInterval",
    "VacuumZLP",
    "ZLPEnsemble",
    "cluster_spectra",
    "decomposition_denoise",
    "dielectric_function",
    "estimate_band_gap",
    "estimate_thickness",
    "feature_catalogue",
    "feature_curve",
    "find_features",
    "fit_gain_loss",
    "fit_onset",
    "identify_features",
    "fourier_log_deconvolution",
    "inelastic_replicas",
    "kramers_kronig",
    "label_features",
    "log_ratio",
    "map_features",
    "map_gain_loss",
    "map_lowloss_features",
    "mean_free_path",
    "noise_edge",
    "noise_variance",
    "onset_curve",
    "onset_window",
    "pool_spectra",
    "resolution_from",
    "richardson_lucy",
]
