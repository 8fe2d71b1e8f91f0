"""What a config value may be: one table of numeric ranges and one of choices, checked at load time.

A setting out of its range does not fail where it is used: a threshold of 0 makes the solver stop
after one step and training runs on at chance accuracy, a batch size of 0 fails deep inside the
DataLoader. So :func:`validate_config` checks every numeric solver and training setting when the
config is loaded and raises :class:`ConfigError` naming the key, the value and what is allowed.

To give a new key a range, add one line to :data:`RANGES` (or :data:`CHOICES`); list-valued keys
are checked entry by entry. The names of things that a higher layer implements (solvers, optimisers,
learning-rate schedules) are not listed here: the layer that owns them hands its names to
:func:`register_choices` when it is imported, and the check asks it (a registered user solver is
then a valid ``MODEL.F_SOLVER``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from yacs.config import CfgNode as CN


class ConfigError(ValueError):
    """A config file or override that does not fit the defaults."""


@dataclass(frozen=True)
class Range:
    """An interval of allowed values, closed unless ``low_open`` / ``high_open``; ``None`` is unbounded.

    ``negative_means`` (e.g. ``"no limit"``) also accepts every value below 0 as that special meaning.
    """

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    negative_means: str = ""

    def contains(self, value: float) -> bool:
        """Whether ``value`` is allowed (NaN never is)."""
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.negative_means and value < 0:
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        """The range in words, e.g. ``'>= 1'``, ``'in [0, 1)'``, ``'>= 1 (or < 0: no limit)'``."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = "any number"
        return text + (f" (or < 0: {self.negative_means})" if self.negative_means else "")


def _num(x: float) -> str:
    """``1`` for 1.0, ``0.5`` for 0.5: ranges read as they are written in the table."""
    return str(int(x)) if float(x).is_integer() else repr(x)


AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, low_open=True)

