"""Configuration: yacs defaults (:mod:`mdeq.config.default`) and strict loading."""
from .default import get_default_config
from .loader import load_config, merge_opts
from .validation import CHOICES, RANGES, ConfigError, Range, check_jac_loss_freq, register_choices, validate_config

__all__ = ["CHOICES", "ConfigError", "RANGES", "Range", "check_jac_loss_freq", "get_default_config", "load_config",
           "merge_opts", "register_choices", "validate_config"]
