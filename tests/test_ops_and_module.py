"""The op layer and the BAM module: the torch and Triton backends agree with a float64 reference in
forward and backward; backend selection (``auto``, ``$BAM_TRITON_BACKEND``, no interpreter, no triton at all);
argument validation naming the bad argument; empty inputs; parameter counts; ``extra_repr``; ``reset_parameters``.

The op and module tests run on the ``device`` of this run (tests/devices.py): Triton's interpreter on CPU, compiled
kernels on CUDA. The tests of CPU-only paths and of backend selection for CPU tensors build CPU tensors in either
run."""
import copy
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from bam_triton._dtypes import assert_close as check_close
from torch import nn

import bam_triton
from bam_triton import BAM, bam_apply, channel_pool
from bam_triton import kernels
from devices import cpu_only
from reference import ref_apply, ref_grads

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV_VAR = "BAM_TRITON_BACKEND"
COMBINES = ["sum", "product"]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
LAYOUT_IDS = ["nchw", "channels_last"]
C, SHAPE = 32, (2, 32, 7, 9)  # H != W; hidden width 32 // 4 = 8
# fp32 gradients in train mode: BatchNorm1d over 2 samples is ill-conditioned (it maps them to ±1 and amplifies
# rounding by 1/|a - b|), so fp32 vs float64 is only meaningful from 4 samples up.
TRAIN_GRAD_SHAPE = (4, 32, 7, 9)
# Every launcher the ops can reach; the backward ones may not exist yet (raising=False when patched).
LAUNCHERS = ("channel_pool_fwd", "apply_fwd", "apply_bwd", "apply_bwd_reduce", "apply_bwd_dx")


def _gen(*parts):
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def assert_close(got, ref, dtype=torch.float32, what="tensor"):
    """The package's check (``bam_triton._dtypes.assert_close``) against a float64 reference."""
    assert ref.dtype == torch.float64
    check_close(got, ref, dtype, what=what)


def make_bam(combine="sum", channels=C, reduction=4, seed=0):
    """A BAM with every parameter and BatchNorm buffer randomised (so eval mode is not an identity BN)."""
    torch.manual_seed(seed)
    bam = BAM(channels, reduction=reduction, combine=combine)
    gen = _gen("bam", combine, channels, seed)
    with torch.no_grad():
        for name, p in bam.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if p.dim() > 1:  # conv / linear weights: unit gain (activations stay O(1) through the branches)
                p.copy_(r / p[0].numel() ** 0.5)
            elif "_bn_" in name and name.endswith(".weight"):  # BatchNorm scales near 1
                p.copy_(1 + 0.2 * r)
            else:
                p.copy_(0.2 * r)
        for m in bam.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return bam


def with_backend(bam, backend, dtype=None):
    m = copy.deepcopy(bam)
    m.backend = backend
    return m.to(dtype) if dtype is not None else m


def make_x(shape=SHAPE, dtype=torch.float32, memory_format=torch.contiguous_format, seed="x", device="cpu"):
    """Drawn and rounded on CPU (the same values on every device), then moved."""
    x = torch.randn(shape, generator=_gen(seed, shape)).to(dtype).to(device)
    return x.contiguous(memory_format=memory_format)


def run_bam(bam, x, train, grad_out=None, x_grad=True):
    """Forward (and backward with ``grad_out``); returns output, x.grad, grads, {buffer: value}. ``grads`` holds
    every parameter's gradient and, as ``"dmc"``/``"dms"``, the gradients reaching the two branches' outputs (what
    the apply step's backward computes)."""
    bam.train(train)
    bam.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x_grad)
    grads = {}

    def catch(key):
        def forward_hook(module, inputs, output):
            output.register_hook(lambda grad: grads.__setitem__(key, grad))
        return forward_hook

    hooks = [bam.channel_att.register_forward_hook(catch("dmc")),
             bam.spatial_att.register_forward_hook(catch("dms"))]
    try:
        out = bam(x)
        if grad_out is not None:
            (out * grad_out.to(out.dtype)).sum().backward()
            grads.update((name, p.grad) for name, p in bam.named_parameters())
    finally:
        for hook in hooks:
            hook.remove()
    return out, x.grad, grads, {name: b.clone() for name, b in bam.named_buffers()}


class KernelLaunched(Exception):
    pass


@pytest.fixture
def kernels_raise(monkeypatch):
    """Every kernel launcher raises KernelLaunched: a test using this proves no kernel ran."""
    for name in LAUNCHERS:
        def launcher(*args, _name=name, **kwargs):
            raise KernelLaunched(_name)

        monkeypatch.setattr(kernels, name, launcher, raising=False)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


