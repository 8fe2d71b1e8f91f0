"""mdeq: Multiscale Deep Equilibrium Models (Bai, Koltun & Kolter, NeurIPS 2020).

Subpackages:
    mdeq.config    yacs defaults and :func:`mdeq.config.load_config`
    mdeq.modules   solvers (L-Broyden, Anderson, fixed point), implicit backward, weight norm, dropout
    mdeq.models    the multiscale equilibrium core and the classification / segmentation nets
    mdeq.datasets  CIFAR-10, ImageNet, the embedded digits set, Cityscapes
    mdeq.core      train / validate loops, losses, metrics
    mdeq.utils     checkpoints, logging, distributed helpers
"""

__version__ = "0.1.0"
