"""Low-loss EELS analyses: ZLP removal, thickness, band gap, dielectric function, features."""
