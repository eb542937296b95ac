"""4D-STEM analyses: Bragg-disk detection, lattice fits, strain, fields.

- :mod:`~stemml_core.diffraction.disks`: direct beam, descan, probe template, disk detection;
- :mod:`~stemml_core.diffraction.lattice`: primitive basis, indexing, batched basis fits;
- :mod:`~stemml_core.diffraction.strain`: strain and rotation maps of a HyperSpy signal, and the
  reference region chosen from a segmentation;
- :mod:`~stemml_core.diffraction.bilayer`: twisted bilayers, a joint fit of both lattices, per-layer
  strain and the twist angle.
"""

from stemml_core.diffraction.bilayer import BilayerResult, JointFit, bilayer_strain_map, fit_lattices, twist_angle
from stemml_core.diffraction.disks import (
    DirectBeam,
    Disks,
    cross_correlate,
    direct_beam,
    disk_radius,
    find_disks,
    fit_descan,
    probe_template,
    refine_disks,
    template_shape,
)
from stemml_core.diffraction.lattice import (
    FitStatus,
    LatticeFit,
    fit_basis,
    index_vectors,
    lattice_basis,
    reduce_basis,
)
from stemml_core.diffraction.strain import (
    StrainResult,
    plot_strain,
    reference_region,
    strain_components,
    strain_map,
)

__all__ = [
    "BilayerResult",
    "DirectBeam",
    "Disks",
    "FitStatus",
    "JointFit",
    "LatticeFit",
    "StrainResult",
    "bilayer_strain_map",
    "cross_correlate",
    "direct_beam",
    "disk_radius",
    "find_disks",
    "fit_basis",
    "fit_descan",
    "fit_lattices",
    "index_vectors",
    "lattice_basis",
    "plot_strain",
    "probe_template",
    "reduce_basis",
    "reference_region",
    "refine_disks",
    "strain_components",
    "strain_map",
    "template_shape",
    "twist_angle",
]