# ----------------------------------------------------------------------------------------------------------------------
# Backends agree: BAM forward and backward against a float64 reference
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bam_forward_backends_agree(train, combine, memory_format, device):
    bam = make_bam(combine).to(device)
    x = make_x(memory_format=memory_format, device=device)
    x_before = x.clone()
    ref, _, _, ref_buffers = run_bam(with_backend(bam, "torch").double(), x.double(), train, x_grad=False)
    for backend in ("torch", "triton"):
        for x_grad in (False, True):  # x.requires_grad selects the fused block on the Triton path
            out, _, _, buffers = run_bam(with_backend(bam, backend), x, train, x_grad=x_grad)
            assert out.dtype == torch.float32
            assert out.is_contiguous(memory_format=memory_format)
            assert_close(out, ref, what=f"{backend} output")
            for name, value in buffers.items():  # running statistics updated alike in train mode
                assert_close(value.double(), ref_buffers[name].double(), what=f"{backend} buffer {name}")
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bam_forward_bf16_backends_agree(train, device):
    """bf16 module and input; the reference is the same (bf16-rounded) weights and input in float64."""
    bam = make_bam("product").to(torch.bfloat16).to(device)
    x = make_x(dtype=torch.bfloat16, memory_format=torch.channels_last, device=device)
    ref, *_ = run_bam(with_backend(bam, "torch").double(), x.double(), train, x_grad=False)
    for backend in ("torch", "triton"):
        out, *_ = run_bam(with_backend(bam, backend), x, train, x_grad=False)
        assert out.dtype == torch.bfloat16
        assert_close(out, ref, torch.bfloat16, what=f"{backend} output")


