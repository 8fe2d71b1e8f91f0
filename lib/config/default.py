"""Default configuration: every key an experiment file may set.

The key names are those of the original MDEQ repository. Keys the original lacks (solver choice,
L-Broyden memory, stopping tolerance and mode, ...) are marked ``# new``. The original's keys that
nothing here reads (HRNet's pose-estimation settings, ``DEBUG.*``, ``TRAIN.EXTRA_LR``, ...) are not
defaults: :mod:`mdeq.config.original` lists them, and its yaml files still load (with one warning
naming them). The allowed values of each key are in :mod:`mdeq.config.validation`.
"""
from yacs.config import CfgNode as CN

_C = CN()

_C.OUTPUT_DIR = "output/"
_C.LOG_DIR = "log/"
_C.DATA_DIR = ""
_C.WORKERS = 4
_C.PERCENT = 1.0
_C.PRINT_FREQ = 20
_C.PIN_MEMORY = True
_C.SEED = 0  # new: base seed of every random generator (each rank adds its rank)
_C.DETERMINISTIC = False  # new: deterministic algorithms (for exact resume tests)

_C.CUDNN = CN()
_C.CUDNN.BENCHMARK = True
_C.CUDNN.DETERMINISTIC = False
_C.CUDNN.ENABLED = True

