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

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..config.validation import apriori_steps
from ..modules import (EquilibriumInfo, EquilibriumLayer, SolverChoice, VariationalDropout2d, call_state,
                       call_state_restored, conv2d, fixed_weights, jacobian_operator_norm, lipschitz_budget,
                       weights_fixed, weights_restored)
from ..modules.early_exit import ExitSetting
from ..solvers import SolverFn, option_names
from .resnet import conv_bn_relu, residual_stage

if TYPE_CHECKING:   # lipschitz_core builds on this module's Activation and BranchNet
    from .lipschitz_core import LipschitzCertificate

Tensor = torch.Tensor


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
    ``restrict(rows)`` is f of the samples ``rows`` (b,) alone, (b, D) -> (b, D): what a solve
    whose samples leave when they are done evaluates (:class:`~mdeq.solvers.SampleExit`).

    With ``channels_last`` (MODEL.STATE_LAYOUT) each stream's block of z holds its state in
    (H, W, C) order, so that the unflattened states are channels-last views (no copies) and the
    convolutions run on that layout; the solvers do not care about the order of the D entries.
    """

    f: Callable[[Tensor], Tensor]
    z0: Tensor
    shapes: List[Tuple[int, ...]]
    channels_last: bool = False
    restrict: Optional[Callable[[Tensor], Callable[[Tensor], Tensor]]] = None

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


def stream_sizes(cfg) -> List[Tuple[int, int]]:
    """(H_i, W_i) of each stream of f for images of MODEL.IMAGE_SIZE (W, H; one entry: square): DOWNSAMPLE_TIMES
    stride-2 convolutions, then each stream halves the previous one (rounding up, as :meth:`MDEQNet.state_shapes`)."""
    size = [int(v) for v in cfg.MODEL.IMAGE_SIZE]
    w, h = (size[0], size[1]) if len(size) >= 2 else (size[0], size[0])
    sizes = []
    for _ in range(cfg.MODEL.DOWNSAMPLE_TIMES):
        h, w = (h + 1) // 2, (w + 1) // 2
    for _ in range(cfg.MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES):
        sizes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return sizes


def lipschitz_stage(cfg) -> nn.Module:
    """The contractive f of ``cfg.MODEL.LIPSCHITZ`` at the stream sizes of MODEL.IMAGE_SIZE.

    Raises:
        ConfigError: TARGET cannot be met with the other keys (:func:`~mdeq.modules.lipschitz_budget`).
    """
    from .lipschitz_core import LipschitzMDEQModule, LipschitzSettings
    stage = cfg.MODEL.EXTRA.FULL_STAGE
    try:
        budget = lipschitz_budget(cfg.MODEL.LIPSCHITZ.TARGET, cfg.MODEL.LIPSCHITZ.ALPHA, cfg.MODEL.LIPSCHITZ.BETA,
                                  cfg.MODEL.LIPSCHITZ.RELU_SLOPE, cfg.MODEL.LIPSCHITZ.GN_GAMMA_MAX,
                                  cfg.MODEL.LIPSCHITZ.CAP_MARGIN, stage.NUM_BRANCHES, max(stage.NUM_BLOCKS))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    settings = LipschitzSettings(alpha=cfg.MODEL.LIPSCHITZ.ALPHA, beta=cfg.MODEL.LIPSCHITZ.BETA,
                                 slope=cfg.MODEL.LIPSCHITZ.RELU_SLOPE, gamma_max=cfg.MODEL.LIPSCHITZ.GN_GAMMA_MAX,
                                 power_iters=cfg.MODEL.LIPSCHITZ.POWER_ITERS, wnorm=bool(cfg.MODEL.WNORM),
                                 num_groups=cfg.MODEL.NUM_GROUPS)
    return LipschitzMDEQModule(stage.NUM_CHANNELS, stage.NUM_BLOCKS, cfg.MODEL.EXPANSION_FACTOR, stream_sizes(cfg),
                               budget, settings)


def _layer_setting(name: str, doc: str) -> property:
    """A read-only model attribute that is the equilibrium layer's (``model.deq``) ``name``."""
    return property(lambda self: getattr(self.deq, name), doc=doc)


def _bn_momentum(cfg, default: float) -> float:
    return cfg.MODEL.BN_MOMENTUM if cfg.MODEL.BN_MOMENTUM >= 0 else default


