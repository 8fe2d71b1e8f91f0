"""Per-sample exit from the forward solve in evaluation: the stopping rules and the evaluation setting.

In evaluation an equilibrium model can stop each sample on its own: a sample that meets the rule
leaves the solve (:class:`~mdeq.solvers.SampleExit`), f is no longer evaluated on it, and its
output is the one the whole-batch solve with the same rule gives it. The rules (``TEST.EXIT_RULE``):

- ``'none'``: no per-sample exit: every sample stays in the solve until the last one stops
  (the residual tolerance ``MODEL.F_EPS`` freezes a sample, it does not leave);
- ``'residual'``: the relative (``MODEL.STOP_MODE``) residual under ``TEST.EXIT_TOL``;
- ``'prediction'``: the head's predicted class the same at ``TEST.EXIT_PATIENCE`` consecutive
  evaluations of f (or the residual under ``TEST.EXIT_TOL``);
- ``'margin'``: the head's softmax margin (top-1 minus top-2 probability) at least ``TEST.EXIT_MARGIN``
  (or the residual under ``TEST.EXIT_TOL``).

The two rules that read the head take its logits (b, classes) at the image f(z) the solve would
return at that point (the lowest-residual iterate's). :class:`ExitSetting` holds the rule, its
parameters and the evaluation budget ``TEST.F_THRES``; it is what ``tools/cls_valid.py --exit-sweep``
varies.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from ..config import CHOICES, RANGES, ConfigError
from ..solvers import ExitRule, FixedPointFnFactory, SampleExit

Tensor = torch.Tensor
#: the per-sample exit rules (TEST.EXIT_RULE)
EXIT_RULES = CHOICES["TEST.EXIT_RULE"]
#: the rules that read the head's logits
HEAD_RULES = ("prediction", "margin")
#: (b, D) images f(z) -> (b, classes) logits
LogitsFn = Callable[[Tensor], Tensor]


class PredictionRule:
    """Done when the predicted class is the same at ``patience`` consecutive evaluations.

    Its state is kept per row of the caller's batch of ``batch`` samples, so the same sample sees the
    same history whether it is solved in the whole batch or in what is left of it.
    """

    def __init__(self, logits: LogitsFn, patience: int, batch: int, device: torch.device) -> None:
        self.logits, self.patience = logits, int(patience)
        self.last = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)

    def __call__(self, fz: Tensor, rows: Tensor) -> Tensor:
        """(b, D) images and their (b,) rows -> (b,) bool: the class has held for ``patience`` evaluations."""
        pred = self.logits(fz).argmax(dim=1)
        count = torch.where(pred == self.last[rows], self.count[rows] + 1, torch.ones_like(pred))
        self.last[rows], self.count[rows] = pred, count
        return count >= self.patience


class MarginRule:
    """Done when the softmax probability of the top class exceeds the second's by ``margin`` or more."""

    def __init__(self, logits: LogitsFn, margin: float) -> None:
        self.logits, self.margin = logits, float(margin)

    def __call__(self, fz: Tensor, rows: Tensor) -> Tensor:
        """(b, D) images (rows unused: no state) -> (b,) bool."""
        top2 = torch.softmax(self.logits(fz).float(), dim=1).topk(2, dim=1).values
        return (top2[:, 0] - top2[:, 1]) >= self.margin


