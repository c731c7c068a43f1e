"""Channel pooling: ``pooled[n, c] = mean over (h, w) of x[n, c, h, w]``, accumulated in fp32 (fp64 for fp64 inputs),
and with ``WITH_MAX`` (CBAM's channel gate) the max over (h, w) and its first position h·W + w from the same read.

Each program owns ``BLOCK_C`` channels of one image and one chunk of H·W positions, and keeps a
[BLOCK_C, BLOCK_HW] fp32 accumulator that it sums down to BLOCK_C values at the end. The tile is laid along the
contiguous axis of the memory format so its loads coalesce and vectorise:

    NCHW: element (n, c, hw) at n·C·HW + c·HW + hw -> tile [BLOCK_C, BLOCK_HW], hw contiguous
    NHWC: element (n, hw, c) at n·HW·C + hw·C + c  -> tile [BLOCK_HW, BLOCK_C], c contiguous

Splitting H·W over ``grid[1]`` gives channels_last inputs with few channels blocks enough programs to fill the GPU;
the split partial sums land in an (N, n_splits, C) fp32 buffer that a tiny second pass adds up in a fixed order,
so results are deterministic (no atomics). With one split the kernel writes the pooled (N, C) result directly. The
max keeps a running (value, position) per tile lane (``_common.track_max``) and reduces the lanes once at the end
(``_common.argmax_reduce``); split maxima are folded by ``_common.fold_max``.
Per-image offsets are int32 (the op layer checks C·H·W < 2**31); the image base is int64.

NCHW with a small H·W that is not a multiple of 16 (14x14, 7x7) goes to ``channel_pool_rows_kernel`` instead: rows
of H·W elements do not start 16-byte aligned there, so the tiles above would load scalars. It views K consecutive
channels as one row of K·H·W elements (``_common.row_group``: K·H·W·itemsize a multiple of 16, H·W a constexpr),
loads [BLOCK_R, BLOCK_L] tiles of whole group rows in 128-bit vectors, and splits each row into its K channel sums
with K masked reductions:

    group row r, position l:  channel r·K + l // HW,  hw = l % HW
"""
import torch
import triton
import triton.language as tl

from ._common import (POOL_SPLIT_UNIT, LaunchPlan, acc_dtype, argmax_reduce, autotune, cached_plan,
                      fold_max, keep_contiguous_configs, launch, n_bucket, row_group, row_tile_pruner, sm_count,
                      target_programs, track_max)


def _pool_prune(configs, named_args, **kwargs):
    """keep_contiguous_configs, and WITH_MAX at most 16 elements per thread, 8 for channels_last: a running max and
    argmax beside the sum make three accumulators per element; 32 per thread took 168-179 registers on sm_80/sm_90
    (bam-triton inspect, Triton 3.9), and 16 spilled 8 bytes channels_last in fp32 on sm_80 under Triton 3.2."""
    kept = keep_contiguous_configs(configs, named_args, **kwargs)
    if kwargs.get("WITH_MAX", named_args.get("WITH_MAX")):
        per_thread = 8 if kwargs.get("CHANNELS_LAST", named_args.get("CHANNELS_LAST")) else 16
        kept = [cf for cf in kept if cf.kwargs["BLOCK_C"] * cf.kwargs["BLOCK_HW"] <= per_thread * 32 * cf.num_warps] \
            or kept
    return kept


