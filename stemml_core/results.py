"""Write an analysis' results with provenance: the notebook contract's writer.

An analysis writes into one ``output_dir``:

- one HyperSpy ``.hspy`` file per mapped quantity, named by the quantity
  (``band_gap.hspy``), keeping the navigation calibration of the input;
- ``summary.json``: the analysis name, scalar results with their units, the
  parameters, the package versions, and the input's provenance (its path and
  SHA-256, or the name of the built-in sample and the SHA-256 of its data).

Every file is written atomically (a temporary file in the same folder, then
:func:`os.replace`), so a crash never leaves half a result. A folder holding
results of another input, or of the same input with other parameters, is never
written into: :func:`check_output_dir` says so before the analysis starts and
:func:`write` checks again. Rerunning the same analysis on the same input with
the same parameters replaces its results (they are the same results). An input
file is never overwritten.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from hyperspy.signal import BaseSignal

__all__ = ["OutputDirError", "atomic_write", "check_output_dir", "provenance", "write", "read_summary", "versions"]

SUMMARY = "summary.json"
# Parameters that say where things are, not what was computed: they may differ between
# two runs whose results are the same.
_LOCATION_PARAMETERS = ("input_path", "output_dir")
_PACKAGES = (
    "stemml", "numpy", "scipy", "torch", "hyperspy", "exspy", "rosettasciio",
    "scikit-learn", "dask", "matplotlib",
)


class OutputDirError(ValueError):
    """The output folder holds results that writing there would mix or overwrite."""


def versions() -> dict[str, str]:
    """Versions of Python and of the packages a result depends on."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(source, *, sample: str | None = None) -> dict[str, Any]:
    """Describe where the input came from.

    Parameters
    ----------
    source : str, os.PathLike or hyperspy.signal.BaseSignal
        The input file, or the in-memory signal of a built-in sample.
    sample : str, optional
        Registry name of the built-in sample (see :mod:`stemml_core.datasets`)
        when ``source`` is a signal.

    Returns
    -------
    dict
        ``{"path", "sha256"}`` for a file; ``{"sample", "sha256"}`` for a signal,
        the hash taken over its data array (C order) and shape.
    """
    if isinstance(source, BaseSignal):
        data = np.ascontiguousarray(np.asarray(source.data))
        digest = hashlib.sha256(repr((data.dtype.str, data.shape)).encode())
        digest.update(data.tobytes())
        return {"sample": sample or source.metadata.General.title, "sha256": digest.hexdigest()}
    path = Path(source).resolve()
    return {"path": str(path), "sha256": _sha256_file(path)}


def _comparable(parameters: Mapping[str, Any]) -> dict[str, Any]:
    clean = {k: v for k, v in parameters.items() if k not in _LOCATION_PARAMETERS}
    return json.loads(json.dumps(clean, default=_to_json))


