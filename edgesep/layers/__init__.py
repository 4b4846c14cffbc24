"""Structured layers, one module per family (kron; lowrank, tt and gdws follow). Imports torch."""

from edgesep.layers.kron import KronLinear, kron_dense, kron_linear, kron_macs, nearest_kronecker

__all__ = ["KronLinear", "kron_dense", "kron_linear", "kron_macs", "nearest_kronecker"]
