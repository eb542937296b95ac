"""Loaders: calibrated signals in, clear errors naming file and axis otherwise."""

import hyperspy.api as hs
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from stemml_core import io


def _eels(nav=(3, 4), n=200, scale=0.01, offset=-0.5, units="eV"):
    data = np.random.default_rng(0).poisson(100, size=(*nav, n)).astype("float32")
    s = hs.signals.Signal1D(data)
    energy = s.axes_manager.signal_axes[0]
    energy.name, energy.units, energy.scale, energy.offset = "Energy loss", units, scale, offset
    for axis, name in zip(s.axes_manager.navigation_axes, ("x", "y")):
        axis.name, axis.units, axis.scale = name, "nm", 2.0
    return s


def _4d(scan=(3, 4), det=(16, 16), det_units="1/nm", scan_units="nm"):
    s = hs.signals.Signal2D(np.ones((*scan, *det), dtype="float32"))
    for axis, name in zip(s.axes_manager.navigation_axes, ("x", "y")):
        axis.name, axis.units, axis.scale = name, scan_units, 0.5
    for axis, name in zip(s.axes_manager.signal_axes, ("kx", "ky")):
        axis.name, axis.units, axis.scale, axis.offset = name, det_units, 0.1, -0.8
    return s


def test_lowloss_roundtrip_hspy(tmp_path):
    path = tmp_path / "si.hspy"
    _eels().save(path)
    s = io.load_lowloss(path)
    assert s.metadata.Signal.signal_type == "EELS"
    assert type(s).__name__ == "EELSSpectrum"
    assert s.axes_manager.signal_axes[0].units == "eV"
    assert s.axes_manager.navigation_shape == (4, 3)
    assert s.axes_manager.navigation_axes[0].scale == 2.0


def test_lowloss_single_spectrum_msa(tmp_path):
    path = tmp_path / "spectrum.msa"
    _eels(nav=()).save(path)
    s = io.load_lowloss(path)
    assert s.axes_manager.navigation_dimension == 0
    np.testing.assert_allclose(s.axes_manager.signal_axes[0].scale, 0.01)


@pytest.mark.filterwarnings("ignore:The NestedDirectoryStore is deprecated")  # RosettaSciIO's zspy writer
def test_lowloss_lazy_from_a_zspy_folder(tmp_path):
    s = _eels()
    s.save(tmp_path / "si.zspy")
    loaded = io.load_lowloss(tmp_path / "si.zspy", lazy=True)
    assert loaded._lazy
    np.testing.assert_array_equal(loaded.data.compute(), s.data)


def test_lowloss_lazy(tmp_path):
    path = tmp_path / "si.hspy"
    _eels().save(path)
    s = io.load_lowloss(path, lazy=True)
    assert s._lazy


def test_mev_axis_converted_without_touching_the_input():
    original = _eels(units="meV", scale=10.0, offset=-500.0)
    s = io.load_lowloss(original)
    energy = s.axes_manager.signal_axes[0]
    assert (energy.units, energy.scale, energy.offset) == ("eV", pytest.approx(0.01), pytest.approx(-0.5))
    assert original.axes_manager.signal_axes[0].units == "meV"
    assert original.axes_manager.signal_axes[0].scale == 10.0


def test_missing_file_named(tmp_path):
    with pytest.raises(io.InputError, match=r"nothere\.dm4': no such file"):
        io.load_lowloss(tmp_path / "nothere.dm4")


def test_unreadable_file_named(tmp_path):
    bad = tmp_path / "broken.dm3"
    bad.write_bytes(b"not a digital micrograph file")
    with pytest.raises(io.InputError, match=r"broken\.dm3': HyperSpy/RosettaSciIO cannot read"):
        io.load_lowloss(bad)


def test_4d_given_to_eels(tmp_path):
    path = tmp_path / "scan.hspy"
    _4d().save(path)
    with pytest.raises(io.InputError, match=r"scan\.hspy' has 2 signal dimensions.*EELS spectrum"):
        io.load_lowloss(path)


def test_eels_given_to_4d(tmp_path):
    path = tmp_path / "si.hspy"
    _eels().save(path)
    with pytest.raises(io.InputError, match=r"si\.hspy' has 2 navigation and 1 signal axes; expected a 4D-STEM"):
        io.load_4dstem(path)


@pytest.mark.parametrize("units", ["nm", "<undefined>", "eV/c"])
def test_energy_units_wrong(units):
    s = _eels(units=units)
    with pytest.raises(io.InputError, match=r"energy axis 'Energy loss' has units .*expected 'eV'"):
        io.load_lowloss(s)


def test_decreasing_energy_axis():
    with pytest.raises(io.InputError, match=r"scale -0.01 eV; expected a positive scale"):
        io.load_lowloss(_eels(scale=-0.01, offset=1.5))


def test_uncalibrated_scan_refused_only_when_maps_need_nm():
    s = _eels()
    s.axes_manager.navigation_axes[1].units = ""
    assert io.load_lowloss(s).axes_manager.navigation_shape == (4, 3)  # pixels are fine by default
    with pytest.raises(io.InputError, match=r"scan axis 'y' has units '.*'; expected 'nm'"):
        io.load_lowloss(s, calibrated_scan=True)
    assert io.load_lowloss(_eels(), calibrated_scan=True).axes_manager.navigation_axes[0].units == "nm"


def test_energy_range_without_zlp():
    with pytest.raises(io.InputError, match=r"spans 5 to 6.99 eV; expected a low-loss range that contains"):
        io.load_lowloss(_eels(offset=5.0))


def test_non_uniform_energy_axis():
    s = _eels()
    s.axes_manager.signal_axes[0].convert_to_non_uniform_axis()
    with pytest.raises(io.InputError, match="non-uniform"):
        io.load_lowloss(s)


def test_4dstem_calibration_and_conversion():
    original = _4d(det_units="1/Å", scan_units="Å")
    s = io.load_4dstem(original)
    assert [a.units for a in s.axes_manager.signal_axes] == ["1/nm", "1/nm"]
    assert s.axes_manager.signal_axes[0].scale == pytest.approx(1.0)
    assert s.axes_manager.navigation_axes[0].scale == pytest.approx(0.05)
    assert original.axes_manager.signal_axes[0].units == "1/Å"


def test_4dstem_uncalibrated_detector():
    with pytest.raises(io.InputError, match=r"detector axis 'kx' has units '<undefined>'; expected '1/nm'"):
        io.load_4dstem(_4d(det_units="<undefined>"))


def test_4dstem_one_position():
    with pytest.raises(io.InputError, match="scan of one position"):
        io.load_4dstem(_4d(scan=(1, 1)))


def test_4dstem_emd_roundtrip(tmp_path):
    path = tmp_path / "scan.emd"
    _4d().save(path)
    s = io.load_4dstem(path)
    assert s.axes_manager.signal_shape == (16, 16)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # HyperSpy computing an axis of inf or nan scale
@settings(max_examples=40, deadline=None)
@given(units=st.text(max_size=6), scale=st.floats(allow_nan=True, allow_infinity=True))
def test_any_energy_calibration_loads_or_explains(units, scale):
    s = _eels(nav=(2,), n=20)
    energy = s.axes_manager.signal_axes[0]
    energy.units = units
    try:
        energy.scale = scale
    except Exception:  # HyperSpy itself refuses some scales
        return
    try:
        out = io.load_lowloss(s)
    except io.InputError:
        return
    axis = out.axes_manager.signal_axes[0]
    assert axis.units == "eV" and axis.scale > 0 and axis.low_value < 0 < axis.high_value
