"""Load calibrated data and check it before any analysis sees it.

Every analysis in stemml starts from one of the two loaders here:

- :func:`load_lowloss` returns an EELS spectrum (image) whose energy axis is in eV;
- :func:`load_4dstem` returns a 4D-STEM dataset with scan axes in nm and
  reciprocal (detector) axes in 1/nm.

Both accept a path to anything HyperSpy/RosettaSciIO reads (.hspy, .dm3, .dm4,
.emd, .msa, ...) or an already loaded HyperSpy signal. They only read, check
and convert calibrations to the units above; they never modify the input (a
signal passed in is copied before a unit conversion) and they keep
``original_metadata``. Every error names the file and the axis at fault and
what was expected.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hyperspy.api as hs
from hyperspy.signal import BaseSignal

__all__ = ["InputError", "load_lowloss", "load_4dstem", "load_signal"]

# Units accepted for each kind of axis, with the factor that converts them to the
# unit the analyses use (eV, nm, 1/nm).
_ENERGY_UNITS = {"eV": 1.0, "meV": 1e-3, "keV": 1e3}
_LENGTH_UNITS = {"nm": 1.0, "Å": 0.1, "A": 0.1, "pm": 1e-3, "µm": 1e3, "um": 1e3}
_RECIPROCAL_UNITS = {"1/nm": 1.0, "nm^-1": 1.0, "1/Å": 10.0, "1/A": 10.0, "Å^-1": 10.0, "1/pm": 1e3}


class InputError(ValueError):
    """Input data that an analysis cannot use, with the reason and the fix."""


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    title = getattr(getattr(source.metadata, "General", None), "title", "") or "untitled"
    return f"signal '{title}'"


def load_signal(source, *, lazy: bool = False) -> BaseSignal:
    """Read one signal from a file HyperSpy can read, or pass a signal through.

    Parameters
    ----------
    source : str, os.PathLike or hyperspy.signal.BaseSignal
        File path (any format RosettaSciIO reads) or a loaded signal.
    lazy : bool
        Load the data as a dask-backed lazy signal (for data larger than memory).

    Returns
    -------
    hyperspy.signal.BaseSignal
        The signal; a signal given as ``source`` is returned as it is.

    Raises
    ------
    InputError
        The file does not exist, cannot be read, or holds several signals.
    """
    if isinstance(source, BaseSignal):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(
            f"expected a file path or a HyperSpy signal, got {type(source).__name__}"
        )
    path = Path(source)
    if not (path.is_file() or (path.is_dir() and path.suffix == ".zspy")):  # zspy: a zarr folder
        raise InputError(f"'{path}': no such file")
    hs_logger = logging.getLogger("hyperspy")
    level = hs_logger.level
    hs_logger.setLevel(logging.CRITICAL)  # the reader's own log lines would repeat our error
    try:
        loaded = hs.load(path, lazy=lazy)
    except Exception as exc:  # every reader raises its own type: report them as one
        raise InputError(
            f"'{path}': HyperSpy/RosettaSciIO cannot read this file "
            f"({type(exc).__name__}: {exc}); expected a readable .hspy, .zspy, .dm3, .dm4, .emd, .msa, ... file"
        ) from exc
    finally:
        hs_logger.setLevel(level)
    if isinstance(loaded, list):
        raise InputError(
            f"'{path}' holds {len(loaded)} signals; expected one. Load it with "
            "hyperspy.api.load and pass the signal you want"
        )
    return loaded


def _check_axis(axis, where: str, kind: str, units: dict[str, float], expected: str):
    """Check one axis; return the factor to its canonical unit."""
    name = axis.name if isinstance(axis.name, str) else "<undefined>"
    label = f"{where}: {kind} axis '{name}'"
    if not getattr(axis, "is_uniform", True):
        raise InputError(f"{label} is non-uniform; expected a uniform axis (constant scale)")
    unit = axis.units if isinstance(axis.units, str) else ""
    unit = "".join(unit.split())  # "1 / nm", as some writers store it, is "1/nm"
    if unit not in units:
        raise InputError(
            f"{label} has units '{unit or '<undefined>'}'; expected {expected}. "
            f"Set them with s.axes_manager['{name}'].units = '{next(iter(units))}' "
            "and the matching scale and offset"
        )
    if not axis.scale > 0:
        raise InputError(
            f"{label} has scale {axis.scale} {unit}; expected a positive scale (increasing axis)"
        )
    return units[unit]


def _with_signal_axes(signal: BaseSignal, n_signal: int) -> BaseSignal:
    """Give a signal read without navigation axes (some EMD writers do this) its
    ``n_signal`` fastest-varying axes as signal axes and the rest as navigation."""
    am = signal.axes_manager
    if am.navigation_dimension == 0 and am.signal_dimension > n_signal:
        return signal.transpose(signal_axes=n_signal)
    return signal


def _converted(signal: BaseSignal, axes_factors, original: BaseSignal) -> BaseSignal:
    """Rescale the axes whose factor is not 1, on a copy if the signal came from the caller."""
    if all(factor == 1.0 for _, factor, _ in axes_factors):
        return signal
    if signal is original:
        signal = signal.deepcopy()
    for index, factor, unit in axes_factors:
        if factor != 1.0:
            axis = signal.axes_manager[index]
            axis.scale *= factor
            axis.offset *= factor
            axis.units = unit
    return signal


def load_lowloss(source, *, lazy: bool = False, calibrated_scan: bool = False) -> BaseSignal:
    """Load a low-loss EELS spectrum or spectrum image with a calibrated energy axis.

    Parameters
    ----------
    source : str, os.PathLike or hyperspy.signal.BaseSignal
        File (any format RosettaSciIO reads) or loaded signal with one signal
        axis (energy loss) and zero, one or two navigation axes.
    lazy : bool
        Load as a dask-backed lazy signal.
    calibrated_scan : bool
        Require navigation axes in length units (for maps whose axes must be
        in nm); False accepts uncalibrated (pixel) navigation axes.

    Returns
    -------
    exspy.signals.EELSSpectrum
        Signal of signal type ``"EELS"`` whose energy axis is in eV (meV and keV
        are converted), navigation axes in nm when they carry length units.

    Raises
    ------
    InputError
        Unreadable file; not one signal axis (e.g. a 4D-STEM dataset); more
        than two navigation axes; energy axis not in eV/meV/keV, non-uniform or
        decreasing; an energy range that does not contain 0 eV (no zero-loss
        peak); with ``calibrated_scan``, a navigation axis without length units.
    """
    signal = _with_signal_axes(load_signal(source, lazy=lazy), 1)
    where = _describe(source)
    am = signal.axes_manager
    if am.signal_dimension != 1:
        raise InputError(
            f"{where} has {am.signal_dimension} signal dimensions "
            f"(shape {am.signal_shape[::-1]}); expected a low-loss EELS spectrum with one "
            "energy axis. A 4D-STEM dataset belongs to the diffraction analyses"
        )
    if am.navigation_dimension > 2:
        raise InputError(
            f"{where} has {am.navigation_dimension} navigation axes; expected at most 2 "
            "(a line scan or a spectrum image)"
        )
    energy = am.signal_axes[0]
    factor = _check_axis(energy, where, "energy", _ENERGY_UNITS, "'eV' (or 'meV', 'keV')")
    low, high = energy.low_value * factor, energy.high_value * factor
    if not low < 0.0 < high:
        raise InputError(
            f"{where}: energy axis '{energy.name}' spans {low:.3g} to {high:.3g} eV; expected "
            "a low-loss range that contains the zero-loss peak at 0 eV"
        )
    factors = [(energy.index_in_axes_manager, factor, "eV")]
    for axis in am.navigation_axes:
        unit = axis.units if isinstance(axis.units, str) else ""
        if calibrated_scan:
            _check_axis(axis, where, "scan", _LENGTH_UNITS, "'nm' (or 'Å', 'pm', 'µm')")
        if unit in _LENGTH_UNITS:
            factors.append((axis.index_in_axes_manager, _LENGTH_UNITS[unit], "nm"))
    result = _converted(signal, factors, source if isinstance(source, BaseSignal) else None)
    if result.metadata.get_item("Signal.signal_type") != "EELS":
        if result is source:
            result = result.deepcopy()
        result.set_signal_type("EELS")
    return result


def load_4dstem(source, *, lazy: bool = False) -> BaseSignal:
    """Load a 4D-STEM dataset with calibrated scan and reciprocal axes.

    Parameters
    ----------
    source : str, os.PathLike or hyperspy.signal.BaseSignal
        File (any format RosettaSciIO reads) or loaded signal with two
        navigation (scan) axes and two signal (detector) axes.
    lazy : bool
        Load as a dask-backed lazy signal (data larger than memory).

    Returns
    -------
    hyperspy.signals.Signal2D
        Scan axes in nm (Å, pm and µm are converted), detector axes in 1/nm
        (1/Å and 1/pm are converted).

    Raises
    ------
    InputError
        Unreadable file; not two signal axes (e.g. an EELS spectrum image); not
        two scan axes, or a scan of one position; uncalibrated scan or detector
        axes.
    """
    signal = _with_signal_axes(load_signal(source, lazy=lazy), 2)
    where = _describe(source)
    am = signal.axes_manager
    if am.signal_dimension != 2 or am.navigation_dimension != 2:
        raise InputError(
            f"{where} has {am.navigation_dimension} navigation and {am.signal_dimension} signal "
            "axes; expected a 4D-STEM dataset with 2 scan (navigation) axes and 2 detector "
            "(signal) axes. A low-loss spectrum image belongs to the EELS analyses"
        )
    if am.navigation_size < 2:
        raise InputError(f"{where} is a scan of one position; expected a scan of at least 2")
    factors = []
    for axis in am.navigation_axes:
        factor = _check_axis(axis, where, "scan", _LENGTH_UNITS, "'nm' (or 'Å', 'pm', 'µm')")
        factors.append((axis.index_in_axes_manager, factor, "nm"))
    for axis in am.signal_axes:
        factor = _check_axis(
            axis, where, "detector", _RECIPROCAL_UNITS, "'1/nm' (or '1/Å', '1/pm')"
        )
        factors.append((axis.index_in_axes_manager, factor, "1/nm"))
    return _converted(signal, factors, source if isinstance(source, BaseSignal) else None)
