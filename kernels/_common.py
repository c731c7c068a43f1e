"""What the kernels share: interpreter detection, autotune config lists and keys, the memory plan of an input, flat
indexing, and the one launch helper (device guard, launch lock)."""
import contextlib
import functools
import math
import os
import threading
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .._backend import AUTOTUNE_ENV_VAR, autotune_enabled

# Triton decides at import time whether @triton.jit builds GPU code or runs under its CPU interpreter.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
# BAM_TRITON_AUTOTUNE=0 pins every kernel to the first config its pruner keeps: :func:`launch` runs it without the
# autotuner, so nothing is timed on any Triton version and the same shape gets the same config (and bitwise the same
# result) in every process on the same GPU model. Read when the kernels are imported, by the one parser of the
# package's environment variables (a value it does not know raises ValueError naming the variable).
PINNED = not autotune_enabled()

# Largest BLOCK in the elementwise configs: flat indices run up to cdiv(n, BLOCK)·BLOCK - 1, so int32 offsets are safe
# only while n + MAX_BLOCK stays below 2**31.
MAX_BLOCK = 8192
# The pooling kernel splits H·W into chunks of this many positions when it needs more programs; it is a multiple of
# every BLOCK_HW in the pooling configs, so no block straddles two chunks and the only tail mask is ``hw < HW``.
POOL_SPLIT_UNIT = 1024

_CONFIGS = {
    # Memory-bound elementwise work: enough bytes in flight per SM, 8-16 elements per thread (128-bit vectors for
    # fp16/bf16 and fp32 alike), more warps for bigger blocks.
    "elementwise": [
        (dict(BLOCK=1024), 4),
        (dict(BLOCK=2048), 4),
        (dict(BLOCK=2048), 8),
        (dict(BLOCK=4096), 8),
        (dict(BLOCK=4096), 16),
        (dict(BLOCK=MAX_BLOCK), 16),
    ],
    # Reduction over H·W for a tile of channels: wide along the contiguous axis, a few thousand elements per step.
    "pool": [
        (dict(BLOCK_C=4, BLOCK_HW=1024), 4),
        (dict(BLOCK_C=8, BLOCK_HW=512), 4),
        (dict(BLOCK_C=16, BLOCK_HW=256), 4),
        (dict(BLOCK_C=32, BLOCK_HW=64), 4),
        (dict(BLOCK_C=64, BLOCK_HW=32), 4),
        (dict(BLOCK_C=128, BLOCK_HW=16), 8),
        (dict(BLOCK_C=256, BLOCK_HW=16), 8),
    ],
    # Backward reductions over both axes of a [C, HW] tile (apply_bwd.py): 1-2K elements per step, two streams (g, x),
    # dx stored in the single-pass backward and a same-size accumulator, so 8 elements per thread: 16 took 155-186
    # registers and spilled on sm_80/sm_90 with dx stored (bam-triton inspect). BLOCK_HW >= 32 keeps the per-hw-block
    # dmc partials under 1/8 byte per element; the first config is wide enough on both axes for either memory format.
    "reduce2d": [
        (dict(BLOCK_C=32, BLOCK_HW=32), 4),
        (dict(BLOCK_C=16, BLOCK_HW=64), 4),
        (dict(BLOCK_C=8, BLOCK_HW=128), 4),
        (dict(BLOCK_C=4, BLOCK_HW=256), 4),
        (dict(BLOCK_C=64, BLOCK_HW=32), 8),
        (dict(BLOCK_C=32, BLOCK_HW=64), 8),
        (dict(BLOCK_C=16, BLOCK_HW=128), 8),
    ],
    # Row-group tiles [BLOCK_R, BLOCK_L] of the NCHW kernels for small unaligned H·W (see row_group): BLOCK_L is the
    # whole group row, fixed by the shape, so only the rows per tile and the warps are tuned (row_tile_pruner drops
    # the tiles that are too small or too large for the group row at hand).
    "rows": [
        (dict(BLOCK_R=4), 4),
        (dict(BLOCK_R=1), 4),
        (dict(BLOCK_R=1), 8),
        (dict(BLOCK_R=2), 4),
        (dict(BLOCK_R=8), 4),
        (dict(BLOCK_R=4), 8),
        (dict(BLOCK_R=8), 8),
        (dict(BLOCK_R=16), 8),
    ],
    # The single-read front end (front.py), a GEMM over pixels with tl.dot: [BLOCK_P pixels, BLOCK_K channels] per
    # step. For fp16/bf16 the first config of each list is kept by the pruner at every ResNet-50 shape in both
    # layouts; the last entries are for fp32 only (an FMA dot: smaller tiles, see front.fits); registers per config:
    # front.py's docstring.
    "front_fwd": [
        (dict(BLOCK_P=64, BLOCK_K=64), 4),
        (dict(BLOCK_P=128, BLOCK_K=32), 4),
        (dict(BLOCK_P=128, BLOCK_K=64), 8),
        (dict(BLOCK_P=32, BLOCK_K=64), 4),
        (dict(BLOCK_P=64, BLOCK_K=32), 4),
        (dict(BLOCK_P=256, BLOCK_K=32), 8),
        (dict(BLOCK_P=32, BLOCK_K=32), 8),  # fp32
    ],
    # (BLOCK_K=64, BLOCK_P=64) is not here: with the maps and bias in x's dtype, as the module launches it, it spilled
    # at 32x512x28x28 channels_last (8 warps: 24 bytes on sm_80, Triton 3.9; 4 warps: 12 bytes on sm_90, Triton 3.3).
    "front_bwd": [
        (dict(BLOCK_K=64, BLOCK_P=32), 4),
        (dict(BLOCK_K=32, BLOCK_P=64), 4),
        (dict(BLOCK_K=128, BLOCK_P=32), 8),
        (dict(BLOCK_K=32, BLOCK_P=128), 8),
        (dict(BLOCK_K=32, BLOCK_P=32), 4),
        (dict(BLOCK_K=32, BLOCK_P=16), 16),  # fp32, NHWC: one element of dx per thread
        (dict(BLOCK_K=16, BLOCK_P=32), 16),  # fp32, NCHW
    ],
}


