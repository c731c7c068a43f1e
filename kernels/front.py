"""BAM's front end in one read of ``x``: the channel pooling and the spatial branch's 1x1 conv C -> C_r, forward and
backward (issue 14).

Forward, ``front_fwd_kernel``: ``pooled[n, c] = mean_hw x[n, c, hw]`` and ``y[n, :, hw] = W·x[n, :, hw] + b`` from
one read of x. The conv is a GEMM over pixels: a program owns one image and BLOCK_P pixels, walks C in BLOCK_K chunks
and accumulates ``acc += W[:, chunk] · x[chunk, pixels]`` with ``tl.dot`` (tensor cores for fp16/bf16; fp32 stays
IEEE: ``input_precision="ieee"``, a keyword Triton 3.2, 3.3 and 3.9 all take; fp64 uses a broadcast-multiply-sum,
Triton 3.2/3.3 have no fp64 dot). The same x tiles give the channel sums of the pooling. Tiles lie along x's
contiguous axis:

    NCHW: x tile [BLOCK_K, BLOCK_P], acc [R_PAD, BLOCK_P] = W [R_PAD, BLOCK_K] · x
    NHWC: x tile [BLOCK_P, BLOCK_K], acc [BLOCK_P, R_PAD] = x · Wᵀ [BLOCK_K, R_PAD]

R_PAD is C_r rounded up to a power of two and at least 16 (the smallest dot); the padding rows of W load as 0.
Each program writes its channel sums to an fp32 (fp64) (N, n_pixel_blocks, C) buffer that the launcher adds up in a
fixed order (no atomics): written and read once, 4/BLOCK_P bytes per byte of fp16 x (6% at BLOCK_P = 64). The x and
W pointers advance by one chunk per step rather than being recomputed: recomputed, ptxas held the kernel at 80
registers and spilled 8-24 bytes (bf16, sm_80, C = 256). The grid is one program per (image, pixel block), so 14x14
maps give few programs (32 images: 128 at BLOCK_P = 64, 224 at 32); splitting C as well would cost fp32 partials of y.

Backward, ``front_bwd_kernel``: with g the gradient of BAM's output, dy that of y (C_r channels) and dpool that of
pooled, it writes ``dx = g·(1 + s) + dpool/(H·W) + Wᵀ·dy`` once (s = sigmoid(mc ⊕ ms), as kernels/apply_bwd.py) and
accumulates ``dW = Σ_pixels dy·xᵀ`` and ``db = Σ dy``. dW is a split-K GEMM over N·H·W pixels, so a program owns one
chunk of BLOCK_K channels (its [BLOCK_K, R_PAD] slice of W loaded once) and one split of the pixels, walks the split
in BLOCK_P blocks (over image boundaries), and keeps ``dW[:, chunk]`` in registers:

    NCHW: dx tile [BLOCK_K, BLOCK_P] += Wᵀ[chunk] · dy[R_PAD, BLOCK_P];   dW[:, chunk] += dy · xᵀ
    NHWC: dx tile [BLOCK_P, BLOCK_K] += dy[BLOCK_P, R_PAD] · W[:, chunk];  dW[:, chunk] += dyᵀ · x

Each program writes its dW slice (and the channel-chunk-0 programs their db) to fp32 (n_splits, C_r, C) and
(n_splits, C_r) buffers that the launcher sums in a fixed order. Splits are whole chunks of ``P_SPLIT_UNIT`` pixels
(a multiple of every BLOCK_P); the plan takes as many as the GPU needs programs (the channel chunk is the fastest grid
axis, so the programs that read the same dy run together and share it in L2), but keeps the partials' bytes (written
and read once) under 1/8 of the bytes of g, x and dx the split moves.

Dtypes: the dots take W in x's dtype (the launchers cast it, as cuDNN under autocast does) and dy in x's dtype and
memory format; b, mc, ms and dpool may be any float dtype. Everything accumulates in fp32 (fp64 for fp64 x).
Offsets within an image are int32 (the op layer checks C·H·W < 2**31), image bases int64.

GPU code (tests/test_kernel_front.py compiles every kept config for sm_80 and sm_90 at the ResNet-50 BAM shapes and
2048x7x7, batch 32, r = 16, fp16/bf16, both layouts, under every Triton from 3.2 to 3.9: `make test-triton-compat`
and `make test`): mma.sync on sm_80,
wgmma or mma.sync on sm_90, no spills; x loads (cp.async into shared memory, as the pipeliner feeds the dots, or
ld.global) are 128-bit wherever x's rows are 16-byte aligned, i.e. everywhere but NCHW 14x14 (a row of 196 fp16 is
8-byte aligned: 64-bit; the pooling's row-group trick cannot feed a GEMM tile). Registers, sm_80 / sm_90, over the
ResNet-50 shapes with Triton 3.2, 3.3 and 3.9:

    forward   P64-K64-w4 56-168 / 56-124    P128-K32-w4 64-202 / 63-130   P128-K64-w8 64-166 / 57-126
              P32-K64-w4 48-111 / 40-117    P64-K32-w4 48-128 / 40-88     P256-K32-w8 78-212 / 62-154
    backward  K64-P32-w4 95-252 / 74-206    K128-P32-w8 101-255 / 75-224  K32-P32-w4 72-168 / 63-168
              C_r <= 32: K32-P64-w4 72-205 / 64-232
              C_r <= 16: K32-P128-w8 100-180 / 80-241

The backward configs the pruner drops at C_r = 64 spilled on sm_80: K32-P128-w8 76 bytes (NCHW, Triton 3.9),
K64-P64-w4 24-48 (NHWC, 3.9). K64-P64 is no longer in the list: with the maps in x's dtype, as the module
launches them, it spilled at 28x28 NHWC (w8: 24 bytes, sm_80, 3.9; w4: 12 bytes, sm_90, 3.3).

fp32 compiles to FMA (IEEE, no TF32), which keeps the whole reduction of each of a thread's outputs in registers: with
the tensor-core budget the first configs spilled at the larger C_r (Triton 3.9, sm_80: forward 536 bytes at 28x28
NHWC, 864 / 1048 at 14x14 NCHW / NHWC, 7480 / 2072 at 2048x7x7; backward 2396-20776 at 14x14 and 7x7; sm_90 too).
The pruner tells fp32 by DOT (DOT_FMA) and keeps it within a budget of its own: forward P64-K32-w4 up to C_r = 32
(at 64 it spilled 16 bytes on sm_90 with Triton 3.4) and P32-K32-w8, backward K32-P16-w16 (NHWC) and K16-P32-w16
(NCHW), one element of dx per thread; the last three are fp32-only entries of the lists, too small for the
tensor-core floor. The tests compile every config fp32 keeps at the ResNet-50 shapes and 2048x7x7, both layouts,
sm_80 and sm_90: no spills with any Triton from 3.2 to 3.9; registers sm_80 / sm_90, over those shapes with 3.2, 3.3
and 3.9:

    forward   P64-K32-w4 56-204 / 62-128    P32-K32-w8 37-194 / 40-118
    backward  K32-P16-w16 40-64 / 40-64     K16-P32-w16 40-117 / 40-70

Where none fits (the backward at C_r = 128; the lists without their fp32 entries; a wider C_r) the pruner keeps the
config with the smallest register tiles (K32-P32-w4 at C_r = 128: no spills, where the first config spilled on sm_80
with Triton 3.4 and 3.5). fp32 is no performance target. fp64 (a correctness path for gradcheck, no dot) spills heavily.
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._common import (LaunchPlan, acc_dtype, cached_plan, is_channels_last, launch, n_bucket, planned_meta, sm_count,
                      target_programs)
from .apply import COMBINE_CODES, attention_logit

# Splits of the backward's pixels are whole chunks of this many pixels of one image: a multiple of every BLOCK_P.
P_SPLIT_UNIT = max(meta["BLOCK_P"] for meta, _ in _common.all_configs("front_bwd"))
# The forward's pooling partials are sized for the most pixel blocks any config makes.
_MIN_FWD_BLOCK_P = min(meta["BLOCK_P"] for meta, _ in _common.all_configs("front_fwd"))
# Channel chunk the backward plan assumes when it counts programs (the config is not known yet).
_TYPICAL_BLOCK_K = 64
# How the kernels multiply their tiles (constexpr DOT): tl.dot on the tiles as loaded (fp16, bf16: tensor cores; fp32:
# DOT_FMA, the same IEEE tl.dot, compiled to FMA: a value of its own so that the pruner can tell fp32 tiles apart),
# tl.dot on fp32 copies (bf16 in the interpreter, whose dot multiplies numpy's raw bf16 bit patterns; exact, since
# bf16 -> fp32 is), or for fp64 a broadcast-multiply-sum (Triton 3.2 and 3.3 have no fp64 dot).
DOT_NATIVE, DOT_FP32, DOT_NONE, DOT_FMA = 1, 2, 0, 3


def dot_mode(dtype):
    if dtype == torch.float64:
        return DOT_NONE
    if dtype == torch.float32:
        return DOT_FMA
    return DOT_FP32 if _common.INTERPRETED and dtype == torch.bfloat16 else DOT_NATIVE


# Register budget of the tensor-core path (fp16, bf16; fp64 too), in elements per thread, of the tiles a program keeps
# live, and of the backward's whole dy tile (it feeds both dots, in two operand layouts). sm_80 is the tighter target:
# at C_r = 64 ptxas spilled with 32 elements of dy, dx and dW per thread (Triton 3.9), with a [64, 128] dy tile on 8
# warps (3.9) and with a [64, 64] one on 8 warps (3.3); every kept config compiles without spills at the ResNet-50
# shapes with 3.2, 3.3 and 3.9. Its floor: 16 bytes of x (8 elements) per thread and step; smaller tiles are for fp32.
_FWD_LIMITS = dict(acc=64, x=64)
# The forward's accumulator, x and W_r tiles together: Triton 3.4 and 3.5 spilled on sm_80 at C_r = 128 (2048x7x7)
# with 128 and 160 elements per thread ([128, 64] x tiles on 8 warps, [64, 64] on 4); at 112 or fewer none did.
_FWD_TOTAL = 112
_BWD_LIMITS = dict(dy=16, dw=32, dx=32)
_BWD_DY_TILE = 2048
_MIN_X = 8
# fp32 (DOT_FMA): an FMA dot keeps the whole reduction of a thread's outputs in registers (BLOCK_K in the forward,
# C_r and BLOCK_P in the backward), so the tensor-core budget does not carry over. Measured with bam-triton inspect at
# the ResNet-50 shapes, sm_80 and sm_90: BLOCK_K = 64 spilled at C_r = 32 and 64, 64 elements of acc per thread at
# C_r = 128 (Triton 3.9), x tiles of 32 took 254-255 registers (NHWC, 3.9); in the backward each of 22 configs with
# 2 or more elements of dx per thread spilled at C_r = 64 or 128 with Triton 3.2, 3.3 or 3.9, those with 1 never.
_FMA_FWD_LIMITS = dict(acc=32, x=16)
# With the W_r tile: Triton 3.4 spilled at 64 (16 bytes, sm_90, 1024x14x14 channels_last), never at 40 or fewer.
_FMA_FWD_TOTAL = 48
_FMA_FWD_BLOCK_K = 32
_FMA_BWD_LIMITS = dict(dy=16, dw=32, dx=1)


def hidden_pad(hidden):
    """R_PAD: the hidden width C_r as the dots see it, a power of two of at least 16."""
    return max(16, triton.next_power_of_2(hidden))


def tile_elements(kind, meta, num_warps, r_pad):
    """Elements per thread of each register tile of a ``kind`` program with config ``meta``."""
    threads = 32 * num_warps
    if kind == "front_fwd":
        return dict(acc=r_pad * meta["BLOCK_P"] // threads, x=meta["BLOCK_K"] * meta["BLOCK_P"] // threads,
                    w=r_pad * meta["BLOCK_K"] // threads)
    return dict(dy=r_pad * meta["BLOCK_P"] // threads, dw=r_pad * meta["BLOCK_K"] // threads,
                dx=meta["BLOCK_K"] * meta["BLOCK_P"] // threads)


def fits(kind, meta, num_warps, r_pad, dot):
    """Whether a ``kind`` config's register tiles stay within the budget above of its ``dot`` path at ``r_pad``."""
    sizes = tile_elements(kind, meta, num_warps, r_pad)
    if dot == DOT_FMA:
        if kind == "front_fwd" and (meta["BLOCK_K"] > _FMA_FWD_BLOCK_K or sum(sizes.values()) > _FMA_FWD_TOTAL):
            return False
        limits = _FMA_FWD_LIMITS if kind == "front_fwd" else _FMA_BWD_LIMITS
    else:
        if sizes["x" if kind == "front_fwd" else "dx"] < _MIN_X:
            return False
        if kind == "front_bwd" and r_pad * meta["BLOCK_P"] > _BWD_DY_TILE:
            return False
        if kind == "front_fwd" and sum(sizes.values()) > _FWD_TOTAL:
            return False
        limits = _FWD_LIMITS if kind == "front_fwd" else _BWD_LIMITS
    return all(sizes[name] <= limit for name, limit in limits.items())


