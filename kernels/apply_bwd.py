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
broadcast is folded here) and ``dx_extra`` another gradient of ``x`` (e.g. the spatial branch's conv); ``dx`` may be
written in place over ``dx_extra``: each element is read before the same program writes it. It does not read ``x``.

Offsets within an image are int32 and image bases int64 (the op layer checks C·H·W < 2**31); the flat kernel uses the
memory plan's INDEX_64 as the forward does.
"""
import torch
import triton
import triton.language as tl

from ._common import (acc_dtype, all_configs, autotune, flat_index, keep_contiguous_configs, launch,
                      memory_plan, row_group, row_tile_pruner, target_programs)
from .apply import COMBINE_CODES, attention_logit, col_map_index, gather_maps, row_map_index

# A channel split is a multiple of every BLOCK_C (powers of two), so only the C tail is ever masked.
_C_SPLIT_UNIT = max(meta["BLOCK_C"] for meta, _ in all_configs("reduce2d"))
# The dmc partial buffer is sized for the smallest BLOCK_HW (the most hw blocks) of any config.
_MIN_BLOCK_HW = min(meta["BLOCK_HW"] for meta, _ in all_configs("reduce2d"))
# hw block size the launcher assumes when it decides whether to split channels (the config is not known yet).
_TYPICAL_BLOCK_HW = 64
# A split of the group rows is a multiple of every BLOCK_R, so only the last split's tail is masked.
_ROW_SPLIT_UNIT = max(meta["BLOCK_R"] for meta, _ in all_configs("rows"))


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


@autotune("reduce2d", key=["C", "HW", "CHANNELS_LAST", "WRITE_DX"],
          prune_configs_by={"early_config_prune": keep_contiguous_configs})
@triton.jit
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
@autotune("rows", key=["C", "HW", "GROUP", "WRITE_DX"],
          prune_configs_by={"early_config_prune": row_tile_pruner(max_per_thread=8)})
@triton.jit
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


# restore_value: dx may be written in place over dx_extra, and the autotuner runs every config on the same buffers.
@autotune("elementwise", key=["n_elements", "INNER", "MID", "CHANNELS_LAST", "HAS_DPOOL", "HAS_EXTRA"],
          restore_value=["dx_ptr"])
@triton.jit
def apply_bwd_dx_kernel(
    g_ptr,  # (N, C, H, W) in memory order (n, c, hw) or (n, hw, c), dense
    row_map_ptr,  # mc for NCHW, ms for NHWC (see kernels/apply.py)
    col_map_ptr,  # ms for NCHW, mc for NHWC
    dpool_ptr,  # (N, C), any float dtype; read only when HAS_DPOOL
    dx_extra_ptr,  # like g; read only when HAS_EXTRA (may be dx_ptr itself)
    dx_ptr,  # like g
    n_elements,
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


def _reduce(g, x, mc, ms, combine, dx):
    """Launch :func:`apply_bwd_reduce_kernel` (writing ``dx`` too unless it is None); returns (dmc, dms)."""
    n, c, h, w = x.shape
    hw = h * w
    plan = memory_plan(x)
    partial_dtype = torch.promote_types(x.dtype, torch.float32)
    group = None if plan.channels_last else row_group(c, hw, x.element_size())
    if group is not None:
        return _reduce_rows(g, x, mc, ms, combine, dx, group, partial_dtype)
    # Split channels only when images x hw blocks alone give too few programs.
    base_programs = n * triton.cdiv(hw, _TYPICAL_BLOCK_HW)
    n_splits = max(1, min(triton.cdiv(target_programs(x.device), base_programs), triton.cdiv(c, _C_SPLIT_UNIT)))
    c_per_split = triton.cdiv(triton.cdiv(c, n_splits), _C_SPLIT_UNIT) * _C_SPLIT_UNIT
    n_splits = triton.cdiv(c, c_per_split)
    dms_partial = torch.empty((n, n_splits, hw), device=x.device, dtype=partial_dtype)
    # The number of hw blocks depends on the config the autotuner picks: size the buffer for the most blocks and
    # note the count of the launch that ran (the grid is evaluated last for the final launch).
    dmc_partial = torch.empty(n * triton.cdiv(hw, _MIN_BLOCK_HW) * c, device=x.device, dtype=partial_dtype)
    launched = {}

    def grid(meta):
        launched["hw_blocks"] = triton.cdiv(hw, meta["BLOCK_HW"])
        return (n * launched["hw_blocks"], n_splits)

    launch(apply_bwd_reduce_kernel, grid, g, x, mc, ms, g if dx is None else dx, dmc_partial, dms_partial, c, hw,
           c_per_split, COMBINE=COMBINE_CODES[combine], CHANNELS_LAST=plan.channels_last, WRITE_DX=dx is not None,
           ACC=acc_dtype(x.dtype))  # dx_ptr = g when WRITE_DX is off: never stored to
    hw_blocks = launched["hw_blocks"]
    dmc = dmc_partial[: n * hw_blocks * c].view(n, hw_blocks, c)
    dmc = dmc.view(n, c) if hw_blocks == 1 else dmc.sum(dim=1)
    dms = dms_partial.view(n, hw) if n_splits == 1 else dms_partial.sum(dim=1)
    return dmc, dms


def _reduce_rows(g, x, mc, ms, combine, dx, group, partial_dtype):
    """Launch :func:`apply_bwd_reduce_rows_kernel` (NCHW, ``group`` channels per row); returns (dmc, dms)."""
    n, c, h, w = x.shape
    hw, n_rows = h * w, c // group
    # Split the channels only as far as the GPU needs programs, and at most until the dms partials (4 bytes per
    # group-row position per split) reach 1/16 of the bytes of g and x that the split reads.
    max_splits = max(1, n_rows * 2 * x.element_size() // 64)
    n_splits = max(1, min(triton.cdiv(target_programs(x.device), n), max_splits, triton.cdiv(n_rows, _ROW_SPLIT_UNIT)))
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, n_splits), _ROW_SPLIT_UNIT) * _ROW_SPLIT_UNIT
    n_splits = triton.cdiv(n_rows, rows_per_split)
    dmc = torch.empty((n, c), device=x.device, dtype=partial_dtype)
    dms_partial = torch.empty((n, n_splits * group, hw), device=x.device, dtype=partial_dtype)
    launch(apply_bwd_reduce_rows_kernel, (n, n_splits), g, x, mc, ms, g if dx is None else dx, dmc, dms_partial, c,
           rows_per_split, HW=hw, GROUP=group, COMBINE=COMBINE_CODES[combine],
           BLOCK_L=triton.next_power_of_2(group * hw), WRITE_DX=dx is not None, ACC=acc_dtype(x.dtype))
    dms = dms_partial.view(n, hw) if n_splits * group == 1 else dms_partial.sum(dim=1)
    return dmc, dms


def apply_bwd(g, x, mc, ms, combine):
    """Single-pass backward: returns ``(dx, dmc, dms)``; dx in ``x``'s dtype and memory format, dmc (N, C) and
    dms (N, H·W) fp32 (fp64 for fp64 inputs). ``g`` has ``x``'s strides; ``mc`` (N, C) and ``ms`` (N, H·W) are
    contiguous. Arguments are validated by the op layer."""
    dx = torch.empty_like(x)  # x is dense, so empty_like keeps its strides (memory format)
    dmc, dms = _reduce(g, x, mc, ms, combine, dx)
    return dx, dmc, dms


def apply_bwd_reduce(g, x, mc, ms, combine):
    """The reductions only: returns ``(dmc, dms)`` as :func:`apply_bwd` does, without writing dx."""
    return _reduce(g, x, mc, ms, combine, None)


def apply_bwd_dx(g, x, mc, ms, combine, dpool=None, dx_extra=None):
    """``dx = g·(1 + s) [+ dpool / (H·W)] [+ dx_extra]`` in ``x``'s dtype and memory format. ``dpool`` (N, C)
    contiguous, any float dtype; ``dx_extra`` has ``x``'s dtype and strides and receives dx in place when given.
    Arguments are validated by the op layer."""
    n, c, h, w = x.shape
    plan = memory_plan(x)
    dx = torch.empty_like(x) if dx_extra is None else dx_extra
    row_map, col_map = (ms, mc) if plan.channels_last else (mc, ms)
    n_elements = x.numel()
    grid = lambda meta: (triton.cdiv(n_elements, meta["BLOCK"]),)  # noqa: E731
    dpool_arg = dx if dpool is None else dpool  # absent inputs are passed as dx: never read
    launch(apply_bwd_dx_kernel, grid, g, row_map, col_map, dpool_arg, dx, dx, n_elements, INNER=plan.inner,
           MID=plan.mid, CHANNELS_LAST=plan.channels_last, COMBINE=COMBINE_CODES[combine], INDEX_64=plan.index_64,
           HAS_DPOOL=dpool is not None, HAS_EXTRA=dx_extra is not None, ACC=acc_dtype(x.dtype))
    return dx
