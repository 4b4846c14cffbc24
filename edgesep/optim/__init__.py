"""Optimizers (imports torch): ``CondLR`` for robust low-rank layers (``edgesep.layers.lowrank``)."""

from edgesep.optim.condlr import CondLR, condition_core, condlr_param_groups, sign_fixed_qr, stiefel_project

__all__ = ["CondLR", "condition_core", "condlr_param_groups", "sign_fixed_qr", "stiefel_project"]