@autotune("pool", key=["batch_bucket", "C", "HW", "CHANNELS_LAST", "WITH_MAX"], prune=_pool_prune)
@triton.jit(do_not_specialize=["batch_bucket"])
def channel_pool_kernel(
    x_ptr,  # (N, C, H, W), dense NCHW or NHWC
    out_ptr,  # (N, n_splits, C): partial means (each split's sum over H·W divided by H·W)
    max_ptr,  # (N, n_splits, C): each split's max; written only WITH_MAX
    argmax_ptr,  # (N, n_splits, C) int32: the first position h·W + w of that max; written only WITH_MAX
    C,
    HW,
    hw_per_split,  # multiple of POOL_SPLIT_UNIT, hence of BLOCK_HW
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    CHANNELS_LAST: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: fp32 (fp64 for fp64 inputs)
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    WITH_MAX: tl.constexpr = False,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    n_c_blocks = tl.cdiv(C, BLOCK_C)
    n = pid // n_c_blocks
    c = (pid % n_c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    image = x_ptr + n.to(tl.int64) * C * HW
    hw_start = split * hw_per_split
    hw_stop = tl.minimum(hw_start + hw_per_split, HW)
    if CHANNELS_LAST:
        acc = tl.zeros([BLOCK_HW, BLOCK_C], dtype=ACC)
        best = tl.full([BLOCK_HW, BLOCK_C], float("-inf"), ACC)
        best_hw = tl.full([BLOCK_HW, BLOCK_C], -1, tl.int32)
        for hw0 in range(hw_start, hw_stop, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            # Blocks never straddle a split (hw_per_split is a multiple of BLOCK_HW): only the H·W tail is masked.
            mask = (hw[:, None] < HW) & c_mask[None, :]
            tile = tl.load(image + hw[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
            acc += tile
            if WITH_MAX:
                best, best_hw = track_max(best, best_hw, tile, hw[:, None], mask)
        sums = tl.sum(acc, axis=0)
        if WITH_MAX:
            maxima, positions = argmax_reduce(best, best_hw, 0)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
        best = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), ACC)
        best_hw = tl.full([BLOCK_C, BLOCK_HW], -1, tl.int32)
        for hw0 in range(hw_start, hw_stop, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (hw[None, :] < HW)
            tile = tl.load(image + c[:, None] * HW + hw[None, :], mask=mask, other=0.0).to(ACC)
            acc += tile
            if WITH_MAX:
                best, best_hw = track_max(best, best_hw, tile, hw[None, :], mask)
        sums = tl.sum(acc, axis=1)
        if WITH_MAX:
            maxima, positions = argmax_reduce(best, best_hw, 1)
    row = (n * n_splits + split) * C + c
    # Divided by H·W in ACC: a float argument for 1 / (H·W) would be fp32 on a GPU even for fp64 inputs.
    tl.store(out_ptr + row, (sums / tl.cast(HW, ACC)).to(out_ptr.dtype.element_ty), mask=c_mask)
    if WITH_MAX:
        tl.store(max_ptr + row, maxima.to(max_ptr.dtype.element_ty), mask=c_mask)
        tl.store(argmax_ptr + row, positions, mask=c_mask)


# Up to 16 elements per thread: one load and a few adds each, 16-64 registers (bam-triton inspect, Triton 3.9).
@autotune("rows", key=["batch_bucket", "C", "HW", "GROUP", "WITH_MAX"], prune=row_tile_pruner(max_per_thread=16))
@triton.jit(do_not_specialize=["batch_bucket"])
def channel_pool_rows_kernel(
    x_ptr,  # (N, C, H, W), dense NCHW, C divisible by GROUP
    out_ptr,  # (N, C): the means
    max_ptr,  # (N, C): the maxima; written only WITH_MAX
    argmax_ptr,  # (N, C) int32: the first position h·W + w of each max; written only WITH_MAX
    C,
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    HW: tl.constexpr,  # a constexpr, so the compiler can prove group rows (GROUP·HW elements) 16-byte aligned
    GROUP: tl.constexpr,  # K channels per group row
    ACC: tl.constexpr,  # accumulation dtype: fp32 (fp64 for fp64 inputs)
    BLOCK_R: tl.constexpr,  # group rows per program
    BLOCK_L: tl.constexpr,  # GROUP·HW rounded up to a power of two
    WITH_MAX: tl.constexpr = False,
):
    ROW = GROUP * HW  # constexpr: elements per group row
    n_rows = C // GROUP
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_R)
    n = (pid // n_row_blocks).to(tl.int64)
    r = (pid % n_row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < n_rows
    l = tl.arange(0, BLOCK_L)
    channel_in_group = l // HW  # GROUP for the padding past ROW: never equal to a j below
    mask = r_mask[:, None] & (l < ROW)[None, :]
    tile = tl.load(x_ptr + n * C * HW + r[:, None] * ROW + l[None, :], mask=mask, other=0.0).to(ACC)
    rows = n * C + r * GROUP
    for j in tl.static_range(GROUP):
        in_channel = channel_in_group[None, :] == j
        sums = tl.sum(tl.where(in_channel, tile, 0.0), axis=1)
        tl.store(out_ptr + rows + j, (sums / HW).to(out_ptr.dtype.element_ty), mask=r_mask)  # once per row: in ACC
        if WITH_MAX:
            valid = mask & in_channel
            values = tl.where(valid, tile, float("-inf"))
            maxima, positions = argmax_reduce(values, tl.where(valid, l[None, :] - j * HW, -1), 1)
            tl.store(max_ptr + rows + j, maxima.to(max_ptr.dtype.element_ty), mask=r_mask)
            tl.store(argmax_ptr + rows + j, positions, mask=r_mask)


def pool_split(n, c, hw, target):
    """(n_splits, hw_per_split) of the pooling grid: split H·W only when the (image, channel block) grid alone has
    fewer than ``target`` programs; each split is a multiple of POOL_SPLIT_UNIT."""
    base_programs = n * -(-c // 64)
    n_splits = max(1, min(-(-target // base_programs), -(-hw // POOL_SPLIT_UNIT)))
    hw_per_split = -(-(-(-hw // n_splits)) // POOL_SPLIT_UNIT) * POOL_SPLIT_UNIT
    return -(-hw // hw_per_split), hw_per_split


@cached_plan
def channel_pool_plan(shape, dtype, channels_last, sms=None, with_max=False):
    """The launch of :func:`channel_pool_fwd` for a dense ``shape`` input of ``dtype`` on a GPU with ``sms`` SMs: the
    row-group kernel (NCHW with unaligned small H·W) or the 2D-tile kernel with its H·W split. Buffer ``out`` is the
    (N, n_splits, C) result: the means when n_splits is 1, fp32 partial means otherwise; with ``with_max`` also
    ``max`` (x's dtype) and ``argmax`` (int32) of that shape."""
    n, c, h, w = shape
    hw = h * w
    acc = acc_dtype(dtype)
    group = None if channels_last else row_group(c, hw, dtype.itemsize)
    maxima = (("max", dtype), ("argmax", torch.int32)) if with_max else ()
    written = ("out_ptr", "max_ptr", "argmax_ptr") if with_max else ("out_ptr",)
    unused = () if with_max else ("max_ptr", "argmax_ptr")
    if group is not None:
        return LaunchPlan(channel_pool_rows_kernel, "rows", grid=((n, c // group, "BLOCK_R"),),
                          scalars=(c, n_bucket(n)),
                          constexprs=(("HW", hw), ("GROUP", group), ("ACC", acc),
                                      ("BLOCK_L", triton.next_power_of_2(group * hw)), ("WITH_MAX", with_max)),
                          buffers=tuple((name, (n, 1, c), dt) for name, dt in (("out", dtype),) + maxima),
                          writes=written, unused=unused)
    n_splits, hw_per_split = pool_split(n, c, hw, target_programs(sms))
    out_dtype = dtype if n_splits == 1 else torch.promote_types(dtype, torch.float32)
    return LaunchPlan(channel_pool_kernel, "pool", grid=((n, c, "BLOCK_C"), (n_splits, 1, None)),
                      scalars=(c, hw, hw_per_split, n_bucket(n)),
                      constexprs=(("CHANNELS_LAST", channels_last), ("ACC", acc), ("WITH_MAX", with_max)),
                      buffers=tuple((name, (n, n_splits, c), dt) for name, dt in (("out", out_dtype),) + maxima),
                      writes=written, unused=unused)


def _pool(x, channels_last, with_max, config):
    plan = channel_pool_plan(tuple(x.shape), x.dtype, channels_last, sm_count(x.device), with_max)
    outputs = [torch.empty(shape, device=x.device, dtype=dtype) for _, shape, dtype in plan.buffers]
    out = outputs[0]
    launch(plan, x, out, *(outputs[1:] if with_max else (out, out)), config=config)
    n, n_splits, c = out.shape
    if n_splits == 1:
        return [t.view(n, c) for t in outputs]
    if not with_max:
        return [out.sum(dim=1).to(x.dtype)]
    return [out.sum(dim=1).to(x.dtype), *fold_max(*outputs[1:], dim=1)]


def channel_pool_fwd(x, channels_last, config=None):
    """Launch :func:`channel_pool_plan`'s kernel on a dense (N, C, H, W) ``x``; returns (N, C) in ``x``'s dtype.
    ``config`` forces one (meta, num_warps) config (tests). Arguments are validated by the op layer."""
    return _pool(x, channels_last, False, config)[0]


def channel_pool_max_fwd(x, channels_last, config=None):
    """CBAM's channel-gate pooling from one read of a dense (N, C, H, W) ``x``: ``(mean, max, argmax)``, (N, C) each,
    the mean and max in ``x``'s dtype, argmax int32 (the first position h·W + w of each max)."""
    return tuple(_pool(x, channels_last, True, config))