def check_bam_gradients(combine, memory_format, x_grad, train, shape, dtype, device, keys=None):
    """Both backends' gradients (x, and ``keys`` of run_bam's grads: all when None) against float64."""
    bam = make_bam(combine).to(dtype).to(device)
    x = make_x(shape, dtype, memory_format, device=device)
    g = make_x(shape, dtype, seed="grad_out", device=device)
    x_before = x.clone()
    _, ref_dx, ref_grads, _ = run_bam(with_backend(bam, "torch").double(), x.double(), train, g.double(), x_grad)
    n_params = len(list(bam.parameters()))
    assert len(ref_grads) == n_params + 2 and all(v is not None for v in ref_grads.values())
    keys = list(ref_grads) if keys is None else keys
    for backend in ("torch", "triton"):
        _, dx, grads, _ = run_bam(with_backend(bam, backend), x, train, g, x_grad)
        if x_grad:
            assert dx.dtype == dtype and dx.is_contiguous(memory_format=memory_format)
            assert_close(dx, ref_dx, dtype, what=f"{backend} dx")
        else:
            assert dx is None
        for key in keys:
            assert grads.get(key) is not None, f"{backend}: no gradient for {key}"
            assert_close(grads[key], ref_grads[key], dtype, what=f"{backend} grad {key}")
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("x_grad", [True, False], ids=["x-and-params", "params-only"])
@pytest.mark.parametrize("memory_format", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("combine", COMBINES)
def test_bam_gradients_fp32_eval(combine, memory_format, x_grad, device):
    """fp32, eval mode: gradients of x and of every parameter, both backends against float64 (x.requires_grad
    selects the fused block on the Triton path; params-only runs the plain apply backward)."""
    check_bam_gradients(combine, memory_format, x_grad, False, SHAPE, torch.float32, device)


@pytest.mark.parametrize("x_grad", [True, False], ids=["x-and-params", "params-only"])
@pytest.mark.parametrize("memory_format", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("combine", COMBINES)
def test_bam_gradients_fp32_train(combine, memory_format, x_grad, device):
    """fp32, train mode: dx and the gradients of the branch outputs (Mc, Ms). The parameter gradients are held to
    the table in float64 below: in train mode every bias before a BatchNorm has an exactly-zero gradient, whose
    fp32 value is rounding noise of torch's own layers of the order of the fp32 atol, whichever backend runs."""
    check_bam_gradients(combine, memory_format, x_grad, True, TRAIN_GRAD_SHAPE, torch.float32, device,
                        keys=["dmc", "dms"])


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("combine", COMBINES)
def test_bam_gradients_fp64_train(combine, memory_format, device):
    """float64 (the kernels compute in fp64 for it), train mode: x and every parameter, the fp64 tolerance."""
    check_bam_gradients(combine, memory_format, True, True, SHAPE, torch.float64, device)


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=LAYOUT_IDS)
def test_channel_pool_gradient_backends_agree(memory_format, device):
    x = make_x(memory_format=memory_format, device=device)
    g = torch.randn(SHAPE[:2], generator=_gen("pool-g")).to(device)
    x64 = x.double().requires_grad_()
    (channel_pool(x64, backend="torch") * g.double()).sum().backward()
    for backend in ("torch", "triton"):
        xb = x.clone().requires_grad_()
        (channel_pool(xb, backend=backend) * g).sum().backward()
        assert_close(xb.grad, x64.grad, what=f"{backend} pool dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_torch_channel_pool_gradient_is_a_broadcast_view(dtype, device):
    """The torch path's pooling matches float64 and, for fp32/fp64, hands x a broadcast view of its (N, C) gradient
    (strides 0 over H, W), not a full-size tensor (``mean``'s backward would divide the view into one)."""
    x = make_x(dtype=dtype, device=device).requires_grad_()
    g = torch.randn(SHAPE[:2], generator=_gen("pool-view", dtype)).to(device)
    pooled = channel_pool(x, backend="torch")
    assert pooled.dtype == dtype
    assert_close(pooled, x.detach().double().mean(dim=(2, 3)), dtype=dtype, what="pooled")
    (dx,) = torch.autograd.grad(pooled, x, g.to(dtype))
    assert_close(dx, (g.double() / (SHAPE[2] * SHAPE[3]))[:, :, None, None].expand(SHAPE), dtype=dtype, what="dx")
    if dtype != torch.bfloat16:
        assert dx.stride()[2:] == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
def test_torch_channel_pool_forms_without_autograd(monkeypatch, dtype):
    """Without autograd the torch path pools NCHW fp32/fp64 CPU inputs of fewer than _PARALLEL_NUMEL elements with a
    matrix-vector product, channels_last CPU inputs of at least that many with avg_pool2d, the rest with mean
    (ops._torch_channel_pool); every form matches float64 in x's dtype."""
    from bam_triton import ops

    calls = []
    real = ops.F.avg_pool2d
    monkeypatch.setattr(ops.F, "avg_pool2d", lambda *args: calls.append(args[1]) or real(*args))
    for shape, memory_format, pools in [((2, 32, 7, 7), torch.contiguous_format, False),
                                        ((2, 32, 7, 7), torch.channels_last, False),
                                        ((4, 130, 9, 8), torch.contiguous_format, False),
                                        ((4, 130, 9, 8), torch.channels_last, True)]:
        if memory_format == torch.channels_last:
            assert (shape[0] * shape[1] * shape[2] * shape[3] >= ops._PARALLEL_NUMEL) is pools
        x = make_x(shape, dtype=dtype, memory_format=memory_format, seed="pool-forms")
        with torch.no_grad():
            pooled = channel_pool(x, backend="torch")
        assert pooled.shape == shape[:2] and pooled.dtype == dtype
        assert_close(pooled, x.double().mean(dim=(2, 3)), dtype=dtype, what=f"pooled {shape} {memory_format}")
        assert calls == ([(shape[2], shape[3])] if pools else []), calls
        calls.clear()


def test_torch_channel_pool_under_fake_tensors_keeps_no_fake_state():
    """The small-map pooling's cached 1/(H·W) vector: a first call under FakeTensorMode neither fails nor leaves a
    fake vector behind for the real calls after it, and a fake call after real ones does not meet the real vector."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bam_triton import ops

    ops._MEAN_WEIGHTS.clear()
    for _ in range(2):
        with FakeTensorMode():
            assert channel_pool(torch.randn(2, 32, 7, 5), backend="torch").shape == (2, 32)
        x = make_x((2, 32, 7, 5), seed="fake-then-real")
        with torch.no_grad():
            assert_close(channel_pool(x, backend="torch"), x.double().mean(dim=(2, 3)), dtype=torch.float32)
        assert all(type(w) is torch.Tensor for w in ops._MEAN_WEIGHTS.values())


@pytest.mark.parametrize("combine", COMBINES)
def test_bam_apply_gradients_backends_agree(combine, device):
    gen = _gen("apply-grad", combine)
    x = make_x(memory_format=torch.channels_last, device=device)
    mc, ms = torch.randn(2, C, generator=gen).to(device), torch.randn(2, 1, 7, 9, generator=gen).to(device)
    g = make_x(seed="g", device=device)
    leaves64 = [t.double().requires_grad_() for t in (x, mc, ms)]
    (bam_apply(*leaves64, combine=combine, backend="torch") * g.double()).sum().backward()
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, mc, ms)]
        (bam_apply(*leaves, combine=combine, backend=backend) * g).sum().backward()
        for name, leaf, ref in zip(("dx", "dmc", "dms"), leaves, leaves64):
            assert leaf.grad.dtype == torch.float32
            assert_close(leaf.grad, ref.grad, what=f"{backend} {name}")


@pytest.mark.parametrize("threads, fits, expected", [(2, 5, [4, 4, 3]), (2, 3, [2, 2, 2, 2, 2, 1]), (4, 5, [4, 4, 3]),
                                                     (8, 5, [5, 5, 1]), (2, 1, [1] * 11), (2, 11, [11])])
def test_image_chunks_hold_whole_rounds_of_the_threads(monkeypatch, threads, fits, expected):
    """_cpu.image_chunks: as many images as fit APPLY_CHUNK_ELEMENTS, rounded down to a multiple of the thread count
    where at least that many fit (odd chunks left one of two threads idle in the ops that split images), the last
    chunk what remains; one slice where everything fits."""
    from bam_triton import _cpu

    x = torch.empty(11, 3, 4, 5)
    monkeypatch.setattr(_cpu, "APPLY_CHUNK_ELEMENTS", fits * 3 * 4 * 5)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    chunks = _cpu.image_chunks(x)
    assert [c.stop - c.start for c in chunks] == expected
    assert chunks[0].start == 0 and chunks[-1].stop == 11 and all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))


@pytest.mark.parametrize("memory_format", LAYOUTS + ["sliced"], ids=LAYOUT_IDS + ["sliced"])
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.bfloat16, torch.float32), (torch.float64,) * 2],
                         ids=["fp32", "bf16-fp32-maps", "fp64"])
@pytest.mark.parametrize("chunk", [2, 1], ids=["two-images", "under-one-image"])
@pytest.mark.parametrize("combine", COMBINES)
def test_torch_apply_on_cpu_runs_in_image_chunks(monkeypatch, combine, chunk, dtypes, memory_format):
    """The CPU forward goes a few images at a time (its temporary stays in cache): 5 images in chunks of 2, 2, 1, or
    one at a time when an image is larger than the chunk. The output matches float64 in x's dtype and memory format,
    x is untouched, and the gradients (the autograd path runs the same forward) match too."""
    from bam_triton import _cpu, ops

    n, c, h, w = 5, 6, 4, 3
    monkeypatch.setattr(_cpu, "APPLY_CHUNK_ELEMENTS", chunk * c * h * w if chunk > 1 else c * h * w - 1)
    chunks = []
    logits = ops._torch_logits

    def counting_logits(x, *args, **kwargs):
        chunks.append(x.shape[0])
        return logits(x, *args, **kwargs)

    monkeypatch.setattr(ops, "_torch_logits", counting_logits)
    x_dtype, map_dtype = dtypes
    gen = _gen("chunks", combine, chunk, x_dtype)
    if memory_format == "sliced":  # neither NCHW- nor channels_last-dense: the chunks are strided views
        x = torch.randn(n, 2 * c, h, w, generator=gen).to(x_dtype)[:, ::2]
    else:
        x = torch.randn(n, c, h, w, generator=gen).to(x_dtype).contiguous(memory_format=memory_format)
    mc, ms = torch.randn(n, c, generator=gen).to(map_dtype), torch.randn(n, h, w, generator=gen).to(map_dtype)
    before = x.clone()
    out = bam_apply(x, mc, ms, combine=combine, backend="torch")
    assert chunks == ([2, 2, 1] if chunk == 2 else [1] * n)
    assert torch.equal(x, before)
    assert out.dtype == x_dtype and out.is_contiguous(
        memory_format=torch.channels_last if memory_format == torch.channels_last else torch.contiguous_format)
    assert_close(out, ref_apply(x, mc, ms, combine), dtype=x_dtype, what="output")
    g = torch.randn(x.shape, generator=gen)
    leaves = [t.detach().requires_grad_() for t in (x, mc, ms)]
    bam_apply(*leaves, combine=combine, backend="torch").backward(g.to(x_dtype))
    for name, leaf, ref in zip(("dx", "dmc", "dms"), leaves, ref_grads(x, mc, ms, g, combine)):
        assert_close(leaf.grad, ref, dtype=x_dtype, what=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("combine", COMBINES)
def test_bam_non_square_maps_pool_over_h_and_w(backend, combine, device):
    """H != W: the output is x·(1 + σ(Mc(mean over H and W) ⊕ Ms(x))), composed here from the module's branches."""
    bam = make_bam(combine).eval().to(device)
    bam.backend = backend
    x = make_x((2, C, 5, 11), device=device)
    with torch.no_grad():
        ref64 = copy.deepcopy(bam).double()
        x64 = x.double()
        mc = ref64.channel_att(x64.mean(dim=(2, 3))).reshape(2, C, 1, 1)
        ms = ref64.spatial_att(x64)
        ref = x64 * (1 + torch.sigmoid(mc + ms if combine == "sum" else mc * ms))
        out = bam(x)
    assert out.shape == x.shape
    assert_close(out, ref)


# ----------------------------------------------------------------------------------------------------------------------
# Module surface: parameter counts, extra_repr, reset_parameters
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,count", [(64, 1_173), (256, 17_361), (512, 68_513), (1024, 272_193)])
def test_parameter_count_matches_the_authors(channels, count):
    assert sum(p.numel() for p in BAM(channels).parameters()) == count


def test_extra_repr():
    bam = BAM(64, reduction=8, dilation=2, num_dilated_convs=3, combine="product", backend="torch")
    text = bam.extra_repr()
    for part in ("channels=64", "reduction=8", "dilation=2", "num_dilated_convs=3", "combine='product'",
                 "backend='torch'"):
        assert part in text, f"{part!r} missing from {text!r}"
    assert text in repr(bam)
    assert "backend=None" in BAM(64).extra_repr() and "combine='sum'" in BAM(64).extra_repr()
    # The arguments shape the module the repr describes.
    convs = [m for n, m in bam.spatial_att.gate_s.named_children() if n.startswith("gate_s_conv_di_")]
    assert len(convs) == 3 and all(m.dilation == (2, 2) and m.padding == (2, 2) for m in convs)
    assert bam.channel_att.gate_c.gate_c_fc_0.out_features == 64 // 8


def test_help_of_the_constructor_documents_its_arguments():
    import pydoc

    text = pydoc.render_doc(BAM.__init__, renderer=pydoc.plaintext)
    assert "Initialize internal Module state" not in text  # nn.Module's, which help() showed before
    for argument in ("channels", "reduction", "dilation", "num_dilated_convs", "combine", "backend", "single_read"):
        assert f"    {argument}: " in text or f"    {argument}, " in text, argument


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_spatial_branch_on_cpu_feeds_its_dilated_convs_channels_last(train, memory_format):
    """On CPU the spatial branch gives its dilated convs channels_last input (oneDNN runs them several times faster
    so) and runs its 1x1 reduction as a batched matrix product; output, gradients and running statistics match the
    plain sequence of ``nn.Conv2d``/BatchNorm/ReLU layers run in float64."""
    branch = make_bam(channels=64, reduction=8).spatial_att
    plain = copy.deepcopy(branch.gate_s).double()
    reduce = plain.gate_s_conv_reduce0
    plain.gate_s_conv_reduce0 = nn.Conv2d(reduce.in_channels, reduce.out_channels, 1).double()
    plain.gate_s_conv_reduce0.load_state_dict(reduce.state_dict())
    dilated = [m for m in branch.gate_s if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    seen = []
    hooks = [m.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))) for m in dilated]
    branch.train(train)
    plain.train(train)
    x = make_x((4, 64, 9, 11), memory_format=memory_format)
    x_fast, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
    try:
        out = branch(x_fast)
    finally:
        for hook in hooks:
            hook.remove()
    ref = plain(x_ref)
    assert len(dilated) == 2 and seen == [True, True]
    assert_close(out, ref, what="spatial logits")
    g = torch.randn(out.shape, generator=_gen("g", train))
    out.backward(g)
    ref.backward(g.double())
    assert_close(x_fast.grad, x_ref.grad, what="dx")
    # Absolute tolerance on the scale of all parameter gradients: in train mode a conv bias followed by BatchNorm has
    # a gradient of exactly 0, which fp32 only reaches up to rounding of the other gradients' size.
    scale = max(q.grad.abs().max().item() for q in plain.parameters())
    for (name, p), q in zip(branch.gate_s.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6 * scale, msg=f"grad of {name}")
    for (name, b), c in zip(branch.gate_s.named_buffers(), plain.buffers()):
        assert_close(b.double(), c.double(), what=f"buffer {name}")


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_pointwise_conv_matches_conv2d(dtype, memory_format):
    """The spatial branch's 1x1 reduction (a batched matrix product on CPU NCHW input) against ``F.conv2d`` in
    float64: output, input gradient and parameter gradients, in either memory format."""
    from bam_triton.module import PointwiseConv2d

    torch.manual_seed(0)
    conv = PointwiseConv2d(48, 6).to(dtype)
    x = make_x((3, 48, 5, 7), dtype=dtype, memory_format=memory_format).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (conv.weight, conv.bias))
    out, ref = conv(x), torch.nn.functional.conv2d(x64, w64, b64)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype=dtype, what="output")
    g = torch.randn(ref.shape, generator=_gen("pointwise", dtype))
    out.backward(g.to(dtype))
    ref.backward(g)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for got, want, what in ((x.grad, x64.grad, "dx"), (conv.weight.grad, w64.grad, "dweight"),
                            (conv.bias.grad, b64.grad, "dbias")):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item(), msg=what)


