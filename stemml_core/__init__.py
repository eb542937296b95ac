"""stemml_core: machine-learning analysis of STEM-EELS and 4D-STEM data of van der Waals materials.

The package is grouped by physical concept:

- :mod:`stemml_core.io` reads and validates calibrated data (anything HyperSpy reads);
- :mod:`stemml_core.synthetic` makes samples with known ground truth;
- :mod:`stemml_core.eels` and :mod:`stemml_core.diffraction` hold the analyses;
- :mod:`stemml_core.results` writes results with provenance;
- :mod:`stemml_core.datasets` is the registry of samples the book runs on.
"""

import warnings

__version__ = "0.1.0"

# exspy 0.3.2 imports lazy signal classes from HyperSpy 2.5's private modules, which
# HyperSpy answers with a VisibleDeprecationWarning on every first import. The warning
# is about exspy's code, not about anything a stemml user does, so hide exactly that one.
warnings.filterwarnings(
    "ignore",
    message=r"Importing `Lazy\w+` from `hyperspy\._signals\.",
    module=r"hyperspy\.misc\._utils",
)
