"""mdeq: Multiscale Deep Equilibrium Models (Bai, Koltun & Kolter, NeurIPS 2020).

Subpackages:
    mdeq.config    yacs defaults and :func:`mdeq.config.load_config`
    mdeq.solvers   fixed-point solvers (limited-memory Broyden, Anderson, plain iteration)
    mdeq.modules   layers: implicit backward, weight norm, variational dropout
    mdeq.models    the multiscale equilibrium core and the classification / segmentation nets
    mdeq.datasets  CIFAR-10, ImageNet, the embedded digits set, Cityscapes
    mdeq.analysis  solver benchmark, convergence traces, forward-budget sweeps, sample images
    mdeq.core      the training engine (trainer.py): loop, checkpoints, policies; losses, metrics,
                   the evaluation reducer
    mdeq.tasks     what classification and segmentation supply to the engine
    mdeq.programs  what the tools run: one runner (train / test) for every task, command line,
                   process setup, exit statuses
    mdeq.utils     base layer: checkpoint files, logging, distributed helpers, optimisers
"""

__version__ = "0.1.0"