def test_reset_parameters_restores_the_defaults():
    torch.manual_seed(123)
    fresh = BAM(64)
    bam = make_bam(channels=64, reduction=16)
    bam.train()
    bam(make_x((4, 64, 6, 6)))  # bumps num_batches_tracked and the running statistics
    torch.manual_seed(123)
    bam.reset_parameters()
    fresh_state = fresh.state_dict()
    for name, value in bam.state_dict().items():
        assert torch.equal(value, fresh_state[name]), f"{name} not reset to the default initialisation"
    for m in bam.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert int(m.num_batches_tracked) == 0
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    # A different seed gives different (random) weights: the reset re-draws them.
    torch.manual_seed(7)
    bam.reset_parameters()
    assert not torch.equal(bam.spatial_att.gate_s.gate_s_conv_reduce0.weight,
                           fresh.spatial_att.gate_s.gate_s_conv_reduce0.weight)


# ----------------------------------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------------------------------


def _run_everything(backend):
    """channel_pool, bam_apply and a BAM forward/backward in train and eval mode with ``backend``."""
    x = make_x((2, 16, 5, 6)).requires_grad_()
    mc, ms = torch.randn(2, 16), torch.randn(2, 5, 6)
    channel_pool(x, backend=backend).sum().backward()
    bam_apply(x, mc, ms, combine="product", backend=backend).sum().backward()
    bam = BAM(16, reduction=4, backend=backend)
    bam(x).sum().backward()
    bam.eval()(x[:1])


