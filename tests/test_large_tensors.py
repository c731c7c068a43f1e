"""Tensors of 2**31 elements and more, through the real kernels in Triton's interpreter.

Opt-in (``BAM_TRITON_BIG_TESTS=1``, or ``make test-big``): about 10 GiB of memory and ~15 minutes on 2 cores, too much
for every run. The quick suite covers the same code paths on small tensors (``INDEX_64`` forced on, the memory plan's
threshold) and ``bam-triton inspect`` shows the 64-bit address arithmetic in the PTX; this file shows the kernels
right where 32-bit offsets would wrap.

The shape puts the last image's base offset past 2**31 (the pooling and the backward reduction index images in
int64 and positions within an image in int32) and the flat range past 2**31 (the elementwise kernels switch to
int64 flat indices). The interpreter caps a block at 2**20 elements, so the raw jit functions are launched with the
largest blocks it takes; the index arithmetic does not depend on the block size. Values are chosen so that results
are exact or checkable at sampled positions: x is constant per (n, c) (an offset that wrapped into another image or
channel reads a different value), ms varies per position.
"""
import os

import pytest
import torch
import triton

from bam_triton.kernels import memory_plan
from bam_triton.kernels._common import acc_dtype, n_bucket
from bam_triton.kernels.apply import apply_fwd_kernel
from bam_triton.kernels.apply_bwd import apply_bwd_dx_kernel, apply_bwd_reduce_kernel
from bam_triton.kernels.pool import channel_pool_kernel
from devices import cpu_only

pytestmark = [
    pytest.mark.skipif(os.environ.get("BAM_TRITON_BIG_TESTS") != "1",
                       reason="needs ~10 GiB and ~15 minutes: set BAM_TRITON_BIG_TESTS=1 (make test-big)"),
    cpu_only("interpreter-only: launches the raw jit functions on CPU tensors with the interpreter's 2**20-element "
             "blocks, which no GPU config uses"),
]

# (N - 1)·C·H·W >= 2**31: the last image starts past the int32 range.
N, C, H, W = 64, 16, 2048, 1041
HW = H * W
BLOCK = 2**20  # the interpreter's largest block


@pytest.fixture(scope="module")
def big():
    assert (N - 1) * C * HW >= 2**31
    gen = torch.Generator().manual_seed(0)
    per_channel = ((torch.arange(N * C) % 7 - 3) / 4).view(N, C)  # exact in fp16, differs between neighbours
    x = per_channel.to(torch.float16)[:, :, None, None].expand(N, C, H, W).contiguous()
    mc = torch.randn(N, C, generator=gen)
    ms = torch.randn(N, HW, generator=gen)
    # Positions to check: random ones, and both sides of the 2**31 boundary and of the end.
    idx = torch.cat([torch.randint(0, x.numel(), (100_000,), generator=gen),
                     torch.arange(2**31 - 4096, 2**31 + 4096), torch.arange(x.numel() - 4096, x.numel())])
    n, c, hw = idx // (C * HW), (idx // HW) % C, idx % HW
    s = torch.sigmoid(mc[n, c].double() + ms[n, hw].double())
    return dict(x=x, per_channel=per_channel, mc=mc, ms=ms, idx=idx, n=n, c=c, hw=hw, s=s)


def test_plan_uses_64_bit_indices(big):
    assert big["x"].numel() >= 2**31 and memory_plan(big["x"]).index_64


def test_channel_pool(big):
    x = big["x"]
    out = torch.empty(N, 1, C, dtype=torch.float32)
    block_hw = 2**16
    hw_per_split = triton.cdiv(HW, block_hw) * block_hw
    channel_pool_kernel.fn[(N * triton.cdiv(C, 16), 1)](
        x, out, C, HW, hw_per_split, n_bucket(N), CHANNELS_LAST=False, ACC=acc_dtype(x.dtype), BLOCK_C=16,
        BLOCK_HW=block_hw)
    # Sums of identical multiples of 1/4 are exact in fp32 here, so the means are exact.
    torch.testing.assert_close(out.view(N, C), big["per_channel"], atol=1e-6, rtol=0)