@dataclass(frozen=True)
class ExitSetting:
    """How an evaluation solve stops: the rule (:data:`EXIT_RULES`) and its parameters, and the budget.

    Attributes:
        rule: ``'none'``, ``'residual'``, ``'prediction'`` or ``'margin'`` (TEST.EXIT_RULE).
        tol: the residual tolerance of the rules other than ``'none'`` (TEST.EXIT_TOL), > 0.
        patience: ``'prediction'``: consecutive evaluations with one class (TEST.EXIT_PATIENCE), >= 2.
        margin: ``'margin'``: the softmax margin, in (0, 1] (TEST.EXIT_MARGIN).
        f_thres: the evaluation budget (TEST.F_THRES), 1 to 10,000; ``< 0``: the model's MODEL.F_THRES.
        leave: samples that meet the rule leave the solve (True), or stay frozen in the whole batch
            (False: the same results at the whole batch's cost, for comparison).
    """

    rule: str = "none"
    tol: float = 1e-3
    patience: int = 2
    margin: float = 0.9
    f_thres: int = -1
    leave: bool = True

    def __post_init__(self) -> None:
        # the config's own table of allowed values (mdeq.config.validation): one statement of each rule
        for key, value in (("TEST.EXIT_RULE", self.rule), ("TEST.EXIT_TOL", self.tol),
                           ("TEST.EXIT_PATIENCE", self.patience), ("TEST.EXIT_MARGIN", self.margin),
                           ("TEST.F_THRES", self.f_thres)):
            if key in CHOICES:
                if value not in CHOICES[key]:
                    raise ConfigError(f"{key} = {value!r}; choose one of {CHOICES[key]}")
            elif not _number(value) or not RANGES[key].contains(value):
                raise ConfigError(f"{key} = {value!r} is out of range: must be {RANGES[key].describe()}")
        for key, value in (("TEST.EXIT_PATIENCE", self.patience), ("TEST.F_THRES", self.f_thres)):
            if not float(value).is_integer():
                raise ConfigError(f"{key} = {value!r} must be a whole number")

    @classmethod
    def from_config(cls, cfg) -> "ExitSetting":
        """The setting of ``cfg.TEST`` (a ConfigError names a bad key and value)."""
        t = cfg.TEST
        return cls(t.EXIT_RULE, t.EXIT_TOL, t.EXIT_PATIENCE, t.EXIT_MARGIN, t.F_THRES)

    @classmethod
    def parse(cls, text: str, base: Optional["ExitSetting"] = None) -> "ExitSetting":
        """``RULE[:PARAM][@BUDGET]`` -> a setting, the other fields from ``base``: ``none@4`` (a fixed
        budget of 4), ``residual:0.01@10``, ``prediction:2@10``, ``margin:0.9@10``."""
        base = base or cls()
        m = re.fullmatch(r"\s*([a-z_]+)(?::([^@\s]+))?(?:@(\d+))?\s*", text)
        if not m or m.group(1) not in EXIT_RULES or (m.group(2) and m.group(1) == "none"):
            raise ConfigError(f"exit setting {text!r}: write RULE[:PARAM][@BUDGET], RULE one of {EXIT_RULES} "
                              "(PARAM: residual tolerance, prediction patience, margin; none takes none), "
                              "e.g. none@4, residual:0.01@10, prediction:2@10, margin:0.9@10")
        rule, param, budget = m.group(1), m.group(2), m.group(3)
        fields = dict(rule=rule, tol=base.tol, patience=base.patience, margin=base.margin,
                      f_thres=int(budget) if budget else base.f_thres)
        if param is not None:
            key = {"residual": "tol", "prediction": "patience", "margin": "margin"}[rule]
            try:
                fields[key] = int(param) if key == "patience" else float(param)
            except ValueError:
                raise ConfigError(f"exit setting {text!r}: {param!r} is not a number") from None
        return cls(**fields)

    @property
    def exits(self) -> bool:
        """Whether samples leave the solve (any rule but ``'none'``)."""
        return self.rule != "none"

    @property
    def reads_head(self) -> bool:
        """Whether the rule reads the head's logits."""
        return self.rule in HEAD_RULES

    def budget(self, default: int) -> int:
        """The evaluation budget: :attr:`f_thres`, or ``default`` (MODEL.F_THRES) when it is < 0."""
        return int(self.f_thres) if self.f_thres > 0 else int(default)

    def label(self) -> str:
        """The setting as :meth:`parse` reads it (budget ``@-1``: the model's)."""
        param = {"none": "", "residual": f":{self.tol:g}", "prediction": f":{self.patience}",
                 "margin": f":{self.margin:g}"}[self.rule]
        return f"{self.rule}{param}@{self.f_thres}"

    def config_items(self) -> Dict[str, Any]:
        """``{'TEST.F_THRES': ..., 'TEST.EXIT_RULE': ..., ...}``: the config keys that give this setting."""
        return {"TEST.F_THRES": self.f_thres, "TEST.EXIT_RULE": self.rule, "TEST.EXIT_TOL": self.tol,
                "TEST.EXIT_PATIENCE": self.patience, "TEST.EXIT_MARGIN": self.margin}

    def sample_exit(self, restrict: FixedPointFnFactory, logits: Optional[LogitsFn], batch: int,
                    device: torch.device) -> SampleExit:
        """The solver's :class:`~mdeq.solvers.SampleExit` for one solve of ``batch`` samples: ``restrict``
        (rows -> f on them) and this rule on ``logits`` ((b, D) -> (b, classes); needed by the head rules)."""
        if not self.exits:
            raise ValueError("ExitSetting(rule='none') has no per-sample exit")
        rule: Optional[ExitRule] = None
        if self.reads_head:
            if logits is None:
                raise ValueError(f"exit rule {self.rule!r} reads the head's class logits, and none were given")
            rule = (PredictionRule(logits, self.patience, batch, device) if self.rule == "prediction"
                    else MarginRule(logits, self.margin))
        return SampleExit(restrict=restrict if self.leave else None, rule=rule)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