@pytest.mark.parametrize("backend", ["auto", "torch", None])
def test_auto_and_torch_never_launch_kernels_on_cpu(kernels_raise, backend):
    _run_everything(backend)


@pytest.mark.parametrize("what", ["channel_pool", "bam_apply", "BAM"])
def test_triton_backend_launches_kernels(kernels_raise, what, device):
    """The positive control of the test above: with backend='triton' the (patched) launchers are reached."""
    x = make_x((2, 16, 5, 6), device=device)
    mc, ms = torch.randn(2, 16, device=device), torch.randn(2, 5, 6, device=device)
    with pytest.raises(KernelLaunched):
        if what == "channel_pool":
            channel_pool(x, backend="triton")
        elif what == "bam_apply":
            bam_apply(x, mc, ms, backend="triton")
        else:
            BAM(16, reduction=4, backend="triton").to(device)(x)


@cpu_only("interpreter-only: backend='triton' resolves for a CPU tensor only under Triton's interpreter")
def test_auto_resolves_to_torch_on_cpu_and_triton_on_cuda():
    from bam_triton import _backend

    assert _backend.resolve("auto", torch.device("cpu")) == "torch"
    assert _backend.resolve(None, torch.device("cpu")) == "torch"
    assert _backend.resolve("torch", torch.device("cuda")) == "torch"
    assert _backend.resolve("auto", torch.device("cuda")) == "triton"  # triton is installed here
    assert _backend.resolve("triton", torch.device("cpu")) == "triton"  # under the interpreter