# ------------------------------------------------------------------ model
_C.MODEL = CN()
_C.MODEL.NAME = "mdeq"
_C.MODEL.WNORM = False
_C.MODEL.PRETRAINED = ""
_C.MODEL.NUM_LAYERS = 5
_C.MODEL.NUM_GROUPS = 4
_C.MODEL.DROPOUT = 0.0
_C.MODEL.NUM_CLASSES = 1000  # every task's classes (the original's segmentation files: DATASET.NUM_CLASSES)
_C.MODEL.F_THRES = 30
_C.MODEL.B_THRES = 40
_C.MODEL.DOWNSAMPLE_TIMES = 2
_C.MODEL.EXPANSION_FACTOR = 5
_C.MODEL.IMAGE_SIZE = [256, 256]
_C.MODEL.IN_CHANNELS = 3  # new: channels of the input images (1 for Fashion-MNIST's grey photos)
# new: explicit residual blocks (conv3x3-BN-ReLU-conv3x3-BN + identity, ReLU) at the input's full resolution,
# before the strided stem: run once per forward pass, not once per evaluation of f. 0: the original's stem
_C.MODEL.STEM_BLOCKS = 0
_C.MODEL.STEM_CHANNELS = 16  # new: their width (the stem's first convolution maps IN_CHANNELS to it)
_C.MODEL.BN_MOMENTUM = -1.0  # new: <0 means the original's choice (0.1 classification, 0.01 segmentation)
# new: equilibrium solvers ('broyden', 'anderson' or 'fixed_point') for the forward and backward
_C.MODEL.F_SOLVER = "broyden"
_C.MODEL.B_SOLVER = "broyden"
_C.MODEL.SOLVER_MEMORY = 18  # new: L-Broyden / Anderson memory m (Table 4: 12 CIFAR, 18 ImageNet/Cityscapes; <= 0: all steps, as the original)
_C.MODEL.F_EPS = 1e-5  # new: forward stopping tolerance (per sample, see STOP_MODE)
_C.MODEL.B_EPS = 1e-5  # new: backward stopping tolerance (per sample)
# new: memory layout of the equilibrium states, 'nchw' or 'channels_last'; the results do not depend on it,
# the speed does, and which is faster depends on the model and the device (docs/performance.md: CPU settings that matter)
_C.MODEL.STATE_LAYOUT = "nchw"
# new: the stopping residual, per sample: 'rel' ||f(z) - z|| / ||f(z)|| (mdeq.solvers.residuals) or 'abs' ||f(z) - z||
_C.MODEL.STOP_MODE = "rel"
_C.MODEL.ANDERSON_BETA = 1.0  # new: Anderson mixing parameter
_C.MODEL.ANDERSON_LAM = 1e-4  # new: Anderson Tikhonov regularisation
# new: beta of the 'reversible' solver, y <- (1-beta) y + beta f(z), z <- (1-beta) z + beta f(y); in (0, 2), not 1.
# Its F_THRES counts coupled steps (2 evaluations of f each) and F_EPS stops them early (0: all F_THRES steps)
_C.MODEL.REV_BETA = 0.8
# new: the reversible solver keeps y and z in float64 (f stays in float32): the backward's rebuilt states then drift
# at float64's rate, which lets N grow in float32 training; always on under TRAIN.AMP (docs/reversible.md)
_C.MODEL.REV_FLOAT64_STATES = False
# new: torch.compile f_theta (the module MODEL.EXTRA.FULL_STAGE builds), in place: the same parameter names
# and results within float tolerance, fewer kernel launches per f evaluation; the first calls compile (minutes)
_C.MODEL.COMPILE = False
_C.MODEL.SOFTPLUS_WARMUP = False  # new: softplus in place of ReLU inside f while TRAIN.SOFTPLUS_EPOCHS last
# new: the gradient of the equilibrium: 'implicit' (adjoint solve under B_THRES, the paper's), 'phantom'
# (PHANTOM_STEPS damped steps z <- (1 - PHANTOM_TAU) z + PHANTOM_TAU f(z) from z*, backpropagated; Geng et al. 2021)
# or 'jfb' (one step, tau = 1: the Jacobian-free gradient of Fung et al. 2022). The forward solve is the same.
# 'reversible' (RevDEQ, McCallum et al. 2025): the exact gradient of the reversible solver's coupled steps,
# rebuilt backwards with memory flat in the steps; it needs MODEL.F_SOLVER reversible (docs/reversible.md)
_C.MODEL.GRAD = "implicit"
_C.MODEL.PHANTOM_STEPS = 5  # new: k of the phantom gradient
_C.MODEL.PHANTOM_TAU = 0.5  # new: tau of the phantom gradient, in (0, 1]
# new: Jacobian regularisation (Bai et al. 2021): loss += weight * ||v^T J_f(z*)||^2 / (probes * numel(z)), the
# normalisation of the authors' code, so the JR paper's weights carry over unchanged; 0 turns it off
_C.MODEL.JAC_LOSS_WEIGHT = 0.0
_C.MODEL.JAC_LOSS_FREQ = 1.0  # new: >= 1: apply JR every JAC_LOSS_FREQ-th step; in (0, 1): on that fraction of steps
_C.MODEL.JAC_INCREMENTAL = 0.0  # new: the JR weight grows by this much per epoch (weight + JAC_INCREMENTAL * epoch)
_C.MODEL.JAC_PROBES = 1  # new: Gaussian probes per JR estimate
_C.MODEL.SPECTRAL_RADIUS_ITERS = 0  # new: power iterations for a spectral-radius estimate of J_f(z*) in evaluation (0: off)
# new: the explicit baseline (MODEL.NAME resnet, mdeq.models.resnet): a CIFAR ResNet of DEPTH = 6n + 2 layers,
# three stages of n basic blocks at WIDTHS channels (20 and [16, 32, 64]: ResNet-20)
_C.MODEL.RESNET = CN()
_C.MODEL.RESNET.DEPTH = 20
_C.MODEL.RESNET.WIDTHS = [16, 32, 64]
# new: the contractive (Lipschitz) MDEQ (Sato & Iiduka, AISTATS 2026; docs/lipschitz.md): f built from parts with a
# computed Lipschitz constant, its certified bound kept under TARGET by the parametrisation itself
_C.MODEL.LIPSCHITZ = CN()
_C.MODEL.LIPSCHITZ.ENABLED = False  # the contractive f in place of the original's (same stem, head and solvers)
_C.MODEL.LIPSCHITZ.TARGET = 0.9  # L < 1: the certified bound of f (L2 norm of the concatenated state) stays under it
_C.MODEL.LIPSCHITZ.RELU_SLOPE = 0.4  # the scaled ReLU s * relu(x), gain s
_C.MODEL.LIPSCHITZ.ALPHA = 0.5  # the residual block's convex weight: (1 - ALPHA) x + ALPHA block(x)
_C.MODEL.LIPSCHITZ.BETA = 0.3  # the fusion's convex weight: (1 - BETA) u_i + BETA sum_j w_ij F_ij(u_j)
_C.MODEL.LIPSCHITZ.GN_GAMMA_MAX = 1.0  # |gamma| of the GroupNorm without std is clipped to this
_C.MODEL.LIPSCHITZ.POWER_ITERS = 1  # power steps per training call on each conv's persistent vector (the cap's sigma)
_C.MODEL.LIPSCHITZ.CERT_ITERS = 50  # power steps of each conv's norm in the certificate, from that vector
_C.MODEL.LIPSCHITZ.CAP_MARGIN = 0.05  # the caps are set 1 + CAP_MARGIN under their share, room for the certified (Fourier) bound over the estimate
_C.MODEL.LIPSCHITZ.EMPIRICAL_ITERS = 20  # power steps of ||J_f(z*)|| on a held-out batch, each epoch (0: off)
# forward / backward budgets ceil(log(F_EPS) / log(TARGET)) and ceil(log(B_EPS) / log(TARGET)) in place of F_THRES /
# B_THRES: plain iteration then reaches ||z_k - z*|| <= EPS ||z_0 - z*|| (F_SOLVER / B_SOLVER fixed_point or anderson)
_C.MODEL.LIPSCHITZ.APRIORI_STEPS = False
_C.MODEL.EXTRA = CN()
_C.MODEL.EXTRA.FINAL_CONV_KERNEL = 1
_C.MODEL.EXTRA.FULL_STAGE = CN()
_C.MODEL.EXTRA.FULL_STAGE.NUM_MODULES = 1
_C.MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES = 4
_C.MODEL.EXTRA.FULL_STAGE.BLOCK = "BASIC"
_C.MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS = [1, 1, 1, 1]
_C.MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS = [32, 64, 128, 256]
_C.MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS = [28, 56, 112, 224]
_C.MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE = 2048
_C.MODEL.EXTRA.FULL_STAGE.FUSE_METHOD = "SUM"