def read_summary(output_dir) -> dict[str, Any] | None:
    """The ``summary.json`` of ``output_dir``, or None when there is none."""
    path = Path(output_dir) / SUMMARY
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def check_output_dir(output_dir, input_provenance: Mapping[str, Any], parameters: Mapping[str, Any]) -> Path:
    """Make sure results for this input and these parameters may go into ``output_dir``.

    Parameters
    ----------
    output_dir : str or os.PathLike
        Folder for the results; it need not exist (it is not created here).
    input_provenance : dict
        What :func:`provenance` returned for the input.
    parameters : dict
        The analysis parameters (``input_path`` and ``output_dir`` are not
        compared).

    Returns
    -------
    pathlib.Path
        ``output_dir`` as a path.

    Raises
    ------
    OutputDirError
        ``output_dir`` is a file, is the input itself, is non-empty without a
        ``summary.json``, or its ``summary.json`` belongs to another input or to
        other parameters.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir '{out}' is a file; expected a folder (new or of earlier results)")
    if "path" in input_provenance and Path(input_provenance["path"]).resolve().parent == out.resolve():
        raise OutputDirError(
            f"output_dir '{out}' is the folder of the input file; choose a separate folder so "
            "that no result can replace the input"
        )
    if not out.is_dir() or not any(out.iterdir()):
        return out
    summary = read_summary(out)
    if summary is None:
        raise OutputDirError(
            f"output_dir '{out}' is not empty and holds no {SUMMARY}; choose a new folder or empty this one"
        )
    fix = "choose a new output_dir, or remove the old results if you no longer need them"
    if summary.get("input", {}).get("sha256") != input_provenance["sha256"]:
        old = summary.get("input", {})
        raise OutputDirError(
            f"output_dir '{out}' holds results of another input "
            f"({old.get('path') or old.get('sample')}, sha256 {str(old.get('sha256'))[:12]}...); {fix}"
        )
    if _comparable(summary.get("parameters", {})) != _comparable(parameters):
        raise OutputDirError(f"output_dir '{out}' holds results of the same input with other parameters; {fix}")
    return out


def _to_json(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def atomic_write(path, write_to) -> None:
    """Call ``write_to(temporary_path)`` and move the result onto ``path``.

    The temporary file lies in ``path``'s folder (so the move is atomic) and is
    removed if ``write_to`` fails; ``path`` is then left as it was.
    """
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(handle)
    try:
        write_to(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write(
    output_dir,
    *,
    analysis: str,
    input_provenance: Mapping[str, Any],
    parameters: Mapping[str, Any],
    maps: Mapping[str, BaseSignal] | None = None,
    scalars: Mapping[str, tuple[Any, str]] | None = None,
    notes: Mapping[str, Any] | None = None,
) -> Path:
    """Write maps and ``summary.json`` into ``output_dir``, atomically.

    Parameters
    ----------
    output_dir : str or os.PathLike
        Folder for the results; created if missing (see :func:`check_output_dir`).
    analysis : str
        Name of the analysis (the notebook's name).
    input_provenance : dict
        What :func:`provenance` returned for the input.
    parameters : dict
        Every parameter of the run.
    maps : dict of str to hyperspy.signal.BaseSignal, optional
        Mapped quantities; each is saved as ``<name>.hspy``. Names are file
        stems: letters, digits and ``_`` only.
    scalars : dict of str to (value, unit), optional
        Scalar results, each with its unit (``""`` when dimensionless).
    notes : dict, optional
        Further JSON-serialisable facts (counts of NaN reasons, fit flags).

    Returns
    -------
    pathlib.Path
        Path of the written ``summary.json``.

    Raises
    ------
    OutputDirError
        See :func:`check_output_dir`.
    ValueError
        A map name that is not a plain file stem, a map that is not a HyperSpy
        signal, or a scalar without a unit.
    """
    out = check_output_dir(output_dir, input_provenance, parameters)
    maps = dict(maps or {})
    for name, signal in maps.items():
        if not name.replace("_", "").isalnum():
            raise ValueError(f"map name {name!r} is not a plain file stem; use letters, digits and '_'")
        if not isinstance(signal, BaseSignal):
            raise ValueError(f"map {name!r} is a {type(signal).__name__}; expected a HyperSpy signal")
    scalar_entries = {}
    for name, entry in (scalars or {}).items():
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str)):
            raise ValueError(f"scalar {name!r} = {entry!r}; expected a (value, unit) tuple, unit '' if dimensionless")
        scalar_entries[name] = {"value": entry[0], "unit": entry[1]}

    out.mkdir(parents=True, exist_ok=True)
    map_entries = {}
    for name, signal in maps.items():
        target = out / f"{name}.hspy"
        atomic_write(target, lambda tmp, s=signal: s.save(tmp, overwrite=True))
        map_entries[name] = {
            "file": target.name,
            "sha256": _sha256_file(target),
            "quantity": signal.metadata.get_item("Signal.quantity", ""),
            "navigation_units": [str(ax.units) for ax in signal.axes_manager.navigation_axes],
        }
    summary = {
        "analysis": analysis,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": dict(input_provenance),
        "parameters": dict(parameters),
        "scalars": scalar_entries,
        "maps": map_entries,
        "notes": dict(notes or {}),
        "versions": versions(),
    }
    text = json.dumps(summary, indent=2, default=_to_json, allow_nan=True)
    target = out / SUMMARY
    atomic_write(target, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    return target