# Programs a grid aims for before a kernel splits its work further: a few waves even on a large GPU.
MIN_TARGET_PROGRAMS = 1024


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device):
    """SMs of a CUDA ``device`` (cached per device), or None for CPU tensors (the interpreter)."""
    if device.type != "cuda":
        return None
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def target_programs(sms):
    """How many programs a grid should have on a GPU with ``sms`` SMs (None: no GPU) before splitting work: 4 per SM,
    at least 1024."""
    return MIN_TARGET_PROGRAMS if sms is None else max(MIN_TARGET_PROGRAMS, 4 * sms)


def keep_contiguous_configs(configs, named_args, **kwargs):
    """``early_config_prune`` for the 2D-tile kernels: drop configs whose block along the contiguous axis is under 32
    elements (short vectors, partial sectors); that axis is H·W for NCHW and C for channels_last. Keeps everything if
    nothing would remain."""
    axis = "BLOCK_C" if kwargs.get("CHANNELS_LAST", named_args.get("CHANNELS_LAST")) else "BLOCK_HW"
    kept = [config for config in configs if config.kwargs[axis] >= 32]
    return kept or configs


# Longest group row (K·H·W elements) the row-group kernels take in one tile; longer rows use the 2D-tile kernels.
MAX_GROUP_ROW = 2048