def test_apply_forward(big):
    x, plan = big["x"], memory_plan(big["x"])
    out = torch.empty_like(x)
    apply_fwd_kernel.fn[(triton.cdiv(x.numel(), BLOCK),)](
        x, big["mc"], big["ms"], out, x.numel(), n_bucket(N), INNER=plan.inner, MID=plan.mid, COMBINE=0, INDEX_64=True,
        BLOCK=BLOCK, ACC=acc_dtype(x.dtype))
    ref = big["per_channel"][big["n"], big["c"]].double() * (1 + big["s"])
    torch.testing.assert_close(out.view(-1)[big["idx"]].double(), ref, atol=1e-3, rtol=2e-3)


def test_apply_backward(big):
    """g = x (cheap, known): reductions for the sum combine, then dx with the pooling gradient folded in."""
    x, plan = big["x"], memory_plan(big["x"])
    g = x
    block_hw = 2**16  # 16 x 2**16: the interpreter's largest tile
    hw_blocks = triton.cdiv(HW, block_hw)
    dmc_partial = torch.empty(N * hw_blocks * C, dtype=torch.float32)
    dms_partial = torch.empty(N, 1, HW, dtype=torch.float32)
    apply_bwd_reduce_kernel.fn[(N * hw_blocks, 1)](
        g, x, big["mc"], big["ms"], g, dmc_partial, dms_partial, C, HW, C, n_bucket(N), COMBINE=0, CHANNELS_LAST=False,
        WRITE_DX=False, ACC=acc_dtype(torch.float32), BLOCK_C=16, BLOCK_HW=block_hw)
    # da = g·x·s·(1-s) with g = x = v(n, c): dms[n, hw] = Σ_c v²·s(1-s), checked at sampled positions.
    v = big["per_channel"].double()
    n, hw = big["n"], big["hw"]
    s_all = torch.sigmoid(big["mc"].double()[n] + big["ms"].double()[n, hw][:, None])  # (samples, C)
    dms_ref = (v[n] ** 2 * s_all * (1 - s_all)).sum(dim=1)
    torch.testing.assert_close(dms_partial.view(N, HW)[n, hw].double(), dms_ref, atol=1e-5, rtol=1e-4)
    dmc = dmc_partial.view(N, hw_blocks, C).double().sum(dim=1)
    dmc_ref = torch.empty(N, C, dtype=torch.float64)
    for i in range(N):  # one image at a time: the whole (N, C, HW) map in float64 would not fit
        s_i = torch.sigmoid(big["mc"].double()[i, :, None] + big["ms"].double()[i, None, :])
        dmc_ref[i] = (v[i, :, None] ** 2 * s_i * (1 - s_i)).sum(dim=1)
    torch.testing.assert_close(dmc, dmc_ref, atol=1e-3, rtol=1e-4)

    dpool = torch.randn(N, C, generator=torch.Generator().manual_seed(1))
    dx = torch.empty_like(x)
    apply_bwd_dx_kernel.fn[(triton.cdiv(x.numel(), BLOCK),)](
        g, big["mc"], big["ms"], dpool, g, dx, x.numel(), n_bucket(N), INNER=plan.inner, MID=plan.mid, CHANNELS_LAST=False,
        COMBINE=0, INDEX_64=True, HAS_DPOOL=True, HAS_EXTRA=False, BLOCK=BLOCK, ACC=acc_dtype(x.dtype))
    ref = v[n, big["c"]] * (1 + big["s"]) + dpool.double()[n, big["c"]] / HW
    torch.testing.assert_close(dx.view(-1)[big["idx"]].double(), ref, atol=1e-3, rtol=2e-3)
