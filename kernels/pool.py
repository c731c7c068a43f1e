"""Channel pooling: ``pooled[n, c] = mean over (h, w) of x[n, c, h, w]``, accumulated in fp32 (fp64 for fp64 inputs).

Each program owns ``BLOCK_C`` channels of one image and one chunk of H·W positions, and keeps a
[BLOCK_C, BLOCK_HW] fp32 accumulator that it sums down to BLOCK_C values at the end. The tile is laid along the
contiguous axis of the memory format so its loads coalesce and vectorise:

    NCHW: element (n, c, hw) at n·C·HW + c·HW + hw -> tile [BLOCK_C, BLOCK_HW], hw contiguous
    NHWC: element (n, hw, c) at n·HW·C + hw·C + c  -> tile [BLOCK_HW, BLOCK_C], c contiguous

Splitting H·W over ``grid[1]`` gives channels_last inputs with few channels blocks enough programs to fill the GPU;
the split partial sums land in an (N, n_splits, C) fp32 buffer that a tiny second pass adds up in a fixed order,
so results are deterministic (no atomics). With one split the kernel writes the pooled (N, C) result directly.
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

from ._common import (POOL_SPLIT_UNIT, LaunchPlan, acc_dtype, autotune, cached_plan, keep_contiguous_configs, launch,
                      n_bucket, row_group, row_tile_pruner, sm_count, target_programs)


@autotune("pool", key=["batch_bucket", "C", "HW", "CHANNELS_LAST"], prune=keep_contiguous_configs)
@triton.jit(do_not_specialize=["batch_bucket"])
def channel_pool_kernel(
    x_ptr,  # (N, C, H, W), dense NCHW or NHWC
    out_ptr,  # (N, n_splits, C): partial means (each split's sum over H·W divided by H·W)
    C,
    HW,
    hw_per_split,  # multiple of POOL_SPLIT_UNIT, hence of BLOCK_HW
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    CHANNELS_LAST: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: fp32 (fp64 for fp64 inputs)
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
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
        for hw0 in range(hw_start, hw_stop, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            # Blocks never straddle a split (hw_per_split is a multiple of BLOCK_HW): only the H·W tail is masked.
            mask = (hw[:, None] < HW) & c_mask[None, :]
            acc += tl.load(image + hw[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
        sums = tl.sum(acc, axis=0)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
        for hw0 in range(hw_start, hw_stop, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (hw[None, :] < HW)
            acc += tl.load(image + c[:, None] * HW + hw[None, :], mask=mask, other=0.0).to(ACC)
        sums = tl.sum(acc, axis=1)
    out = out_ptr + (n * n_splits + split) * C + c
    # Divided by H·W in ACC: a float argument for 1 / (H·W) would be fp32 on a GPU even for fp64 inputs.
    tl.store(out, (sums / tl.cast(HW, ACC)).to(out_ptr.dtype.element_ty), mask=c_mask)


# Up to 16 elements per thread: one load and a few adds each, 16-64 registers (bam-triton inspect, Triton 3.9).
@autotune("rows", key=["batch_bucket", "C", "HW", "GROUP"], prune=row_tile_pruner(max_per_thread=16))
@triton.jit(do_not_specialize=["batch_bucket"])
def channel_pool_rows_kernel(
    x_ptr,  # (N, C, H, W), dense NCHW, C divisible by GROUP
    out_ptr,  # (N, C): the means
    C,
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    HW: tl.constexpr,  # a constexpr, so the compiler can prove group rows (GROUP·HW elements) 16-byte aligned
    GROUP: tl.constexpr,  # K channels per group row
    ACC: tl.constexpr,  # accumulation dtype: fp32 (fp64 for fp64 inputs)
    BLOCK_R: tl.constexpr,  # group rows per program
    BLOCK_L: tl.constexpr,  # GROUP·HW rounded up to a power of two
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
    out = out_ptr + n * C + r * GROUP
    for j in tl.static_range(GROUP):
        sums = tl.sum(tl.where(channel_in_group[None, :] == j, tile, 0.0), axis=1)
        tl.store(out + j, (sums / HW).to(out_ptr.dtype.element_ty), mask=r_mask)  # once per row: divide in ACC


def pool_split(n, c, hw, target):
    """(n_splits, hw_per_split) of the pooling grid: split H·W only when the (image, channel block) grid alone has
    fewer than ``target`` programs; each split is a multiple of POOL_SPLIT_UNIT."""
    base_programs = n * -(-c // 64)
    n_splits = max(1, min(-(-target // base_programs), -(-hw // POOL_SPLIT_UNIT)))
    hw_per_split = -(-(-(-hw // n_splits)) // POOL_SPLIT_UNIT) * POOL_SPLIT_UNIT
    return -(-hw // hw_per_split), hw_per_split


@cached_plan
def channel_pool_plan(shape, dtype, channels_last, sms=None):
    """The launch of :func:`channel_pool_fwd` for a dense ``shape`` input of ``dtype`` on a GPU with ``sms`` SMs: the
    row-group kernel (NCHW with unaligned small H·W) or the 2D-tile kernel with its H·W split. Buffer ``out`` is the
    (N, n_splits, C) result: the means when n_splits is 1, fp32 partial means otherwise."""
    n, c, h, w = shape
    hw = h * w
    acc = acc_dtype(dtype)
    group = None if channels_last else row_group(c, hw, dtype.itemsize)
    if group is not None:
        return LaunchPlan(channel_pool_rows_kernel, "rows", grid=((n, c // group, "BLOCK_R"),),
                          scalars=(c, n_bucket(n)),
                          constexprs=(("HW", hw), ("GROUP", group), ("ACC", acc),
                                      ("BLOCK_L", triton.next_power_of_2(group * hw))),
                          buffers=(("out", (n, 1, c), dtype),), writes=("out_ptr",))
    n_splits, hw_per_split = pool_split(n, c, hw, target_programs(sms))
    out_dtype = dtype if n_splits == 1 else torch.promote_types(dtype, torch.float32)
    return LaunchPlan(channel_pool_kernel, "pool", grid=((n, c, "BLOCK_C"), (n_splits, 1, None)),
                      scalars=(c, hw, hw_per_split, n_bucket(n)),
                      constexprs=(("CHANNELS_LAST", channels_last), ("ACC", acc)),
                      buffers=(("out", (n, n_splits, c), out_dtype),), writes=("out_ptr",))


def channel_pool_fwd(x, channels_last, config=None):
    """Launch :func:`channel_pool_plan`'s kernel on a dense (N, C, H, W) ``x``; returns (N, C) in ``x``'s dtype.
    ``config`` forces one (meta, num_warps) config (tests). Arguments are validated by the op layer."""
    plan = channel_pool_plan(tuple(x.shape), x.dtype, channels_last, sm_count(x.device))
    shape, dtype = plan.buffer("out")
    out = torch.empty(shape, device=x.device, dtype=dtype)
    launch(plan, x, out, config=config)
    if shape[1] == 1:
        return out.view(shape[0], shape[2])
    return out.sum(dim=1).to(x.dtype)