def row_group(c, hw, element_size):
    """K for the row-group kernels of an NCHW tensor, or None when the 2D-tile kernels vectorise anyway or cannot use
    it.

    A row of H·W elements starts at c·H·W. Triton marks an integer argument 16-divisible when it is, so for H·W a
    multiple of 16 every row start is known to be 16-byte aligned and the 2D tiles load 128-bit vectors. Otherwise
    (14x14 = 196, 7x7 = 49) nothing is known and every access is scalar. Viewing K consecutive channels as one row of
    K·H·W elements, with K the smallest count whose bytes are a multiple of 16 and H·W a constexpr, makes every row
    start provably aligned again: K = 2 for fp16 at 196, 8 at 49; K = 1 for fp32 at 196, 4 at 49.
    Needs C divisible by K (rows never straddle images) and K·H·W <= MAX_GROUP_ROW (one tile per group row)."""
    if hw % 16 == 0:
        return None
    per_vector = 16 // element_size
    k = per_vector // math.gcd(hw, per_vector)
    if c % k or k * hw > MAX_GROUP_ROW:
        return None
    return k


def row_tile_pruner(max_per_thread):
    """An ``early_config_prune`` for a row-group kernel: keep tiles [BLOCK_R, BLOCK_L] of 1K-8K elements with at most
    ``max_per_thread`` per thread (BLOCK_L is the group row rounded up to a power of two, fixed by the shape). Tiny
    rows (H·W of 1-4) reach 1K elements with no config: keep the largest tile that fits in ``max_per_thread`` then,
    and the smallest tile only if nothing fits."""

    def prune(configs, named_args, **kwargs):
        block_l = kwargs.get("BLOCK_L", named_args.get("BLOCK_L"))

        def elements(config):
            return config.kwargs["BLOCK_R"] * block_l

        fitting = [cf for cf in configs if elements(cf) <= min(8192, max_per_thread * 32 * cf.num_warps)]
        kept = [cf for cf in fitting if elements(cf) >= 1024]
        if kept:
            return kept
        if fitting:
            largest = max(elements(cf) for cf in fitting)
            return [cf for cf in fitting if elements(cf) == largest]
        return [min(configs, key=elements)]

    return prune


def per_thread_pruner(max_per_thread):
    """An ``early_config_prune`` for the flat kernels that gather many small maps per element: keep the configs with
    at most ``max_per_thread`` elements of BLOCK per thread (every gathered value and its address is a register)."""

    def prune(configs, named_args, **kwargs):
        kept = [cf for cf in configs if cf.kwargs["BLOCK"] <= max_per_thread * 32 * cf.num_warps]
        return kept or configs

    return prune


# Software-pipelining stages of every config, explicit: ``triton.Config`` defaults to 2 on Triton 3.2 and to 3 from 3.3,
# while the compiler itself (``bam-triton inspect``) defaults to 3 on every version, so with the default what 3.2 ran
# was not what was checked, and a forced config compiled a second time.
NUM_STAGES = 3


def make_config(meta, num_warps):
    """The ``triton.Config`` of one (meta, num_warps) config, with :data:`NUM_STAGES`."""
    return triton.Config(dict(meta), num_warps=num_warps, num_stages=NUM_STAGES)


def gpu_configs(kind):
    """Every GPU config of ``kind`` as a ``triton.Config``."""
    return [make_config(meta, warps) for meta, warps in _CONFIGS[kind]]


def driver_timer(kernel_call, quantiles):
    """The autotuner's timer: the active driver's own, looked up when a config is first timed. Triton 3.3 looks it up
    when a kernel is defined unless it is given one, which fails where there is no GPU driver (the interpreter,
    ``bam-triton inspect``); Triton 3.4 and later look it up lazily themselves."""
    return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def n_bucket(n):
    """The batch size as the autotuners see it: the next power of two. Grids and splits scale with N, so the best
    config can too, but every new N re-tuning (~1 s per kernel per BAM shape) would stall dynamic batching."""
    return 1 << max(0, n - 1).bit_length()


def autotune(kind, key, prune=None):
    """``triton.autotune`` over the ``kind`` config list, keyed on ``key``, pruned by ``prune``, timed by
    :func:`driver_timer`. The interpreter cannot time configs, so there it runs the first config of the list only.
    Compiled, :func:`launch` bypasses it where there is nothing to choose (``BAM_TRITON_AUTOTUNE=0``, or one kept
    config).

    No kernel may write over one of its inputs: the autotuner runs every config on the same arguments, and
    ``restore_value`` would time its clone and restore together with the kernel."""
    configs = gpu_configs(kind)
    if INTERPRETED:
        configs = configs[:1]  # with one config the autotuner never prunes; ``prune`` stays readable for inspect
    options = {"prune_configs_by": {"early_config_prune": prune}} if prune else {}
    return triton.autotune(configs=configs, key=key, do_bench=driver_timer, **options)


