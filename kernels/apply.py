"""Fused BAM attention-apply, forward: ``out = x * (1 + sigmoid(mc ⊕ ms))``.

Shapes: ``x``/``out`` (N, C, H, W); ``mc`` (N, C); ``ms`` (N, H·W); ``⊕`` is ``+`` (the paper) or ``*`` (the authors'
code), a compile-time choice. The (N, C, H, W) attention map is never written: each element of ``x`` is read once,
its two attention logits are gathered from the small maps (they stay in L1/L2), and ``out`` is written once.

Indexing. The kernel walks the flat memory range of ``x``, not rows of H·W, so every block starts 16-byte aligned and
loads/stores vectorise to 128 bits even when H·W is 49 or 196. Both memory formats are the same problem seen with
the two small maps swapped:

    NCHW: memory order (n, c, hw) -> ``row_map`` = mc, ``col_map`` = ms, INNER = H·W, MID = C
    NHWC: memory order (n, hw, c) -> ``row_map`` = ms, ``col_map`` = mc, INNER = C,   MID = H·W

For a flat index ``i``: ``row_map[i // INNER]`` and ``col_map[(i // (MID·INNER))·INNER + i % INNER]``. INNER and MID
are compile-time constants, so these divisions compile to multiply-high and shift instead of a ~20-instruction integer
division; a network has a handful of BAM shapes, so the specialisation costs a handful of compiles. ``⊕`` commutes,
so swapping the maps changes nothing. Offsets are int32 unless ``x`` has 2**31 elements or more (``INDEX_64``).
"""

import torch
import triton
import triton.language as tl

from ._common import autotune, cached_plan, flat_index, flat_plan, is_channels_last, launch

COMBINE_SUM = 0
COMBINE_PRODUCT = 1
COMBINE_CODES = {"sum": COMBINE_SUM, "product": COMBINE_PRODUCT}


@triton.jit
def attention_logit(row_val, col_val, COMBINE: tl.constexpr):
    """``mc ⊕ ms`` in the dtype of its operands (fp32, fp64 for fp64 inputs); shared by the forward and backward
    kernels."""
    if COMBINE == 0:
        return row_val + col_val
    else:
        return row_val * col_val


@triton.jit
def row_map_index(idx, INNER: tl.constexpr):
    """Index into ``row_map`` of flat indices ``idx`` of ``x``: n·MID + mid (see the module docstring)."""
    return idx // INNER


@triton.jit
def col_map_index(idx, INNER: tl.constexpr, MID: tl.constexpr):
    """Index into ``col_map`` of flat indices ``idx`` of ``x``: n·INNER + inner (see the module docstring)."""
    return (idx // (MID * INNER)) * INNER + idx % INNER


@triton.jit
def gather_maps(row_map_ptr, col_map_ptr, idx, mask, INNER: tl.constexpr, MID: tl.constexpr,
                ACC: tl.constexpr = tl.float32):
    """Load the two small-map values that belong to flat indices ``idx`` of ``x`` (see the module docstring), as
    ``ACC`` (fp32; fp64 for fp64 inputs)."""
    row = tl.load(row_map_ptr + row_map_index(idx, INNER), mask=mask, other=0.0).to(ACC)
    col = tl.load(col_map_ptr + col_map_index(idx, INNER, MID), mask=mask, other=0.0).to(ACC)
    return row, col


# Keyed on the per-image shape (INNER, MID) and the batch bucket, not on n_elements: every new batch size would re-tune.
@autotune("elementwise", key=["batch_bucket", "INNER", "MID"])
@triton.jit(do_not_specialize=["batch_bucket"])
def apply_fwd_kernel(
    x_ptr,  # (N, C, H, W) in memory order (n, c, hw) or (n, hw, c), dense
    row_map_ptr,  # N·(n_elements // (N·INNER)) values, see the module docstring
    col_map_ptr,  # N·INNER values
    out_ptr,  # same shape and memory order as x
    n_elements,
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    INNER: tl.constexpr,
    MID: tl.constexpr,
    COMBINE: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr = tl.float32,  # compute dtype: fp32, fp64 for fp64 inputs (the launcher passes acc_dtype)
):
    idx = flat_index(tl.program_id(0), BLOCK, INDEX_64)
    mask = idx < n_elements
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC)
    row, col = gather_maps(row_map_ptr, col_map_ptr, idx, mask, INNER, MID, ACC)
    s = tl.sigmoid(attention_logit(row, col, COMBINE))
    tl.store(out_ptr + idx, (x * (1.0 + s)).to(out_ptr.dtype.element_ty), mask=mask)


@cached_plan
def apply_fwd_plan(shape, dtype, channels_last, combine):
    """The launch of :func:`apply_fwd` for a dense ``shape`` input of ``dtype``: one flat grid over every element."""
    return flat_plan(apply_fwd_kernel, shape, dtype, channels_last, (("COMBINE", COMBINE_CODES[combine]),),
                     writes=("out_ptr",))


def apply_fwd(x, mc, ms, combine, config=None):
    """Launch :func:`apply_fwd_kernel`. ``x`` dense NCHW or channels_last; ``mc`` (N, C), ``ms`` (N, H·W), both
    contiguous. Returns ``out`` in ``x``'s memory format. ``config`` forces one (meta, num_warps) config (tests).
    Arguments are validated by the op layer."""
    channels_last = is_channels_last(x)
    out = torch.empty_like(x)  # x is dense, so empty_like keeps its strides (memory format)
    row_map, col_map = (ms, mc) if channels_last else (mc, ms)
    launch(apply_fwd_plan(tuple(x.shape), x.dtype, channels_last, combine), x, row_map, col_map, out, config=config)
    return out
