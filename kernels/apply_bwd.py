"""Fused BAM attention-apply, backward, for ``out = x * (1 + s)``, ``s = sigmoid(a)``, ``a = mc ⊕ ms``.

With ``g`` the gradient of ``out`` (same shape and strides as ``x``):

    dx = g·(1 + s)                    da = g·x·s·(1 - s)
    ⊕ = +:  dmc[n, c] = Σ_hw da               dms[n, hw] = Σ_c da
    ⊕ = *:  dmc[n, c] = Σ_hw da·ms[n, hw]     dms[n, hw] = Σ_c da·mc[n, c]

The reductions accumulate in fp32 (fp64 for fp64 inputs) and are returned in that dtype: dmc (N, C), dms (N, H·W).

``apply_bwd_reduce_kernel`` reads ``g`` and ``x`` once in 2D tiles laid along the contiguous axis of the memory format
(as in pool.py), and with ``WRITE_DX`` also writes ``dx`` in the same pass (the single-pass backward):

    NCHW: tile [BLOCK_C, BLOCK_HW], hw contiguous        NHWC: tile [BLOCK_HW, BLOCK_C], c contiguous

A program owns one image, one block of BLOCK_HW positions and one split of the channels, and walks that split in
BLOCK_C steps. Its dms is complete for the split, so it keeps a 2D accumulator and reduces it once at the end; dmc
needs every hw block, so each step writes a partial dmc[n, hw_block, c]. Both partials go to fp32 buffers that the
launcher sums in a fixed order (deterministic, no atomics). The dmc partials cost 4 bytes per C·BLOCK_HW elements
(4 / BLOCK_HW bytes per element, ≤ 1/8 byte with BLOCK_HW ≥ 32) written and read once more; the dms partials
4·splits / C bytes per element. Channels are split (grid[1]) only when images x hw blocks alone leave the GPU idle:
(1024, 14, 14) at N = 32 gives 128 hw-block programs, too few for ~132 SMs to stream from.

NCHW with a small H·W that is not a multiple of 16 (14x14, 7x7) goes to ``apply_bwd_reduce_rows_kernel``: as for the
pooling (pool.py), K consecutive channels form one 16-byte-aligned group row of K·H·W elements, so g, x and dx move in
128-bit vectors. A program owns whole group rows of one channel split, so its dmc is complete (K masked row sums per
tile, written straight to (N, C)); its dms is a column sum over the split's rows, stored per group-row position as
(N, n_splits, K·H·W) partials that the launcher folds over splits and K in a fixed order.

``apply_bwd_dx_kernel`` is elementwise over the flat range of ``x``, like ``apply_fwd_kernel`` (same INNER/MID
indexing of the small maps, so loads and stores vectorise to 128 bits for any H·W):
``dx = g·(1 + s) + dpool[n, c] / (H·W) + dx_extra``. ``dpool`` is the gradient of the channel pooling's output (its
broadcast is folded here) and ``dx_extra`` another gradient of ``x`` (e.g. the spatial branch's conv). ``dx`` is a fresh tensor, never written
over ``dx_extra``: the autotuner runs every config on the same arguments, and restoring an in-place buffer between
them would be timed with the kernel. It does not read ``x``.

Offsets within an image are int32 and image bases int64 (the op layer checks C·H·W < 2**31); the flat kernel uses the
memory plan's INDEX_64 as the forward does.
"""

import torch
import triton
import triton.language as tl

from ._common import (LaunchPlan, acc_dtype, all_configs, autotune, cached_plan, flat_index, flat_plan,
                      is_channels_last, keep_contiguous_configs, launch, n_bucket, planned_meta, row_group,
                      row_tile_pruner, sm_count, target_programs)
from .apply import COMBINE_CODES, attention_logit, col_map_index, gather_maps, row_map_index