def all_configs(kind):
    """Every GPU config of ``kind`` as (meta, num_warps); used by tests and the AOT inspection."""
    return [(dict(meta), warps) for meta, warps in _CONFIGS[kind]]


def acc_dtype(dtype):
    """Compute/accumulate dtype of the kernels: fp32, or fp64 for fp64 inputs (gradcheck runs in fp64)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def config_id(config):
    """A readable name for an (meta, num_warps) config, e.g. ``BLOCK1024-w4``."""
    meta, warps = config
    return "-".join(f"{k}{v}" for k, v in meta.items()) + f"-w{warps}"


@dataclass(frozen=True)
class MemoryPlan:
    """How a dense (N, C, H, W) tensor is laid out: memory order (n, MID, INNER)."""

    channels_last: bool
    inner: int  # H·W for NCHW, C for NHWC
    mid: int  # C for NCHW, H·W for NHWC
    index_64: bool  # flat offsets may pass 2**31 - 1


def layout_plan(shape, channels_last):
    """The :class:`MemoryPlan` of a dense tensor of ``shape`` in NCHW or channels_last order."""
    n, c, h, w = shape
    inner, mid = (c, h * w) if channels_last else (h * w, c)
    return MemoryPlan(channels_last, inner, mid, n * c * h * w + MAX_BLOCK >= 2**31)


def is_channels_last(x):
    """Whether dense ``x`` is laid out channels_last (a tensor that is both, e.g. C = 1 or H = W = 1, counts as NCHW)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def memory_plan(x):
    return layout_plan(x.shape, is_channels_last(x))


def flat_plan(kernel, shape, dtype, channels_last, constexprs, writes, unused=()):
    """The :class:`LaunchPlan` of a flat elementwise kernel (apply.py's INNER/MID indexing) over a dense ``shape``
    input of ``dtype``: one grid axis over every element, scalars (n_elements, batch bucket), the constexprs
    INNER, MID, then the kernel's own ``constexprs``, then INDEX_64 and ACC."""
    layout = layout_plan(shape, channels_last)
    n_elements = math.prod(shape)
    return LaunchPlan(kernel, "elementwise", grid=((1, n_elements, "BLOCK"),),
                      scalars=(n_elements, n_bucket(shape[0])),
                      constexprs=(("INNER", layout.inner), ("MID", layout.mid), *constexprs,
                                  ("INDEX_64", layout.index_64), ("ACC", acc_dtype(dtype))),
                      writes=writes, unused=unused)


