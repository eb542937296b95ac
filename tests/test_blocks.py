"""map_pixels: the same numbers eager, lazy and on a dask.distributed cluster; axes kept."""

import hyperspy.api as hs
import numpy as np
import pytest

from stemml_core.blocks import map_pixels


def _si(nav=(5, 7), n=30):
    s = hs.signals.Signal1D(np.random.default_rng(1).normal(size=(*nav, n)))
    for axis, name in zip(s.axes_manager.navigation_axes, ("x", "y")):
        axis.name, axis.units, axis.scale, axis.offset = name, "nm", 0.5, 3.0
    energy = s.axes_manager.signal_axes[0]
    energy.name, energy.units, energy.scale = "Energy loss", "eV", 0.1
    return s


def total(block, factor=1.0):
    return factor * block.sum(axis=1)


def moments(block):
    return np.stack([block.mean(axis=1), block.std(axis=1)], axis=1)


def doubled(block):
    return 2 * block


@pytest.mark.parametrize("lazy", [False, True])
def test_scalar_map_keeps_navigation_axes(lazy):
    s = _si()
    source = s.as_lazy() if lazy else s
    out = map_pixels(source, total, factor=2.0, block_pixels=4, progress=False)
    assert out._lazy == lazy
    if lazy:
        out.compute()
    np.testing.assert_allclose(out.data, 2 * s.data.sum(axis=-1))
    assert out.axes_manager.signal_dimension == 0
    assert [(a.name, a.units, a.scale, a.offset) for a in out.axes_manager.navigation_axes] == \
        [("x", "nm", 0.5, 3.0), ("y", "nm", 0.5, 3.0)]


@pytest.mark.parametrize("lazy", [False, True])
def test_vector_and_spectrum_outputs(lazy):
    s = _si()
    source = s.as_lazy() if lazy else s
    out = map_pixels(source, moments, output_shape=(2,), block_pixels=3, progress=False)
    np.testing.assert_allclose(np.asarray(out.data), np.stack([s.data.mean(-1), s.data.std(-1)], -1))
    energy = s.axes_manager.signal_axes[0].get_axis_dictionary()
    spectra = map_pixels(source, doubled, output_shape=(30,), output_axes=[energy], progress=False)
    np.testing.assert_allclose(np.asarray(spectra.data), 2 * s.data)
    assert spectra.axes_manager.signal_axes[0].units == "eV"


def test_single_spectrum():
    s = _si().inav[0, 0]
    out = map_pixels(s, total, progress=False)
    np.testing.assert_allclose(out.data, s.data.sum())


def test_wrong_output_shape_is_reported():
    with pytest.raises(ValueError, match=r"moments returned shape \(35, 2\); expected \(35, 3\)"):
        map_pixels(_si(), moments, output_shape=(3,), progress=False)


def test_distributed_cluster_gives_identical_numbers():
    distributed = pytest.importorskip("distributed")
    s = _si(nav=(8, 6))
    expected = map_pixels(s, moments, output_shape=(2,), progress=False).data
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        lazy = s.as_lazy()
        lazy.data = lazy.data.rechunk((4, 3, -1))
        out = map_pixels(lazy, moments, output_shape=(2,))
        out.compute()
    np.testing.assert_array_equal(out.data, expected)


def weighted(block, weight, offset):
    """Per-pixel extra inputs: a spectrum of weights and a scalar offset."""
    return (block * weight).sum(axis=1) + offset


@pytest.mark.parametrize("lazy", [False, True])
def test_extra_inputs_follow_the_pixels(lazy):
    s = _si()
    rng = np.random.default_rng(2)
    weight, offset = rng.normal(size=s.data.shape), rng.normal(size=s.data.shape[:-1])
    source = s.as_lazy() if lazy else s
    if lazy:
        source.data = source.data.rechunk((2, 3, -1))
    out = map_pixels(source, weighted, extra={"weight": weight, "offset": offset}, block_pixels=4, progress=False)
    np.testing.assert_allclose(np.asarray(out.data), (s.data * weight).sum(-1) + offset)


def test_extra_input_with_the_wrong_shape_is_reported():
    s = _si()
    with pytest.raises(ValueError, match=r"extra input 'offset' has shape \(7, 5\); expected the navigation "
                                         r"shape \(5, 7\)"):
        map_pixels(s, weighted, extra={"weight": s.data, "offset": np.zeros((7, 5))}, progress=False)


def test_threads_give_the_same_numbers_in_order():
    s = _si(nav=(9, 11))
    one = map_pixels(s, moments, output_shape=(2,), block_pixels=4, progress=False)
    three = map_pixels(s, moments, output_shape=(2,), block_pixels=4, workers=3, progress=False)
    np.testing.assert_array_equal(three.data, one.data)
    with pytest.raises(ValueError, match="workers"):
        map_pixels(s, total, workers=0, progress=False)


def test_the_data_dtype_is_kept_on_request():
    s = _si()
    s.data = s.data.astype(np.float32)
    seen = []
    map_pixels(s, lambda block: seen.append(block.dtype) or block.sum(axis=1), input_dtype=None, progress=False)
    map_pixels(s, lambda block: seen.append(block.dtype) or block.sum(axis=1), progress=False)
    assert seen == [np.float32, np.float64]
