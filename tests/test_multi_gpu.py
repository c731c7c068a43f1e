"""CUDA placement: the ops and the module on a GPU that is not the current one, and launches on a non-default stream.

Triton launches on the current device and the current stream. An op given tensors on ``cuda:1`` while ``cuda:0`` is
current must still run on ``cuda:1`` (a kernel of ``cuda:0`` reading ``cuda:1``'s memory faults, or reads through
peer access at best) and leave the current device as it was; a launch made while a side stream is current must be
ordered on that stream, after the work that produced its inputs.

The two-GPU checks run in a child process (torch.multiprocessing.spawn): an illegal memory access is a sticky CUDA
error that would fail every later test of the session. References are float64 on the torch path, on the same GPU."""
import copy

import pytest
import torch

from bam_triton._dtypes import assert_close as check_close
import torch.multiprocessing as mp
from torch import nn

from bam_triton import BAM, bam_apply, channel_pool
from devices import ON_CUDA, TEST_DEVICE, cuda_only
from reference import ref_apply, ref_grads

GPUS = torch.cuda.device_count() if ON_CUDA else 0
pytestmark = cuda_only("checks CUDA devices and streams")
two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs (cuda:1 while cuda:0 is current), found {GPUS}")

COMBINES = ("sum", "product")
SHAPE = (4, 32, 7, 9)  # 4 samples: train-mode BatchNorm1d in fp32 is ill-conditioned over 2 (test_ops_and_module)


def assert_close(got, ref, dtype=torch.float32, what="tensor", scale_atol=False):
    """``|got - ref| <= atol + rtol·|ref|`` with the package's table; ``scale_atol`` for sums of many terms (map and
    parameter gradients), whose rounding scales with the terms: atol·(1 + max|ref|), as in tests/test_hardening.py."""
    assert ref.dtype == torch.float64 and got.device == ref.device, (what, got.device, ref.device)
    check_close(got, ref, dtype, what=what, scale_atol=scale_atol)


