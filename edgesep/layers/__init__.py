"""Structured layers, one module per family (kron; lowrank, tt and gdws follow). Imports torch."""

from edgesep.layers.gdws import GDWSConv2d
from edgesep.layers.kron import KronLinear, kron_dense, kron_linear, kron_macs, nearest_kronecker
from edgesep.layers.lowrank import LowRankConv2d, LowRankLinear, lowrank_layer_stats, rank_from_ratio
from edgesep.layers.tt import TTConv2d, TTLinear, convert_to_tt, tt_svd

__all__ = [
    "GDWSConv2d",
    "KronLinear",
    "LowRankConv2d",
    "LowRankLinear",
    "TTConv2d",
    "TTLinear",
    "convert_to_tt",
    "kron_dense",
    "kron_linear",
    "kron_macs",
    "lowrank_layer_stats",
    "nearest_kronecker",
    "rank_from_ratio",
    "tt_svd",
]
