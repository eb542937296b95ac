"""4D-STEM analyses: Bragg-disk detection, lattice fits, strain, fields.

- :mod:`~stemml_core.diffraction.disks`: direct beam, descan, probe template, disk detection;
- :mod:`~stemml_core.diffraction.lattice`: primitive basis, indexing, batched basis fits;
- :mod:`~stemml_core.diffraction.strain`: strain and rotation maps of a HyperSpy signal, the
  reference region chosen from a segmentation, and a tilt flag from the Friedel pairs;
- :mod:`~stemml_core.diffraction.bilayer`: twisted bilayers, a joint fit of both lattices, per-layer
  strain and the twist angle with their uncertainties;
- :mod:`~stemml_core.diffraction.field`: centre of mass, descan, scan-detector rotation, projected
  field, integrated potential (iCoM), charge density and DPC of focused-probe data;
- :mod:`~stemml_core.diffraction.polarization`: polar domains, their sign with an uncertainty from
  the dose, and domain walls.
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
from stemml_core.diffraction.field import (
    FieldResult,
    ScanRotation,
    center_of_mass,
    divergence,
    field_map,
    find_scan_rotation,
    integrate_gradient,
    interaction_constant,
    quadrant_dpc,
    remove_descan,
    to_scan_frame,
)
from stemml_core.diffraction.lattice import (
    FitStatus,
    LatticeFit,
    fit_basis,
    index_vectors,
    lattice_basis,
    reduce_basis,
)
from stemml_core.diffraction.polarization import PolarizationResult, domain_walls, polarization_map
from stemml_core.diffraction.strain import (
    StrainResult,
    friedel_dipole,
    plot_strain,
    reference_region,
    strain_components,
    strain_map,
)

__all__ = [
    "BilayerResult",
    "DirectBeam",
    "Disks",
    "FieldResult",
    "FitStatus",
    "JointFit",
    "LatticeFit",
    "PolarizationResult",
    "ScanRotation",
    "StrainResult",
    "bilayer_strain_map",
    "center_of_mass",
    "cross_correlate",
    "direct_beam",
    "disk_radius",
    "divergence",
    "domain_walls",
    "field_map",
    "find_disks",
    "find_scan_rotation",
    "fit_basis",
    "fit_descan",
    "fit_lattices",
    "friedel_dipole",
    "index_vectors",
    "integrate_gradient",
    "interaction_constant",
    "lattice_basis",
    "plot_strain",
    "polarization_map",
    "probe_template",
    "quadrant_dpc",
    "reduce_basis",
    "reference_region",
    "refine_disks",
    "remove_descan",
    "strain_components",
    "strain_map",
    "template_shape",
    "to_scan_frame",
    "twist_angle",
]