@cpu_only("interpreter-only: selects backend='triton' for CPU tensors, and on CUDA 'auto' would launch kernels too")
def test_env_var_sets_the_default_backend(monkeypatch, kernels_raise):
    x, mc, ms = make_x((2, 16, 5, 6)), torch.randn(2, 16), torch.randn(2, 5, 6)
    bam = BAM(16, reduction=4)  # backend=None: follows the variable at each call
    monkeypatch.setenv(ENV_VAR, "triton")
    assert bam_triton.default_backend() == "triton"
    for call in (lambda: channel_pool(x), lambda: bam_apply(x, mc, ms), lambda: bam(x)):
        with pytest.raises(KernelLaunched):
            call()
    channel_pool(x, backend="torch")  # an explicit argument wins over the variable
    BAM(16, reduction=4, backend="auto")(x)
    monkeypatch.setenv(ENV_VAR, "torch")
    assert bam_triton.default_backend() == "torch"
    channel_pool(x)
    bam_apply(x, mc, ms)
    bam(x)
    with pytest.raises(KernelLaunched):
        channel_pool(x, backend="triton")
    monkeypatch.setenv(ENV_VAR, "auto")
    bam(x)


@pytest.mark.parametrize("value", ["cuda", "tritonn", "1"])
def test_env_var_invalid_value_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(ENV_VAR, value)
    x = make_x((2, 16, 5, 6))
    with pytest.raises(ValueError, match=ENV_VAR):
        bam_triton.default_backend()
    with pytest.raises(ValueError, match=ENV_VAR):
        channel_pool(x)
    with pytest.raises(ValueError, match=ENV_VAR):
        bam_apply(x, torch.zeros(2, 16), torch.zeros(2, 5, 6))
    with pytest.raises(ValueError, match=ENV_VAR):
        BAM(16, reduction=4)(x)


def _python(code, env):
    """Run ``code`` in a fresh interpreter; return the JSON it prints on its last line."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


_PROBE = """
def probe(call):
    try:
        call()
    except Exception as e:
        return [type(e).__name__, str(e)]
    return ["ok", ""]

x = torch.randn(2, 8, 5, 6, requires_grad=True)
mc, ms = torch.randn(2, 8), torch.randn(2, 5, 6)