#: numeric keys and their allowed values (list values: every entry). One line per key.
RANGES: Dict[str, Range] = {
    "WORKERS": AT_LEAST_0,
    "PERCENT": Range(0, 1, low_open=True),
    "PRINT_FREQ": AT_LEAST_1,
    "SEED": AT_LEAST_0,
    "MODEL.NUM_LAYERS": AT_LEAST_1,
    "MODEL.NUM_GROUPS": AT_LEAST_1,
    "MODEL.IN_CHANNELS": AT_LEAST_1,
    "MODEL.STEM_BLOCKS": AT_LEAST_0,
    "MODEL.STEM_CHANNELS": AT_LEAST_1,
    "MODEL.DROPOUT": Range(0, 1, high_open=True),
    "MODEL.NUM_CLASSES": AT_LEAST_1,
    # every solver step is an evaluation of f: 10,000 is 250x the original's largest budget (40), and
    # a budget such as 1e9 is a typo that would run for days without a word
    "MODEL.F_THRES": Range(1, 10000),
    "MODEL.B_THRES": Range(1, 10000),
    "MODEL.F_EPS": AT_LEAST_0,
    "MODEL.B_EPS": AT_LEAST_0,
    "MODEL.EXPANSION_FACTOR": AT_LEAST_1,
    "MODEL.IMAGE_SIZE": AT_LEAST_1,
    "MODEL.BN_MOMENTUM": Range(0, 1, negative_means="the original's momentum"),
    "MODEL.ANDERSON_BETA": POSITIVE,
    "MODEL.ANDERSON_LAM": AT_LEAST_0,
    "MODEL.REV_BETA": Range(0, 2, low_open=True, high_open=True),   # and not 1: check_reversible
    "MODEL.EXTRA.FINAL_CONV_KERNEL": AT_LEAST_1,
    "MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES": AT_LEAST_1,
    "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS": AT_LEAST_1,
    "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS": AT_LEAST_1,
    "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS": AT_LEAST_1,
    "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE": AT_LEAST_1,
    "LOSS.OHEMTHRES": Range(0, 1),
    "LOSS.OHEMKEEP": AT_LEAST_0,
    "LOSS.LABEL_SMOOTHING": Range(0, 1, high_open=True),
    "DATASET.VAL_SIZE": AT_LEAST_0,
    "DATASET.RANDOM_ERASING": Range(0, 1),
    "TRAIN.IMAGE_SIZE": AT_LEAST_1,
    "TRAIN.BASE_SIZE": AT_LEAST_1,
    "TRAIN.DOWNSAMPLERATE": AT_LEAST_1,
    "TRAIN.SCALE_FACTOR": AT_LEAST_0,
    "TRAIN.LR_FACTOR": POSITIVE,
    "TRAIN.LR_STEP": AT_LEAST_0,
    "TRAIN.LR": POSITIVE,
    "TRAIN.MOMENTUM": Range(0, 1, high_open=True),
    "TRAIN.WD": AT_LEAST_0,
    "TRAIN.PRETRAIN_STEPS": AT_LEAST_0,
    "TRAIN.SOFTPLUS_EPOCHS": AT_LEAST_0,
    "TRAIN.BEGIN_EPOCH": AT_LEAST_0,
    "TRAIN.END_EPOCH": AT_LEAST_1,
    "TRAIN.BATCH_SIZE_PER_GPU": AT_LEAST_1,
    "TRAIN.KEEP_CHECKPOINTS": AT_LEAST_0,
    "TRAIN.MAX_BAD_STEPS": AT_LEAST_1,
    "TRAIN.MAX_ITERS": Range(1, negative_means="no limit"),
    "TEST.BATCH_SIZE_PER_GPU": AT_LEAST_1,
    "TEST.SCALE_LIST": POSITIVE,
    "TEST.F_THRES": Range(1, 10000, negative_means="MODEL.F_THRES"),
    "TEST.EXIT_TOL": POSITIVE,
    "TEST.EXIT_PATIENCE": Range(2),
    "TEST.EXIT_MARGIN": Range(0, 1, low_open=True),
    "MODEL.PHANTOM_STEPS": AT_LEAST_1,
    "MODEL.PHANTOM_TAU": Range(0, 1, low_open=True),
    "MODEL.JAC_LOSS_WEIGHT": AT_LEAST_0,
    # MODEL.JAC_LOSS_FREQ: not a range, see check_jac_loss_freq
    "MODEL.JAC_INCREMENTAL": AT_LEAST_0,
    "MODEL.JAC_PROBES": AT_LEAST_1,
    "MODEL.SPECTRAL_RADIUS_ITERS": AT_LEAST_0,
    "MODEL.LIPSCHITZ.TARGET": Range(0, 1, low_open=True, high_open=True),
    "MODEL.LIPSCHITZ.RELU_SLOPE": Range(0, 1, low_open=True),
    "MODEL.LIPSCHITZ.ALPHA": Range(0, 1, low_open=True),
    "MODEL.LIPSCHITZ.BETA": Range(0, 1),
    "MODEL.LIPSCHITZ.GN_GAMMA_MAX": POSITIVE,
    "MODEL.LIPSCHITZ.POWER_ITERS": AT_LEAST_1,
    "MODEL.LIPSCHITZ.CERT_ITERS": AT_LEAST_1,
    "MODEL.LIPSCHITZ.CAP_MARGIN": AT_LEAST_0,
    "MODEL.LIPSCHITZ.EMPIRICAL_ITERS": AT_LEAST_0,
    "MODEL.RESNET.DEPTH": Range(8),
    "MODEL.RESNET.WIDTHS": AT_LEAST_1,
}

#: string keys and their allowed values. One line per key.
CHOICES: Dict[str, Tuple[Any, ...]] = {
    "MODEL.STOP_MODE": ("abs", "rel"),
    "MODEL.STATE_LAYOUT": ("nchw", "channels_last"),
    "MODEL.GRAD": ("implicit", "phantom", "jfb", "reversible"),
    "MODEL.DOWNSAMPLE_TIMES": (0, 1, 2),
    "TEST.EXIT_RULE": ("none", "residual", "prediction", "margin"),
    # the original's architecture keys: only what this implementation builds
    "MODEL.EXTRA.FULL_STAGE.NUM_MODULES": (1,),
    "MODEL.EXTRA.FULL_STAGE.BLOCK": ("BASIC",),
    "MODEL.EXTRA.FULL_STAGE.FUSE_METHOD": ("SUM",),
}

#: keys whose allowed values a higher layer owns (``MODEL.F_SOLVER``: :mod:`mdeq.solvers`'s registry,
#: ``TRAIN.OPTIMIZER``: :mod:`mdeq.utils.optim`, ``MODEL.NAME``: :mod:`mdeq.models.registry`), each with
#: the function that lists them now
REGISTERED_CHOICES: Dict[str, Callable[[], Iterable[str]]] = {}


