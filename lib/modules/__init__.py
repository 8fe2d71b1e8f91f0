"""Building blocks of an MDEQ: solvers, the implicit backward, weight norm, variational dropout."""
from .anderson import anderson
from .broyden import broyden
from .dropout import VariationalDropout2d
from .fixed_point import fixed_point
from .implicit import attach_implicit_backward
from .residuals import IterateTracker, SolverResult
from .solvers import SOLVERS, get_solver
from .weight_norm import WeightNormConv2d, conv2d
from .workspace import SolverWorkspace

__all__ = ["anderson", "broyden", "fixed_point", "get_solver", "SOLVERS", "SolverResult", "IterateTracker",
           "attach_implicit_backward", "SolverWorkspace", "VariationalDropout2d", "WeightNormConv2d", "conv2d"]