def make_inputs(device, memory_format=torch.contiguous_format, seed=0):
    """x, mc, ms, g drawn on CPU (the same values on every device), moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = SHAPE
    x = torch.randn(SHAPE, generator=gen).to(device).contiguous(memory_format=memory_format)
    mc, ms = torch.randn(n, c, generator=gen).to(device), torch.randn(n, h, w, generator=gen).to(device)
    g = torch.randn(SHAPE, generator=gen).to(device).contiguous(memory_format=memory_format)
    return x, mc, ms, g


def make_bam(combine, seed=0):
    """A BAM with random parameters and BatchNorm statistics (eval mode is then no identity)."""
    torch.manual_seed(seed)
    bam = BAM(SHAPE[1], reduction=4, combine=combine, backend="triton")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in bam.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5 if p.dim() > 1 else 5))
        for m in bam.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return bam


# ----------------------------------------------------------------------------------------------------------------------
# What the checks compute, on any CUDA device: each returns its comparisons (what, result, float64 reference,
# scale_atol) for verify() to assert once the results may be read (the stream test first synchronises its stream).
# ----------------------------------------------------------------------------------------------------------------------


def verify(comparisons):
    for what, got, ref, scale_atol in comparisons:
        assert_close(got, ref, what=what, scale_atol=scale_atol)


def check_channel_pool(device):
    comparisons = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x, *_ = make_inputs(device, memory_format)
        pooled = channel_pool(x, backend="triton")
        assert pooled.device == x.device
        comparisons.append((f"pooled ({memory_format})", pooled, channel_pool(x.double(), backend="torch"), False))
    return comparisons


def check_bam_apply(device):
    comparisons = []
    for combine in COMBINES:
        for memory_format in (torch.contiguous_format, torch.channels_last):
            what = f"{combine}, {memory_format}"
            x, mc, ms, g = make_inputs(device, memory_format)
            leaves = [t.clone().requires_grad_() for t in (x, mc, ms)]
            out = bam_apply(*leaves, combine=combine, backend="triton")
            assert out.device == x.device and out.is_contiguous(memory_format=memory_format)
            comparisons.append((f"out ({what})", out.detach(), ref_apply(x, mc, ms, combine), False))
            grads = torch.autograd.grad(out, leaves, g)
            for name, got, ref in zip(("dx", "dmc", "dms"), grads, ref_grads(x, mc, ms, g, combine)):
                assert got.device == x.device
                comparisons.append((f"{name} ({what})", got, ref, name != "dx"))
    return comparisons


def check_bam_module(device):
    """Forward and backward of the module (the fused block backward in training) against its float64 torch path:
    output and dx in train and eval mode, every parameter gradient in eval mode (in train mode the bias before each
    BatchNorm has a true gradient of 0, rounding noise in fp32: see test_ops_and_module), and the running
    statistics."""
    comparisons = []
    for combine in COMBINES:
        bam = make_bam(combine).to(device)
        ref_bam = copy.deepcopy(bam).double()
        ref_bam.backend = "torch"
        x, _, _, g = make_inputs(device, torch.channels_last, seed=1)
        for train in (True, False):
            results = []
            for module, inputs in ((bam, x), (ref_bam, x.double())):
                module.train(train)
                module.zero_grad(set_to_none=True)
                leaf = inputs.clone().requires_grad_()
                out = module(leaf)
                out.backward(g.to(out.dtype))
                results.append((out.detach(), leaf.grad, {n: p.grad for n, p in module.named_parameters()}))
            (out, dx, grads), (ref_out, ref_dx, ref_param_grads) = results
            what = f"{combine} {'train' if train else 'eval'}"
            assert out.device == x.device and dx.device == x.device
            comparisons += [(f"{what} out", out, ref_out, False), (f"{what} dx", dx, ref_dx, True)]
            if not train:
                comparisons += [(f"{what} grad {name}", grads[name], ref, True)
                                for name, ref in ref_param_grads.items()]
            comparisons += [(f"{what} buffer {name}", b.double(), ref.double(), False)
                            for (name, b), ref in zip(bam.named_buffers(), ref_bam.buffers())]
    return comparisons


CHECKS = {"channel_pool": check_channel_pool, "bam_apply": check_bam_apply, "BAM": check_bam_module}


def _on_second_gpu(index, what):
    """Child process: cuda:0 current, tensors on cuda:1; the current device must be cuda:0 again afterwards."""
    # The parent's conftest set these for its own process only: IEEE fp32 for the module's convs and linears.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.cuda.set_device(0)
    comparisons = CHECKS[what](torch.device("cuda", 1))
    torch.cuda.synchronize(1)  # a fault from a kernel still in flight surfaces here, not after the check
    assert torch.cuda.current_device() == 0, f"{what} left cuda:{torch.cuda.current_device()} current"
    verify(comparisons)


@two_gpus
@pytest.mark.parametrize("what", list(CHECKS))
def test_on_a_gpu_that_is_not_the_current_one(what):
    mp.spawn(_on_second_gpu, args=(what,), nprocs=1, join=True)


# ----------------------------------------------------------------------------------------------------------------------
# One GPU: streams
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", list(CHECKS))
def test_on_a_non_default_stream(what):
    """Inputs made and ops run (forward and backward) with a side stream current; the results are checked after
    ``s.synchronize()``, on the default stream."""
    device = TEST_DEVICE
    check = CHECKS[what]
    verify(check(device))  # warm-up on the default stream: the autotuners' timing runs synchronise the device
    torch.cuda.synchronize(device)
    s = torch.cuda.Stream(device)
    with torch.cuda.stream(s):
        comparisons = check(device)
    s.synchronize()
    assert torch.cuda.current_stream(device) == torch.cuda.default_stream(device)
    verify(comparisons)


def _delayed_copy(s, src, device):
    """On stream ``s``: a long busy wait, then ``src`` into a fresh buffer that holds zeros until then."""
    dst = torch.zeros_like(src)
    torch.cuda.synchronize(device)  # the zeros are in place before s starts
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # ~0.1 s at GPU clocks: a launch on another stream would run meanwhile
        dst.copy_(src)
    return dst


@pytest.mark.parametrize("combine", COMBINES)
def test_launches_follow_the_current_stream(combine):
    """x is written on a side stream after a long wait; the ops launched while that stream is current must read the
    new x (a launch on the default stream would run during the wait and read zeros) and write their outputs before
    the stream's next op reads them."""
    device = TEST_DEVICE
    x, mc, ms, g = make_inputs(device, torch.channels_last, seed=2)
    bam = make_bam(combine).to(device).eval()
    for _ in range(2):  # warm-up: the autotuners time their configs on the first calls, synchronising the device
        leaves = [t.clone().requires_grad_() for t in (x, mc, ms)]
        torch.autograd.grad(bam_apply(*leaves, combine=combine, backend="triton"), leaves, g)
        channel_pool(x, backend="triton")
        bam(x)
    torch.cuda.synchronize(device)
    s = torch.cuda.Stream(device)
    x_late = _delayed_copy(s, x, device)
    with torch.cuda.stream(s):
        pooled = channel_pool(x_late, backend="triton").clone()
        leaves = [x_late.requires_grad_(), mc.clone().requires_grad_(), ms.clone().requires_grad_()]
        out = bam_apply(*leaves, combine=combine, backend="triton")
        grads = [t.clone() for t in torch.autograd.grad(out, leaves, g)]
        out = out.detach().clone()
        with torch.no_grad():
            module_out = bam(x_late.detach()).clone()
    s.synchronize()
    assert_close(pooled, x.double().mean(dim=(2, 3)), what="pooled")
    assert_close(out, ref_apply(x, mc, ms, combine), what="out")
    for name, got, ref in zip(("dx", "dmc", "dms"), grads, ref_grads(x, mc, ms, g, combine)):
        assert_close(got, ref, what=name, scale_atol=name != "dx")
    with torch.no_grad():
        ref_bam = copy.deepcopy(bam).double()
        ref_bam.backend = "torch"
        assert_close(module_out, ref_bam(x.double()), what="BAM out")