def _prune(kind):
    """``early_config_prune`` of ``kind``: keep the configs whose block along x's contiguous axis has at least 32
    elements (BLOCK_P for NCHW, BLOCK_K for NHWC; or the whole axis when it is shorter), whose pixel block is at most
    twice the image's pixels (rounded up to a power of two, at least 32), and that :func:`fits` the register budget
    of the dot path (DOT: fp32 or not). Never empty: where no config fits the budget (the backward at C_r = 128),
    the one with the fewest register-tile elements per thread of those the other rules keep stays (the first of the
    list spilled there on sm_80 with Triton 3.4 and 3.5, this one never)."""

    def prune(configs, named_args, **kwargs):
        def arg(name):
            return kwargs[name] if name in kwargs else named_args[name]

        channels_last, c, hw, r_pad, dot = arg("CHANNELS_LAST"), arg("C"), arg("HW"), arg("R_PAD"), arg("DOT")
        contiguous_axis, extent = ("BLOCK_K", c) if channels_last else ("BLOCK_P", hw)

        def shaped(cf):
            meta = cf.kwargs
            if meta[contiguous_axis] < min(32, triton.next_power_of_2(extent)):
                return False
            if meta["BLOCK_P"] > max(32, 2 * triton.next_power_of_2(hw)):
                return False
            return dot == DOT_FMA or tile_elements(kind, meta, cf.num_warps, r_pad)[
                "x" if kind == "front_fwd" else "dx"] >= _MIN_X

        kept = [cf for cf in configs if shaped(cf) and fits(kind, cf.kwargs, cf.num_warps, r_pad, dot)]
        if kept:
            return kept
        usable = [cf for cf in configs if shaped(cf)] or configs
        return [min(usable, key=lambda cf: sum(tile_elements(kind, cf.kwargs, cf.num_warps, r_pad).values()))]

    return prune