# A channel split is a multiple of every BLOCK_C (powers of two), so only the C tail is ever masked.
_C_SPLIT_UNIT = max(meta["BLOCK_C"] for meta, _ in all_configs("reduce2d"))
# The dmc partial buffer is sized for the smallest BLOCK_HW (the most hw blocks) of any config.
_MIN_BLOCK_HW = min(meta["BLOCK_HW"] for meta, _ in all_configs("reduce2d"))
# hw block size the launcher assumes when it decides whether to split channels (the config is not known yet).
_TYPICAL_BLOCK_HW = 64
# A split of the group rows is a multiple of every BLOCK_R, so only the last split's tail is masked.
ROW_SPLIT_UNIT = max(meta["BLOCK_R"] for meta, _ in all_configs("rows"))


@triton.jit
def _tile_map_grads(g_ptr, x_ptr, dx_ptr, offsets, mask, mc, ms, COMBINE: tl.constexpr, WRITE_DX: tl.constexpr,
                    ACC: tl.constexpr):
    """For one tile (``mc``, ``ms`` broadcast to it): the terms of dmc and dms, and dx stored when ``WRITE_DX``.
    Masked elements' terms are 0. (Their loads give g = x = 0 and map values 0, but that is not enough: a valid row's
    mc = ±inf meets a masked column's ms = 0 and inf·0 = NaN would reach the row's sum, so they are selected out.)"""
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    s = tl.sigmoid(attention_logit(mc, ms, COMBINE))
    if WRITE_DX:
        tl.store(dx_ptr + offsets, (g * (1.0 + s)).to(dx_ptr.dtype.element_ty), mask=mask)
    da = g * x * s * (1.0 - s)
    if COMBINE == 0:
        da = tl.where(mask, da, 0.0)
        return da, da
    else:  # ∂a/∂mc = ms, ∂a/∂ms = mc
        return tl.where(mask, da * ms, 0.0), tl.where(mask, da * mc, 0.0)


