"""Loading experiment files with errors that name the key, the value and the file."""
from __future__ import annotations

import ast
import difflib
import logging
import os
from typing import Any, Iterable, List, Sequence, Set, Tuple

import yaml
from yacs.config import CfgNode as CN

from .default import get_default_config
from .original import IGNORED, RENAMED, apply_renamed, describe, split_ignored
from .validation import ConfigError, validate_config

__all__ = ["ConfigError", "load_config", "merge_opts", "validate_config"]

logger = logging.getLogger(__name__)

# (source, keys) already warned about in this process: a tool may load its config twice
_WARNED: Set[Tuple[str, Tuple[str, ...]]] = set()


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
    hint = ""
    if isinstance(old, bool) and isinstance(new, str) and new.lower() in _YAML_BOOLS:
        # yaml writes false / true; the command line's values are Python literals
        hint = f" (on the command line write {_YAML_BOOLS[new.lower()]}, as Python does, not {new})"
    raise ConfigError(
        f"{source}: wrong type for config key {full_key}: got {new!r} ({type(new).__name__}), "
        f"expected {type(old).__name__} like the default {old!r}{hint}"
    )


_YAML_BOOLS = {"true": "True", "false": "False", "yes": "True", "no": "False", "on": "True", "off": "False"}


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


def merge_opts(cfg: CN, opts: Sequence[Any], source: str = "command line") -> List[str]:
    """Apply ``KEY VALUE`` pairs (e.g. ``['MODEL.DROPOUT', 0.0]``) to a mutable config.

    Returns the keys of the original MDEQ that this implementation ignores (:mod:`.original`),
    which are accepted and not applied, and those it names otherwise (applied under their new name).
    """
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"{source}: overrides come as KEY VALUE pairs; got an odd list {opts!r}")
    ignored: List[str] = []
    for full_key, value in zip(opts[0::2], map(_decode, opts[1::2])):
        if str(full_key) in IGNORED:
            ignored.append(str(full_key))
            continue
        if str(full_key) in RENAMED:
            ignored.append(str(full_key))
            full_key = RENAMED[str(full_key)]
        node = cfg
        parts = str(full_key).split(".")
        walked = []
        for part in parts[:-1]:
            walked.append(part)
            if part not in node or not isinstance(node[part], CN):
                raise ConfigError(f"{source}: unknown config key {full_key} = {value!r} (no section {'.'.join(walked)})")
            node = node[part]
        _merge(node, {parts[-1]: value}, source, ".".join(parts[:-1]) + "." if len(parts) > 1 else "")
    return ignored


def _warn_ignored(keys: List[str], source: str) -> None:
    """One warning naming every ignored or renamed key of the original (once per process, on rank 0 only)."""
    seen = tuple(dict.fromkeys(keys))
    if not seen or (source, seen) in _WARNED or os.environ.get("RANK", "0") not in ("", "0"):
        return
    _WARNED.add((source, seen))
    logger.warning("%s: keys of the original MDEQ configuration that this implementation ignores "
                   "(accepted, no effect) or names otherwise: %s", source, describe(list(seen)))


def load_config(path: str | os.PathLike | None = None, opts: Iterable[Any] = ()) -> CN:
    """Defaults, then the yaml file at ``path``, then the ``KEY VALUE`` overrides; returns a frozen CfgNode.

    Keys of the original MDEQ that this implementation ignores are accepted with one warning that
    names them all; the values are then checked against their ranges (:mod:`.validation`).

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: the file is a folder or empty; an unknown key, a value of the wrong type or out of its range, or unparsable
            yaml; the message names the key, the value and the file.
    """
    opts = list(opts)
    cfg = get_default_config()
    ignored: List[str] = []
    if path is not None:
        path = os.fspath(path)
        if os.path.isdir(path):
            inside = sorted(f for f in os.listdir(path) if f.endswith((".yaml", ".yml")))[:3]
            raise ConfigError(f"config file {path} is a folder: give one yaml file"
                              + (f" in it ({', '.join(inside)} ...)" if inside else " (experiments/<dataset>/*.yaml)"))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path} (experiment files live under experiments/)")
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid yaml: {e}") from e
        if data is None:   # would silently mean "all defaults", which no experiment is
            raise ConfigError(f"{path} is empty (no config keys): give an experiment file, e.g. "
                              f"experiments/digits/cls_mdeq_digits.yaml")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
        ignored = apply_renamed(data, path)
        data, dropped = split_ignored(data)
        ignored += dropped
        _merge(cfg, data, path)
    ignored += merge_opts(cfg, opts)
    source = path or "defaults"
    validate_config(cfg, f"{source} + command line" if opts else source)
    _warn_ignored(ignored, source)
    cfg.freeze()
    return cfg
