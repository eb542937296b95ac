"""Plots with calibrated, labelled axes, shared by the notebooks.

Computation never plots; these functions only draw what they are given on a
Matplotlib ``Axes`` and return what they drew.
"""

from __future__ import annotations

import numpy as np
from hyperspy.signal import BaseSignal

__all__ = ["axis_label", "plot_map", "plot_spectrum", "plot_pattern"]


def axis_label(axis) -> str:
    """``"name (units)"`` of a HyperSpy axis; ``"<undefined>"`` parts are left out."""
    name = axis.name if isinstance(axis.name, str) else "index"
    units = axis.units if isinstance(axis.units, str) else ""
    return f"{name} ({units})" if units else name


def _extent(axes) -> list[float]:
    """imshow extent (left, right, bottom, top) of two uniform axes (x = columns, y = rows)."""
    x, y = axes
    return [
        x.offset - x.scale / 2, x.offset + (x.size - 0.5) * x.scale,
        y.offset + (y.size - 0.5) * y.scale, y.offset - y.scale / 2,
    ]


def plot_map(signal: BaseSignal, ax, *, label: str | None = None, cmap="viridis", **imshow_kwargs):
    """Draw a 2D map (a signal with two navigation or two signal axes) with a colour bar.

    Parameters
    ----------
    signal : hyperspy.signal.BaseSignal
        Map of shape (rows, cols); its two axes give the extent and labels.
    ax : matplotlib.axes.Axes
        Where to draw.
    label : str, optional
        Colour-bar label; default ``"quantity (units)"`` from the signal's
        ``metadata.Signal.quantity``.
    cmap : str
        Colour map.

    Returns
    -------
    matplotlib.image.AxesImage
    """
    axes = signal.axes_manager.navigation_axes if signal.axes_manager.navigation_dimension == 2 \
        else signal.axes_manager.signal_axes
    if len(axes) != 2:
        raise ValueError(f"plot_map needs a signal with two axes of one kind; got {signal.axes_manager!r}")
    data = np.asarray(signal.data).reshape(axes[1].size, axes[0].size)
    image = ax.imshow(data, extent=_extent(axes), cmap=cmap, interpolation="nearest", **imshow_kwargs)
    ax.set_xlabel(axis_label(axes[0]))
    ax.set_ylabel(axis_label(axes[1]))
    ax.set_title(signal.metadata.General.title)
    bar = ax.figure.colorbar(image, ax=ax)
    bar.set_label(label if label is not None else signal.metadata.get_item("Signal.quantity", ""))
    return image


def plot_spectrum(signal: BaseSignal, ax, *, label: str | None = None, **plot_kwargs):
    """Draw one spectrum (a signal without navigation) against its calibrated axis.

    Returns
    -------
    list of matplotlib.lines.Line2D
    """
    if signal.axes_manager.navigation_dimension != 0 or signal.axes_manager.signal_dimension != 1:
        raise ValueError("plot_spectrum needs one spectrum; select a pixel first, e.g. s.inav[col, row]")
    axis = signal.axes_manager.signal_axes[0]
    lines = ax.plot(axis.axis, np.asarray(signal.data), label=label, **plot_kwargs)
    ax.set_xlabel(axis_label(axis))
    ax.set_ylabel(signal.metadata.get_item("Signal.quantity", "Intensity (counts)"))
    return lines


def plot_pattern(signal: BaseSignal, ax, *, log: bool = True, label: str = "Intensity (counts)", **imshow_kwargs):
    """Draw one diffraction pattern with its reciprocal-space calibration, on a log scale by default."""
    from matplotlib.colors import LogNorm

    if signal.axes_manager.signal_dimension != 2 or signal.axes_manager.navigation_dimension != 0:
        raise ValueError("plot_pattern needs one diffraction pattern (no navigation axes)")
    data = np.asarray(signal.data, dtype=float)
    norm = LogNorm(vmin=max(np.percentile(data[data > 0], 1), 1e-3), vmax=data.max()) if log and (data > 0).any() else None
    axes = signal.axes_manager.signal_axes
    image = ax.imshow(data, extent=_extent(axes), norm=norm, cmap="magma", interpolation="nearest", **imshow_kwargs)
    ax.set_xlabel(axis_label(axes[0]))
    ax.set_ylabel(axis_label(axes[1]))
    ax.figure.colorbar(image, ax=ax).set_label(label)
    return image
