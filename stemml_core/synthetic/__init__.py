"""Forward models with ground truth.

Every generator returns ``(signal, truth)`` and never imports the analyses of
:mod:`stemml_core.eels` or :mod:`stemml_core.diffraction`: the truth is made
independently of the estimators it tests.
"""
