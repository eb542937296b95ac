"""The joint strain and band-gap analysis end to end on the built-in joint sample: the deformation
potential recovered within 20 % (issue goal), as the notebook ``strain_and_bandgap`` does it."""

import hyperspy.api as hs
import numpy as np
from scipy import ndimage

from stemml_core import diffraction, segment
from stemml_core.eels import ZLPEnsemble, estimate_band_gap, pool_spectra, resolution_from
from stemml_core.registration import line_fit, register_maps
from stemml_core.synthetic.joint import strain_and_lowloss


def test_deformation_potential_within_20_percent():
    """Measured with seed 0: registration (1.97, 3.03) against (2, 3); D = -5.47 eV against -5.00 eV,
    68 % interval -6.19 to -4.64 eV when the bootstrap resamples the ZLP replicas as well as the
    pixels (-5.84 to -5.03 eV, missing the truth, over pixels alone). Seeds 0-5: D off by 4-25 %,
    the interval held the truth in 4 of 6 (pixels alone: 2 of 6)."""
    dp, full, truth = strain_and_lowloss(random_state=0)
    strain = diffraction.strain_map(dp, reference=segment.segment_patterns(dp, n_clusters=2, random_state=0,
                                                                             progress=False), progress=False)
    eels = full.isig[:9.0]
    model = ZLPEnsemble(n_replicas=20, n_clusters=2, random_state=0, progress=False).fit(eels)
    pooled = pool_spectra(eels, 1.0, labels=model.labels_)
    energy = eels.axes_manager.signal_axes[0].axis
    resolution = resolution_from(model.cluster_medians_[int(np.argmax(model.cluster_centers_))], energy,
                                 half_width=0.5)
    gap = estimate_band_gap(pooled, model, window=(1.1, 2.5), resolution=resolution, random_state=0,
                            keep_replicas=True, progress=False)
    assert gap.replicas.data.shape == gap.band_gap.median.data.shape + (int(model.kept_.sum()),)
    # the median over the kept replicas is the band-gap map (NaN where no replica has a gap)
    some = np.isfinite(gap.replicas.data).any(axis=-1)
    np.testing.assert_allclose(np.nanmedian(gap.replicas.data[some], axis=-1), gap.band_gap.median.data[some],
                               atol=1e-12)
    assert np.isnan(gap.band_gap.median.data[~some]).all()

    detector = hs.roi.CircleROI(cx=0.0, cy=0.0, r=6.0, r_inner=1.0)(dp, axes=dp.axes_manager.signal_axes)
    adf = detector.nansum(axis=detector.axes_manager.signal_axes).data
    inelastic = eels.data[..., energy > 1.0].sum(axis=-1) / eels.data.sum(axis=-1)
    shift = register_maps(adf, inelastic)
    assert np.hypot(shift[0] - truth.offset[0], shift[1] - truth.offset[1]) < 0.25

    strain_sum, strain_std = (ndimage.shift(values, (-shift[0], -shift[1]), order=1, mode="constant", cval=np.nan)
                              for values in (strain.exx.data + strain.eyy.data,
                                             np.hypot(strain.exx_std.data, strain.eyy_std.data)))
    fit = line_fit(strain_sum, gap.band_gap.median.data, strain_std,
                   (gap.band_gap.high.data - gap.band_gap.low.data) / 2, y_replicas=np.moveaxis(gap.replicas.data, -1, 0),
                   n_boot=200, block=3, random_state=0)
    assert fit["n"] > 200
    assert abs(fit["slope"] / truth.deformation_potential - 1) <= 0.2, fit
    assert fit["slope_low"] <= truth.deformation_potential <= fit["slope_high"], fit