class MDEQNet(nn.Module):
    """Stem (``downsample``, ``stage0``) and the equilibrium stage (``fullstage`` = f_theta).

    Subclasses add the :meth:`head`; ``forward`` is the same for every task. ``default_mode``
    ``'unrolled'`` makes the net the unrolled baseline: every call that names no mode, in training
    and in evaluation, is the weight-tied stack of ``MODEL.NUM_LAYERS`` applications of f.
    """

    #: the original release's names of ``fullstage`` (it stores f_theta four times): ``deq.func`` is
    #: ``fullstage``, the two copies carry nothing new (read by mdeq.utils.checkpoint.load_weights)
    state_dict_aliases = {"fullstage_copy.": None, "deq.func_copy.": None, "deq.func.": "fullstage."}

    def __init__(self, cfg, bn_momentum: float = 0.1, default_mode: str = "equilibrium") -> None:
        super().__init__()
        stage = cfg.MODEL.EXTRA.FULL_STAGE
        m = cfg.MODEL
        self.num_branches = stage.NUM_BRANCHES
        self.num_channels = list(stage.NUM_CHANNELS)
        self.downsample_times = m.DOWNSAMPLE_TIMES
        # the solve, its backward and the warm-up rule (TRAIN.PRETRAIN_STEPS); no parameters
        self.deq = EquilibriumLayer.from_config(cfg, default_mode)
        self.state_layout = m.STATE_LAYOUT
        momentum = _bn_momentum(cfg, bn_momentum)
        c0 = self.num_channels[0]
        self.in_channels = m.IN_CHANNELS
        c_stem = m.IN_CHANNELS
        self.full_res_stem: Optional[nn.Module] = None
        if m.STEM_BLOCKS > 0:
            # processing at the input's resolution, paid once per forward pass: f works at 2^-DOWNSAMPLE_TIMES
            # of it and runs T_f + T_b + 1 times per training step
            c_stem = m.STEM_CHANNELS
            # the ResNet baseline's stem and first stage; flat, so that the keys are full_res_stem.0, .1, ...
            self.full_res_stem = nn.Sequential(*conv_bn_relu(m.IN_CHANNELS, c_stem, momentum),
                                               *residual_stage(c_stem, c_stem, m.STEM_BLOCKS, 1, momentum))
        # flat, as the original's downsample.0 ... downsample.5
        self.downsample = nn.Sequential(
            *conv_bn_relu(c_stem, c0, momentum, stride=2 if self.downsample_times >= 1 else 1),
            *conv_bn_relu(c0, c0, momentum, stride=2 if self.downsample_times >= 2 else 1))
        # as in the original: with no downsampling and at most 2 streams the stem is the injection
        if self.downsample_times == 0 and self.num_branches <= 2:
            self.stage0 = None
        else:
            self.stage0 = nn.Sequential(nn.Conv2d(c0, c0, 1, bias=False), nn.BatchNorm2d(c0, momentum=momentum),
                                        nn.ReLU())
        #: the contractive f of MODEL.LIPSCHITZ (docs/lipschitz.md) in place of the original's
        self.lipschitz = bool(cfg.MODEL.LIPSCHITZ.ENABLED)
        if self.lipschitz:
            self.fullstage = lipschitz_stage(cfg)
            if cfg.MODEL.LIPSCHITZ.APRIORI_STEPS:   # the budgets that the certified contraction implies
                self.deq.f_thres = apriori_steps(cfg.MODEL.LIPSCHITZ.TARGET, m.F_EPS)
                self.deq.b_thres = apriori_steps(cfg.MODEL.LIPSCHITZ.TARGET, m.B_EPS)
        else:
            self.fullstage = MDEQModule(self.num_channels, stage.NUM_BLOCKS, m.EXPANSION_FACTOR, m.NUM_GROUPS,
                                        m.DROPOUT, m.WNORM)
        self.cert_iters = int(cfg.MODEL.LIPSCHITZ.CERT_ITERS)
        self.set_exit(ExitSetting.from_config(cfg))
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

    @property
    def forward_kind(self) -> str:
        """What the net computes after the warm-up: ``'equilibrium'``, or ``'unrolled'`` (the unrolled
        baseline, at depth :attr:`depth`)."""
        return self.deq.default_mode

    # the equilibrium layer's settings, where the model stands for it (benchmark, analysis, tests)
    depth = _layer_setting("depth", "the unrolled depth (MODEL.NUM_LAYERS)")
    f_solver = _layer_setting("f_solver", "the forward solver (MODEL.F_SOLVER)")
    b_solver = _layer_setting("b_solver", "the backward solver (MODEL.B_SOLVER)")
    f_thres = _layer_setting("f_thres", "the forward budget (MODEL.F_THRES)")
    b_thres = _layer_setting("b_thres", "the backward budget (MODEL.B_THRES)")
    solver_settings = _layer_setting("solver_settings", "every solver's settings, per direction ('f', 'b')")

    def solver_kwargs(self, direction: str, solver: Optional[SolverFn] = None, **overrides: Any) -> Dict:
        """See :meth:`mdeq.modules.EquilibriumLayer.solver_kwargs`."""
        return self.deq.solver_kwargs(direction, solver, **overrides)

    def call_solvers(self, solver: Optional[SolverChoice] = None) -> Tuple[SolverFn, SolverFn]:
        """See :meth:`mdeq.modules.EquilibriumLayer.call_solvers`."""
        return self.deq.call_solvers(solver)

    # ------------------------------------------------------------------ the Lipschitz MDEQ
    def lipschitz_certificate(self, iters: Optional[int] = None) -> "LipschitzCertificate":
        """The certified Lipschitz bound of f (a :class:`~mdeq.models.lipschitz_core.LipschitzCertificate`):
        each conv's provable norm bound, its cap's vector refreshed by ``iters`` power steps (default
        MODEL.LIPSCHITZ.CERT_ITERS). Lipschitz model only."""
        if not self.lipschitz:
            raise ValueError("the certified bound is the Lipschitz MDEQ's (MODEL.LIPSCHITZ.ENABLED)")
        return self.fullstage.certificate(self.cert_iters if iters is None else int(iters))

    @torch.no_grad()
    def lipschitz_empirical(self, x: Tensor, iters: int = 20) -> Tensor:
        """(N,) power-method estimates of ||J_f(z*)||_2 at the equilibrium of each image of ``x`` (N, C, H, W),
        in the L2 norm of the concatenated state (the norm of the certificate); in evaluation mode."""
        training = self.training
        self.eval()
        try:
            with weights_fixed(self.fullstage):
                problem = self.equilibrium_problem(self.injection(x))
                z, _ = self.deq(problem.f, problem.z0, mode="equilibrium")
                return jacobian_operator_norm(problem.f, z, iters)
        finally:
            self.train(training)

    # ------------------------------------------------------------------ forward
    def injection(self, x: Tensor) -> Tensor:
        """The input injection (N, C_1, H_1, W_1) for images x (N, MODEL.IN_CHANNELS, H, W)."""
        if self.full_res_stem is not None:
            x = self.full_res_stem(x)
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
        # the call's weights (inside weights_fixed), dropout masks and train/eval flags, set again when f runs
        # after the call (the reversible backward): f stays the function that the forward solve iterated
        weights, state = fixed_weights(self.fullstage), call_state(self.fullstage)

        def f_of(injection: Tensor) -> Callable[[Tensor], Tensor]:
            def f(z: Tensor) -> Tensor:
                # autocast's weight cache off: a cast made under the solve's no_grad must not be reused without
                # its history by the differentiable application of f (pytorch issues 112583, 158232)
                with weights_restored(weights), call_state_restored(state), \
                        torch.autocast(device, dtype=amp_dtype, enabled=amp, cache_enabled=False):
                    return problem.flatten(self.fullstage(problem.unflatten(z), injection)).to(dtype)
            return f

        def restrict(rows: Tensor) -> Callable[[Tensor], Tensor]:
            # per sample, f holds only the injection: dropout masks exist in training, where no sample leaves
            if any(mask is not None for _, mask in state.masks):
                raise RuntimeError("a per-sample exit runs in evaluation: variational dropout masks are drawn")
            return f_of(inj[rows])

        problem.f, problem.restrict = f_of(inj), restrict
        return problem

    def equilibrium_states(self, x: Tensor, **call: Any) -> Tuple[List[Tensor], EquilibriumInfo]:
        """Images (N, 3, H, W) -> (the per-resolution states (N, C_i, H_i, W_i) at the output of the
        MDEQ stage, the call's :class:`~mdeq.modules.EquilibriumInfo`).

        ``call``: the keywords of :meth:`mdeq.modules.EquilibriumLayer.forward` (``mode``,
        ``train_step``, ``f_thres``, ``b_thres``, ``solver``, ``depth``, ``eps``, ``jac_loss``), each
        for this call only. ``mode='unrolled'`` is the warm-up, ``depth`` (default
        ``MODEL.NUM_LAYERS``) weight-tied applications of f from z = 0; ``train_step`` picks it for
        ``0 <= train_step < TRAIN.PRETRAIN_STEPS``; the default is the equilibrium, with
        ``MODEL.GRAD``'s backward under autograd.
        """
        with weights_fixed(self.fullstage):  # one w per call, see weights_fixed
            problem = self.equilibrium_problem(self.injection(x))
            z, info = self.deq(problem.f, problem.z0, **self.evaluation_call(problem, call))
        return problem.unflatten(z), info

    # ------------------------------------------------------------------ evaluation: budget and per-sample exit
    #: whether :meth:`head` gives class logits (N, classes), which the rules 'prediction' and 'margin' read
    head_gives_classes = False

    def set_exit(self, setting: ExitSetting) -> None:
        """Make ``setting`` the evaluation's budget and per-sample exit (TEST.F_THRES, TEST.EXIT_*).

        Raises:
            ConfigError: the rule needs what this net or its forward solver (MODEL.F_SOLVER) lacks.
        """
        if setting.exits and "sample_exit" not in option_names(self.deq.f_solver):
            raise ConfigError(f"TEST.EXIT_RULE = {setting.rule!r}: the forward solver MODEL.F_SOLVER = "
                              f"{getattr(self.deq.f_solver, '__name__', self.deq.f_solver)!r} has no per-sample "
                              "exit (broyden, anderson and fixed_point have)")
        if setting.reads_head and not self.head_gives_classes:
            raise ConfigError(f"TEST.EXIT_RULE = {setting.rule!r} reads class logits, which the head of "
                              f"{type(self).__name__} does not give; use 'residual' or 'none'")
        self.exit_setting = setting

    def evaluation_call(self, problem: EquilibriumProblem, call: Dict[str, Any]) -> Dict[str, Any]:
        """The keywords of the layer call: ``call``, and, in an evaluation solve (eval mode, no autograd,
        the equilibrium), the budget TEST.F_THRES and the per-sample exit of :attr:`exit_setting` where
        ``call`` does not set them (``f_thres``, ``eps``)."""
        setting: ExitSetting = self.exit_setting
        mode = self.deq.resolve_mode(call.get("mode"), call.get("train_step"))
        if self.training or torch.is_grad_enabled() or mode != "equilibrium":
            return call
        call = dict(call)
        if call.get("f_thres") is None:
            call["f_thres"] = setting.budget(self.deq.f_thres)
        if setting.exits:
            if call.get("eps") is None:
                call["eps"] = setting.tol
            logits = self._exit_logits(problem) if setting.reads_head else None
            call["sample_exit"] = setting.sample_exit(problem.restrict, logits, problem.z0.shape[0],
                                                      problem.z0.device)
        return call

    def _exit_logits(self, problem: EquilibriumProblem) -> Callable[[Tensor], Tensor]:
        """(b, D) images f(z) -> (b, classes) logits of the head, under the caller's autocast (as the output's)."""
        device = problem.z0.device.type
        amp, amp_dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)

        def logits(fz: Tensor) -> Tensor:
            with torch.autocast(device, dtype=amp_dtype, enabled=amp):
                return self.head(problem.unflatten(fz))
        return logits

    def head(self, states: List[Tensor]) -> Tensor:
        """Per-resolution states -> the task's output (classification / segmentation logits)."""
        raise NotImplementedError

    def forward(self, x: Tensor, train_step: Optional[int] = None, return_info: bool = False, **call: Any
                ) -> Union[Tensor, Tuple[Tensor, EquilibriumInfo]]:
        """Images (N, 3, H, W) -> :meth:`head` of the equilibrium states; with ``return_info``,
        ``(output, info)``, the :class:`~mdeq.modules.EquilibriumInfo` of this call (its backward
        statistics are filled in when the backward runs).

        ``call``: the keywords of :meth:`equilibrium_states` (``mode``, ``f_thres``, ``b_thres``,
        ``solver``, ``depth``, ``eps``, ``jac_loss``), e.g. ``model(x, mode="unrolled")`` or
        ``model(x, f_thres=30, solver="anderson")``. ``train_step`` is the original's API: in
        ``[0, TRAIN.PRETRAIN_STEPS)`` unrolled, otherwise (and by default) the equilibrium.
        """
        states, info = self.equilibrium_states(x, train_step=train_step, **call)
        out = self.head(states)
        return (out, info) if return_info else out
