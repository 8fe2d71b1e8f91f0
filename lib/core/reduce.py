"""Sums over a distributed loop, reduced once: what the held-out evaluations of every task and the
training epoch (:mod:`mdeq.core.trainer`) report.

Each process adds, batch by batch, named **sums** (a number or a tensor: a loss summed over the
batch, correct predictions, images, a confusion matrix) and **weighted means** (``{name: float}``,
e.g. a batch's solver statistics, weighted by its images). :meth:`Reducer.reduce` sums them all
over the processes in one ``all_reduce`` and gives :class:`Totals`: the sums, the means (of the
names some batch reported) and ratios of sums.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..utils.distributed import all_reduce_sum

Number = Union[int, float]


@dataclass
class Totals:
    """The reduced sums (tensors keep their shape and dtype) and weighted means of a :class:`Reducer`."""

    sums: Dict[str, Union[float, torch.Tensor]]
    means: Dict[str, float]    # only the names that some batch, on some process, reported
    #: each mean's (weighted sum, total weight), so that a later part of the same loop can go on from them
    parts: Dict[str, Tuple[float, float]] = field(default_factory=dict)

    def state(self) -> Dict[str, Any]:
        """The totals as plain numbers (for a checkpoint); :meth:`Reducer.carry` goes on from them."""
        return {"sums": {k: v if isinstance(v, torch.Tensor) else float(v) for k, v in self.sums.items()},
                "means": {k: [float(s), float(w)] for k, (s, w) in self.parts.items()}}

    def ratio(self, numerator: str, denominator: str, scale: float = 1.0, empty: float = float("nan")) -> float:
        """``scale * sums[numerator] / sums[denominator]``, or ``empty`` when the denominator is 0."""
        den = float(self.sums[denominator])
        return scale * float(self.sums[numerator]) / den if den else empty


class Reducer:
    """Named sums and weighted means, accumulated per batch and summed over the processes once.

    Args:
        sums: names of number sums that start at 0 (so that a process without batches reduces them too).
        means: the names whose weighted means are kept; other names given to :meth:`add` are ignored
            (so that every process reduces the same vector, whatever each one's batches reported).

    Every process must add the same sum names, and tensors of the same shapes (the vector reduced
    is built from them in name order).
    """

    def __init__(self, sums: Sequence[str] = (), means: Sequence[str] = ()) -> None:
        self.mean_names: Tuple[str, ...] = tuple(means)
        self.sums: Dict[str, Union[float, torch.Tensor]] = {k: 0.0 for k in sums}
        self._means: Dict[str, Tuple[float, float]] = {k: (0.0, 0.0) for k in self.mean_names}

    def add(self, sums: Optional[Mapping[str, Union[Number, torch.Tensor]]] = None,
            means: Optional[Mapping[str, Optional[Number]]] = None, weight: float = 1.0) -> None:
        """Add a batch: ``sums`` to the running sums; each value of ``means`` (None: not reported)
        with ``weight`` (e.g. the batch's images) to its weighted mean."""
        for k, v in (sums or {}).items():
            if isinstance(v, torch.Tensor):
                v = v.detach()
                self.sums[k] = v.clone() if k not in self.sums else self.sums[k] + v
            else:
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
        for k, v in (means or {}).items():
            if k in self._means and v is not None:
                s, w = self._means[k]
                self._means[k] = (s + float(v) * weight, w + weight)

    def carry(self, state: Mapping[str, Any]) -> None:
        """Go on from the totals of an earlier part of the same loop (:meth:`Totals.state`, e.g. those of
        an interrupted epoch): on one process only, as they already hold every process's part."""
        self.add(state.get("sums"))
        for k, (s, w) in (state.get("means") or {}).items():
            if k in self._means:
                s0, w0 = self._means[k]
                self._means[k] = (s0 + float(s), w0 + float(w))

    def reduce(self, device: Union[torch.device, str] = "cpu") -> Totals:
        """The sums and means over every process (one collective; every process must call it)."""
        names = sorted(self.sums)
        parts = [torch.as_tensor(self.sums[k], dtype=torch.float64).reshape(-1).to(device) for k in names]
        parts += [torch.tensor(self._means[k], dtype=torch.float64, device=device) for k in self.mean_names]
        flat = all_reduce_sum(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.float64)
        flat = flat.cpu()
        sums: Dict[str, Union[float, torch.Tensor]] = {}
        at = 0
        for k in names:
            own = self.sums[k]
            if isinstance(own, torch.Tensor):
                n = own.numel()
                part = flat[at:at + n].reshape(own.shape)
                sums[k] = (part.round() if not own.is_floating_point() else part).to(own.dtype)
            else:
                n = 1
                sums[k] = float(flat[at])
            at += n
        means, parts = {}, {}
        for k in self.mean_names:
            s, w = float(flat[at]), float(flat[at + 1])
            at += 2
            if w:
                means[k], parts[k] = s / w, (s, w)
        return Totals(sums, means, parts)
