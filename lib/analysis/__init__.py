"""Measurements around a model: the solver benchmark, convergence traces, forward-budget sweeps,
training curves and the training-cost comparison, and the sample images the solver tools use."""
