"""The `stemml` command: list, run on a user's file, one-line errors that write nothing."""

import subprocess
import sys
from pathlib import Path

import hyperspy.api as hs
import pytest

from stemml_core import cli, datasets

ROOT = Path(__file__).resolve().parents[1]


def _stemml(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "stemml_core.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A user's low-loss spectrum image and 4D-STEM scan as HyperSpy files."""
    folder = tmp_path_factory.mktemp("user")
    eels = datasets.save_sample("lowloss_flake", folder)
    dp = datasets.load("strained_flake").signal.inav[:6, :5]
    dp.save(folder / "scan.hspy")
    return {"eels": eels, "dp": folder / "scan.hspy", "folder": folder}


def test_list_shows_parameters(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "getting_started" in out
    assert "    input_path = None" in out
    assert "    output_dir = 'results/getting_started'" in out or 'output_dir = "results/getting_started"' in out


def test_run_on_a_users_file(user_files, tmp_path):
    out = tmp_path / "out"
    result = _stemml("run", "getting_started", "--input", str(user_files["eels"]), "--output-dir", str(out),
                     "-p", "diffraction_path", str(user_files["dp"]), "-p", "bright_field_radius", "0.8", "--quiet")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "getting_started.ipynb", "inelastic_counts.hspy", "summary.json", "virtual_bright_field.hspy"]
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["path"] == str(user_files["eels"].resolve())
    assert summary["parameters"]["bright_field_radius"] == 0.8
    bf = hs.load(out / "virtual_bright_field.hspy")
    assert bf.axes_manager.navigation_shape == (6, 5) or bf.axes_manager.signal_shape == (6, 5)
    # the input is untouched
    assert hs.load(user_files["eels"]).data.shape == datasets.load("lowloss_flake").signal.data.shape


@pytest.mark.parametrize("case, args, message", [
    ("missing file", ["--input", "NOFILE.dm4"], "input file 'NOFILE.dm4' does not exist"),
    ("unknown parameter", ["-p", "n_replikas", "10"], "getting_started has no parameter 'n_replikas'"),
    ("unknown analysis", None, "unknown analysis 'nope'"),
])
def test_errors_before_running(case, args, message, tmp_path):
    out = tmp_path / "out"
    name = "nope" if args is None else "getting_started"
    result = _stemml("run", name, "--output-dir", str(out), *(args or []))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line
    assert message in result.stderr
    assert not out.exists()


def test_4d_file_given_as_eels_fails_in_one_line_and_writes_nothing(user_files, tmp_path):
    out = tmp_path / "out"
    result = _stemml("run", "getting_started", "--input", str(user_files["dp"]), "--output-dir", str(out), "--quiet")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("stemml:")]
    assert len(lines) == 1 and "InputError" in lines[0] and "expected a low-loss EELS spectrum" in lines[0]
    assert "scan.hspy" in lines[0]
    assert not out.exists()


def test_wrong_energy_units_named(user_files, tmp_path):
    s = hs.load(user_files["eels"])
    s.axes_manager.signal_axes[0].units = "nm"
    bad = tmp_path / "bad_units.hspy"
    s.save(bad)
    result = _stemml("run", "getting_started", "--input", str(bad), "--output-dir", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 1
    assert "energy axis 'Energy loss' has units 'nm'; expected 'eV'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_plain_papermill_works(user_files, tmp_path):
    executed = tmp_path / "executed.ipynb"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("papermill")), str(ROOT / "notebooks" / "getting_started.ipynb"),
         str(executed), "-p", "input_path", str(user_files["eels"]), "-p", "output_dir", str(tmp_path / "res"),
         "-p", "diffraction_path", str(user_files["dp"]), "--cwd", str(tmp_path)],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "res" / "summary.json").is_file()
