"""Layers of an MDEQ: the equilibrium layer and its implicit backward, weight norm, variational
dropout, the reversible backward (the solvers are in :mod:`mdeq.solvers`)."""
from .dropout import CallState, VariationalDropout2d, call_state, call_state_restored
from .equilibrium import EXPLICIT, GRAD_MODES, LOGGED_KEYS, MODES, EquilibriumInfo, EquilibriumLayer, SolverChoice
from .implicit import attach_implicit_backward, attach_phantom_backward
from .reversible import CapturedTensors, attach_reversible_backward, coupled_steps, reconstruction_error
from .jacobian import hutchinson_jac_loss, jacobian_operator_norm, spectral_radius
from .lipschitz import (CenteredGroupNorm, LipschitzBudget, SpectralCapConv2d, conv_operator_norm, lipschitz_budget,
                        nearest_upsample_gain)
from .weight_norm import ReparamConv2d, WeightNormConv2d, conv2d, fixed_weights, weights_fixed, weights_restored

__all__ = ["EXPLICIT", "EquilibriumInfo", "EquilibriumLayer", "GRAD_MODES", "LOGGED_KEYS", "MODES", "SolverChoice",
           "attach_implicit_backward", "attach_phantom_backward", "attach_reversible_backward", "CapturedTensors",
           "coupled_steps", "reconstruction_error", "hutchinson_jac_loss", "jacobian_operator_norm", "spectral_radius",
           "CenteredGroupNorm", "LipschitzBudget", "SpectralCapConv2d", "conv_operator_norm", "lipschitz_budget",
           "nearest_upsample_gain", "ReparamConv2d",
           "CallState", "VariationalDropout2d", "WeightNormConv2d", "call_state", "call_state_restored", "conv2d", "fixed_weights", "weights_fixed",
           "weights_restored"]
