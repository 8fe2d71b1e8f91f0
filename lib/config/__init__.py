"""Configuration: yacs defaults (:mod:`mdeq.config.default`) and strict loading."""
from .default import get_default_config
from .loader import ConfigError, load_config, merge_opts, validate_config

__all__ = ["ConfigError", "get_default_config", "load_config", "merge_opts", "validate_config"]
