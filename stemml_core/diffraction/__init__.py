"""4D-STEM analyses: Bragg-disk detection, lattice fits, strain, fields."""
