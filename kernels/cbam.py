"""CBAM's memory-bound steps (``bam_triton/cbam_ops.py`` has the maths and the autograd wiring).

With ``a`` (N, C) the channel attention, ``b`` (N, H·W) the spatial attention and ``g`` the output's gradient:

    pool          avg, max and argmax over H·W           kernels/pool.py, WITH_MAX          reads x
    spatial_pool  max, argmax and mean over C of x·a      channel_reduce(_rows)_kernel       reads x
    apply         out = x·a·b                             apply_kernel (flat)                reads x, writes out
    grad_b        db = Σ_c g·x·a                          channel_reduce(_rows)_kernel, WITH_G   reads g, x
    grad_a        da = Σ_hw dy·x                          hw_reduce(_rows)_kernel            reads g, x
    grad_x        dx = dy·a + d_avg/(H·W) + d_max at argmax_hw (+ extra)    grad_x_kernel (flat)   reads g, writes dx
    with dy = g·b + dmax_c at argmax_c + dmean_c / C (the gradient of x·a; never written)

Forward 3 reads of x and 1 write; backward 3 reads of g, 2 of x, 1 write: 4 and 10 |F| per training step (plus the
small maps and partial sums).

``channel_reduce_kernel`` reduces over channels for a block of pixels: a program owns one image, BLOCK_HW positions
and one split of the channels, keeps [BLOCK_C, BLOCK_HW] (NCHW; [BLOCK_HW, BLOCK_C] for NHWC, the tile laid along
the contiguous axis as in pool.py) running sums, maxima and argmaxes, and reduces them once at the end into per-split
partials (N, n_splits, H·W) that the launcher folds in a fixed order (deterministic, no atomics). The split is
apply_bwd.py's ``channel_split``, the configs its ``reduce2d`` tiles. ``hw_reduce_kernel`` reduces over H·W for a
block of channels like the pooling (its ``pool`` tiles and ``pool_split``), with dy formed from g and the small maps.

NCHW with a small H·W that is not a multiple of 16 (14x14, 7x7) goes to the row-group variants instead, as BAM's
kernels do (pool.py, apply_bwd.py): rows of H·W elements do not start 16-byte aligned there, so the tiles above would
load x and g as scalars. K consecutive channels form one group row of K·H·W elements (``_common.row_group``), loaded
in [BLOCK_R, BLOCK_L] tiles of whole group rows as 128-bit vectors:

    group row r, position l:  channel r·K + l // HW,  hw = l % HW

``channel_reduce_rows_kernel``: a program owns one image and one split of the group rows (all positions), keeps
running sums (and maxima and argmax channels) per tile lane over its rows, reduces them over the rows once at the end
and stores per group-row position partials (N, n_splits, K·H·W); the launcher folds them over the splits and the K
segments alike, viewed as (N, n_splits·K, H·W). ``hw_reduce_rows_kernel``: a program owns one image and one split of
the group rows, gathers the pixel maps once (they depend on hw = l % HW only) and writes each row's K channel sums
(K masked row sums per tile) straight into da (N, C).

The flat kernels walk the flat memory range of g or x as ``apply.py`` does (INNER/MID constexprs, 128-bit vectors for
any H·W). Each element needs its channel index n·C + c and pixel index n·H·W + hw: for NCHW the row-map and
column-map indices of apply.py, for NHWC the other way round. Argmax maps are int32 positions (hw in 0..H·W-1, c in
0..C-1); ties go to the first position, NaN to the first NaN (``_common.track_max``), as torch's CPU ``max``.

Offsets within an image are int32 and image bases int64 (the op layer checks C·H·W < 2**31); the flat kernels use the
memory plan's INDEX_64.
"""

import torch
import triton
import triton.language as tl

from ._common import (LaunchPlan, acc_dtype, argmax_reduce, autotune, cached_plan, flat_index, flat_plan,
                      fold_max, is_channels_last, keep_contiguous_configs, launch, n_bucket, per_thread_pruner,
                      row_group, row_tile_pruner, sm_count, target_programs, track_max)
from .apply import col_map_index, row_map_index
from .apply_bwd import ROW_SPLIT_UNIT, channel_split
from .pool import channel_pool_max_fwd, pool_split

# ----------------------------------------------------------------------------------------------------------------------
# Reductions over channels: the spatial pool (max, argmax, sum of x·a) and db (sum of g·x·a)
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _channel_tile(x_image, g_image, a_row, offsets, mask, c, c_valid, sums, best, best_c, WITH_G: tl.constexpr,
                  ACC: tl.constexpr):
    """One tile's step of the reductions over channels: ``v = x·a`` (``g·x·a`` WITH_G) added to ``sums``, and
    without g the running max and argmax over channels updated. ``c`` and ``c_valid`` broadcast against the tile:
    along its channel axis (channel_reduce_kernel), or each element's own channel (the row-group kernel)."""
    a = tl.load(a_row + c, mask=c_valid, other=0.0).to(ACC)
    v = tl.load(x_image + offsets, mask=mask, other=0.0).to(ACC) * a
    if WITH_G:
        v *= tl.load(g_image + offsets, mask=mask, other=0.0).to(ACC)
    else:
        best, best_c = track_max(best, best_c, v, c, mask)
    return sums + tl.where(mask, v, 0.0), best, best_c


