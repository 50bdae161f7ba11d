"""bnsweep: sweeps for Batch Normalization studies, measured, tracked and reproducible."""

__version__ = "0.1.0"
