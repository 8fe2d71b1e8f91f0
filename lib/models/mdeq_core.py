"""The multiscale equilibrium core shared by the classification and segmentation nets.

f_theta(z; x) acts on a list of states z = [z_1, ..., z_n], z_i of shape (N, C_i, H/2^(i-1), W/2^(i-1)):

1. per resolution, a residual block: conv3x3 to ``EXPANSION_FACTOR`` x width, GroupNorm, ReLU,
   conv3x3 back, variational dropout, + input injection (highest resolution only), GroupNorm,
   + residual, ReLU, GroupNorm;
2. simultaneous multiscale fusion: each stream i sums every stream j, brought to its size by a
   chain of stride-2 conv3x3 (j finer than i) or a conv1x1 + nearest upsampling (j coarser),
   then ReLU, conv1x1, GroupNorm.

Module and parameter names follow the original implementation so that its state dicts load.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules import (VariationalDropout2d, attach_implicit_backward, attach_phantom_backward, conv2d,
                       hutchinson_jac_loss, spectral_radius, weights_fixed)
from ..solvers import SolverFn, SolverWorkspace, get_solver, option_names, resolve_solver, solver_options

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

#: what ``model(x, mode=...)`` computes: the equilibrium by the solvers (implicit backward), or the
#: warm-up's ``depth`` weight-tied applications of f from z = 0 (ordinary backprop)
MODES = ("equilibrium", "unrolled")
#: a solver by name ('broyden', 'anderson', 'fixed_point') or as a callable; a pair is (forward, backward)
SolverChoice = Union[str, SolverFn, Tuple[Union[str, SolverFn], Union[str, SolverFn]]]


class Activation(nn.Module):
    """ReLU, or softplus while the softplus warm-up is on (see :meth:`MDEQNet.set_softplus`)."""

    def __init__(self) -> None:
        super().__init__()
        self.softplus = False

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x) if self.softplus else F.relu(x)


class ResidualBlock(nn.Module):
    """The per-resolution block of f_theta (Figure 2 of the paper). (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, channels: int, expansion: int, num_groups: int, dropout: float, wnorm: bool) -> None:
        super().__init__()
        hidden = expansion * channels
        self.conv1 = conv2d(channels, hidden, 3, wnorm=wnorm)
        self.gn1 = nn.GroupNorm(num_groups, hidden)
        self.relu = Activation()
        self.conv2 = conv2d(hidden, channels, 3, wnorm=wnorm)
        self.gn2 = nn.GroupNorm(num_groups, channels)
        self.gn3 = nn.GroupNorm(num_groups, channels)
        self.relu3 = Activation()
        self.drop = VariationalDropout2d(dropout)

    def forward(self, x: Tensor, injection: Optional[Tensor] = None) -> Tensor:
        out = self.relu(self.gn1(self.conv1(x)))
        out = self.drop(self.conv2(out))
        if injection is not None:
            out = out + injection
        out = self.gn2(out) + x
        return self.gn3(self.relu3(out))


class BranchNet(nn.Module):
    """The residual blocks of one resolution stream; the injection enters the first block."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, injection: Optional[Tensor] = None) -> Tensor:
        y = self.blocks[0](x, injection)
        for block in self.blocks[1:]:
            y = block(y)
        return y


class DownsampleModule(nn.Module):
    """Stream j -> coarser stream i: (i - j) stride-2 conv3x3 + GroupNorm, ReLU between them."""

    def __init__(self, channels: Sequence[int], in_res: int, out_res: int, num_groups: int) -> None:
        super().__init__()
        steps = out_res - in_res
        layers = []
        for k in range(steps):
            last = k == steps - 1
            out_c = channels[out_res] if last else channels[in_res]
            parts = [("conv", nn.Conv2d(channels[in_res], out_c, 3, stride=2, padding=1, bias=False)),
                     ("gnorm", nn.GroupNorm(num_groups, out_c))]
            if not last:
                parts.append(("relu", Activation()))
            layers.append(nn.Sequential(OrderedDict(parts)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, size: Tuple[int, int]) -> Tensor:
        return self.net(x)


class UpsampleModule(nn.Module):
    """Stream j -> finer stream i: conv1x1 + GroupNorm, then nearest upsampling to stream i's size."""

    def __init__(self, channels: Sequence[int], in_res: int, out_res: int, num_groups: int) -> None:
        super().__init__()
        self.net = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(channels[in_res], channels[out_res], 1, bias=False)),
            ("gnorm", nn.GroupNorm(num_groups, channels[out_res])),
        ]))

    def forward(self, x: Tensor, size: Tuple[int, int]) -> Tensor:
        return F.interpolate(self.net(x), size=size, mode="nearest")


