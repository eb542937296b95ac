"""Apply a batched array function to every pixel of a signal, eager or lazy.

HyperSpy's ``map`` calls a function once per navigation position; the array
functions of stemml are batched (they take many spectra or patterns at once),
so they are applied to blocks of pixels instead:

- an in-memory signal is processed in blocks of ``block_pixels`` pixels with a
  progress bar, bounding the memory of the intermediate results;
- a lazy (dask-backed) signal gives a lazy result, one dask task per block of
  navigation chunks, which runs on whatever dask scheduler is active
  (threads, or a ``dask.distributed`` client).

The output keeps the input's navigation axes (names, units, scale, offset).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import dask.array as da
import hyperspy.api as hs
import numpy as np
from hyperspy.signal import BaseSignal
from tqdm import tqdm  # text bars: no widget JavaScript in notebooks and the offline book

__all__ = ["check_workers", "compute_map", "map_pixels", "navigation_map"]


def check_workers(workers) -> int:
    """``workers`` as a positive int, or a ValueError naming what was expected."""
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers={workers!r}; expected a positive number of threads")
    return int(workers)


def _navigation_signal(data, source: BaseSignal, signal_axes: Sequence[dict], lazy: bool) -> BaseSignal:
    """A signal with ``source``'s navigation axes followed by ``signal_axes``."""
    nav_axes = [axis.get_axis_dictionary() for axis in source.axes_manager.navigation_axes]
    # HyperSpy lists axes in array order: navigation (slowest first) then signal.
    axes = nav_axes[::-1] + list(signal_axes)
    for index, axis in enumerate(axes):
        axis["navigate"] = index < len(nav_axes)
    n_signal = len(signal_axes)
    cls = {0: hs.signals.BaseSignal, 1: hs.signals.Signal1D, 2: hs.signals.Signal2D}[n_signal]
    out = cls(data, axes=axes)  # a BaseSignal keeps the navigate flags: all-navigation, no transpose (a copy)
    if lazy and not out._lazy:
        out = out.as_lazy()
    return out


