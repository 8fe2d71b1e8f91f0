"""Loading experiment files with errors that name the key, the value and the file."""
from __future__ import annotations

import ast
import difflib
import os
from typing import Any, Iterable, Sequence

import yaml
from yacs.config import CfgNode as CN

from .default import get_default_config


class ConfigError(ValueError):
    """A config file or override that does not fit the defaults."""


def _decode(value: Any) -> Any:
    """Turn override strings such as '0.1', '[1, 2]', 'True' into Python values (as yacs does)."""
    if isinstance(value, dict):
        return CN(value)
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _coerce(new: Any, old: Any, full_key: str, source: str) -> Any:
    """Check ``new`` against the type of the default ``old``; allow the harmless conversions."""
    if isinstance(old, CN):
        raise ConfigError(f"{source}: key {full_key} is a section; give its sub-keys, not the value {new!r}")
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
    elif isinstance(old, float):
        if isinstance(new, (int, float)) and not isinstance(new, bool):
            return float(new)
    elif isinstance(old, int):
        if isinstance(new, int) and not isinstance(new, bool):
            return new
        if isinstance(new, float) and new.is_integer():
            return int(new)
    elif isinstance(old, str):
        if isinstance(new, str):
            return new
    elif isinstance(old, (list, tuple)):
        if isinstance(new, (list, tuple)):
            return type(old)(new)
    elif old is None:
        return new
    raise ConfigError(
        f"{source}: wrong type for config key {full_key}: got {new!r} ({type(new).__name__}), "
        f"expected {type(old).__name__} like the default {old!r}"
    )


def _merge(cfg: CN, updates: dict, source: str, prefix: str = "") -> None:
    for key, value in updates.items():
        full_key = f"{prefix}{key}"
        if key not in cfg:
            close = difflib.get_close_matches(str(key), list(cfg.keys()), n=1, cutoff=0.6)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key {full_key} = {value!r}{hint}")
        if isinstance(cfg[key], CN):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key {full_key} is a section; got the value {value!r}")
            _merge(cfg[key], value, source, full_key + ".")
        else:
            cfg[key] = _coerce(_decode(value), cfg[key], full_key, source)


def merge_opts(cfg: CN, opts: Sequence[Any], source: str = "command line") -> None:
    """Apply ``KEY VALUE`` pairs (e.g. ``['MODEL.DROPOUT', 0.0]``) to a mutable config."""
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"{source}: overrides come as KEY VALUE pairs; got an odd list {opts!r}")
    for full_key, value in zip(opts[0::2], map(_decode, opts[1::2])):
        node = cfg
        parts = str(full_key).split(".")
        walked = []
        for part in parts[:-1]:
            walked.append(part)
            if part not in node or not isinstance(node[part], CN):
                raise ConfigError(f"{source}: unknown config key {full_key} = {value!r} (no section {'.'.join(walked)})")
            node = node[part]
        _merge(node, {parts[-1]: value}, source, ".".join(parts[:-1]) + "." if len(parts) > 1 else "")


def load_config(path: str | os.PathLike | None = None, opts: Iterable[Any] = ()) -> CN:
    """Defaults, then the yaml file at ``path``, then the ``KEY VALUE`` overrides; returns a frozen CfgNode.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: an unknown key, a value of the wrong type, or unparsable yaml; the message names
            the key, the value and the file.
    """
    cfg = get_default_config()
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path} (experiment files live under experiments/)")
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid yaml: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
        _merge(cfg, data, path)
    merge_opts(cfg, list(opts))
    validate_config(cfg, path or "defaults")
    cfg.freeze()
    return cfg


def validate_config(cfg: CN, source: str) -> None:
    """Checks across keys that types alone cannot catch."""
    stage = cfg.MODEL.EXTRA.FULL_STAGE
    nb = stage.NUM_BRANCHES
    for key in ("NUM_BLOCKS", "NUM_CHANNELS"):
        if len(stage[key]) != nb:
            raise ConfigError(
                f"{source}: MODEL.EXTRA.FULL_STAGE.{key} has {len(stage[key])} entries {list(stage[key])} "
                f"but NUM_BRANCHES is {nb}")
    for key, choices in (("F_SOLVER", ("broyden", "anderson", "fixed_point")),
                         ("B_SOLVER", ("broyden", "anderson", "fixed_point")),
                         ("STOP_MODE", ("abs", "rel")),
                         ("STATE_LAYOUT", ("nchw", "channels_last")),
                         ("GRAD", ("implicit", "phantom", "jfb"))):
        if cfg.MODEL[key] not in choices:
            raise ConfigError(f"{source}: MODEL.{key} = {cfg.MODEL[key]!r}; choose one of {choices}")
    _validate_training_cost(cfg, source)
    if not 0.0 <= cfg.MODEL.DROPOUT < 1.0:
        raise ConfigError(f"{source}: MODEL.DROPOUT = {cfg.MODEL.DROPOUT} must lie in [0, 1)")
    if cfg.MODEL.DOWNSAMPLE_TIMES not in (0, 1, 2):
        raise ConfigError(f"{source}: MODEL.DOWNSAMPLE_TIMES = {cfg.MODEL.DOWNSAMPLE_TIMES} must be 0, 1 or 2")
    for c in stage.NUM_CHANNELS:
        if c % cfg.MODEL.NUM_GROUPS:
            raise ConfigError(f"{source}: NUM_CHANNELS entry {c} is not divisible by MODEL.NUM_GROUPS = "
                              f"{cfg.MODEL.NUM_GROUPS}")


def _validate_training_cost(cfg: CN, source: str) -> None:
    """The gradient-mode and Jacobian-regularisation keys (MODEL.GRAD, PHANTOM_*, JAC_*)."""
    m = cfg.MODEL
    checks = (("PHANTOM_STEPS", m.PHANTOM_STEPS >= 1, "must be >= 1"),
              ("PHANTOM_TAU", 0.0 < m.PHANTOM_TAU <= 1.0, "must lie in (0, 1]"),
              ("JAC_LOSS_WEIGHT", m.JAC_LOSS_WEIGHT >= 0.0, "must be >= 0"),
              ("JAC_LOSS_FREQ", m.JAC_LOSS_FREQ > 0.0 and (m.JAC_LOSS_FREQ < 1.0 or float(m.JAC_LOSS_FREQ).is_integer()),
               "must be a probability in (0, 1) or a whole period >= 1"),
              ("JAC_INCREMENTAL", m.JAC_INCREMENTAL >= 0.0, "must be >= 0"),
              ("JAC_PROBES", m.JAC_PROBES >= 1, "must be >= 1"),
              ("SPECTRAL_RADIUS_ITERS", m.SPECTRAL_RADIUS_ITERS >= 0, "must be >= 0"))
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{source}: MODEL.{key} = {m[key]!r} {why}")
