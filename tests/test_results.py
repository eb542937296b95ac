"""Results writer: atomic files, provenance, no mixing of results."""

import json

import hyperspy.api as hs
import numpy as np
import pytest

from stemml_core import results


def _map(title="band gap"):
    s = hs.signals.BaseSignal(np.arange(12, dtype=float).reshape(3, 4)).T  # a map: navigation axes only
    for axis, name in zip(s.axes_manager.navigation_axes, ("x", "y")):
        axis.name, axis.units, axis.scale, axis.offset = name, "nm", 2.5, 10.0
    s.metadata.General.title = title
    s.metadata.Signal.quantity = "Band gap (eV)"
    return s


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "input" / "data.hspy"
    path.parent.mkdir()
    path.write_bytes(b"input bytes")
    return results.provenance(path)


def test_write_and_summary(tmp_path, source):
    out = tmp_path / "out"
    params = {"input_path": "x", "output_dir": str(out), "seed": 0, "n_replicas": np.int64(10)}
    summary_path = results.write(out, analysis="demo", input_provenance=source, parameters=params,
                                 maps={"band_gap": _map()}, scalars={"de1": (np.float32(0.5), "eV")},
                                 notes={"nan_reasons": {"no onset": 3}})
    summary = json.loads(summary_path.read_text())
    assert summary["analysis"] == "demo"
    assert summary["input"] == source
    assert summary["scalars"]["de1"] == {"value": 0.5, "unit": "eV"}
    assert summary["parameters"]["n_replicas"] == 10
    assert {"numpy", "hyperspy", "torch", "stemml", "python"} <= set(summary["versions"])
    assert summary["maps"]["band_gap"]["quantity"] == "Band gap (eV)"
    assert sorted(p.name for p in out.iterdir()) == ["band_gap.hspy", "summary.json"]  # no temp files left
    loaded = hs.load(out / "band_gap.hspy")
    axes = loaded.axes_manager.navigation_axes or loaded.axes_manager.signal_axes
    assert [(a.units, a.scale, a.offset) for a in axes] == [("nm", 2.5, 10.0)] * 2
    np.testing.assert_array_equal(loaded.data, np.arange(12).reshape(3, 4))


def test_provenance_of_file_is_sha256(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert results.provenance(path)["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_provenance_of_signal_depends_on_data():
    a, b = _map(), _map()
    assert results.provenance(a, sample="s") == results.provenance(b, sample="s")
    b.data[0, 0] = -1
    assert results.provenance(a)["sha256"] != results.provenance(b)["sha256"]


def test_rerun_same_input_and_parameters_replaces(tmp_path, source):
    out = tmp_path / "out"
    kwargs = dict(analysis="demo", input_provenance=source, parameters={"seed": 0})
    results.write(out, maps={"band_gap": _map()}, **kwargs)
    results.write(out, maps={"band_gap": _map()}, **{**kwargs, "parameters": {"seed": 0, "output_dir": "elsewhere"}})
    assert (out / "band_gap.hspy").is_file()


def test_other_input_refused(tmp_path, source):
    out = tmp_path / "out"
    results.write(out, analysis="demo", input_provenance=source, parameters={"seed": 0})
    other = {"path": "/data/other.dm4", "sha256": "0" * 64}
    with pytest.raises(results.OutputDirError, match="holds results of another input"):
        results.check_output_dir(out, other, {"seed": 0})
    with pytest.raises(results.OutputDirError, match="holds results of another input"):
        results.write(out, analysis="demo", input_provenance=other, parameters={"seed": 0})


def test_other_parameters_refused(tmp_path, source):
    out = tmp_path / "out"
    results.write(out, analysis="demo", input_provenance=source, parameters={"seed": 0})
    with pytest.raises(results.OutputDirError, match="same input with other parameters"):
        results.write(out, analysis="demo", input_provenance=source, parameters={"seed": 1})


def test_foreign_folder_refused(tmp_path, source):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    with pytest.raises(results.OutputDirError, match="not empty and holds no summary.json"):
        results.write(out, analysis="demo", input_provenance=source, parameters={})
    assert (out / "thesis.docx").read_text() == "precious"


def test_input_folder_refused(source):
    from pathlib import Path

    with pytest.raises(results.OutputDirError, match="is the folder of the input file"):
        results.check_output_dir(Path(source["path"]).parent, source, {})


def test_output_dir_is_a_file(tmp_path, source):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(results.OutputDirError, match="is a file"):
        results.check_output_dir(target, source, {})


@pytest.mark.parametrize("maps, scalars, match", [
    ({"../escape": None}, None, "not a plain file stem"),
    ({"band_gap": np.zeros(3)}, None, "expected a HyperSpy signal"),
    (None, {"de1": 0.5}, r"expected a \(value, unit\) tuple"),
])
def test_bad_entries(tmp_path, source, maps, scalars, match):
    with pytest.raises(ValueError, match=match):
        results.write(tmp_path / "out", analysis="demo", input_provenance=source, parameters={},
                      maps=maps, scalars=scalars)
    assert not (tmp_path / "out").exists()


def test_result_arrays_are_read_only_views_and_inputs_stay_writeable():
    from dataclasses import dataclass

    from stemml_core._frozen import ReadOnlyArrays

    @dataclass(frozen=True)
    class Result(ReadOnlyArrays):
        values: np.ndarray
        label: str

    given = np.zeros(3)
    result = Result(given, "x")
    with pytest.raises(ValueError, match="read-only"):
        result.values[0] = 1.0
    given[0] = 2.0  # the caller's array is not frozen with it
    assert result.values[0] == 2.0 and given.flags.writeable