def map_pixels(
    signal: BaseSignal,
    func: Callable[..., np.ndarray],
    *,
    output_shape: tuple[int, ...] = (),
    output_axes: Sequence[dict] | None = None,
    dtype=np.float64,
    input_dtype=np.float64,
    block_pixels: int = 4096,
    progress: bool = True,
    description: str | None = None,
    extra: dict | None = None,
    workers: int = 1,
    **kwargs,
) -> BaseSignal:
    """Apply ``func`` to blocks of pixels of ``signal``.

    Parameters
    ----------
    signal : hyperspy.signal.BaseSignal
        Input with navigation shape ``nav`` (any number of navigation axes,
        possibly none) and signal shape ``sig``; eager or lazy.
    func : callable
        ``func(block, **kwargs)`` with ``block`` of shape ``(n, *sig)`` (of
        ``input_dtype``) returning an array of shape ``(n, *output_shape)``. It must not depend on
        which pixels are in a block.
    output_shape : tuple of int
        Per-pixel shape of ``func``'s output; ``()`` for a scalar map.
    output_axes : sequence of dict, optional
        HyperSpy axis dictionaries (``size``, ``name``, ``units``, ``scale``,
        ``offset``) for the output's signal axes, in array order; default plain
        index axes.
    dtype : numpy dtype
        Output dtype.
    input_dtype : numpy dtype or None
        dtype of the blocks ``func`` receives; None passes the data's own dtype
        (no converted copy of every block, for a ``func`` that accumulates in
        float64 itself).
    block_pixels : int
        Pixels per block for in-memory input (memory bound).
    progress : bool
        Show a progress bar for in-memory input.
    description : str, optional
        Progress-bar label.
    extra : dict of str to array_like, optional
        Further per-pixel inputs by name, each of shape ``(*nav, *rest)`` (numpy or
        dask; e.g. a noise variance per channel or a scalar map): ``func`` receives
        the rows of the block's pixels, shape ``(n, *rest)``, as keyword arguments.
    workers : int
        Threads that process the blocks of in-memory input side by side (for a
        ``func`` whose numpy/scipy work releases the GIL); the result does not
        depend on it. Lazy input runs on the active dask scheduler instead.
    **kwargs
        Passed to ``func``.

    Returns
    -------
    hyperspy.signal.BaseSignal
        ``nav`` navigation axes copied from ``signal`` plus the output signal
        axes; lazy when ``signal`` or an ``extra`` input is lazy.
    """
    workers = check_workers(workers)
    am = signal.axes_manager
    nav_shape = tuple(am.navigation_shape[::-1])
    sig_shape = tuple(am.signal_shape[::-1])
    output_shape = tuple(output_shape)
    if output_axes is None:
        output_axes = [{"size": size} for size in output_shape]
    if [axis["size"] for axis in output_axes] != list(output_shape):
        raise ValueError(f"output_axes sizes {[a['size'] for a in output_axes]} differ from output_shape {output_shape}")
    n_sig = len(sig_shape)

    extra = {name: _navigation_aligned(name, values, nav_shape) for name, values in (extra or {}).items()}

    def run(block: np.ndarray, *extra_blocks) -> np.ndarray:
        flat = np.asarray(block, dtype=input_dtype).reshape(-1, *sig_shape)
        rows = {name: np.asarray(values).reshape(flat.shape[0], *values.shape[block.ndim - n_sig:])
                for name, values in zip(extra, extra_blocks)}
        result = np.asarray(func(flat, **rows, **kwargs), dtype=dtype)
        if result.shape != (flat.shape[0], *output_shape):
            raise ValueError(
                f"{getattr(func, '__name__', 'func')} returned shape {result.shape}; "
                f"expected {(flat.shape[0], *output_shape)}"
            )
        return result.reshape(block.shape[: block.ndim - n_sig] + output_shape)

    lazy_extra = [values for values in extra.values() if isinstance(values, da.Array)]
    if signal._lazy or lazy_extra:
        if signal._lazy:
            data = signal.data
        else:  # an eager signal with a lazy extra input: chunk the navigation like that input
            data = da.from_array(signal.data, chunks=lazy_extra[0].chunks[: len(nav_shape)] + (-1,) * len(sig_shape))
        data = data.rechunk({axis: -1 for axis in range(len(nav_shape), data.ndim)})
        nav_chunks = data.chunks[: len(nav_shape)]
        nav_index = tuple(f"n{i}" for i in range(len(nav_shape)))
        args = [data, nav_index + tuple(f"s{i}" for i in range(n_sig))]
        for k, values in enumerate(extra.values()):
            values = da.asarray(values)
            n_rest = values.ndim - len(nav_shape)
            args += [values.rechunk(nav_chunks + (-1,) * n_rest),
                     nav_index + tuple(f"e{k}_{i}" for i in range(n_rest))]
        new_axes = {f"o{i}": n for i, n in enumerate(output_shape)}
        result = da.blockwise(run, nav_index + tuple(new_axes), *args, new_axes=new_axes, dtype=dtype,
                              concatenate=True)
        return _navigation_signal(result, signal, output_axes, lazy=True)

    data = np.asarray(signal.data)
    flat = data.reshape(-1, *sig_shape)
    flat_extra = [np.asarray(values).reshape(flat.shape[0], *values.shape[len(nav_shape):]) for values in extra.values()]
    out = np.empty((flat.shape[0], *output_shape), dtype=dtype)
    starts = range(0, flat.shape[0], block_pixels)

    def one(start):
        sl = slice(start, start + block_pixels)
        out[sl] = run(flat[sl], *(values[sl] for values in flat_extra))

    bar = tqdm(total=len(starts), desc=description, disable=not progress or len(starts) < 2, leave=False)
    with bar, ThreadPoolExecutor(max_workers=max(1, min(workers, len(starts)))) as pool:
        for _ in pool.map(one, starts):  # in order; an exception in a block is raised here
            bar.update()
    return _navigation_signal(out.reshape(nav_shape + output_shape), signal, output_axes, lazy=False)


def _navigation_aligned(name, values, nav_shape):
    """``values`` (numpy or dask) checked to start with the navigation shape."""
    values = values if isinstance(values, da.Array) else np.asarray(values)
    if values.shape[: len(nav_shape)] != nav_shape:
        raise ValueError(
            f"extra input {name!r} has shape {values.shape}; expected the navigation shape {nav_shape} "
            "followed by the per-pixel shape"
        )
    return values


def navigation_map(data, source: BaseSignal, *, title: str, quantity: str) -> BaseSignal:
    """An in-memory map of ``data`` with ``source``'s navigation axes and no signal axis.

    Parameters
    ----------
    data : array_like
        Shape ``nav``: ``source``'s navigation shape in array order (rows, cols).
    source : hyperspy.signal.BaseSignal
        Signal whose navigation calibration (names, units, scale, offset) is copied.
    title, quantity : str
        ``metadata.General.title`` and ``metadata.Signal.quantity`` (with its unit in brackets).

    Returns
    -------
    hyperspy.signal.BaseSignal
    """
    out = _navigation_signal(np.asarray(data), source, [], lazy=False)
    out.metadata.General.title = title
    out.metadata.set_item("Signal.quantity", quantity)
    return out


def compute_map(result: BaseSignal, *, progress: bool = True, description: str | None = None) -> np.ndarray:
    """The data of a :func:`map_pixels` result as a numpy array.

    A lazy result is computed band by band of its first navigation chunks, on whatever dask
    scheduler is active, with a progress bar; memory stays bounded by one band of the input.
    """
    if not result._lazy:
        return np.asarray(result.data)
    data = result.data
    bands = np.cumsum((0,) + data.chunks[0])
    out = np.empty(data.shape, dtype=data.dtype)
    for start, stop in tqdm(list(zip(bands[:-1], bands[1:])), desc=description, disable=not progress, leave=False):
        out[start:stop] = data[start:stop].compute()
    return out