@triton.jit
def _mma(a, b, acc, DOT: tl.constexpr):
    """``acc + a·b``: tl.dot (IEEE for fp32 operands: no TF32), or for fp64 a broadcast-multiply-sum."""
    if DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT == 0:
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:  # DOT_NATIVE, DOT_FMA
        return tl.dot(a, b, acc, input_precision="ieee")


@_common.autotune("front_fwd", prune=_prune("front_fwd"), key=["batch_bucket", "C", "HW", "C_R", "CHANNELS_LAST"])
@triton.jit(do_not_specialize=["batch_bucket"])
def front_fwd_kernel(
    x_ptr,  # (N, C, H, W), dense NCHW or NHWC
    w_ptr,  # (C_R, C), x's dtype, contiguous
    b_ptr,  # (C_R,), any float dtype
    y_ptr,  # (N, C_R, H, W), x's dtype and memory format
    pool_partial_ptr,  # (N, cdiv(HW, BLOCK_P), C), ACC: channel sums over one pixel block
    C,
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    HW: tl.constexpr,  # a constexpr: NCHW rows of H·W elements are then known to be as aligned as they are
    C_R: tl.constexpr,
    R_PAD: tl.constexpr,  # C_R rounded up to a power of two >= 16
    CHANNELS_LAST: tl.constexpr,
    ACC: tl.constexpr,  # fp32, fp64 for fp64 inputs
    DOT: tl.constexpr,  # dot_mode(x's dtype)
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_p_blocks = (HW + BLOCK_P - 1) // BLOCK_P
    n = (pid // n_p_blocks).to(tl.int64)
    p = (pid % n_p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < HW
    r = tl.arange(0, R_PAD)
    r_mask = r < C_R
    x_image = x_ptr + n * C * HW
    y_image = y_ptr + n * (C_R * HW)
    pool_row = pool_partial_ptr + pid.to(tl.int64) * C  # row (n, pixel block)
    k = tl.arange(0, BLOCK_K)  # channel offsets within a chunk; pointers advance by one chunk a step
    if CHANNELS_LAST:
        acc = tl.zeros([BLOCK_P, R_PAD], dtype=ACC)
        x_ptrs = x_image + p[:, None] * C + k[None, :]
        w_ptrs = w_ptr + r[None, :] * C + k[:, None]
        for c0 in range(0, C, BLOCK_K):
            c_mask = k < C - c0
            x = tl.load(x_ptrs, mask=p_mask[:, None] & c_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=c_mask[:, None] & r_mask[None, :], other=0.0)
            acc = _mma(x, w, acc, DOT)
            tl.store(pool_row + c0 + k, tl.sum(x.to(ACC), axis=0).to(pool_partial_ptr.dtype.element_ty), mask=c_mask)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y = acc + tl.load(b_ptr + r, mask=r_mask, other=0.0).to(ACC)[None, :]
        tl.store(y_image + p[:, None] * C_R + r[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=p_mask[:, None] & r_mask[None, :])
    else:
        acc = tl.zeros([R_PAD, BLOCK_P], dtype=ACC)
        x_ptrs = x_image + k[:, None] * HW + p[None, :]
        w_ptrs = w_ptr + r[:, None] * C + k[None, :]
        for c0 in range(0, C, BLOCK_K):
            c_mask = k < C - c0
            x = tl.load(x_ptrs, mask=c_mask[:, None] & p_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=r_mask[:, None] & c_mask[None, :], other=0.0)
            acc = _mma(w, x, acc, DOT)
            tl.store(pool_row + c0 + k, tl.sum(x.to(ACC), axis=1).to(pool_partial_ptr.dtype.element_ty), mask=c_mask)
            x_ptrs += BLOCK_K * HW
            w_ptrs += BLOCK_K
        y = acc + tl.load(b_ptr + r, mask=r_mask, other=0.0).to(ACC)[:, None]
        tl.store(y_image + r[:, None] * HW + p[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=r_mask[:, None] & p_mask[None, :])


@_common.autotune("front_bwd", prune=_prune("front_bwd"),
                  key=["batch_bucket", "C", "HW", "C_R", "CHANNELS_LAST", "COMBINE", "HAS_DPOOL"])
@triton.jit(do_not_specialize=["batch_bucket"])
def front_bwd_kernel(
    g_ptr,  # (N, C, H, W), x's strides
    x_ptr,  # (N, C, H, W), dense NCHW or NHWC
    mc_ptr,  # (N, C), any float dtype
    ms_ptr,  # (N, H·W), any float dtype
    dpool_ptr,  # (N, C), any float dtype; read only when HAS_DPOOL
    dy_ptr,  # (N, C_R, H, W), x's dtype and memory format
    w_ptr,  # (C_R, C), x's dtype, contiguous
    dx_ptr,  # like x, a new tensor
    dw_partial_ptr,  # (n_splits, C_R, C), ACC: dW over one pixel split
    db_partial_ptr,  # (n_splits, C_R), ACC: db over one pixel split (written by channel chunk 0)
    n_chunks,  # N · cdiv(HW, CHUNK)
    chunks_per_split,
    batch_bucket,  # tuning key only: N rounded up to a power of two (_common.n_bucket)
    C: tl.constexpr,
    HW: tl.constexpr,
    C_R: tl.constexpr,
    R_PAD: tl.constexpr,
    CHUNK: tl.constexpr,  # pixels per split unit, a multiple of BLOCK_P
    CHANNELS_LAST: tl.constexpr,
    COMBINE: tl.constexpr,
    HAS_DPOOL: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,  # dot_mode(x's dtype)
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    c_block = tl.program_id(0)
    split = tl.program_id(1)
    c = c_block * BLOCK_K + tl.arange(0, BLOCK_K)
    c_mask = c < C
    r = tl.arange(0, R_PAD)
    r_mask = r < C_R
    # Pixel blocks of the split, numbered over all images: block t is pixels (t % P_BLOCKS)·BLOCK_P... of image
    # t // P_BLOCKS. A chunk (image n, chunk k) starts at block n·P_BLOCKS + k·CHUNK/BLOCK_P.
    P_BLOCKS = (HW + BLOCK_P - 1) // BLOCK_P
    CHUNKS = (HW + CHUNK - 1) // CHUNK
    BLOCKS_PER_CHUNK = CHUNK // BLOCK_P
    q0 = split * chunks_per_split
    q1 = tl.minimum(q0 + chunks_per_split, n_chunks)
    t0 = (q0 // CHUNKS) * P_BLOCKS + (q0 % CHUNKS) * BLOCKS_PER_CHUNK
    t1 = (q1 // CHUNKS) * P_BLOCKS + (q1 % CHUNKS) * BLOCKS_PER_CHUNK
    inv_hw = 1.0 / tl.cast(HW, ACC)  # in ACC: a float argument would be fp32 even for fp64 inputs
    dw = tl.zeros([R_PAD, BLOCK_K], dtype=ACC)
    if CHANNELS_LAST:
        w = tl.load(w_ptr + r[:, None] * C + c[None, :], mask=r_mask[:, None] & c_mask[None, :], other=0.0)
    else:
        wt = tl.load(w_ptr + r[None, :] * C + c[:, None], mask=c_mask[:, None] & r_mask[None, :], other=0.0)
    db = tl.zeros([R_PAD], dtype=ACC)
    for t in range(t0, t1):
        n = t // P_BLOCKS
        p = (t % P_BLOCKS) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < HW
        image = n.to(tl.int64) * (C * HW)
        dy_image = dy_ptr + n.to(tl.int64) * (C_R * HW)
        mc = tl.load(mc_ptr + n * C + c, mask=c_mask, other=0.0).to(ACC)
        ms = tl.load(ms_ptr + n * HW + p, mask=p_mask, other=0.0).to(ACC)
        if HAS_DPOOL:
            dpool = tl.load(dpool_ptr + n * C + c, mask=c_mask, other=0.0).to(ACC) * inv_hw
        else:
            dpool = tl.zeros([BLOCK_K], dtype=ACC)
        if CHANNELS_LAST:
            offsets = p[:, None] * C + c[None, :]
            mask = p_mask[:, None] & c_mask[None, :]
            dy = tl.load(dy_image + p[:, None] * C_R + r[None, :], mask=p_mask[:, None] & r_mask[None, :], other=0.0)
            x = tl.load(x_ptr + image + offsets, mask=mask, other=0.0)
            g = tl.load(g_ptr + image + offsets, mask=mask, other=0.0).to(ACC)
            s = tl.sigmoid(attention_logit(mc[None, :], ms[:, None], COMBINE))
            dx = _mma(dy, w, g * (1.0 + s) + dpool[None, :], DOT)
            dw = _mma(tl.trans(dy), x, dw, DOT)
            db += tl.sum(dy.to(ACC), axis=0)
        else:
            offsets = c[:, None] * HW + p[None, :]
            mask = c_mask[:, None] & p_mask[None, :]
            dy = tl.load(dy_image + r[:, None] * HW + p[None, :], mask=r_mask[:, None] & p_mask[None, :], other=0.0)
            x = tl.load(x_ptr + image + offsets, mask=mask, other=0.0)
            g = tl.load(g_ptr + image + offsets, mask=mask, other=0.0).to(ACC)
            s = tl.sigmoid(attention_logit(mc[:, None], ms[None, :], COMBINE))
            dx = _mma(wt, dy, g * (1.0 + s) + dpool[:, None], DOT)
            dw = _mma(dy, tl.trans(x), dw, DOT)
            db += tl.sum(dy.to(ACC), axis=1)
        tl.store(dx_ptr + image + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    out = (split * C_R + r[:, None]).to(tl.int64) * C + c[None, :]
    tl.store(dw_partial_ptr + out, dw.to(dw_partial_ptr.dtype.element_ty), mask=r_mask[:, None] & c_mask[None, :])
    if c_block == 0:
        tl.store(db_partial_ptr + split * C_R + r, db.to(db_partial_ptr.dtype.element_ty), mask=r_mask)


def _acc_torch(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _common_constexprs(shape, dtype, channels_last, hidden):
    n, c, h, w = shape
    return (("C", c), ("HW", h * w), ("C_R", hidden), ("R_PAD", hidden_pad(hidden)),
            ("CHANNELS_LAST", channels_last), ("ACC", acc_dtype(dtype)), ("DOT", dot_mode(dtype)))


@cached_plan
def front_fwd_plan(shape, dtype, channels_last, hidden, sms=None):
    """The launch of :func:`front_fwd` for a dense ``shape`` (N, C, H, W) input of ``dtype`` and a C -> ``hidden``
    1x1 conv: one program per (image, pixel block). ``sms`` is unused (the grid is the work itself); it is there for
    the plans' common signature. Buffer ``pool_partial``: flat channel sums per pixel block, sized for the smallest
    BLOCK_P of any config."""
    n, c, h, w = shape
    hw = h * w
    return LaunchPlan(front_fwd_kernel, "front_fwd", grid=((n, hw, "BLOCK_P"),), scalars=(c, n_bucket(n)),
                      constexprs=_common_constexprs(shape, dtype, channels_last, hidden)[1:],
                      buffers=(("pool_partial", (n * -(-hw // _MIN_FWD_BLOCK_P) * c,), _acc_torch(dtype)),),
                      writes=("y_ptr", "pool_partial_ptr"))


def bwd_split(n, c, hw, hidden, itemsize, target):
    """(n_chunks, chunks_per_split, n_splits) of the backward's pixel split: chunks of P_SPLIT_UNIT pixels of one
    image; as many splits as ``target`` programs need with _TYPICAL_BLOCK_K channel chunks, but at most as many as
    keep the dW/db partials (8·C_r·(C + 1) bytes per split: written, then read by the sum) under 1/8 of the bytes of
    g, x and dx the splits move (3·itemsize·C per pixel)."""
    chunks_per_image = -(-hw // P_SPLIT_UNIT)
    n_chunks = n * chunks_per_image
    # 8·C_r·(C + 1) <= 3·itemsize·C·pixels / 8, with (C + 1)/C taken as 1 + 1/C <= 2^-6 more: pixels per split.
    min_pixels = 64 * hidden * (c + 1) / (3 * itemsize * c)
    max_splits = max(1, int(n * hw // min_pixels))
    want_splits = -(-target // -(-c // _TYPICAL_BLOCK_K))
    per_split = -(-n_chunks // max(1, min(max_splits, want_splits, n_chunks)))
    return n_chunks, per_split, -(-n_chunks // per_split)


@cached_plan
def front_bwd_plan(shape, dtype, channels_last, hidden, combine, has_dpool=True, sms=None):
    """The launch of :func:`front_bwd` for a dense ``shape`` input of ``dtype``, C -> ``hidden`` conv, on a GPU with
    ``sms`` SMs (None: interpreter): grid (channel chunks, pixel splits). Buffers ``dw_partial`` (n_splits, C_r, C)
    and ``db_partial`` (n_splits, C_r), fp32 (fp64 for fp64 inputs)."""
    n, c, h, w = shape
    hw = h * w
    n_chunks, per_split, n_splits = bwd_split(n, c, hw, hidden, dtype.itemsize, target_programs(sms))
    acc = _acc_torch(dtype)
    return LaunchPlan(front_bwd_kernel, "front_bwd", grid=((1, c, "BLOCK_K"), (n_splits, 1, None)),
                      scalars=(n_chunks, per_split, n_bucket(n)),
                      constexprs=_common_constexprs(shape, dtype, channels_last, hidden)
                      + (("CHUNK", P_SPLIT_UNIT), ("COMBINE", COMBINE_CODES[combine]), ("HAS_DPOOL", has_dpool)),
                      buffers=(("dw_partial", (n_splits, hidden, c), acc), ("db_partial", (n_splits, hidden), acc)),
                      writes=("dx_ptr", "dw_partial_ptr", "db_partial_ptr"), unused=() if has_dpool else ("dpool_ptr",))


# The launchers run once per BAM call: their conversions are checked in Python first (a no-op torch call still costs
# a dispatch, about a microsecond).
def _in_dtype(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def _weight_matrix(weight, x):
    """W_r (C_r, C[, 1, 1]) as a contiguous (C_r, C) matrix in x's dtype (the dots' operand dtype)."""
    w = _in_dtype(weight.detach().reshape(weight.shape[0], -1), x.dtype)
    return w if w.is_contiguous() else w.contiguous()


def _like_x(t, x, channels_last):
    """``t`` (N, C', H, W) in x's dtype and memory format (a copy only when it is not already)."""
    t = _in_dtype(t, x.dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def front_fwd(x, weight, bias, config=None):
    """``(pooled, y)`` from one read of a dense (N, C, H, W) ``x``: pooled (N, C) = mean over H, W in x's dtype
    (accumulated in fp32, fp64 for fp64), y (N, C_r, H, W) = conv1x1(x, weight, bias) in x's dtype and memory format.
    ``weight`` (C_r, C, 1, 1) or (C_r, C), any float dtype (cast to x's for the dot); ``bias`` (C_r,) or None.
    ``config`` forces one (meta, num_warps) config (tests). Arguments are validated by the op layer."""
    n, c, h, w = x.shape
    hw = h * w
    channels_last = is_channels_last(x)
    w_mat = _weight_matrix(weight, x)
    hidden = w_mat.shape[0]
    if bias is None:
        b = torch.zeros(hidden, device=x.device, dtype=torch.float32)
    else:  # the kernel reads its memory; autograd never sees it
        b = bias if bias.is_contiguous() else bias.contiguous()
    plan = front_fwd_plan(tuple(x.shape), x.dtype, channels_last, hidden, sm_count(x.device))
    # One row of channel sums per pixel block, and their number depends on the config: sized for it where it is
    # known before the launch (the plan's buffer, sized for the most, on the first launch). The dtypes are the launch's.
    shape, dtype = plan.buffer("pool_partial")
    meta = config[0] if config else planned_meta(plan, x.device, (x.dtype, w_mat.dtype, b.dtype, x.dtype, dtype))
    partial = torch.empty(shape if meta is None else (n * -(-hw // meta["BLOCK_P"]) * c,), device=x.device, dtype=dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.empty((n, hidden, h, w), device=x.device, dtype=x.dtype, memory_format=fmt)
    meta = launch(plan, x, w_mat, b, y, partial, config=config)
    p_blocks = -(-hw // meta["BLOCK_P"])
    sums = partial[: n * p_blocks * c].view(n, p_blocks, c)
    sums = sums.view(n, c) if p_blocks == 1 else sums.sum(dim=1)
    return _in_dtype(sums.div_(hw), x.dtype), y  # in place: the launcher's own buffer or a fresh sum


def front_bwd(g, x, mc, ms, combine, dpool, dy, weight, config=None):
    """``(dx, dW, db)`` of BAM's front end. ``g`` the gradient of BAM's output (x's strides), ``mc`` (N, C),
    ``ms`` (N, H·W) contiguous, ``dpool`` (N, C) the gradient of pooled or None, ``dy`` (N, C_r, H, W) the gradient
    of the 1x1 conv's output (converted to x's dtype and memory format if it is not), ``weight`` (C_r, C, 1, 1) or
    (C_r, C). dx: x's dtype and memory format, a new tensor. dW: weight's shape and dtype, db (C_r,) in weight's
    dtype; both summed in fp32 (fp64 for fp64 x). ``config`` forces one (meta, num_warps) config (tests)."""
    channels_last = is_channels_last(x)
    w_mat = _weight_matrix(weight, x)
    hidden = w_mat.shape[0]
    dy = _like_x(dy, x, channels_last)
    plan = front_bwd_plan(tuple(x.shape), x.dtype, channels_last, hidden, combine, dpool is not None,
                          sm_count(x.device))
    dx = torch.empty_like(x)  # x is dense, so empty_like keeps its strides (memory format)
    dw_shape, acc = plan.buffer("dw_partial")
    dw_partial = torch.empty(dw_shape, device=x.device, dtype=acc)
    db_partial = torch.empty(plan.buffer("db_partial")[0], device=x.device, dtype=acc)
    launch(plan, g, x, mc, ms, mc if dpool is None else dpool, dy, w_mat, dx, dw_partial, db_partial, config=config)
    dw = dw_partial[0] if dw_shape[0] == 1 else dw_partial.sum(dim=0)
    db = db_partial[0] if dw_shape[0] == 1 else db_partial.sum(dim=0)
    return dx, _in_dtype(dw.reshape(weight.shape), weight.dtype), _in_dtype(db, weight.dtype)