@triton.jit
def _store_channel_reduction(sum_ptr, max_ptr, argmax_ptr, row, argmax_row, hw_mask, sums, best, best_c, C,
                             AXIS: tl.constexpr, WITH_G: tl.constexpr, MEAN: tl.constexpr):
    """Reduce channel_reduce_kernel's tiles along their channel axis ``AXIS`` and store the split's results (the sum
    divided by C when it is the ``MEAN``) at ``row``, the argmax at ``argmax_row``."""
    sums = tl.sum(sums, axis=AXIS)
    if MEAN:
        sums = sums / tl.cast(C, sums.dtype)
    tl.store(sum_ptr + row, sums.to(sum_ptr.dtype.element_ty), mask=hw_mask)
    if not WITH_G:
        maxima, channels = argmax_reduce(best, best_c, AXIS)
        tl.store(max_ptr + row, maxima.to(max_ptr.dtype.element_ty), mask=hw_mask)
        tl.store(argmax_ptr + argmax_row, channels, mask=hw_mask)


def _channel_reduce_prune(configs, named_args, **kwargs):
    """keep_contiguous_configs; without g (a running max and argmax beside the sum) not BLOCK_C=16 x BLOCK_HW=128 on 8
    warps, which spilled 4 bytes on sm_90 in fp16/bf16 NCHW (bam-triton inspect, Triton 3.9)."""
    kept = keep_contiguous_configs(configs, named_args, **kwargs)
    if not kwargs.get("WITH_G", named_args.get("WITH_G")):
        kept = [cf for cf in kept if (cf.kwargs["BLOCK_C"], cf.kwargs["BLOCK_HW"], cf.num_warps) != (16, 128, 8)] \
            or kept
    return kept