@autotune("reduce2d", key=["batch_bucket", "C", "HW", "CHANNELS_LAST", "WRITE_DX"], prune=keep_contiguous_configs)
@triton.jit(do_not_specialize=["batch_bucket"])
def apply_bwd_reduce_kernel(
    g_ptr,  # (N, C, H, W), same strides as x
    x_ptr,  # (N, C, H, W), dense NCHW or NHWC
    mc_ptr,  # (N, C)
    ms_ptr,  # (N, H·W)
    dx_ptr,  # like x; written only when WRITE_DX
    dmc_partial_ptr,  # (N, cdiv(HW, BLOCK_HW), C): dmc summed over one hw block
    dms_partial_ptr,  # (N, n_c_splits, HW): dms summed over one channel split
    C,
    HW,
    c_per_split,  # multiple of every BLOCK_C
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    COMBINE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    WRITE_DX: tl.constexpr = False,
    ACC: tl.constexpr = tl.float32,  # accumulation dtype: fp32, fp64 for fp64 inputs
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_hw_blocks = tl.cdiv(HW, BLOCK_HW)
    n = (pid // n_hw_blocks).to(tl.int64)
    hw = (pid % n_hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    image = n * C * HW
    g_image, x_image, dx_image = g_ptr + image, x_ptr + image, dx_ptr + image
    ms = tl.load(ms_ptr + n * HW + hw, mask=hw_mask, other=0.0).to(ACC)
    dmc_row = dmc_partial_ptr + pid.to(tl.int64) * C  # row (n, hw_block)
    c_start = split * c_per_split
    c_stop = tl.minimum(c_start + c_per_split, C)
    if CHANNELS_LAST:
        dms_acc = tl.zeros([BLOCK_HW, BLOCK_C], dtype=ACC)
        for c0 in range(c_start, c_stop, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_mask = c < C
            mc = tl.load(mc_ptr + n * C + c, mask=c_mask, other=0.0).to(ACC)
            d_mc, d_ms = _tile_map_grads(g_image, x_image, dx_image, hw[:, None] * C + c[None, :],
                                         hw_mask[:, None] & c_mask[None, :], mc[None, :], ms[:, None],
                                         COMBINE, WRITE_DX, ACC)
            tl.store(dmc_row + c, tl.sum(d_mc, axis=0).to(dmc_partial_ptr.dtype.element_ty), mask=c_mask)
            dms_acc += d_ms
        dms = tl.sum(dms_acc, axis=1)
    else:
        dms_acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
        for c0 in range(c_start, c_stop, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_mask = c < C
            mc = tl.load(mc_ptr + n * C + c, mask=c_mask, other=0.0).to(ACC)
            d_mc, d_ms = _tile_map_grads(g_image, x_image, dx_image, c[:, None] * HW + hw[None, :],
                                         c_mask[:, None] & hw_mask[None, :], mc[:, None], ms[None, :],
                                         COMBINE, WRITE_DX, ACC)
            tl.store(dmc_row + c, tl.sum(d_mc, axis=1).to(dmc_partial_ptr.dtype.element_ty), mask=c_mask)
            dms_acc += d_ms
        dms = tl.sum(dms_acc, axis=0)
    dms_out = dms_partial_ptr + (n * tl.num_programs(1) + split) * HW + hw
    tl.store(dms_out, dms.to(dms_partial_ptr.dtype.element_ty), mask=hw_mask)


# At most 8 elements per thread: with g, x, the maps and an accumulator per element, 16 took 128-142 registers on
# sm_90 and spilled in fp32 at 7x7 (bam-triton inspect).
@autotune("rows", key=["batch_bucket", "C", "HW", "GROUP", "WRITE_DX"], prune=row_tile_pruner(max_per_thread=8))
@triton.jit(do_not_specialize=["batch_bucket"])
def apply_bwd_reduce_rows_kernel(
    g_ptr,  # (N, C, H, W), dense NCHW like x
    x_ptr,  # (N, C, H, W), dense NCHW, C divisible by GROUP
    mc_ptr,  # (N, C)
    ms_ptr,  # (N, H·W)
    dx_ptr,  # like x; written only when WRITE_DX
    dmc_ptr,  # (N, C): complete sums (a program owns whole rows)
    dms_partial_ptr,  # (N, n_splits, GROUP·HW): column sums of one split, per group-row position
    C,
    rows_per_split,  # group rows per split, a multiple of every BLOCK_R
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    HW: tl.constexpr,  # a constexpr, so the compiler can prove group rows 16-byte aligned
    GROUP: tl.constexpr,  # K channels per group row
    COMBINE: tl.constexpr,
    BLOCK_R: tl.constexpr,  # group rows per tile
    BLOCK_L: tl.constexpr,  # GROUP·HW rounded up to a power of two
    WRITE_DX: tl.constexpr = False,
    ACC: tl.constexpr = tl.float32,  # accumulation dtype: fp32, fp64 for fp64 inputs
):
    ROW = GROUP * HW  # constexpr: elements per group row
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_rows = C // GROUP
    l = tl.arange(0, BLOCK_L)
    l_mask = l < ROW
    channel_in_group = l // HW  # GROUP for the padding past ROW: never equal to a j below
    hw = l - channel_in_group * HW
    ms = tl.load(ms_ptr + n * HW + hw, mask=l_mask, other=0.0).to(ACC)
    image = n * C * HW
    g_image, x_image, dx_image = g_ptr + image, x_ptr + image, dx_ptr + image
    r_start = split * rows_per_split
    r_stop = tl.minimum(r_start + rows_per_split, n_rows)
    dms_acc = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
    for r0 in range(r_start, r_stop, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < n_rows
        mask = r_mask[:, None] & l_mask[None, :]
        channel = r[:, None] * GROUP + channel_in_group[None, :]
        mc = tl.load(mc_ptr + n * C + channel, mask=mask, other=0.0).to(ACC)
        d_mc, d_ms = _tile_map_grads(g_image, x_image, dx_image, r[:, None] * ROW + l[None, :], mask, mc,
                                     ms[None, :], COMBINE, WRITE_DX, ACC)
        dmc_rows = dmc_ptr + n * C + r * GROUP
        for j in tl.static_range(GROUP):
            row_sums = tl.sum(tl.where(channel_in_group[None, :] == j, d_mc, 0.0), axis=1)
            tl.store(dmc_rows + j, row_sums.to(dmc_ptr.dtype.element_ty), mask=r_mask)
        dms_acc += d_ms
    dms_out = dms_partial_ptr + (n * tl.num_programs(1) + split) * ROW + l
    tl.store(dms_out, tl.sum(dms_acc, axis=0).to(dms_partial_ptr.dtype.element_ty), mask=l_mask)


@triton.jit
def _channel_index(idx, INNER: tl.constexpr, MID: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """n·C + c of flat indices ``idx``: the row-map index for NCHW, the column-map index for NHWC."""
    if CHANNELS_LAST:
        return col_map_index(idx, INNER, MID)
    else:
        return row_map_index(idx, INNER)


@autotune("elementwise", key=["batch_bucket", "INNER", "MID", "CHANNELS_LAST", "HAS_DPOOL", "HAS_EXTRA"])
@triton.jit(do_not_specialize=["batch_bucket"])
def apply_bwd_dx_kernel(
    g_ptr,  # (N, C, H, W) in memory order (n, c, hw) or (n, hw, c), dense
    row_map_ptr,  # mc for NCHW, ms for NHWC (see kernels/apply.py)
    col_map_ptr,  # ms for NCHW, mc for NHWC
    dpool_ptr,  # (N, C), any float dtype; read only when HAS_DPOOL
    dx_extra_ptr,  # like g; read only when HAS_EXTRA; never dx_ptr itself
    dx_ptr,  # like g
    n_elements,
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    INNER: tl.constexpr,
    MID: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    COMBINE: tl.constexpr,
    INDEX_64: tl.constexpr,
    HAS_DPOOL: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr = tl.float32,  # compute dtype: fp32, fp64 for fp64 inputs
):
    idx = flat_index(tl.program_id(0), BLOCK, INDEX_64)
    mask = idx < n_elements
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(ACC)
    row, col = gather_maps(row_map_ptr, col_map_ptr, idx, mask, INNER, MID, ACC)
    dx = g * (1.0 + tl.sigmoid(attention_logit(row, col, COMBINE)))
    if HAS_DPOOL:
        # The pooling's gradient is dpool / (H·W) at every position. 1 / (H·W) is formed once per program in ACC: a
        # float argument would be fp32 even for fp64 inputs.
        if CHANNELS_LAST:
            inv_hw = 1.0 / tl.cast(MID, ACC)
        else:
            inv_hw = 1.0 / tl.cast(INNER, ACC)
        dpool = tl.load(dpool_ptr + _channel_index(idx, INNER, MID, CHANNELS_LAST), mask=mask, other=0.0).to(ACC)
        dx += dpool * inv_hw
    if HAS_EXTRA:
        dx += tl.load(dx_extra_ptr + idx, mask=mask, other=0.0).to(ACC)
    tl.store(dx_ptr + idx, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def channel_split(n, c, hw, target):
    """(n_splits, c_per_split) of a grid of (image, hw block) programs that reduce over channels: split the channels
    only when images x hw blocks alone give fewer than ``target`` programs; each split a multiple of every BLOCK_C."""
    base_programs = n * -(-hw // _TYPICAL_BLOCK_HW)
    n_splits = max(1, min(-(-target // base_programs), -(-c // _C_SPLIT_UNIT)))
    c_per_split = -(-(-(-c // n_splits)) // _C_SPLIT_UNIT) * _C_SPLIT_UNIT
    return -(-c // c_per_split), c_per_split


@cached_plan
def reduce_plan(shape, dtype, channels_last, combine, write_dx, sms=None):
    """The launch of the backward reductions (with dx stored when ``write_dx``) for a dense ``shape`` input of
    ``dtype`` on a GPU with ``sms`` SMs: the row-group kernel (NCHW with unaligned small H·W) or the 2D-tile kernel,
    each with its channel split. Buffers: ``dmc`` (complete, row-group kernel) or ``dmc_partial`` (per hw block, sized
    for the smallest BLOCK_HW of any config), and ``dms_partial`` (per split)."""
    n, c, h, w = shape
    hw = h * w
    partial_dtype = torch.promote_types(dtype, torch.float32)
    target = target_programs(sms)
    common = (("COMBINE", COMBINE_CODES[combine]), ("WRITE_DX", write_dx), ("ACC", acc_dtype(dtype)))
    written_dx = ("dx_ptr",) if write_dx else ()
    group = None if channels_last else row_group(c, hw, dtype.itemsize)
    if group is not None:
        n_rows = c // group
        # Split the channels only as far as the GPU needs programs, and at most until the dms partials (4 bytes per
        # group-row position per split) reach 1/16 of the bytes of g and x that the split reads.
        max_splits = max(1, n_rows * 2 * dtype.itemsize // 64)
        n_splits = max(1, min(-(-target // n), max_splits, -(-n_rows // ROW_SPLIT_UNIT)))
        rows_per_split = -(-(-(-n_rows // n_splits)) // ROW_SPLIT_UNIT) * ROW_SPLIT_UNIT
        n_splits = -(-n_rows // rows_per_split)
        return LaunchPlan(apply_bwd_reduce_rows_kernel, "rows", grid=((n, 1, None), (n_splits, 1, None)),
                          scalars=(c, rows_per_split, n_bucket(n)),
                          constexprs=(("HW", hw), ("GROUP", group), ("BLOCK_L", triton.next_power_of_2(group * hw)))
                          + common,
                          buffers=(("dmc", (n, c), partial_dtype), ("dms_partial", (n, n_splits * group, hw),
                                                                     partial_dtype)),
                          writes=("dmc_ptr", "dms_partial_ptr") + written_dx, unused=() if write_dx else ("dx_ptr",))
    n_splits, c_per_split = channel_split(n, c, hw, target)
    return LaunchPlan(apply_bwd_reduce_kernel, "reduce2d", grid=((n, hw, "BLOCK_HW"), (n_splits, 1, None)),
                      scalars=(c, hw, c_per_split, n_bucket(n)),
                      constexprs=(("CHANNELS_LAST", channels_last),) + common,
                      buffers=(("dmc_partial", (n * -(-hw // _MIN_BLOCK_HW) * c,), partial_dtype),
                               ("dms_partial", (n, n_splits, hw), partial_dtype)),
                      writes=("dmc_partial_ptr", "dms_partial_ptr") + written_dx, unused=() if write_dx else ("dx_ptr",))


def _reduce(g, x, mc, ms, combine, dx, config):
    """Launch :func:`reduce_plan`'s kernel (writing ``dx`` too unless it is None); returns (dmc, dms)."""
    n, c, h, w = x.shape
    hw = h * w
    plan = reduce_plan(tuple(x.shape), x.dtype, is_channels_last(x), combine, dx is not None, sm_count(x.device))
    dms_shape, partial_dtype = plan.buffer("dms_partial")
    dms_partial = torch.empty(dms_shape, device=x.device, dtype=partial_dtype)
    dx_arg = g if dx is None else dx  # dx_ptr = g when WRITE_DX is off: never stored to
    if any(name == "dmc" for name, _, _ in plan.buffers):  # the row-group kernel: complete dmc sums
        dmc = torch.empty(plan.buffer("dmc")[0], device=x.device, dtype=partial_dtype)
        launch(plan, g, x, mc, ms, dx_arg, dmc, dms_partial, config=config)
    else:
        # One partial row per hw block, and their number depends on the config: sized for it where it is known
        # before the launch (the plan's buffer, sized for the most, on the first launch). The dtypes are the launch's.
        dtypes = (g.dtype, x.dtype, mc.dtype, ms.dtype, dx_arg.dtype, partial_dtype, partial_dtype)
        meta = config[0] if config else planned_meta(plan, x.device, dtypes)
        size = plan.buffer("dmc_partial")[0] if meta is None else (n * -(-hw // meta["BLOCK_HW"]) * c,)
        dmc_partial = torch.empty(size, device=x.device, dtype=partial_dtype)
        meta = launch(plan, g, x, mc, ms, dx_arg, dmc_partial, dms_partial, config=config)
        hw_blocks = -(-hw // meta["BLOCK_HW"])
        dmc = dmc_partial[: n * hw_blocks * c].view(n, hw_blocks, c)
        dmc = dmc.view(n, c) if hw_blocks == 1 else dmc.sum(dim=1)
    dms = dms_partial.view(n, hw) if dms_shape[1] == 1 else dms_partial.sum(dim=1)
    return dmc, dms


def apply_bwd(g, x, mc, ms, combine, config=None):
    """Single-pass backward: returns ``(dx, dmc, dms)``; dx in ``x``'s dtype and memory format, dmc (N, C) and
    dms (N, H·W) fp32 (fp64 for fp64 inputs). ``g`` has ``x``'s strides; ``mc`` (N, C) and ``ms`` (N, H·W) are
    contiguous. ``config`` forces one (meta, num_warps) config (tests). Arguments are validated by the op layer."""
    dx = torch.empty_like(x)  # x is dense, so empty_like keeps its strides (memory format)
    dmc, dms = _reduce(g, x, mc, ms, combine, dx, config)
    return dx, dmc, dms


def apply_bwd_reduce(g, x, mc, ms, combine, config=None):
    """The reductions only: returns ``(dmc, dms)`` as :func:`apply_bwd` does, without writing dx."""
    return _reduce(g, x, mc, ms, combine, None, config)


@cached_plan
def dx_plan(shape, dtype, channels_last, combine, has_dpool, has_extra):
    """The launch of :func:`apply_bwd_dx` for a dense ``shape`` input of ``dtype``: one flat grid, as the forward."""
    return flat_plan(apply_bwd_dx_kernel, shape, dtype, channels_last,
                     (("CHANNELS_LAST", channels_last), ("COMBINE", COMBINE_CODES[combine]), ("HAS_DPOOL", has_dpool),
                      ("HAS_EXTRA", has_extra)),
                     writes=("dx_ptr",),
                     unused=(() if has_dpool else ("dpool_ptr",)) + (() if has_extra else ("dx_extra_ptr",)))


def apply_bwd_dx(g, x, mc, ms, combine, dpool=None, dx_extra=None, config=None):
    """``dx = g·(1 + s) [+ dpool / (H·W)] [+ dx_extra]`` in ``x``'s dtype and memory format, a new tensor. ``dpool``
    (N, C) contiguous, any float dtype; ``dx_extra`` has ``x``'s dtype and strides. ``config`` forces one
    (meta, num_warps) config (tests). Arguments are validated by the op layer."""
    channels_last = is_channels_last(x)
    dx = torch.empty_like(x)  # x is dense, so empty_like keeps its strides (memory format)
    row_map, col_map = (ms, mc) if channels_last else (mc, ms)
    plan = dx_plan(tuple(x.shape), x.dtype, channels_last, combine, dpool is not None, dx_extra is not None)
    # Absent inputs are passed as g: never read.
    launch(plan, g, row_map, col_map, g if dpool is None else dpool, g if dx_extra is None else dx_extra, dx,
           config=config)
    return dx
