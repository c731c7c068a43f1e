"""What the kernels share: interpreter detection, autotune config lists, the memory plan of an input, flat indexing."""
import functools
import math
import os
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Triton decides at import time whether @triton.jit builds GPU code or runs under its CPU interpreter.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

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
}


# Programs a grid aims for before a kernel splits its work further: a few waves even on a large GPU.
MIN_TARGET_PROGRAMS = 1024


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device):
    """How many programs a grid should have on ``device`` before splitting work (4 per SM, at least 1024)."""
    if device.type != "cuda":
        return MIN_TARGET_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(MIN_TARGET_PROGRAMS, 4 * _multiprocessors(index))


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
    ``max_per_thread`` per thread (BLOCK_L is the group row rounded up to a power of two, fixed by the shape); keeps
    the smallest tile if none fits."""

    def prune(configs, named_args, **kwargs):
        block_l = kwargs.get("BLOCK_L", named_args.get("BLOCK_L"))

        def elements(config):
            return config.kwargs["BLOCK_R"] * block_l

        kept = [cf for cf in configs
                if 1024 <= elements(cf) <= 8192 and elements(cf) <= max_per_thread * 32 * cf.num_warps]
        return kept or [min(configs, key=elements)]

    return prune


def gpu_configs(kind):
    """Every GPU config of ``kind`` as a ``triton.Config``."""
    return [triton.Config(meta, num_warps=warps) for meta, warps in _CONFIGS[kind]]


def driver_timer(kernel_call, quantiles):
    """The autotuner's timer: the active driver's own, looked up when a config is first timed. Triton 3.3 looks it up
    when a kernel is defined unless it is given one, which fails where there is no GPU driver (the interpreter,
    ``bam-triton inspect``); Triton 3.4 and later look it up lazily themselves."""
    return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def autotune(kind, key, **options):
    """``triton.autotune`` over the ``kind`` config list, timed by :func:`driver_timer`. The interpreter cannot time
    configs, so there it runs the first config of the list only."""
    configs = gpu_configs(kind)
    return triton.autotune(configs=configs[:1] if INTERPRETED else configs, key=key, do_bench=driver_timer,
                           **options)


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


def memory_plan(x):
    n, c, h, w = x.shape
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    inner, mid = (c, h * w) if channels_last else (h * w, c)
    return MemoryPlan(channels_last, inner, mid, x.numel() + MAX_BLOCK >= 2**31)


@triton.jit
def flat_index(pid, BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """Flat element indices of block ``pid``: int64 only when the tensor is large enough to need it."""
    if INDEX_64:
        start = pid.to(tl.int64) * BLOCK
    else:
        start = pid * BLOCK
    return start + tl.arange(0, BLOCK)


# Launches are serialised: the interpreter patches triton.language while a kernel runs, and the autotuner keeps
# per-kernel state (the arguments and timings of the config search) while it tunes; neither is thread-safe. Holding
# a lock for the host side of a launch costs well under a microsecond; GPU execution is not serialised by it.
_LAUNCH_LOCK = threading.Lock()


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, one thread at a time."""
    with _LAUNCH_LOCK:
        return kernel[grid](*args, **kwargs)
