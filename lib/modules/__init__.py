"""Layers of an MDEQ: the implicit backward, weight norm, variational dropout (the solvers are
in :mod:`mdeq.solvers`)."""
from .dropout import VariationalDropout2d
from .implicit import attach_implicit_backward
from .weight_norm import WeightNormConv2d, conv2d

__all__ = ["attach_implicit_backward", "VariationalDropout2d", "WeightNormConv2d", "conv2d"]