# ------------------------------------------------------------------ loss
_C.LOSS = CN()
_C.LOSS.USE_OHEM = False
_C.LOSS.OHEMTHRES = 0.9
_C.LOSS.OHEMKEEP = 100000
_C.LOSS.LABEL_SMOOTHING = 0.0  # new: classification training loss, target (1 - e) on the class + e / classes everywhere

# ------------------------------------------------------------------ dataset
_C.DATASET = CN()
_C.DATASET.ROOT = ""
_C.DATASET.DATASET = "cifar10"
# the training and the held-out split, by name ('train', 'val', 'test'); each dataset knows where a split
# lies (ImageNet: the folder ROOT/<name>, Cityscapes: the list ROOT/list/cityscapes/<name>.lst); a path
# ('list/cityscapes/val.lst', as the original's files write it) is taken as it is
_C.DATASET.TRAIN_SET = "train"
_C.DATASET.TEST_SET = "val"
_C.DATASET.AUGMENT = True  # new: CIFAR random crop + flip (False: the paper's no-augmentation setting)
# new: training images held out as a validation split (fashion_mnist; DATASET.TEST_SET 'val' evaluates on it,
# '' trains without a held-out set)
_C.DATASET.VAL_SIZE = 0
# new: probability of random erasing of a training image (fashion_mnist; Zhong et al. 2020), 0: none
_C.DATASET.RANDOM_ERASING = 0.0
_C.DATASET.DOWNLOAD = False  # new: let torchvision download CIFAR-10 when it is missing

