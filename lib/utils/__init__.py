"""Utilities: checkpoints, logging, distributed training, optimisers."""
