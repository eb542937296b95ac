"""Fixtures shared by the EELS tests."""

import pytest


@pytest.fixture(scope="session")
def flake_and_low_loss_model():
    """A noisy flake recorded to 100 eV and a ZLP ensemble fitted on its -1 to 9 eV window (about 10 s)."""
    from stemml_core.eels.zlp import ZLPEnsemble
    from stemml_core.synthetic.lowloss import flake_sample

    signal, truth = flake_sample((8, 10), random_state=0, dose=1e6)
    model = ZLPEnsemble(n_replicas=20, n_clusters=5, random_state=0, progress=False).fit(signal.isig[-1.0:9.0])
    return signal, truth, model