# ------------------------------------------------------------------ training
_C.TRAIN = CN()
_C.TRAIN.IMAGE_SIZE = [1024, 512]  # width, height
_C.TRAIN.BASE_SIZE = 2048
_C.TRAIN.DOWNSAMPLERATE = 1
_C.TRAIN.FLIP = True
_C.TRAIN.MULTI_SCALE = True
_C.TRAIN.SCALE_FACTOR = 16
_C.TRAIN.CLIP = -1.0  # gradient-norm clipping (<= 0: off)
_C.TRAIN.LR_FACTOR = 0.1
_C.TRAIN.LR_STEP = [90, 110]
_C.TRAIN.LR = 0.001
_C.TRAIN.LR_SCHEDULER = "step"
_C.TRAIN.OPTIMIZER = "adam"
_C.TRAIN.MOMENTUM = 0.9
_C.TRAIN.WD = 0.0001
_C.TRAIN.NESTEROV = False
_C.TRAIN.PRETRAIN_STEPS = 100000
_C.TRAIN.SOFTPLUS_EPOCHS = 0  # new: epochs with softplus in f (needs MODEL.SOFTPLUS_WARMUP)
_C.TRAIN.IGNORE_LABEL = -1
_C.TRAIN.BEGIN_EPOCH = 0
_C.TRAIN.END_EPOCH = 140
_C.TRAIN.RESUME = False  # continue the run in OUTPUT_DIR (HRNet's AUTO_RESUME is this key)
_C.TRAIN.CHECKPOINT = ""
_C.TRAIN.MODEL_FILE = ""
_C.TRAIN.BATCH_SIZE_PER_GPU = 32
_C.TRAIN.SHUFFLE = True
_C.TRAIN.AMP = False  # new: mixed precision: bfloat16 (or float16) on CUDA, bfloat16 on a CPU with AVX512-BF16 or AMX
_C.TRAIN.CHANNELS_LAST = False  # new: the layers outside f train with channels-last weights (f's states: MODEL.STATE_LAYOUT)
_C.TRAIN.KEEP_CHECKPOINTS = 1  # new: how many per-epoch checkpoints to keep
_C.TRAIN.STOP_ON_UNHEALTHY = False  # new: stop (exit 3) when an epoch fails the health check (mdeq.core.health)
_C.TRAIN.MAX_BAD_STEPS = 5  # new: consecutive non-finite / diverged steps before the run stops
_C.TRAIN.MAX_ITERS = -1  # new: stop after this many optimizer steps (<0: no limit)

# ------------------------------------------------------------------ testing
_C.TEST = CN()
_C.TEST.BATCH_SIZE_PER_GPU = 32
_C.TEST.FLIP_TEST = False
_C.TEST.MULTI_SCALE = False
_C.TEST.SCALE_LIST = [1.0]
_C.TEST.MODEL_FILE = ""
# new: the evaluation's forward solve (docs/performance.md, "Per-sample early exit"); training is unaffected
_C.TEST.F_THRES = -1  # the evaluation budget (< 0: MODEL.F_THRES)
_C.TEST.EXIT_RULE = "none"  # per-sample exit: 'none', 'residual', 'prediction', 'margin'
_C.TEST.EXIT_TOL = 1e-3  # the residual tolerance (MODEL.STOP_MODE) of every rule but 'none'
_C.TEST.EXIT_PATIENCE = 2  # 'prediction': the class the same at this many consecutive evaluations of f
_C.TEST.EXIT_MARGIN = 0.9  # 'margin': softmax top-1 minus top-2 probability
# new: evaluations (the tools' and the training's) run a copy of the model with the same outputs to rounding
# (mdeq.models.inference)
_C.TEST.FOLD_BN = True  # BatchNorm folded into the convolution before it
_C.TEST.CHANNELS_LAST = True  # the layers outside f in channels-last layout (f's follows MODEL.STATE_LAYOUT)


def get_default_config() -> CN:
    """A fresh, mutable copy of the defaults."""
    return _C.clone()
