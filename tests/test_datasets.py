"""Sample registry: generated samples with truth, shipped and remote files checked by SHA-256."""

import dataclasses
import functools
import hashlib
import http.server
import json
import threading

import hyperspy.api as hs
import numpy as np
import pytest

from stemml_core import datasets


@dataclasses.dataclass(frozen=True)
class _Truth:
    band_gap: np.ndarray
    peaks: dict
    dose: float


def tiny_generator(nav_shape=(2, 3), random_state=None):
    """A stand-in generator for registry mechanics (the real ones have their own tests)."""
    rng = np.random.default_rng(random_state)
    s = hs.signals.Signal1D(rng.poisson(50, size=(*nav_shape, 40)).astype("float32"))
    energy = s.axes_manager.signal_axes[0]
    energy.name, energy.units, energy.scale, energy.offset = "Energy loss", "eV", 0.05, -0.5
    truth = _Truth(np.full(nav_shape, 1.5), {"A": {"energy": np.full(nav_shape, 1.88)}}, 1e3)
    return s, truth


def _spectrum_file(path):
    s, _ = tiny_generator(nav_shape=())
    s.save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def registry(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    digest = _spectrum_file(folder / "spectrum.msa")
    (folder / "registry.toml").write_text(f"""
[tiny]
kind = "generated"
description = "tiny test sample"
provenance = "tests"
generator = "tests.test_datasets:tiny_generator"
arguments = {{ nav_shape = [2, 3], random_state = 7 }}

[shipped_spectrum]
kind = "shipped"
description = "a shipped spectrum"
provenance = "tests"
file = "spectrum.msa"
sha256 = "{digest}"

[broken]
kind = "shipped"
description = "a shipped file whose hash is wrong"
provenance = "tests"
file = "spectrum.msa"
sha256 = "{'0' * 64}"
""")
    monkeypatch.setenv("STEMML_DATA_DIR", str(folder))
    return folder


def test_project_registry_lists_the_book_samples():
    names = datasets.list_samples()
    assert {"lowloss_flake", "strained_flake", "lowloss_spectrum", "twisted_bilayer"} <= set(names)
    assert all(names.values())


def test_project_shipped_spectrum_is_checked_and_knows_its_truth():
    sample = datasets.load("lowloss_spectrum")
    assert sample.signal.axes_manager.navigation_dimension == 0
    assert sample.signal.axes_manager.signal_axes[0].scale == pytest.approx(0.025)
    assert sample.truth["band_gap_eV"] == 1.5 and sample.truth["t_over_lambda"] == pytest.approx(0.4955, abs=1e-4)


def test_generated_is_deterministic_and_has_truth(registry):
    a, b = datasets.load("tiny"), datasets.load("tiny")
    np.testing.assert_array_equal(a.signal.data, b.signal.data)
    assert a.truth.dose == 1e3 and a.signal.metadata.General.title == "tiny"
    c = datasets.load("tiny", random_state=8)
    assert not np.array_equal(a.signal.data, c.signal.data)


def test_shipped_checked(registry):
    sample = datasets.load("shipped_spectrum")
    assert sample.signal.axes_manager.signal_axes[0].units == "eV"
    assert sample.truth is None
    with pytest.raises(ValueError, match="has SHA-256 .* the registry expects 0000"):
        datasets.load("broken")


def test_unknown_name(registry):
    with pytest.raises(KeyError, match="no sample 'nope' in the registry; known samples: broken, shipped_spectrum, tiny"):
        datasets.load("nope")


def test_save_sample_writes_signal_and_truth(registry, tmp_path):
    path = datasets.save_sample("tiny", tmp_path / "out")
    assert hs.load(path).data.shape == (2, 3, 40)
    arrays = np.load(tmp_path / "out" / "tiny_truth.npz")
    np.testing.assert_array_equal(arrays["band_gap"], np.full((2, 3), 1.5))
    np.testing.assert_array_equal(arrays["peaks.A.energy"], np.full((2, 3), 1.88))
    meta = json.loads((tmp_path / "out" / "tiny_truth.json").read_text())
    assert meta["truth"] == {"dose": 1000.0}
    with pytest.raises(ValueError, match="is shipped, not generated"):
        datasets.save_sample("shipped_spectrum", tmp_path / "out")


def test_missing_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("STEMML_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no registry.toml in"):
        datasets.list_samples()


@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/served (no outside network)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_only_when_allowed(registry, loopback_server, tmp_path):
    served, url = loopback_server
    digest = _spectrum_file(served / "remote.msa")
    with open(registry / "registry.toml", "a") as handle:
        handle.write(f"""
[remote_spectrum]
kind = "remote"
description = "a spectrum on a server"
provenance = "tests"
url = "{url}/remote.msa"
sha256 = "{digest}"
""")
    with pytest.raises(PermissionError, match="pass allow_download=True"):
        datasets.load("remote_spectrum")
    sample = datasets.load("remote_spectrum", allow_download=True, cache_dir=tmp_path / "cache")
    assert sample.signal.axes_manager.signal_axes[0].size == 40