def register_choices(key: str, names: Callable[[], Iterable[str]]) -> None:
    """Let ``names()`` decide the allowed values of ``key`` (a default key, e.g. ``'MODEL.F_SOLVER'``).

    The owner of the names calls this when it is imported; until then the key is not checked at load
    time, and the owner's own look-up (e.g. :func:`mdeq.solvers.get_solver` when the model is built)
    names the key and the choices instead.
    """
    REGISTERED_CHOICES[key] = names


def choices(key: str) -> Tuple[Any, ...]:
    """The allowed values of ``key``: its :data:`CHOICES` entry or its registered names (``()``: any)."""
    if key in REGISTERED_CHOICES:
        return tuple(REGISTERED_CHOICES[key]())
    return CHOICES.get(key, ())


def _lookup(cfg: CN, full_key: str) -> Any:
    """The value of a dotted key (every key of the tables is a default: tests/test_user_errors.py)."""
    node: Any = cfg
    for part in full_key.split("."):
        node = node[part]
    return node


def check_ranges(cfg: CN, source: str) -> None:
    """Every key of :data:`RANGES`, :data:`CHOICES` and :data:`REGISTERED_CHOICES` holds an allowed value in ``cfg``.

    Raises:
        ConfigError: ``<source>: <KEY> = <value> is out of range: must be <range>`` (or ``choose one of``).
    """
    for key, allowed in RANGES.items():
        value = _lookup(cfg, key)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if not allowed.contains(v):
                where = f" (entry {v!r})" if isinstance(value, (list, tuple)) else ""
                raise ConfigError(f"{source}: {key} = {value!r}{where} is out of range: must be {allowed.describe()}")
    for key in (*CHOICES, *REGISTERED_CHOICES):
        value, allowed = _lookup(cfg, key), choices(key)
        if value not in allowed:
            raise ConfigError(f"{source}: {key} = {value!r}; choose one of {allowed}")


def check_jac_loss_freq(freq: float, source: str = "") -> None:
    """The rule of ``MODEL.JAC_LOSS_FREQ`` (its one statement; the Jacobian regulariser asks it too):
    a probability in (0, 1) (the fraction of steps) or a whole period >= 1 (every freq-th step).

    Raises:
        ConfigError: ``[<source>: ]MODEL.JAC_LOSS_FREQ = <freq> must be ...``.
    """
    if not (0.0 < freq < 1.0 or (freq >= 1.0 and float(freq).is_integer())):
        raise ConfigError(f"{source + ': ' if source else ''}MODEL.JAC_LOSS_FREQ = {freq!r} must be a probability "
                          f"in (0, 1) or a whole period >= 1 (apply the Jacobian loss every JAC_LOSS_FREQ-th step)")


def check_reversible(cfg: CN, source: str) -> None:
    """``MODEL.GRAD reversible`` runs the reversible solver's steps backwards: it needs ``MODEL.F_SOLVER
    reversible``; and that solver's ``MODEL.REV_BETA`` must not be 1 (its inverse divides by 1 - beta).

    Raises:
        ConfigError: ``<source>: MODEL.GRAD = 'reversible' needs ...`` / ``MODEL.REV_BETA = 1.0 ...``.
    """
    m = cfg.MODEL
    if m.GRAD == "reversible" and m.F_SOLVER != "reversible":
        raise ConfigError(f"{source}: MODEL.GRAD = 'reversible' needs MODEL.F_SOLVER = 'reversible' (got "
                          f"{m.F_SOLVER!r}): only the reversible solver's coupled steps can be run backwards")
    if "reversible" in (m.F_SOLVER, m.B_SOLVER) and m.REV_BETA == 1.0:
        raise ConfigError(f"{source}: MODEL.REV_BETA = 1.0: the reversible solver's beta must lie in (0, 2) and "
                          "differ from 1 (its inverse divides by 1 - beta)")