def auto_path():
    bam = bam_triton.BAM(8, reduction=4)
    bam(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    bam.eval()(x[:1])
    bam_triton.channel_pool(x, backend="auto"), bam_triton.bam_apply(x, mc, ms, backend="torch")
    cbam = bam_triton.CBAM(8, reduction=4)
    cbam(x).sum().backward()
    cbam.eval()(x[:1])

results = {
    "auto": probe(auto_path),
    "channel_pool": probe(lambda: bam_triton.channel_pool(x, backend="triton")),
    "bam_apply": probe(lambda: bam_triton.bam_apply(x, mc, ms, backend="triton")),
    "BAM": probe(lambda: bam_triton.BAM(8, reduction=4, backend="triton")(x)),
    "CBAM": probe(lambda: bam_triton.CBAM(8, reduction=4, backend="triton")(x)),
    "cbam_apply": probe(lambda: bam_triton.cbam_apply(x, mc, backend="triton")),
}
"""


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV_VAR)}
    env.update(extra)
    return env


def test_triton_backend_without_interpreter_raises_clearly():
    code = "import json, torch, bam_triton\n" + _PROBE + "print(json.dumps(results))"
    results = _python(code, _clean_env())
    assert results.pop("auto") == ["ok", ""]
    for what, (kind, message) in results.items():
        assert kind == "RuntimeError", f"{what}: {kind}: {message}"
        assert "TRITON_INTERPRET" in message, f"{what}: {message}"


def test_triton_from_the_environment_names_the_variable():
    """$BAM_TRITON_BACKEND=triton on CPU without the interpreter: the errors say the choice came from the variable
    (no backend= was passed) and how to undo it."""
    code = """
    import json, torch, bam_triton
    x = torch.randn(2, 8, 5, 6)
    messages = []
    for call in (lambda: bam_triton.BAM(8, reduction=4)(x), lambda: bam_triton.channel_pool(x)):
        try:
            call()
            messages.append("no error")
        except RuntimeError as e:
            messages.append(str(e))
    print(json.dumps(messages))
    """
    for message in _python(code, _clean_env(**{ENV_VAR: "triton"})):
        assert f"{ENV_VAR}=triton (no backend= given)" in message and f"unset {ENV_VAR}" in message, message
        assert "backend='triton'" not in message, message


_BLOCK_TRITON = """
import importlib.abc, importlib.machinery, sys
import torch
assert "triton" not in sys.modules

class BrokenLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        if MODE == "driverless":  # what Triton 3.2 raises when a kernel is defined on a machine without a GPU driver
            raise RuntimeError("0 active drivers ([]). There should only be one.")
        raise ImportError("libtriton.so: cannot open shared object file")

class BlockTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "triton" and not name.startswith("triton."):
            return None
        if MODE == "missing":
            raise ImportError(f"import of {name} blocked by the test")
        return importlib.machinery.ModuleSpec(name, BrokenLoader())

sys.meta_path.insert(0, BlockTriton())
import bam_triton
"""


@pytest.mark.parametrize("mode", ["missing", "broken", "driverless"])
def test_works_when_triton_cannot_be_imported(mode):
    """``missing``: the import system refuses triton; ``broken``: triton is found but its import fails with an
    ImportError; ``driverless``: with a RuntimeError (Triton 3.2 without a GPU driver). Either way ``import bam_triton``
    and the torch path work, and backend='triton' raises a RuntimeError saying what to use."""
    code = (f"MODE = {mode!r}\n" + _BLOCK_TRITON + "import json\n" + _PROBE
            + "results['triton_imported'] = 'triton' in sys.modules\nprint(json.dumps(results))")
    results = _python(code, _clean_env(TRITON_INTERPRET="1"))
    assert results.pop("triton_imported") is False
    assert results.pop("auto") == ["ok", ""]
    for what, (kind, message) in results.items():
        assert kind == "RuntimeError", f"{what}: {kind}: {message}"
        assert "triton" in message.lower() and "backend='torch'" in message, f"{what}: {message}"
        assert ("needs a GPU driver" in message) == (mode == "driverless"), f"{what}: {message}"


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: each error names the argument
# ----------------------------------------------------------------------------------------------------------------------

_X = make_x((2, 8, 5, 6))
_MC, _MS = torch.zeros(2, 8), torch.zeros(2, 5, 6)
_INT = torch.zeros(2, 8, 5, 6, dtype=torch.int64)

BAD_INPUTS = {
    # wrong ndim
    "pool-x-3d": (lambda: channel_pool(_X[0]), ValueError, r"\bx must be 4-D"),
    "apply-x-5d": (lambda: bam_apply(_X[None], _MC, _MS), ValueError, r"\bx must be 4-D"),
    "module-x-3d": (lambda: BAM(8, reduction=4)(_X[0]), ValueError, r"\bx must be 4-D"),
    # channel count
    "module-channels": (lambda: BAM(16, reduction=4)(_X), ValueError, r"\bx must have 16 channels"),
    # map shapes
    "apply-mc-channels": (lambda: bam_apply(_X, torch.zeros(2, 9), _MS), ValueError, r"\bmc must have shape"),
    "apply-mc-batch": (lambda: bam_apply(_X, torch.zeros(3, 8), _MS), ValueError, r"\bmc must have shape"),
    "apply-mc-3d": (lambda: bam_apply(_X, torch.zeros(2, 8, 1), _MS), ValueError, r"\bmc must have shape"),
    "apply-ms-hw-swapped": (lambda: bam_apply(_X, _MC, torch.zeros(2, 6, 5)), ValueError, r"\bms must have shape"),
    "apply-ms-channels": (lambda: bam_apply(_X, _MC, torch.zeros(2, 2, 5, 6)), ValueError, r"\bms must have shape"),
    # mixed devices
    "apply-mc-meta": (lambda: bam_apply(_X, _MC.to("meta"), _MS), ValueError, r"\bmc is on meta"),
    "apply-ms-meta": (lambda: bam_apply(_X, _MC, _MS.to("meta")), ValueError, r"\bms is on meta"),
    "apply-x-meta": (lambda: bam_apply(_X.to("meta"), _MC, _MS), ValueError, r"\bmc is on cpu but x is on meta"),
    # dtypes
    "pool-x-int": (lambda: channel_pool(_INT), TypeError, r"\bx must have a floating dtype"),
    "pool-x-bool": (lambda: channel_pool(_INT.bool()), TypeError, r"\bx must have a floating dtype"),
    "apply-x-int": (lambda: bam_apply(_INT.int(), _MC, _MS), TypeError, r"\bx must have a floating dtype"),
    "apply-mc-int": (lambda: bam_apply(_X, _MC.long(), _MS), TypeError, r"\bmc must have a floating dtype"),
    "apply-ms-bool": (lambda: bam_apply(_X, _MC, _MS.bool()), TypeError, r"\bms must have a floating dtype"),
    "module-x-int": (lambda: BAM(8, reduction=4)(_INT), TypeError, r"\bx must have a floating dtype"),
    # non-tensors
    "pool-x-list": (lambda: channel_pool(_X.tolist()), TypeError, r"\bx must be a torch.Tensor"),
    "apply-mc-float": (lambda: bam_apply(_X, 0.5, _MS), TypeError, r"\bmc must be a torch.Tensor"),
    "apply-ms-none": (lambda: bam_apply(_X, _MC, None), TypeError, r"\bms must be a torch.Tensor"),
    "module-x-numpy": (lambda: BAM(8, reduction=4)(_X.numpy()), TypeError, r"\bx must be a torch.Tensor"),
    # combine / backend names
    "module-combine": (lambda: BAM(8, reduction=4, combine="mul"), ValueError, r"\bcombine must be one of"),
    "module-combine-case": (lambda: BAM(8, reduction=4, combine="Sum"), ValueError, r"\bcombine must be one of"),
    "apply-combine": (lambda: bam_apply(_X, _MC, _MS, combine="add"), ValueError, r"\bcombine must be one of"),
    "module-backend": (lambda: BAM(8, reduction=4, backend="cuda"), ValueError, r"\bbackend must be one of"),
    "pool-backend": (lambda: channel_pool(_X, backend="gpu"), ValueError, r"\bbackend must be one of"),
    "apply-backend": (lambda: bam_apply(_X, _MC, _MS, backend="Triton"), ValueError, r"\bbackend must be one of"),
    # constructor numbers
    "module-reduction": (lambda: BAM(8, reduction=16), ValueError, r"\breduction\b"),
    "module-channels-float": (lambda: BAM(8.0), TypeError, r"\bchannels must be an int"),
    "module-channels-zero": (lambda: BAM(0), ValueError, r"\bchannels must be >= 1"),
    "module-dilation": (lambda: BAM(8, reduction=4, dilation=0), ValueError, r"\bdilation must be >= 1"),
    # batch of one in training
    "module-batch-1-train": (lambda: BAM(8, reduction=4).train()(_X[:1]), ValueError, r"eval"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_argument(case):
    call, exc, pattern = BAD_INPUTS[case]
    before = _X.clone()
    with pytest.raises(exc, match=pattern):
        call()
    assert torch.equal(_X, before)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batch_of_one_works_in_eval(backend, device):
    bam = make_bam().eval().to(device)
    bam.backend = backend
    x = make_x((1, C, 6, 5), device=device)
    ref = with_backend(bam, "torch").double()(x.double())
    with torch.no_grad():
        assert_close(bam(x), ref)


# ----------------------------------------------------------------------------------------------------------------------
# Empty inputs: correctly shaped results, no kernel launched
# ----------------------------------------------------------------------------------------------------------------------

EMPTY_SHAPES = [(0, 8, 5, 6), (2, 8, 0, 6), (2, 8, 5, 0)]
EMPTY_IDS = ["N0", "H0", "W0"]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=EMPTY_IDS)
def test_empty_ops(kernels_raise, shape, device):
    n, c, h, w = shape
    x = torch.randn(shape, device=device, requires_grad=True)
    mc = torch.randn(n, c, device=device, requires_grad=True)
    ms = torch.randn(n, h, w, device=device, requires_grad=True)
    pooled = channel_pool(x, backend="triton")
    assert pooled.shape == (n, c) and pooled.dtype == x.dtype
    if n > 0:
        assert pooled.isnan().all()  # a mean over no positions, as torch.mean gives
    out = bam_apply(x, mc, ms, combine="product", backend="triton")
    assert out.shape == shape and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == shape and mc.grad.shape == (n, c) and ms.grad.shape == (n, h, w)
    assert not mc.grad.any() and not ms.grad.any()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=EMPTY_IDS)
def test_empty_module(kernels_raise, shape, train, device):
    bam = BAM(8, reduction=4, backend="triton").train(train).to(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    out = bam(x)
    assert out.shape == shape and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == shape


def test_bam_names_x_when_its_dtype_differs_from_the_parameters():
    bam = BAM(16, reduction=4, backend="torch")
    with pytest.raises(TypeError, match=r"x has dtype torch.float16 but this BAM's parameters are torch.float32"):
        bam(torch.randn(2, 16, 5, 5, dtype=torch.float16))
    # Another device: named before any op meets the mismatch (meta stands in for a GPU here).
    with pytest.raises(ValueError, match=r"x is on meta but this BAM's parameters are on cpu: .*bam.to\('meta'\)"):
        bam(torch.randn(2, 16, 5, 5, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtypes: no error
        assert bam(torch.randn(2, 16, 5, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bam_combine_assigned_later_is_checked():
    """``.combine`` is the ⊕ every later call uses (the checkpoint error suggests setting it): another value raises at
    once instead of computing one of the two."""
    bam = BAM(16, reduction=4, backend="torch").eval()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        as_sum = bam(x)
        bam.combine = "product"
        assert not torch.equal(bam(x), as_sum) and "combine='product'" in repr(bam)
    for wrong in ("Sum", "mul", None):
        with pytest.raises(ValueError, match=r"combine must be one of \('sum', 'product'\)"):
            bam.combine = wrong
    assert bam.combine == "product"


def test_custom_ops_without_a_meta_kernel_where_torch_refuses_one(monkeypatch):
    """torch 2.11 (the GPU image's) refuses a meta kernel beside the fake one, which made ``import bam_triton`` fail
    there: BAM's and CBAM's ops are made without it."""
    from bam_triton import cbam_ops, ops

    class RefusingOp:
        def register_fake(self, fake):
            self.fake = fake

        def register_kernel(self, key, impl):
            raise RuntimeError("This is not allowed since there's already a kernel registered from python overriding "
                               "x's behavior for Meta dispatch key and bam_triton namespace.")

        def register_autograd(self, backward, setup_context):
            self.backward = backward

    monkeypatch.setattr(torch.library, "custom_op", lambda *args, **kwargs: RefusingOp())
    fake = object()
    op = ops._custom_op("refused", lambda x: x, fake)
    assert isinstance(op, RefusingOp) and op.fake is fake
    backward = object()
    op = cbam_ops._custom_op("refused", lambda x: x, fake, backward, None)
    assert op.fake is fake and op.backward is backward
