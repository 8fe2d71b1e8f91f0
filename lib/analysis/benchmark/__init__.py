"""Solver speed against the physical limit: f-evaluation time, solves, training steps, peak memory
(``tools/benchmark.py``).

One module per concern:

==================  ===================================================================================
``spec``            what to benchmark (:class:`BenchSpec`) and building its model and batch (:func:`build`)
``timing``          medians of repeated runs (:func:`median_time`), the solver wrapper that splits a
                    solve's time (:class:`TimedSolver`)
``measurements``    the timed pieces of a training step (:func:`time_components`, :func:`forward_solve`,
                    :func:`train_step`) and the overhead figures (:func:`overheads`, defined there)
``memory``          the peak memory of a training step, in a fresh process on the CPU (:func:`peak_memory`)
``backward_modes``  one training-step row per MODEL.GRAD mode (:func:`run_backward_modes`) and its table
``model_cost``      any MODEL.NAME's parameters, FLOPs, training-step memory and time, inference rate, one
                    fresh process per config (:func:`model_costs`; ``tools/model_cost.py``)
``reversible``      the reversible backward: its gradient against stored autograd, its drift, its peak
                    memory (:func:`run_reversible`, :func:`format_reversible`)
``run``             a whole run of the parts asked for (:data:`PARTS`, :func:`run_benchmark`)
``report``          its markdown tables (:func:`format_report`) and JSON (:func:`dump_json`)
==================  ===================================================================================
"""
from .backward_modes import BACKWARD_MODES, backward_mode_worker, format_backward_modes, run_backward_modes
from .measurements import forward_solve, overheads, time_components, train_step
from .model_cost import CostSpec, format_costs, model_cost_worker, model_costs
from .memory import peak_memory, peak_memory_worker, solver_history_bytes
from .report import dump_json, format_report
from .reversible import format_reversible, gradient_drift, reversible_memory, run_reversible
from .run import DEFAULT_PARTS, PARTS, run_benchmark
from .spec import BenchSpec, build
from .timing import TimedSolver, median_time, synchronize

__all__ = ["BACKWARD_MODES", "DEFAULT_PARTS", "PARTS", "BenchSpec", "CostSpec", "format_costs", "model_cost_worker", "model_costs",
           "format_reversible", "gradient_drift", "reversible_memory", "run_reversible", "TimedSolver",
           "backward_mode_worker", "build", "dump_json",
           "format_backward_modes", "format_report", "forward_solve", "median_time", "overheads", "peak_memory",
           "peak_memory_worker", "run_backward_modes", "run_benchmark", "solver_history_bytes", "synchronize",
           "time_components", "train_step"]