def apriori_steps(lipschitz: float, tol: float) -> int:
    """ceil(log(tol) / log(L)): the plain-iteration steps after which ||z_k - z*|| <= tol ||z_0 - z*|| for an
    L-contraction (at least 1). The one statement of the rule (MODEL.LIPSCHITZ.APRIORI_STEPS)."""
    if not 0 < lipschitz < 1:
        raise ValueError(f"the Lipschitz constant {lipschitz} must lie in (0, 1)")
    if not 0 < tol < 1:
        raise ValueError(f"the tolerance {tol} must lie in (0, 1)")
    return max(1, math.ceil(math.log(tol) / math.log(lipschitz)))


def check_lipschitz(cfg: CN, source: str) -> None:
    """``MODEL.LIPSCHITZ.ENABLED``: no dropout in f (its 1 / (1 - p) scales the bound); with ``APRIORI_STEPS``
    the solvers that the count holds for (fixed_point, anderson) and tolerances in (0, 1).

    Raises:
        ConfigError: naming the key, its value and the rule.
    """
    m, lip = cfg.MODEL, cfg.MODEL.LIPSCHITZ
    if not lip.ENABLED:
        return
    if m.DROPOUT > 0:
        raise ConfigError(f"{source}: MODEL.DROPOUT = {m.DROPOUT} with MODEL.LIPSCHITZ.ENABLED: the contractive f has "
                          "no dropout (its 1 / (1 - p) would scale the certified bound); set it to 0")
    if lip.APRIORI_STEPS:
        for key in ("F_SOLVER", "B_SOLVER"):
            if m[key] not in ("fixed_point", "anderson"):
                raise ConfigError(f"{source}: MODEL.{key} = {m[key]!r} with MODEL.LIPSCHITZ.APRIORI_STEPS: the "
                                  "a-priori step count is for plain iteration ('fixed_point') or 'anderson'")
        for key in ("F_EPS", "B_EPS"):
            if not 0 < m[key] < 1:
                raise ConfigError(f"{source}: MODEL.{key} = {m[key]!r} with MODEL.LIPSCHITZ.APRIORI_STEPS: the "
                                  "tolerance of the a-priori step count must lie in (0, 1)")
            steps = apriori_steps(lip.TARGET, m[key])
            if steps > RANGES["MODEL.F_THRES"].high:
                raise ConfigError(f"{source}: MODEL.{key} = {m[key]!r} and MODEL.LIPSCHITZ.TARGET = {lip.TARGET} give "
                                  f"{steps} a-priori steps, more than {_num(RANGES['MODEL.F_THRES'].high)}")


def validate_config(cfg: CN, source: str) -> None:
    """Ranges and choices (:func:`check_ranges`), then the checks across keys that they cannot make."""
    check_ranges(cfg, source)
    stage = cfg.MODEL.EXTRA.FULL_STAGE
    nb = stage.NUM_BRANCHES
    for key in ("NUM_BLOCKS", "NUM_CHANNELS"):
        if len(stage[key]) != nb:
            raise ConfigError(
                f"{source}: MODEL.EXTRA.FULL_STAGE.{key} has {len(stage[key])} entries {list(stage[key])} "
                f"but NUM_BRANCHES is {nb}")
    for c in stage.NUM_CHANNELS:
        if c % cfg.MODEL.NUM_GROUPS:
            raise ConfigError(f"{source}: NUM_CHANNELS entry {c} is not divisible by MODEL.NUM_GROUPS = "
                              f"{cfg.MODEL.NUM_GROUPS}")
    resnet = cfg.MODEL.RESNET
    if (resnet.DEPTH - 2) % 6 or len(resnet.WIDTHS) != 3:
        raise ConfigError(f"{source}: MODEL.RESNET.DEPTH = {resnet.DEPTH} must be 6n + 2 (8, 14, 20, 32, ...) and "
                          f"MODEL.RESNET.WIDTHS = {list(resnet.WIDTHS)} must have 3 entries (one per stage)")
    check_jac_loss_freq(cfg.MODEL.JAC_LOSS_FREQ, source)
    check_reversible(cfg, source)
    check_lipschitz(cfg, source)
    if cfg.TRAIN.END_EPOCH <= cfg.TRAIN.BEGIN_EPOCH:
        raise ConfigError(f"{source}: TRAIN.END_EPOCH = {cfg.TRAIN.END_EPOCH} must be greater than "
                          f"TRAIN.BEGIN_EPOCH = {cfg.TRAIN.BEGIN_EPOCH}")