@autotune("reduce2d", key=["batch_bucket", "C", "HW", "CHANNELS_LAST", "WITH_G"], prune=_channel_reduce_prune)
@triton.jit(do_not_specialize=["batch_bucket"])
def channel_reduce_kernel(
    x_ptr,  # (N, C, H, W), dense NCHW or NHWC
    g_ptr,  # like x; read only WITH_G
    a_ptr,  # (N, C): the channel attention
    sum_ptr,  # (N, ·, H·W), image stride out_stride: Σ over the split's channels of x·a (g·x·a WITH_G); MEAN: / C
    max_ptr,  # (N, ·, H·W), image stride out_stride: the split's max of x·a; written only without g
    argmax_ptr,  # (N, n_splits, H·W) int32: the channel of that max; written only without g
    C,
    HW,
    c_per_split,  # multiple of every BLOCK_C (apply_bwd.channel_split)
    out_stride,  # elements from one image's results to the next: n_splits·H·W, or 2·H·W writing into s
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    CHANNELS_LAST: tl.constexpr,
    WITH_G: tl.constexpr,
    MEAN: tl.constexpr,  # one split: store the mean (the sum / C), straight into s
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    ACC: tl.constexpr = tl.float32,  # accumulation dtype: fp32, fp64 for fp64 inputs
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_hw_blocks = tl.cdiv(HW, BLOCK_HW)
    n = (pid // n_hw_blocks).to(tl.int64)
    hw = (pid % n_hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    image = n * C * HW
    x_image, g_image, a_row = x_ptr + image, g_ptr + image, a_ptr + n * C
    c_start = split * c_per_split
    c_stop = tl.minimum(c_start + c_per_split, C)
    row = n * out_stride + split * HW + hw
    argmax_row = (n * tl.num_programs(1) + split) * HW + hw
    if CHANNELS_LAST:
        sums = tl.zeros([BLOCK_HW, BLOCK_C], dtype=ACC)
        best = tl.full([BLOCK_HW, BLOCK_C], float("-inf"), ACC)
        best_c = tl.full([BLOCK_HW, BLOCK_C], -1, tl.int32)
        for c0 in range(c_start, c_stop, BLOCK_C):
            c = (c0 + tl.arange(0, BLOCK_C))[None, :]
            mask = hw_mask[:, None] & (c < C)
            sums, best, best_c = _channel_tile(x_image, g_image, a_row, hw[:, None] * C + c, mask, c, c < C, sums,
                                               best, best_c, WITH_G, ACC)
        _store_channel_reduction(sum_ptr, max_ptr, argmax_ptr, row, argmax_row, hw_mask, sums, best, best_c, C, 1,
                                 WITH_G, MEAN)
    else:
        sums = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
        best = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), ACC)
        best_c = tl.full([BLOCK_C, BLOCK_HW], -1, tl.int32)
        for c0 in range(c_start, c_stop, BLOCK_C):
            c = (c0 + tl.arange(0, BLOCK_C))[:, None]
            mask = (c < C) & hw_mask[None, :]
            sums, best, best_c = _channel_tile(x_image, g_image, a_row, c * HW + hw[None, :], mask, c, c < C, sums,
                                               best, best_c, WITH_G, ACC)
        _store_channel_reduction(sum_ptr, max_ptr, argmax_ptr, row, argmax_row, hw_mask, sums, best, best_c, C, 0,
                                 WITH_G, MEAN)


# Up to 16 elements per thread: with the sum, running max and argmax per element, 32-127 registers and no spills on
# sm_80/sm_90 in fp16/bf16/fp32 at 14x14, 15x15 and 7x7 (db: 32-80; bam-triton inspect, Triton 3.9).
_rows_16_per_thread = row_tile_pruner(max_per_thread=16)


def _channel_reduce_rows_prune(configs, named_args, **kwargs):
    """row_tile_pruner(16), and without g not BLOCK_R=2 on 4 warps, which spilled 4 bytes on sm_90 under Triton 3.2
    (fp16 at 14x14, K = 2; none under 3.9)."""
    kept = _rows_16_per_thread(configs, named_args, **kwargs)
    if not kwargs.get("WITH_G", named_args.get("WITH_G")):
        kept = [cf for cf in kept if (cf.kwargs["BLOCK_R"], cf.num_warps) != (2, 4)] or kept
    return kept


@autotune("rows", key=["batch_bucket", "C", "HW", "GROUP", "WITH_G"], prune=_channel_reduce_rows_prune)
@triton.jit(do_not_specialize=["batch_bucket"])
def channel_reduce_rows_kernel(
    x_ptr,  # (N, C, H, W), dense NCHW, C divisible by GROUP
    g_ptr,  # like x; read only WITH_G
    a_ptr,  # (N, C): the channel attention
    sum_ptr,  # (N, n_splits, GROUP·HW): per group-row position, Σ over the split's rows of x·a (g·x·a WITH_G)
    max_ptr,  # (N, n_splits, GROUP·HW): the split's max of x·a per position; written only without g
    argmax_ptr,  # (N, n_splits, GROUP·HW) int32: the channel (not the row) of that max; written only without g
    C,
    rows_per_split,  # group rows per split, a multiple of every BLOCK_R
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    HW: tl.constexpr,  # a constexpr, so the compiler can prove group rows (GROUP·HW elements) 16-byte aligned
    GROUP: tl.constexpr,  # K channels per group row
    WITH_G: tl.constexpr,
    BLOCK_R: tl.constexpr,  # group rows per tile
    BLOCK_L: tl.constexpr,  # GROUP·HW rounded up to a power of two
    ACC: tl.constexpr = tl.float32,  # accumulation dtype: fp32, fp64 for fp64 inputs
):
    ROW = GROUP * HW  # constexpr: elements per group row
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_rows = C // GROUP
    l = tl.arange(0, BLOCK_L)
    l_mask = l < ROW
    channel_in_group = l // HW  # GROUP for the padding past ROW: masked out
    image = n * C * HW
    x_image, g_image, a_row = x_ptr + image, g_ptr + image, a_ptr + n * C
    r_start = split * rows_per_split
    r_stop = tl.minimum(r_start + rows_per_split, n_rows)
    sums = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
    best = tl.full([BLOCK_R, BLOCK_L], float("-inf"), ACC)
    best_c = tl.full([BLOCK_R, BLOCK_L], -1, tl.int32)
    for r0 in range(r_start, r_stop, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < n_rows)[:, None] & l_mask[None, :]
        # Each lane sees its rows in increasing order, and the argmax keeps the real channel: the first of equal
        # maxima wins in argmax_reduce over the rows and in the launcher's fold over splits and segments alike.
        c = r[:, None] * GROUP + channel_in_group[None, :]
        sums, best, best_c = _channel_tile(x_image, g_image, a_row, r[:, None] * ROW + l[None, :], mask, c, mask,
                                           sums, best, best_c, WITH_G, ACC)
    partial = (n * tl.num_programs(1) + split) * ROW + l
    _store_channel_reduction(sum_ptr, max_ptr, argmax_ptr, partial, partial, l_mask, sums, best, best_c, C, 0,
                             WITH_G, False)


# The row-group reductions over channels write partials per split and group-row position (K per pixel) that the
# launcher reads back: they split the channels only until those partials reach 1/_PARTIAL_SHARE of the bytes the split
# reads. An image's programs are its splits, so this trades programs for traffic: with 1/8 the spatial pool gets 8 and 4
# programs per image at ResNet-50's 1024x14x14 and 2048x7x7 in fp16 (32 and 16 in fp32), db 32 and 16.
_PARTIAL_SHARE = 8


def _row_split(n_rows, n_splits):
    """(n_splits, rows_per_split) for about ``n_splits`` splits of ``n_rows`` group rows, each a whole number of
    ``apply_bwd``'s row-split units (a multiple of every BLOCK_R, so only the last split's tail is masked)."""
    n_splits = max(1, min(n_splits, -(-n_rows // ROW_SPLIT_UNIT)))
    rows_per_split = -(-(-(-n_rows // n_splits)) // ROW_SPLIT_UNIT) * ROW_SPLIT_UNIT
    return -(-n_rows // rows_per_split), rows_per_split


@cached_plan
def channel_reduce_plan(shape, dtype, channels_last, with_g, sms=None):
    """The launch of :func:`spatial_pool` (``with_g`` False) or :func:`grad_b` for a dense ``shape`` input of
    ``dtype`` on a GPU with ``sms`` SMs. Buffers: the spatial pool's ``s`` (N, 2, H·W) in x's dtype, which the 2D-tile
    kernel fills itself when the channels are not split, else fp32 partials ``sum`` and ``max`` (N, n_splits, H·W);
    its ``argmax`` (N, n_splits, H·W) int32; db's ``sum``. The row-group kernel (NCHW with unaligned small H·W) always
    leaves partials, (N, n_splits·K, H·W): per split and group-row segment."""
    n, c, h, w = shape
    hw = h * w
    acc = torch.promote_types(dtype, torch.float32)
    writes = ("sum_ptr",) if with_g else ("sum_ptr", "max_ptr", "argmax_ptr")
    unused = ("max_ptr", "argmax_ptr") if with_g else ("g_ptr",)
    group = None if channels_last else row_group(c, hw, dtype.itemsize)
    if group is not None:
        # Per group-row position a split reads its rows of x (and g) and writes the sum (and the max and argmax).
        n_rows = c // group
        read = (2 if with_g else 1) * dtype.itemsize
        written = acc.itemsize if with_g else 2 * acc.itemsize + 4
        max_splits = max(1, n_rows * read // (_PARTIAL_SHARE * written))
        n_splits, rows_per_split = _row_split(n_rows, min(-(-target_programs(sms) // n), max_splits))
        partials = (n, n_splits * group, hw)
        buffers = (("sum", partials, acc),) if with_g else (("sum", partials, acc), ("max", partials, acc),
                                                            ("argmax", partials, torch.int32))
        return LaunchPlan(channel_reduce_rows_kernel, "rows", grid=((n, 1, None), (n_splits, 1, None)),
                          scalars=(c, rows_per_split, n_bucket(n)),
                          constexprs=(("HW", hw), ("GROUP", group), ("WITH_G", with_g),
                                      ("BLOCK_L", triton.next_power_of_2(group * hw)), ("ACC", acc_dtype(dtype))),
                          buffers=buffers, writes=writes, unused=unused)
    n_splits, c_per_split = channel_split(n, c, hw, target_programs(sms))
    mean = not with_g and n_splits == 1
    if with_g:
        buffers = (("sum", (n, n_splits, hw), acc),)
    elif mean:
        buffers = (("s", (n, 2, hw), dtype), ("argmax", (n, 1, hw), torch.int32))
    else:
        buffers = (("sum", (n, n_splits, hw), acc), ("max", (n, n_splits, hw), acc),
                   ("argmax", (n, n_splits, hw), torch.int32))
    return LaunchPlan(channel_reduce_kernel, "reduce2d", grid=((n, hw, "BLOCK_HW"), (n_splits, 1, None)),
                      scalars=(c, hw, c_per_split, (2 if mean else n_splits) * hw, n_bucket(n)),
                      constexprs=(("CHANNELS_LAST", channels_last), ("WITH_G", with_g), ("MEAN", mean),
                                  ("ACC", acc_dtype(dtype))),
                      buffers=buffers, writes=writes, unused=unused)


def _plan_and_outputs(x, g):
    plan = channel_reduce_plan(tuple(x.shape), x.dtype, is_channels_last(x), g is not None, sm_count(x.device))
    return plan, [torch.empty(shape, device=x.device, dtype=dtype) for _, shape, dtype in plan.buffers]


def spatial_pool(x, a, config=None):
    """``(s, argmax_c)``: s (N, 2, H, W) in x's dtype, ``[max over C, mean over C]`` of ``x·a``, from one read of a
    dense ``x``; argmax_c (N, H·W) int32, the first channel of each max. ``a`` (N, C) contiguous. ``config`` forces one
    (meta, num_warps) config (tests)."""
    n, c, h, w = x.shape
    plan, outputs = _plan_and_outputs(x, None)
    if len(outputs) == 2:  # one split: the kernel writes the max and the mean into s itself
        s, argmax = outputs
        launch(plan, x, x, a, s[:, 1], s[:, 0], argmax, config=config)  # x as g: never read
        return s.view(n, 2, h, w), argmax.view(n, h * w)
    sums, maxima, argmax = outputs
    launch(plan, x, x, a, sums, maxima, argmax, config=config)
    maxima, argmax = fold_max(maxima, argmax, dim=1)
    s = torch.stack((maxima, sums.sum(dim=1).div_(c)), dim=1).to(x.dtype)
    return s.view(n, 2, h, w), argmax


def grad_b(g, x, a, config=None):
    """db (N, H·W) = Σ_c g·x·a in fp32 (fp64 for fp64); ``g`` in x's strides, ``a`` (N, C) contiguous."""
    plan, (sums,) = _plan_and_outputs(x, g)
    launch(plan, x, g, a, sums, sums, sums, config=config)  # the sums as max and argmax: never touched
    return sums[:, 0] if sums.shape[1] == 1 else sums.sum(dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Reduction over H·W: da
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _pixel_maps(b_ptr, argmax_c_ptr, dmax_c_ptr, dmean_c_ptr, pixel, pixel_mask, ACC: tl.constexpr):
    """The pixel maps dy needs, ``(b, argmax_c, dmax_c, dmean_c)``, gathered at ``pixel`` (n·H·W + hw)."""
    return (tl.load(b_ptr + pixel, mask=pixel_mask, other=0.0).to(ACC),
            tl.load(argmax_c_ptr + pixel, mask=pixel_mask, other=-1),
            tl.load(dmax_c_ptr + pixel, mask=pixel_mask, other=0.0).to(ACC),
            tl.load(dmean_c_ptr + pixel, mask=pixel_mask, other=0.0).to(ACC))


@triton.jit
def _spatial_dy(g, b, argmax_c, dmax_c, dmean_c, c, inv_c):
    """The gradient of x·a with the spatial gate: ``g·b + dmax_c`` where ``c`` is the argmax channel ``+ dmean_c /
    C``, the pixel maps shaped to broadcast against g."""
    return g * b + tl.where(c == argmax_c, dmax_c, 0.0) + dmean_c * inv_c


@triton.jit
def _dy(g, b_ptr, argmax_c_ptr, dmax_c_ptr, dmean_c_ptr, pixel, pixel_mask, c, inv_c, HAS_SPATIAL: tl.constexpr,
        ACC: tl.constexpr):
    """The gradient of x·a, the pixel maps gathered at ``pixel`` (shaped to broadcast against g); ``g`` itself
    without the spatial gate."""
    if HAS_SPATIAL:
        b, argmax_c, dmax_c, dmean_c = _pixel_maps(b_ptr, argmax_c_ptr, dmax_c_ptr, dmean_c_ptr, pixel, pixel_mask, ACC)
        return _spatial_dy(g, b, argmax_c, dmax_c, dmean_c, c, inv_c)
    else:
        return g


def _hw_reduce_prune(configs, named_args, **kwargs):
    """keep_contiguous_configs with at most 16 elements per thread, 8 for channels_last: g, x, dy and the pixel maps
    per element; 32 spilled 4-12 bytes on sm_80/sm_90 (fp32, bf16) and 16 spilled 4 bytes channels_last in fp32 on
    sm_90 (bam-triton inspect, Triton 3.9)."""
    kept = keep_contiguous_configs(configs, named_args, **kwargs)
    per_thread = 8 if kwargs.get("CHANNELS_LAST", named_args.get("CHANNELS_LAST")) else 16
    return [cf for cf in kept if cf.kwargs["BLOCK_C"] * cf.kwargs["BLOCK_HW"] <= per_thread * 32 * cf.num_warps] or kept


@autotune("pool", key=["batch_bucket", "C", "HW", "CHANNELS_LAST", "HAS_SPATIAL"], prune=_hw_reduce_prune)
@triton.jit(do_not_specialize=["batch_bucket"])
def hw_reduce_kernel(
    g_ptr,  # (N, C, H, W), same strides as x
    x_ptr,  # (N, C, H, W), dense NCHW or NHWC
    b_ptr,  # (N, H·W): the spatial attention; the pixel maps are read only HAS_SPATIAL
    argmax_c_ptr,  # (N, H·W) int32 (or int64): channel of each pixel's max over C
    dmax_c_ptr,  # (N, H·W): gradient of that max
    dmean_c_ptr,  # (N, H·W): gradient of the mean over C
    out_ptr,  # (N, n_splits, C): Σ over the split's positions of dy·x
    C,
    HW,
    hw_per_split,  # multiple of POOL_SPLIT_UNIT, hence of BLOCK_HW
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    CHANNELS_LAST: tl.constexpr,
    HAS_SPATIAL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    ACC: tl.constexpr = tl.float32,  # accumulation dtype: fp32, fp64 for fp64 inputs
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_c_blocks = tl.cdiv(C, BLOCK_C)
    n = (pid // n_c_blocks).to(tl.int64)
    c = (pid % n_c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    image = n * C * HW
    g_image, x_image = g_ptr + image, x_ptr + image
    pixels = n * HW
    inv_c = 1.0 / tl.cast(C, ACC)
    hw_start = split * hw_per_split
    hw_stop = tl.minimum(hw_start + hw_per_split, HW)
    if CHANNELS_LAST:
        acc = tl.zeros([BLOCK_HW, BLOCK_C], dtype=ACC)
        for hw0 in range(hw_start, hw_stop, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            hw_mask = hw < HW
            mask = hw_mask[:, None] & c_mask[None, :]
            offsets = hw[:, None] * C + c[None, :]
            g = tl.load(g_image + offsets, mask=mask, other=0.0).to(ACC)
            x = tl.load(x_image + offsets, mask=mask, other=0.0).to(ACC)
            dy = _dy(g, b_ptr, argmax_c_ptr, dmax_c_ptr, dmean_c_ptr, pixels + hw[:, None], hw_mask[:, None],
                     c[None, :], inv_c, HAS_SPATIAL, ACC)
            acc += tl.where(mask, dy * x, 0.0)
        sums = tl.sum(acc, axis=0)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
        for hw0 in range(hw_start, hw_stop, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            hw_mask = hw < HW
            mask = c_mask[:, None] & hw_mask[None, :]
            offsets = c[:, None] * HW + hw[None, :]
            g = tl.load(g_image + offsets, mask=mask, other=0.0).to(ACC)
            x = tl.load(x_image + offsets, mask=mask, other=0.0).to(ACC)
            dy = _dy(g, b_ptr, argmax_c_ptr, dmax_c_ptr, dmean_c_ptr, pixels + hw[None, :], hw_mask[None, :],
                     c[:, None], inv_c, HAS_SPATIAL, ACC)
            acc += tl.where(mask, dy * x, 0.0)
        sums = tl.sum(acc, axis=1)
    out = out_ptr + (n * tl.num_programs(1) + split) * C + c
    tl.store(out, sums.to(out_ptr.dtype.element_ty), mask=c_mask)


# At most 8 elements per thread: g, x and the four pixel maps per element, 40-125 registers and no spills on sm_80/sm_90
# in fp16/bf16/fp32 at 14x14, 15x15 and 7x7 (bam-triton inspect, Triton 3.9).
@autotune("rows", key=["batch_bucket", "C", "HW", "GROUP", "HAS_SPATIAL"], prune=row_tile_pruner(max_per_thread=8))
@triton.jit(do_not_specialize=["batch_bucket"])
def hw_reduce_rows_kernel(
    g_ptr,  # (N, C, H, W), dense NCHW like x
    x_ptr,  # (N, C, H, W), dense NCHW, C divisible by GROUP
    b_ptr,  # (N, H·W): the spatial attention; the pixel maps are read only HAS_SPATIAL
    argmax_c_ptr,  # (N, H·W) int32 (or int64): channel of each pixel's max over C
    dmax_c_ptr,  # (N, H·W): gradient of that max
    dmean_c_ptr,  # (N, H·W): gradient of the mean over C
    out_ptr,  # (N, C): Σ over H·W of dy·x, complete (a program owns whole group rows)
    C,
    rows_per_split,  # group rows per split, a multiple of every BLOCK_R
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    HW: tl.constexpr,  # a constexpr, so the compiler can prove group rows (GROUP·HW elements) 16-byte aligned
    GROUP: tl.constexpr,  # K channels per group row
    HAS_SPATIAL: tl.constexpr,
    BLOCK_R: tl.constexpr,  # group rows per tile
    BLOCK_L: tl.constexpr,  # GROUP·HW rounded up to a power of two
    ACC: tl.constexpr = tl.float32,  # accumulation dtype: fp32, fp64 for fp64 inputs
):
    ROW = GROUP * HW  # constexpr: elements per group row
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_rows = C // GROUP
    l = tl.arange(0, BLOCK_L)
    l_mask = l < ROW
    channel_in_group = l // HW  # GROUP for the padding past ROW: never equal to a j below
    image = n * C * HW
    g_image, x_image = g_ptr + image, x_ptr + image
    inv_c = 1.0 / tl.cast(C, ACC)
    if HAS_SPATIAL:  # the same for every row: gathered once per program
        b, argmax_c, dmax_c, dmean_c = _pixel_maps(b_ptr, argmax_c_ptr, dmax_c_ptr, dmean_c_ptr,
                                                   n * HW + l - channel_in_group * HW, l_mask, ACC)
    r_start = split * rows_per_split
    r_stop = tl.minimum(r_start + rows_per_split, n_rows)
    for r0 in range(r_start, r_stop, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < n_rows
        mask = r_mask[:, None] & l_mask[None, :]
        offsets = r[:, None] * ROW + l[None, :]
        g = tl.load(g_image + offsets, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_image + offsets, mask=mask, other=0.0).to(ACC)
        if HAS_SPATIAL:
            dy = _spatial_dy(g, b[None, :], argmax_c[None, :], dmax_c[None, :], dmean_c[None, :],
                             r[:, None] * GROUP + channel_in_group[None, :], inv_c)
        else:
            dy = g
        terms = tl.where(mask, dy * x, 0.0)
        rows = out_ptr + n * C + r * GROUP
        for j in tl.static_range(GROUP):
            sums = tl.sum(tl.where(channel_in_group[None, :] == j, terms, 0.0), axis=1)
            tl.store(rows + j, sums.to(out_ptr.dtype.element_ty), mask=r_mask)


@cached_plan
def hw_reduce_plan(shape, dtype, channels_last, has_spatial, sms=None):
    """The launch of :func:`grad_a` for a dense ``shape`` input of ``dtype`` on a GPU with ``sms`` SMs: the row-group
    kernel (NCHW with unaligned small H·W; its channels split as far as the GPU needs programs) or the 2D-tile kernel
    with the pooling's H·W split; buffer ``out`` (N, n_splits, C) in fp32 (fp64 for fp64), n_splits 1 for the
    row-group kernel."""
    n, c, h, w = shape
    hw = h * w
    acc = torch.promote_types(dtype, torch.float32)
    constexprs = (("HAS_SPATIAL", has_spatial), ("ACC", acc_dtype(dtype)))
    unused = () if has_spatial else ("b_ptr", "argmax_c_ptr", "dmax_c_ptr", "dmean_c_ptr")
    group = None if channels_last else row_group(c, hw, dtype.itemsize)
    if group is not None:
        n_splits, rows_per_split = _row_split(c // group, -(-target_programs(sms) // n))
        return LaunchPlan(hw_reduce_rows_kernel, "rows", grid=((n, 1, None), (n_splits, 1, None)),
                          scalars=(c, rows_per_split, n_bucket(n)),
                          constexprs=(("HW", hw), ("GROUP", group), ("BLOCK_L", triton.next_power_of_2(group * hw)))
                          + constexprs,
                          buffers=(("out", (n, 1, c), acc),), writes=("out_ptr",), unused=unused)
    n_splits, hw_per_split = pool_split(n, c, hw, target_programs(sms))
    return LaunchPlan(hw_reduce_kernel, "pool", grid=((n, c, "BLOCK_C"), (n_splits, 1, None)),
                      scalars=(c, hw, hw_per_split, n_bucket(n)),
                      constexprs=(("CHANNELS_LAST", channels_last),) + constexprs,
                      buffers=(("out", (n, n_splits, c), acc),), writes=("out_ptr",), unused=unused)


def grad_a(g, x, b, argmax_c, dmax_c, dmean_c, config=None):
    """da (N, C) = Σ_hw dy·x in fp32 (fp64 for fp64), dy = g·b + dmax_c at argmax_c + dmean_c / C (``b`` None: no
    spatial gate, dy = g). ``g`` in x's strides; the pixel maps (N, H·W) contiguous."""
    plan = hw_reduce_plan(tuple(x.shape), x.dtype, is_channels_last(x), b is not None, sm_count(x.device))
    shape, dtype = plan.buffer("out")
    out = torch.empty(shape, device=x.device, dtype=dtype)
    maps = (g, g, g, g) if b is None else (b, argmax_c, dmax_c, dmean_c)  # g where absent: never read
    launch(plan, g, x, *maps, out, config=config)
    return out[:, 0] if shape[1] == 1 else out.sum(dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Flat kernels: apply and dx
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _channel_and_pixel(idx, INNER: tl.constexpr, MID: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """(n·C + c, n·H·W + hw) of flat indices ``idx`` (see the module docstring)."""
    if CHANNELS_LAST:
        return col_map_index(idx, INNER, MID), row_map_index(idx, INNER)
    else:
        return row_map_index(idx, INNER), col_map_index(idx, INNER, MID)


@autotune("elementwise", key=["batch_bucket", "INNER", "MID", "CHANNELS_LAST", "HAS_B"])
@triton.jit(do_not_specialize=["batch_bucket"])
def apply_kernel(
    x_ptr,  # (N, C, H, W) in memory order (n, c, hw) or (n, hw, c), dense
    a_ptr,  # (N, C)
    b_ptr,  # (N, H·W); read only HAS_B
    out_ptr,  # like x
    n_elements,
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    INNER: tl.constexpr,
    MID: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_B: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr = tl.float32,  # compute dtype: fp32, fp64 for fp64 inputs
):
    idx = flat_index(tl.program_id(0), BLOCK, INDEX_64)
    mask = idx < n_elements
    channel, pixel = _channel_and_pixel(idx, INNER, MID, CHANNELS_LAST)
    out = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC) * tl.load(a_ptr + channel, mask=mask, other=0.0).to(ACC)
    if HAS_B:
        out *= tl.load(b_ptr + pixel, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=mask)


@cached_plan
def apply_plan(shape, dtype, channels_last, has_b):
    """The launch of :func:`apply` for a dense ``shape`` input of ``dtype``: one flat grid over every element."""
    return flat_plan(apply_kernel, shape, dtype, channels_last, (("CHANNELS_LAST", channels_last), ("HAS_B", has_b)),
                     writes=("out_ptr",), unused=() if has_b else ("b_ptr",))


def apply(x, a, b, config=None):
    """``x·a·b`` (``b`` None: ``x·a``) in x's dtype and memory format, one read of a dense ``x`` and one write;
    ``a`` (N, C) and ``b`` (N, H·W) contiguous, any float dtype."""
    channels_last = is_channels_last(x)
    out = torch.empty_like(x)  # x is dense, so empty_like keeps its strides (memory format)
    plan = apply_plan(tuple(x.shape), x.dtype, channels_last, b is not None)
    launch(plan, x, a, a if b is None else b, out, config=config)
    return out


# 8 elements per thread: each gathers up to 9 small-map values (and their addresses).
@autotune("elementwise", key=["batch_bucket", "INNER", "MID", "CHANNELS_LAST", "HAS_SPATIAL", "HAS_DAVG", "HAS_DMAX",
                              "HAS_EXTRA"], prune=per_thread_pruner(8))
@triton.jit(do_not_specialize=["batch_bucket"])
def grad_x_kernel(
    g_ptr,  # (N, C, H, W) in memory order (n, c, hw) or (n, hw, c), dense
    a_ptr,  # (N, C)
    b_ptr,  # (N, H·W); the pixel maps are read only HAS_SPATIAL
    argmax_c_ptr,  # (N, H·W) integer: channel of each pixel's max over C
    dmax_c_ptr,  # (N, H·W)
    dmean_c_ptr,  # (N, H·W)
    d_avg_ptr,  # (N, C); read only HAS_DAVG
    d_max_ptr,  # (N, C); read only HAS_DMAX
    argmax_hw_ptr,  # (N, C) integer: position of each channel's max over H·W; read only HAS_DMAX
    extra_ptr,  # like g; read only HAS_EXTRA; never dx_ptr itself
    dx_ptr,  # like g
    n_elements,
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    INNER: tl.constexpr,
    MID: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_SPATIAL: tl.constexpr,
    HAS_DAVG: tl.constexpr,
    HAS_DMAX: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr = tl.float32,  # compute dtype: fp32, fp64 for fp64 inputs
):
    idx = flat_index(tl.program_id(0), BLOCK, INDEX_64)
    mask = idx < n_elements
    channel, pixel = _channel_and_pixel(idx, INNER, MID, CHANNELS_LAST)
    # C and H·W are constexprs (INNER, MID), so the modulos and the reciprocals fold at compile time.
    if CHANNELS_LAST:
        c, hw, inv_c, inv_hw = channel % INNER, pixel % MID, 1.0 / tl.cast(INNER, ACC), 1.0 / tl.cast(MID, ACC)
    else:
        c, hw, inv_c, inv_hw = channel % MID, pixel % INNER, 1.0 / tl.cast(MID, ACC), 1.0 / tl.cast(INNER, ACC)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(ACC)
    dy = _dy(g, b_ptr, argmax_c_ptr, dmax_c_ptr, dmean_c_ptr, pixel, mask, c, inv_c, HAS_SPATIAL, ACC)
    dx = dy * tl.load(a_ptr + channel, mask=mask, other=0.0).to(ACC)
    if HAS_DAVG:
        dx += tl.load(d_avg_ptr + channel, mask=mask, other=0.0).to(ACC) * inv_hw
    if HAS_DMAX:
        argmax_hw = tl.load(argmax_hw_ptr + channel, mask=mask, other=-1)
        dx += tl.where(hw == argmax_hw, tl.load(d_max_ptr + channel, mask=mask, other=0.0).to(ACC), 0.0)
    if HAS_EXTRA:
        dx += tl.load(extra_ptr + idx, mask=mask, other=0.0).to(ACC)
    tl.store(dx_ptr + idx, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@cached_plan
def grad_x_plan(shape, dtype, channels_last, has_spatial, has_davg, has_dmax, has_extra):
    """The launch of :func:`grad_x` for a dense ``shape`` input of ``dtype``: one flat grid over every element."""
    unused = (() if has_spatial else ("b_ptr", "argmax_c_ptr", "dmax_c_ptr", "dmean_c_ptr")) + \
        (() if has_davg else ("d_avg_ptr",)) + (() if has_dmax else ("d_max_ptr", "argmax_hw_ptr")) + \
        (() if has_extra else ("extra_ptr",))
    return flat_plan(grad_x_kernel, shape, dtype, channels_last,
                     (("CHANNELS_LAST", channels_last), ("HAS_SPATIAL", has_spatial), ("HAS_DAVG", has_davg),
                      ("HAS_DMAX", has_dmax), ("HAS_EXTRA", has_extra)),
                     writes=("dx_ptr",), unused=unused)


def grad_x(g, a, b, argmax_c, dmax_c, dmean_c, d_avg, d_max, argmax_hw, extra, config=None):
    """dx = dy·a + d_avg / (H·W) + d_max at argmax_hw (+ extra), a new tensor in g's dtype and memory format; dy as in
    :func:`grad_a`. Any of ``b`` (with its three pixel maps), ``d_avg``, ``d_max`` (with ``argmax_hw``) and
    ``extra`` may be None. Maps contiguous; ``extra`` in g's dtype and strides."""
    channels_last = is_channels_last(g)
    dx = torch.empty_like(g)  # g is dense, so empty_like keeps its strides (memory format)
    plan = grad_x_plan(tuple(g.shape), g.dtype, channels_last, b is not None, d_avg is not None, d_max is not None,
                       extra is not None)
    spatial = (g, g, g, g) if b is None else (b, argmax_c, dmax_c, dmean_c)  # g where absent: never read
    launch(plan, g, a, *spatial, a if d_avg is None else d_avg, a if d_max is None else d_max,
           a if d_max is None else argmax_hw, g if extra is None else extra, dx, config=config)
    return dx


def pool(x, config=None):
    """``(avg, max, argmax_hw)`` over H·W from one read of a dense ``x`` (kernels/pool.py with WITH_MAX); argmax
    int32."""
    return channel_pool_max_fwd(x, is_channels_last(x), config=config)
