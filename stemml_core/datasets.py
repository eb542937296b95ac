"""The registry of samples the book and the tests run on (``data/registry.toml``).

A sample is generated deterministically by :mod:`stemml_core.synthetic` (and
knows its ground truth), shipped as a small file in ``data/`` (checked against
its SHA-256), or fetched with pooch from a public address (checked against its
SHA-256, and only when the caller allows downloading: the book and the tests
never do).

The registry folder is ``data/`` beside the package in a source checkout; set
the environment variable ``STEMML_DATA_DIR`` to use another one.

Examples
--------
>>> from stemml_core import datasets
>>> "lowloss_flake" in datasets.list_samples()
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hyperspy.signal import BaseSignal

from . import io

__all__ = ["Sample", "data_dir", "list_samples", "load", "save_sample"]

_KINDS = ("generated", "shipped", "remote")


@dataclass(frozen=True)
class Sample:
    """A loaded sample.

    Attributes
    ----------
    name : str
        Registry name.
    signal : hyperspy.signal.BaseSignal
        The data, calibrated.
    truth : object or None
        Ground truth: a frozen dataclass of :mod:`stemml_core.synthetic` for
        generated samples, the dict of the registry's ``truth`` file for a
        shipped one that has it; None where none is known.
    entry : dict
        The registry entry (description, provenance, how it was obtained).
    """

    name: str
    signal: BaseSignal
    truth: Any
    entry: dict


def data_dir() -> Path:
    """The registry folder: ``$STEMML_DATA_DIR`` or ``data/`` of the source checkout."""
    path = Path(os.environ.get("STEMML_DATA_DIR", Path(__file__).resolve().parents[1] / "data"))
    if not (path / "registry.toml").is_file():
        raise FileNotFoundError(
            f"no registry.toml in '{path}'; set STEMML_DATA_DIR to the stemml data folder"
        )
    return path


def _registry() -> dict[str, dict]:
    with open(data_dir() / "registry.toml", "rb") as handle:
        registry = tomllib.load(handle)
    for name, entry in registry.items():
        if entry.get("kind") not in _KINDS:
            raise ValueError(f"registry entry {name!r} has kind {entry.get('kind')!r}; expected one of {_KINDS}")
    return registry


def list_samples() -> dict[str, str]:
    """Names of the registered samples with their one-line descriptions."""
    return {name: entry["description"] for name, entry in _registry().items()}


def _entry(name: str) -> dict:
    registry = _registry()
    if name not in registry:
        raise KeyError(f"no sample {name!r} in the registry; known samples: {', '.join(sorted(registry))}")
    return registry[name]


def _checked_file(name: str, path: Path, sha256: str) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise ValueError(
            f"sample {name!r}: '{path}' has SHA-256 {digest}, the registry expects {sha256}; "
            "the file is damaged or was replaced"
        )
    return path


def _generate(entry: dict, random_state: int | None):
    module_name, function_name = entry["generator"].split(":")
    generator = getattr(importlib.import_module(module_name), function_name)
    arguments = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.get("arguments", {}).items()}
    if random_state is not None:
        arguments["random_state"] = random_state
    return generator(**arguments)


def load(name: str, *, random_state: int | None = None, allow_download: bool = False, cache_dir=None) -> Sample:
    """Load a registered sample.

    Parameters
    ----------
    name : str
        Registry name (see :func:`list_samples`).
    random_state : int, optional
        For a generated sample: the seed of its noise and random features,
        replacing the registry's (which makes the book's default sample).
    allow_download : bool
        Allow fetching a ``remote`` sample from the internet. Off by default,
        so that nothing is downloaded behind the user's back.
    cache_dir : str or os.PathLike, optional
        Where downloaded samples are kept (pooch's default cache otherwise).

    Returns
    -------
    Sample

    Raises
    ------
    KeyError
        Unknown name.
    ValueError
        A shipped or downloaded file whose SHA-256 differs from the registry's.
    PermissionError
        A remote sample when ``allow_download`` is False.
    """
    entry = _entry(name)
    kind = entry["kind"]
    if kind == "generated":
        signal, truth = _generate(entry, random_state)
        signal.metadata.General.title = name
        return Sample(name, signal, truth, entry)
    if kind == "shipped":
        path = _checked_file(name, data_dir() / entry["file"], entry["sha256"])
    else:
        if not allow_download:
            raise PermissionError(
                f"sample {name!r} is fetched from {entry['url']}; pass allow_download=True to download it"
            )
        import pooch

        path = Path(pooch.retrieve(entry["url"], known_hash=f"sha256:{entry['sha256']}",
                                   path=cache_dir, progressbar=False))
    loader = io.load_4dstem if entry.get("type") == "4dstem" else io.load_lowloss
    truth = None
    if "truth" in entry:  # a shipped file's known truth, as a JSON object beside it
        truth = json.loads((data_dir() / entry["truth"]).read_text(encoding="utf-8"))
    return Sample(name, loader(path), truth, entry)


def _truth_arrays(truth) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays, scalars = {}, {}
    for field in dataclasses.fields(truth):
        value = getattr(truth, field.name)
        if isinstance(value, np.ndarray):
            arrays[field.name] = value
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            for key, sub in value.items():  # e.g. peaks: name -> {energy, width, amplitude}
                for part, array in sub.items():
                    arrays[f"{field.name}.{key}.{part}"] = np.asarray(array)
        else:
            scalars[field.name] = value
    return arrays, scalars


def save_sample(name: str, directory) -> Path:
    """Write a generated sample and its ground truth to files.

    ``<name>.hspy`` holds the signal; ``<name>_truth.npz`` the truth's arrays
    and ``<name>_truth.json`` its scalars, so that the sample can be given to
    ``stemml run`` or to another program as a file.

    Parameters
    ----------
    name : str
        Registry name of a ``generated`` sample.
    directory : str or os.PathLike
        Destination folder (created if missing). Existing files of the same
        name are replaced, since the sample is deterministic.

    Returns
    -------
    pathlib.Path
        Path of the ``.hspy`` file.
    """
    entry = _entry(name)
    if entry["kind"] != "generated":
        raise ValueError(f"sample {name!r} is {entry['kind']}, not generated; its file is already at hand")
    sample = load(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.hspy"
    sample.signal.save(path, overwrite=True)
    arrays, scalars = _truth_arrays(sample.truth)
    np.savez_compressed(directory / f"{name}_truth.npz", **arrays)
    (directory / f"{name}_truth.json").write_text(
        json.dumps({"sample": name, "registry_entry": entry, "truth": scalars}, indent=2, default=str) + "\n",
        encoding="utf-8",
    )
    return path
