"""Measurements around a model: the solver benchmark, convergence traces, forward-budget sweeps,
training curves and the training-cost comparison, the sample images the solver tools use, and the
model zoo's tables written from the released models' results."""