class MDEQModule(nn.Module):
    """f_theta: per-resolution residual blocks, then multiscale fusion.

    ``forward(z, injection)`` maps a list of n states [(N, C_i, H_i, W_i)] to a list of the same
    shapes; ``injection`` (N, C_1, H_1, W_1) enters the highest resolution only.
    """

    def __init__(self, channels: Sequence[int], num_blocks: Sequence[int], expansion: int, num_groups: int,
                 dropout: float, wnorm: bool) -> None:
        super().__init__()
        if len(channels) != len(num_blocks):
            raise ValueError(f"NUM_CHANNELS {list(channels)} and NUM_BLOCKS {list(num_blocks)} differ in length")
        self.num_branches = n = len(channels)
        self.channels = list(channels)
        self.branches = nn.ModuleList(
            BranchNet([ResidualBlock(c, expansion, num_groups, dropout, wnorm) for _ in range(nb)])
            for c, nb in zip(channels, num_blocks))
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(None if i == j else
                          (UpsampleModule if j > i else DownsampleModule)(channels, j, i, num_groups)
                          for j in range(n))
            for i in range(n)) if n > 1 else None
        self.post_fuse_layers = nn.ModuleList(nn.Sequential(OrderedDict([
            ("relu", Activation()),
            ("conv", conv2d(c, c, 1, wnorm=wnorm)),
            ("gnorm", nn.GroupNorm(num_groups // 2, c)),
        ])) for c in channels)

    def reset_dropout(self, states: Sequence[Tensor]) -> None:
        """Draw new variational-dropout masks (one per solve) for states shaped like ``states``."""
        for branch, z in zip(self.branches, states):
            for block in branch.blocks:
                block.drop.reset_mask(z)

    def forward(self, z: Sequence[Tensor], injection: Tensor) -> List[Tensor]:
        blocks = [branch(zi, injection if i == 0 else None) for i, (branch, zi) in enumerate(zip(self.branches, z))]
        if self.num_branches == 1:
            return blocks
        fused = []
        for i in range(self.num_branches):
            size = blocks[i].shape[-2:]
            y = blocks[i]
            for j in range(self.num_branches):
                if j != i:
                    y = y + self.fuse_layers[i][j](blocks[j], size)
            fused.append(self.post_fuse_layers[i](y))
        return fused


@dataclass
class EquilibriumProblem:
    """z = f(z) on flattened states: ``f`` maps (B, D) -> (B, D), ``z0`` is the start, and
    ``unflatten`` turns (B, D) back into the list of per-resolution states (N, C_i, H_i, W_i).

    With ``channels_last`` (MODEL.STATE_LAYOUT) each stream's block of z holds its state in
    (H, W, C) order, so that the unflattened states are channels-last views (no copies) and the
    convolutions run on that layout; the solvers do not care about the order of the D entries.
    """

    f: Callable[[Tensor], Tensor]
    z0: Tensor
    shapes: List[Tuple[int, ...]]
    channels_last: bool = False

    def unflatten(self, z: Tensor) -> List[Tensor]:
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        parts = z.split(sizes, dim=1)
        if self.channels_last:
            return [part.reshape(z.shape[0], h, w, c).permute(0, 3, 1, 2) for part, (c, h, w) in zip(parts, self.shapes)]
        return [part.reshape(z.shape[0], *s) for part, s in zip(parts, self.shapes)]

    def flatten(self, states: Sequence[Tensor]) -> Tensor:
        if self.channels_last:
            return torch.cat([s.permute(0, 2, 3, 1).flatten(1) for s in states], dim=1)
        return torch.cat([s.flatten(1) for s in states], dim=1)


def _bn_momentum(cfg, default: float) -> float:
    return cfg.MODEL.BN_MOMENTUM if cfg.MODEL.BN_MOMENTUM >= 0 else default


class MDEQNet(nn.Module):
    """Stem (``downsample``, ``stage0``) and the equilibrium stage (``fullstage`` = f_theta).

    Subclasses add the :meth:`head`; ``forward`` is the same for every task.
    """

    #: the original release's names of ``fullstage`` (it stores f_theta four times): ``deq.func`` is
    #: ``fullstage``, the two copies carry nothing new (read by mdeq.utils.checkpoint.load_weights)
    state_dict_aliases = {"fullstage_copy.": None, "deq.func_copy.": None, "deq.func.": "fullstage."}

    def __init__(self, cfg, bn_momentum: float = 0.1) -> None:
        super().__init__()
        stage = cfg.MODEL.EXTRA.FULL_STAGE
        m = cfg.MODEL
        self.num_branches = stage.NUM_BRANCHES
        self.num_channels = list(stage.NUM_CHANNELS)
        self.num_layers = m.NUM_LAYERS
        self.downsample_times = m.DOWNSAMPLE_TIMES
        # only for the original's call model(x, train_step=k) (see resolve_mode): the trainer picks the mode
        self.pretrain_steps = cfg.TRAIN.PRETRAIN_STEPS
        self.f_thres, self.b_thres = m.F_THRES, m.B_THRES
        self.f_solver = get_solver(m.F_SOLVER, "MODEL.F_SOLVER")
        self.b_solver = get_solver(m.B_SOLVER, "MODEL.B_SOLVER")
        self.solver_workspace = SolverWorkspace()   # the solvers' scratch memory, reused between calls
        # the settings of every solver, per direction; a solve passes its solver only what it takes
        common = dict(stop_mode=m.STOP_MODE, memory=m.SOLVER_MEMORY, beta=m.ANDERSON_BETA, lam=m.ANDERSON_LAM,
                      workspace=self.solver_workspace)
        self.solver_settings: Dict[str, Dict] = {"f": dict(common, eps=m.F_EPS), "b": dict(common, eps=m.B_EPS)}
        self.solver_stats: Dict = {}
        self.grad_mode, self.phantom_steps, self.phantom_tau = m.GRAD, m.PHANTOM_STEPS, m.PHANTOM_TAU
        self.jac_probes, self.spectral_radius_iters = m.JAC_PROBES, m.SPECTRAL_RADIUS_ITERS
        self.jac_loss: Optional[Tensor] = None  # the last forward's JR term (with graph), see equilibrium_states
        self.state_layout = m.STATE_LAYOUT
        momentum = _bn_momentum(cfg, bn_momentum)
        c0 = self.num_channels[0]
        self.downsample = nn.Sequential(
            nn.Conv2d(m.IN_CHANNELS, c0, 3, stride=2 if self.downsample_times >= 1 else 1, padding=1, bias=False),
            nn.BatchNorm2d(c0, momentum=momentum),
            nn.ReLU(inplace=True),
            nn.Conv2d(c0, c0, 3, stride=2 if self.downsample_times >= 2 else 1, padding=1, bias=False),
            nn.BatchNorm2d(c0, momentum=momentum),
            nn.ReLU(inplace=True),
        )
        # as in the original: with no downsampling and at most 2 streams the stem is the injection
        if self.downsample_times == 0 and self.num_branches <= 2:
            self.stage0 = None
        else:
            self.stage0 = nn.Sequential(nn.Conv2d(c0, c0, 1, bias=False), nn.BatchNorm2d(c0, momentum=momentum),
                                        nn.ReLU())
        self.fullstage = MDEQModule(self.num_channels, stage.NUM_BLOCKS, m.EXPANSION_FACTOR, m.NUM_GROUPS,
                                    m.DROPOUT, m.WNORM)
        self.compiled = bool(m.COMPILE)
        if self.compiled:
            # f runs T_f + T_b + 1 times per step: on a GPU a small f is bound by kernel launches, which
            # fusion cuts. Compiled in place (nn.Module.compile), so state dicts keep their names.
            self.fullstage.compile()
            # the adjoint solve takes its VJPs through one retained graph of f (retain_graph=True),
            # which a compiled backward that reuses ("donates") its saved buffers refuses; a process-wide
            # setting, read when a graph is compiled and when its backward runs
            torch._functorch.config.donated_buffer = False

    # ------------------------------------------------------------------ configuration
    def set_softplus(self, flag: bool) -> None:
        """Use softplus instead of ReLU inside f_theta (the paper's alternative warm-up)."""
        for mod in self.fullstage.modules():
            if isinstance(mod, Activation):
                mod.softplus = bool(flag)

    def init_weights(self) -> None:
        """N(0, 0.01) for every convolution (weight-normed ones get g = ||v||), BN to (1, 0)."""
        from ..modules import WeightNormConv2d
        for mod in self.modules():
            if isinstance(mod, WeightNormConv2d):
                nn.init.normal_(mod.weight_v, 0.0, 0.01)
                mod.reset_g()
            elif isinstance(mod, nn.Conv2d):
                nn.init.normal_(mod.weight, 0.0, 0.01)
                if mod.bias is not None:
                    nn.init.normal_(mod.bias, 0.0, 0.01)
            elif isinstance(mod, nn.BatchNorm2d) and mod.weight is not None:
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def solver_kwargs(self, direction: str, solver: Optional[SolverFn] = None, **overrides) -> Dict:
        """The options of the forward (``direction='f'``) or backward (``'b'``) solve for ``solver``
        (default: the configured one): the model's settings that this solver takes, then
        ``overrides`` (e.g. ``eps=0.0``). An override the solver does not take is a ValueError."""
        if direction not in self.solver_settings:
            raise ValueError(f"solver direction must be 'f' or 'b', got {direction!r}")
        solver = (self.f_solver if direction == "f" else self.b_solver) if solver is None else solver
        names = option_names(solver)
        unknown = sorted(k for k in overrides if k not in names)
        if unknown:
            raise ValueError(f"solver option(s) {unknown} not taken by {getattr(solver, '__name__', solver)!r} "
                             f"(it takes {list(names)})")
        return {**solver_options(solver, self.solver_settings[direction]), **overrides}

    @property
    def f_solver_kwargs(self) -> Dict:
        """The configured forward solver's options (see :meth:`solver_kwargs`)."""
        return self.solver_kwargs("f")

    @property
    def b_solver_kwargs(self) -> Dict:
        """The configured backward solver's options (see :meth:`solver_kwargs`)."""
        return self.solver_kwargs("b")

    def resolve_mode(self, mode: Optional[str] = None, train_step: Optional[int] = None) -> str:
        """``mode`` ('equilibrium' or 'unrolled'), or the original's rule for ``train_step``:
        unrolled for ``0 <= train_step < TRAIN.PRETRAIN_STEPS``, else equilibrium (the default)."""
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
            if train_step is not None:
                raise ValueError(f"give mode ({mode!r}) or train_step ({train_step}), not both")
            return mode
        if train_step is not None and 0 <= train_step < self.pretrain_steps:
            return "unrolled"
        return "equilibrium"

    def call_solvers(self, solver: Optional[SolverChoice] = None) -> Tuple[SolverFn, SolverFn]:
        """(forward, backward) solvers of one call: the configured ones, or the override ``solver``."""
        if solver is None:
            return self.f_solver, self.b_solver
        if isinstance(solver, tuple):
            if len(solver) != 2:
                raise ValueError(f"solver: a pair (forward, backward) expected, got {len(solver)} entries")
            return resolve_solver(solver[0]), resolve_solver(solver[1])
        return resolve_solver(solver), resolve_solver(solver)

    # ------------------------------------------------------------------ forward
    def injection(self, x: Tensor) -> Tensor:
        """The input injection (N, C_1, H_1, W_1) for images x (N, 3, H, W)."""
        x = self.downsample(x)
        return self.stage0(x) if self.stage0 is not None else x

    def state_shapes(self, inj: Tensor) -> List[Tuple[int, ...]]:
        """Per-stream (C_i, H_i, W_i): each stream halves the previous one (rounding up, as a stride-2 conv)."""
        _, _, h, w = inj.shape
        shapes = []
        for c in self.num_channels:
            shapes.append((c, h, w))
            h, w = (h + 1) // 2, (w + 1) // 2
        return shapes

    def equilibrium_problem(self, inj: Tensor) -> EquilibriumProblem:
        """z = f(z; x) on flattened states for the injection ``inj``; draws new dropout masks."""
        shapes = self.state_shapes(inj)
        # solvers work in at least float32, also when f runs under autocast
        dtype = torch.promote_types(inj.dtype, torch.float32)
        z0 = inj.new_zeros(inj.shape[0], sum(int(torch.Size(s).numel()) for s in shapes), dtype=dtype)
        channels_last = self.state_layout == "channels_last"
        if channels_last:
            inj = inj.contiguous(memory_format=torch.channels_last)
        problem = EquilibriumProblem(f=None, z0=z0, shapes=shapes, channels_last=channels_last)  # type: ignore[arg-type]
        self.fullstage.reset_dropout(problem.unflatten(z0))

        # f keeps the caller's autocast setting; the solvers' own linear algebra runs without it
        device = inj.device.type
        amp, amp_dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)

        def f(z: Tensor) -> Tensor:
            with torch.autocast(device, dtype=amp_dtype, enabled=amp):
                return problem.flatten(self.fullstage(problem.unflatten(z), inj)).to(dtype)

        problem.f = f
        return problem

    def equilibrium_states(self, x: Tensor, mode: Optional[str] = None, f_thres: Optional[int] = None,
                           b_thres: Optional[int] = None, *, train_step: Optional[int] = None,
                           solver: Optional[SolverChoice] = None, depth: Optional[int] = None,
                           eps: Optional[float] = None, jac_loss: bool = False) -> List[Tensor]:
        """Images (N, 3, H, W) -> the list of per-resolution states (N, C_i, H_i, W_i) at the output
        of the MDEQ stage.

        Args:
            x: (N, 3, H, W) images.
            mode: ``'equilibrium'`` (default): the forward solver's equilibrium, with the implicit
                backward when autograd is on. ``'unrolled'``: ``depth`` weight-tied applications of f
                from z = 0 (the warm-up), differentiated by ordinary backprop.
            f_thres, b_thres: forward / backward solver budgets for this call (default
                ``MODEL.F_THRES`` / ``B_THRES``); equilibrium mode only.
            train_step: the original's API instead of ``mode`` (see :meth:`resolve_mode`).
            solver: this call's solver, forward and backward, by name or as a callable, or a pair
                (forward, backward); default ``MODEL.F_SOLVER`` / ``B_SOLVER``. Each gets the model's
                settings that its signature names (a wrapper with ``__wrapped__`` those of the solver
                it wraps).
            depth: the unrolled depth for this call (default ``MODEL.NUM_LAYERS``); unrolled mode only.
            eps: the stopping tolerance of both solves for this call (``0``: run the full budgets).
            jac_loss: with autograd on, take the normalised Hutchinson estimate of ||J_f||_F^2 at the one
                differentiable application of f that the backward already builds (the last one when
                unrolled, the one at z* otherwise) and leave it in ``self.jac_loss`` (a scalar with
                graph; None when not computed) and, as a float, in ``solver_stats['jac_loss']``.
        """
        mode = self.resolve_mode(mode, train_step)
        self.jac_loss = None
        with weights_fixed(self.fullstage):  # one w per call, see weights_fixed
            problem = self.equilibrium_problem(self.injection(x))
            want_jac = bool(jac_loss) and torch.is_grad_enabled()
            if mode == "unrolled":
                z = self._unrolled(problem, self.num_layers if depth is None else int(depth), want_jac)
            else:
                z = self._solved(problem, self.f_thres if f_thres is None else f_thres,
                                 self.b_thres if b_thres is None else b_thres, solver, eps, want_jac)
        if self.jac_loss is not None:
            self.solver_stats["jac_loss"] = float(self.jac_loss.detach())
        return problem.unflatten(z)

    def _unrolled(self, problem: EquilibriumProblem, depth: int, want_jac: bool) -> Tensor:
        """(B, D) after ``depth`` weight-tied applications of f from z0, with autograd (the warm-up)."""
        z = problem.z0
        for k in range(depth):
            last = k == depth - 1
            z_in = z.requires_grad_(True) if (want_jac and last and not z.requires_grad) else z
            z = problem.f(z_in)
            if want_jac and last:
                self._record_jac_loss(z_in, z)
        self.solver_stats = {"mode": "unrolled", "f_steps": depth}
        return z

    def _solved(self, problem: EquilibriumProblem, f_thres: int, b_thres: int, solver: Optional[SolverChoice],
                eps: Optional[float], want_jac: bool) -> Tensor:
        """(B, D) the forward solver's equilibrium; with autograd on, connected to the graph by the
        configured backward (:meth:`_differentiable_output`)."""
        f_solver, b_solver = self.call_solvers(solver)
        tol = {} if eps is None else {"eps": eps}
        with torch.no_grad(), torch.autocast(problem.z0.device.type, enabled=False):
            result = f_solver(problem.f, problem.z0, f_thres, **self.solver_kwargs("f", f_solver, **tol))
        stats = {"mode": "equilibrium", **result.stats("f"), "f_trace": result.trace}
        self.solver_stats = stats
        if result.diverged:
            logger.warning("forward solver diverged for some samples (rel residual %.3g after %d steps)",
                           result.rel_residual, result.steps)
        if torch.is_grad_enabled():
            return self._differentiable_output(problem, result.z, b_solver, b_thres, stats, want_jac, tol)
        if self.spectral_radius_iters > 0 and not self.training:
            stats["spectral_radius"] = float(spectral_radius(problem.f, result.z, self.spectral_radius_iters).mean())
        return result.fz

    def _record_jac_loss(self, z_in: Tensor, z_out: Tensor) -> None:
        self.jac_loss = hutchinson_jac_loss(z_in, z_out, self.jac_probes)

    def _differentiable_output(self, problem: EquilibriumProblem, z_star: Tensor, b_solver: SolverFn,
                               b_thres: int, stats: Dict, want_jac: bool, tol: Dict[str, float]) -> Tensor:
        """(B, D) output with autograd for the equilibrium ``z_star``: f(z*) with the implicit backward,
        or the phantom / JFB iterate (MODEL.GRAD); the JR term is taken at the application of f at z*."""
        record = self._record_jac_loss if want_jac else None
        if self.grad_mode == "implicit":
            return attach_implicit_backward(problem.f, z_star, b_solver, b_thres, stats=stats,
                                            on_application=record, **self.solver_kwargs("b", b_solver, **tol))
        steps, tau = (1, 1.0) if self.grad_mode == "jfb" else (self.phantom_steps, self.phantom_tau)
        stats["b_steps"] = steps  # f applications the backward differentiates through
        return attach_phantom_backward(problem.f, z_star, steps, tau, on_application=record)

    def head(self, states: List[Tensor]) -> Tensor:
        """Per-resolution states -> the task's output (classification / segmentation logits)."""
        raise NotImplementedError

    def forward(self, x: Tensor, train_step: Optional[int] = None, **call: Any) -> Tensor:
        """Images (N, 3, H, W) -> :meth:`head` of the equilibrium states.

        ``call``: the keywords of :meth:`equilibrium_states` (``mode``, ``f_thres``, ``b_thres``,
        ``solver``, ``depth``, ``eps``, ``jac_loss``), e.g. ``model(x, mode="unrolled")`` or
        ``model(x, f_thres=30, solver="anderson")``. ``train_step`` is the original's API: in
        ``[0, TRAIN.PRETRAIN_STEPS)`` unrolled, otherwise (and by default) the equilibrium.
        """
        return self.head(self.equilibrium_states(x, train_step=train_step, **call))