@triton.jit
def flat_index(pid, BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """Flat element indices of block ``pid``: int64 only when the tensor is large enough to need it."""
    if INDEX_64:
        start = pid.to(tl.int64) * BLOCK
    else:
        start = pid * BLOCK
    return start + tl.arange(0, BLOCK)


@triton.jit
def track_max(best, best_index, values, index, valid):
    """One step of a running max with its argmax, per lane: a lane takes ``values`` where valid and (it holds nothing
    yet, or the value is larger, or it is the first NaN). Lanes see their positions in increasing order, so a lane
    keeps the first of equal values, as torch's CPU ``max`` does. ``best_index`` is -1 while a lane holds nothing."""
    take = valid & ((best_index < 0) | (values > best) | ((values != values) & (best == best)))
    return tl.where(take, values, best), tl.where(take, index, best_index)


@triton.jit
def argmax_reduce(values, indices, AXIS: tl.constexpr):
    """Reduce :func:`track_max` lanes along ``AXIS`` to (max, first index): lanes holding nothing (index -1) never
    win; any NaN wins, at its smallest index; otherwise the largest value at its smallest index. Three plain
    reductions (max, max, min) rather than one ``tl.reduce`` with a combine function, which Triton's interpreter
    evaluates one element at a time."""
    # NaN flags as int32 0/1, not bools: Triton 3.2/3.3's interpreters cannot cast or invert an int1 tensor.
    valid = indices >= 0
    nan = tl.where(valid & (values != values), 1, 0)
    has_nan = tl.max(nan, AXIS)
    largest = tl.max(tl.where(valid & (nan == 0), values, float("-inf")), AXIS)
    winners = tl.where(tl.expand_dims(has_nan, AXIS) > 0, nan > 0, valid & (values == tl.expand_dims(largest, AXIS)))
    first = tl.min(tl.where(winners, indices, 2**31 - 1), AXIS)
    return tl.where(has_nan > 0, float("nan"), largest), first


def fold_max(values, indices, dim):
    """:func:`argmax_reduce` in torch, for partial maxima the kernels leave per split: along ``dim`` the max of
    ``values`` and the smallest of its ``indices`` (any NaN wins, at its smallest index)."""
    nan = values.isnan()
    has_nan = nan.any(dim=dim, keepdim=True)
    largest = values.masked_fill(nan, float("-inf")).amax(dim=dim, keepdim=True)
    winners = torch.where(has_nan, nan, values == largest)
    first = indices.masked_fill(~winners, torch.iinfo(indices.dtype).max).amin(dim=dim)
    return torch.where(has_nan, float("nan"), largest).squeeze(dim).to(values.dtype), first


@dataclass(frozen=True)
class LaunchPlan:
    """What a launcher launches for one input description, computed by a pure function of the shape, dtype, layout
    and SM count (the ``*_plan`` functions beside each kernel). The launch itself (:func:`launch`), ``bam-triton
    inspect`` and the tests all read these, so they cannot drift apart.

    ``grid`` axes are ``(count, extent, block)``: ``count · cdiv(extent, meta[block])``, or ``count`` when ``block``
    is None (``meta`` is the config the autotuner picks). ``scalars`` are the runtime int arguments after the tensors,
    in signature order; ``buffers`` the (shape, dtype) of each small output or partial-sum buffer the launcher
    allocates; ``writes`` and ``unused`` say which pointer arguments are stored to and which are not touched (every
    other one is read: what ``bam-triton traffic`` charges); ``tuning_key`` the values of the autotuner's key."""

    kernel: object  # the autotuned kernel (a triton Autotuner)
    kind: str  # its config list in _CONFIGS
    grid: tuple
    scalars: tuple
    constexprs: tuple  # (name, value) pairs
    buffers: tuple = ()  # (name, shape, dtype) triples
    writes: tuple = ()  # the pointer arguments the kernel stores to
    unused: tuple = ()  # pointer arguments this variant never touches (absent optional inputs)
    # The launch chosen for this plan, (meta, jit kwargs, grid, Config), once :func:`launch` has run it, per
    # :func:`tuning_state` (device and argument dtypes): later launches call the jit function with it directly. Not
    # part of the plan's identity.
    tuned: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        # Compiled Triton types a Python float argument as fp32, which would cost fp64 inputs precision (the
        # interpreter keeps a double and would not show it): scalars are ints, checked once, where a plan is made.
        floats = [a for a in (*self.scalars, *dict(self.constexprs).values()) if isinstance(a, float)]
        if floats:
            raise TypeError(f"bam_triton internal error: float scalar arguments {floats} would be fp32 on a GPU")

    def grid_for(self, meta):
        return tuple(count * (-(-extent // meta[block]) if block else 1) for count, extent, block in self.grid)

    @functools.cached_property
    def constexpr_kwargs(self):
        return dict(self.constexprs)

    @functools.cached_property
    def first_kept_meta(self):
        """The meta-parameters of the first config the pruner keeps: what a launch that runs nothing reports."""
        return self.kept_configs()[0][0]

    def buffer(self, name):
        return next((shape, dtype) for key, shape, dtype in self.buffers if key == name)

    @property
    def kernel_name(self):
        return getattr(self.kernel, "base_fn", self.kernel).__name__

    def scalar_names(self):
        """Names of the runtime scalar arguments: those right after the pointer (``*_ptr``) arguments."""
        names = self.kernel.arg_names
        first = sum(name.endswith("_ptr") for name in names)
        return names[first:first + len(self.scalars)]

    def kept_configs(self):
        """The (meta, num_warps) configs of ``kind`` that the kernel's pruner keeps for this launch (all of them where
        it has none): what the autotuner times; ``BAM_TRITON_AUTOTUNE=0`` runs the first."""
        configs = gpu_configs(self.kind)
        prune = self.kernel.early_config_prune
        if prune is not None:
            configs = prune(configs, dict(zip(self.scalar_names(), self.scalars)), **dict(self.constexprs))
        return [(dict(config.kwargs), config.num_warps) for config in configs]

    @property
    def tuning_key(self):
        values = dict(zip(self.scalar_names(), self.scalars), **dict(self.constexprs))
        return tuple(values[name] for name in self.kernel.keys)


_NO_GUARD = contextlib.nullcontext()


def device_guard(device):
    """Make ``device`` the current CUDA device while a kernel launches: Triton launches on the current device and its
    current stream, which need not be the inputs' device. Nothing to do for CPU tensors (the interpreter) or when
    ``device`` is already current (entering ``torch.cuda.device`` costs a few microseconds a launch)."""
    if device.type != "cuda":
        return _NO_GUARD
    if torch.cuda.is_initialized() and device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


# Launches on META tensors execute nothing (shape-only runs, ``bam-triton traffic``), nor do those under skip_kernels:
# they are handed to these lists.
_RECORDERS = []


@contextlib.contextmanager
def record_launches():
    """Collect the launches that run nothing while the block runs (on META tensors, or under :func:`skip_kernels`): a
    list of (plan, {argument name: bytes of the tensor passed}). Sizes, not tensors: holding a gradient would keep
    autograd from reusing its buffer."""
    launches = []
    _RECORDERS.append(launches)
    try:
        yield launches
    finally:
        _RECORDERS.remove(launches)


# Per thread: a measurement in one thread must not stop another thread's launches.
_SKIPPING = threading.local()


def _skipping():
    return getattr(_SKIPPING, "depth", 0) > 0


@contextlib.contextmanager
def skip_kernels():
    """Within this block (in this thread) every launch does all of its host-side work (plan, config, arguments,
    device guard) and then runs nothing, as launches on META tensors do: ``bam-triton overhead`` times the library's
    own Python this way on any machine. Outputs are left unwritten."""
    _SKIPPING.depth = getattr(_SKIPPING, "depth", 0) + 1
    try:
        yield
    finally:
        _SKIPPING.depth -= 1


def tuning_state(device, dtypes):
    """Where a plan keeps its chosen launch (:attr:`LaunchPlan.tuned`): per device, which Triton compiles for, and per
    dtype of every tensor argument (``dtypes``, in argument order), on which Triton's autotuner keys its choice beside
    the tuning key. A plan's own description leaves some of them open (the small maps', the bias's, dpool's): fp32 and
    bf16 maps may be tuned to different configs."""
    return (device, *dtypes)


def untimed_config(plan):
    """The (meta, num_warps) config a compiled first launch of ``plan`` runs without the autotuner, or None where the
    autotuner chooses: ``BAM_TRITON_AUTOTUNE=0`` runs the first config the pruner keeps, and a pruner that keeps one
    config leaves nothing to choose. Triton 3.2 to 3.7 would time that one config (warm-up, repeats and the 256 MiB
    cache flush); 3.8 and later skip timing a single pruned config themselves. The interpreter always goes through its
    one-config autotuner, which never times."""
    if INTERPRETED:
        return None
    kept = plan.kept_configs()
    return kept[0] if PINNED or len(kept) == 1 else None


def planned_meta(plan, device, dtypes):
    """The meta-parameters the next launch of ``plan`` on ``device`` with tensors of ``dtypes`` will use, where known
    before it runs (launchers size their partial-sum buffers by it): the config chosen once the plan has launched
    there, the one it will run untimed (:func:`untimed_config`), the first kept config where nothing runs (META
    tensors, :func:`skip_kernels`); None before the first real launch the autotuner chooses for (size for every
    config)."""
    tuned = plan.tuned.get(tuning_state(device, dtypes))
    if tuned is not None:
        return tuned[0]
    if device.type == "meta" or _skipping():
        return plan.first_kept_meta
    config = untimed_config(plan)
    return None if config is None else config[0]


# Plan functions are memoised (their arguments are a hashable description of the input), so a launch makes no plan
# and reuses the config its plan was tuned to. Bounded: a stream of new shapes cannot grow it without limit.
_PLAN_CACHES = []


def cached_plan(plan_function):
    cached = functools.lru_cache(maxsize=1024)(plan_function)
    _PLAN_CACHES.append(cached)
    return cached


def forget_plans():
    """Empty the plan caches (tests that swap a kernel or a helper the plans call)."""
    for cache in _PLAN_CACHES:
        cache.cache_clear()


# Launches are serialised: the interpreter patches triton.language while a kernel runs, and the autotuner keeps
# per-kernel state (the arguments and timings of the config search) while it tunes; neither is thread-safe. Holding
# a lock for the host side of a launch costs well under a microsecond; GPU execution is not serialised by it.
_LAUNCH_LOCK = threading.Lock()


def _direct_launch(plan, config):
    """What :func:`launch` passes the jit function for ``config`` (a ``triton.Config``): (meta, jit kwargs, grid,
    config), the kwargs exactly what ``Autotuner.run`` passes for it."""
    meta = dict(config.kwargs)
    return meta, {**plan.constexpr_kwargs, **config.all_kwargs()}, plan.grid_for(meta), config


def launch(plan, *tensors, config=None):
    """Launch ``plan`` on ``tensors`` on their device and that device's current stream, one thread at a time, and
    return the meta-parameters of the launch. The first launch of a plan on a device with tensors of given dtypes
    (:func:`tuning_state`) goes through the autotuner (which tunes, or finds the config it tuned for the plan's key),
    or where there is nothing to choose runs the config of :func:`untimed_config` directly; the plan then keeps the
    config and later launches call the jit function with it directly, skipping the autotuner's per-call bookkeeping.
    ``config`` = (meta, num_warps) forces one config (tests, every config). Scalars are ints: :class:`LaunchPlan`
    refuses floats when it is made."""
    device = tensors[0].device
    state = tuning_state(device, [t.dtype for t in tensors])
    tuned = plan.tuned.get(state) if config is None else _direct_launch(plan, make_config(*config))
    if device.type == "meta" or _skipping():  # nothing to run: the launch is recorded
        if _RECORDERS:
            sizes = {name: t.numel() * t.element_size() for name, t in zip(plan.kernel.arg_names, tensors)}
            for launches in _RECORDERS:
                launches.append((plan, sizes))
        return plan.first_kept_meta if tuned is None else tuned[0]
    with _LAUNCH_LOCK, device_guard(device):
        if tuned is None:
            untimed = untimed_config(plan)
            if untimed is not None:
                tuned = plan.tuned[state] = _direct_launch(plan, make_config(*untimed))
        if tuned is not None:
            meta, kwargs, grid, best = tuned
            plan.kernel.fn[grid](*tensors, *plan.scalars, **kwargs)
            if config is None:  # as Autotuner.run would: best_config is the config of the latest launch
                plan.kernel.best_config = best
            return meta
        plan.kernel[plan.grid_for](*tensors, *plan.scalars, **plan.constexpr_kwargs)
        # the config of the launch that just ran (set by Autotuner.run)
        tuned = plan.tuned[state] = _direct_launch(plan, plan.kernel.best_config)
    return tuned[0]
