"""Forward models with ground truth.

Every generator returns ``(signal, truth)`` (:func:`strain_and_lowloss`, two scans of one
region, returns ``(patterns, spectra, truth)``) and never imports the analyses of
:mod:`stemml_core.eels` or :mod:`stemml_core.diffraction`: the truth is made
independently of the estimators it tests.
"""

from stemml_core.synthetic.anomalies import AnomalyTruth, diffraction_anomalies, lowloss_anomalies
from stemml_core.synthetic.diffraction import (
    LayerStrain,
    StrainTruth,
    simulate_4dstem,
    strained_flake,
    twisted_bilayer,
)
from stemml_core.synthetic.field import FieldTruth, atomic_monolayer, polar_bilayer, simulate_field_4dstem
from stemml_core.synthetic.features import FeatureTruth, feature_sample
from stemml_core.synthetic.gain import GainLossTruth, gain_loss_sample, simulate_gain_loss
from stemml_core.synthetic.joint import JointTruth, strain_and_lowloss
from stemml_core.synthetic.lowloss import LowLossTruth, flake_sample, simulate_lowloss, single_spectrum
from stemml_core.synthetic.nanostructures import NanostructureTruth, nanostructure_sample

__all__ = [
    "AnomalyTruth",
    "FeatureTruth",
    "FieldTruth",
    "GainLossTruth",
    "JointTruth",
    "LayerStrain",
    "LowLossTruth",
    "NanostructureTruth",
    "StrainTruth",
    "atomic_monolayer",
    "diffraction_anomalies",
    "feature_sample",
    "flake_sample",
    "gain_loss_sample",
    "lowloss_anomalies",
    "nanostructure_sample",
    "polar_bilayer",
    "simulate_4dstem",
    "simulate_field_4dstem",
    "simulate_gain_loss",
    "simulate_lowloss",
    "single_spectrum",
    "strain_and_lowloss",
    "strained_flake",
    "twisted_bilayer",
]
