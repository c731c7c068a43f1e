"""Autograd beyond one plain backward (issue 12): gradients of gradients (a gradient penalty, ``gradgradcheck``) on
every backend, and the fused block's gradient hand-off across partial and interleaved backward passes. Every result
is checked against float64 autograd of a plain formula of BAM, never against the code under test."""
import zlib

import pytest
import torch

from bam_triton import BAM, bam_apply
from devices import TEST_DEVICE

BACKENDS = ["torch", "triton"]


def _gen(*parts):
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _bam(combine, seed=0, channels=16):
    """A float64 BAM with randomised BatchNorm parameters and statistics (eval mode is then no identity)."""
    torch.manual_seed(seed)
    bam = BAM(channels, reduction=4, combine=combine).double()
    gen = _gen("bam", combine, seed)
    with torch.no_grad():
        for module in bam.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen, dtype=torch.float64) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen, dtype=torch.float64) * 0.1)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen, dtype=torch.float64))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen, dtype=torch.float64) + .5)
    return bam.to(TEST_DEVICE)


def _plain_bam(bam, x):
    """BAM's forward as plain torch ops on ``bam``'s own layers (the reference)."""
    mc = bam.channel_att(x.mean(dim=(2, 3)))[:, :, None, None]
    ms = x
    for layer in bam.spatial_att.gate_s:
        ms = torch.nn.functional.conv2d(ms, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation) \
            if isinstance(layer, torch.nn.Conv2d) else layer(ms)
    return x * (1 + torch.sigmoid(mc + ms if bam.combine == "sum" else mc * ms))


def _x(shape, channels_last, *seed):
    x = torch.randn(shape, generator=_gen(shape, channels_last, *seed), dtype=torch.float64).to(TEST_DEVICE)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _penalty_grads(forward, bam, x):
    """d/d(x, params) of |d(sum forward)/dx|²: a gradient penalty, which backpropagates through a backward."""
    x = x.detach().requires_grad_()
    (gx,) = torch.autograd.grad(forward(x).sum(), x, create_graph=True)
    params = [p for p in bam.parameters()]
    return torch.autograd.grad(gx.pow(2).sum(), [x] + params, allow_unused=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_through_the_module(backend, combine, train, channels_last):
    bam = _bam(combine)
    bam.backend = backend
    bam.train(train)
    x = _x((3, 16, 5, 6), channels_last, "penalty")
    state = {k: v.clone() for k, v in bam.state_dict().items()}
    got = _penalty_grads(bam, bam, x)
    bam.load_state_dict(state)  # the same running statistics for the reference's forward
    want = _penalty_grads(lambda t: _plain_bam(bam, t), bam, x)
    names = ["x"] + [name for name, _ in bam.named_parameters()]
    for name, a, b in zip(names, got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bam_apply_gradgradcheck(backend, combine):
    gen = _gen("gradgrad", backend, combine)
    x, mc, ms = (torch.randn(shape, generator=gen, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
                 for shape in ((2, 3, 4, 5), (2, 3), (2, 4, 5)))
    assert torch.autograd.gradgradcheck(lambda *t: bam_apply(*t, combine=combine, backend=backend), (x, mc, ms))


def _spatial_logits(bam):
    """Capture the spatial branch's output of the next forward (an auxiliary loss's input)."""
    captured = []
    handle = bam.spatial_att.register_forward_hook(lambda module, inputs, output: captured.append(output))
    return captured, handle


@pytest.mark.parametrize("backend,single_read", [("torch", None), ("triton", None), ("triton", True)],
                         ids=["torch", "triton", "triton-single-read"])
def test_a_partial_backward_leaves_nothing_for_a_later_pass(backend, single_read):
    """``autograd.grad`` of the channel branch's parameters runs the apply step's backward but not the junction that
    writes dx; a later backward of an auxiliary loss on the spatial logits must not pick up the first pass's g (on
    the single-read path too, whose front end is that junction)."""
    bam = _bam("product")
    bam.backend, bam.single_read = backend, single_read
    x = _x((4, 16, 6, 6), bool(single_read), "partial").requires_grad_()
    captured, handle = _spatial_logits(bam)
    out = bam(x)
    handle.remove()
    torch.autograd.grad(out.sum(), list(bam.channel_att.parameters()), retain_graph=True)
    (dx,) = torch.autograd.grad(captured[0].pow(2).sum(), x, retain_graph=True)
    (dx_ref,) = torch.autograd.grad(_spatial_ref(bam, x).pow(2).sum(), x)
    torch.testing.assert_close(dx, dx_ref, atol=1e-10, rtol=1e-8)
    # And the full backward of the same graph afterwards is still right.
    (dx_full,) = torch.autograd.grad(out.sum(), x)
    (dx_full_ref,) = torch.autograd.grad(_plain_bam(bam, x).sum(), x)
    torch.testing.assert_close(dx_full, dx_full_ref, atol=1e-10, rtol=1e-8)


def _spatial_ref(bam, x):
    ms = x
    for layer in bam.spatial_att.gate_s:
        ms = torch.nn.functional.conv2d(ms, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation) \
            if isinstance(layer, torch.nn.Conv2d) else layer(ms)
    return ms


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_graphs_and_auxiliary_losses(backend):
    """Two forwards of one module, their backward passes interleaved (each with retain_graph), plus an auxiliary loss
    on the spatial logits added to one of them: every dx matches the plain formula's."""
    bam = _bam("sum", seed=1)
    bam.backend = backend
    bam.eval()  # two forwards, one set of statistics
    x1 = _x((2, 16, 5, 5), True, "one").requires_grad_()
    x2 = _x((2, 16, 5, 5), True, "two").requires_grad_()
    captured, handle = _spatial_logits(bam)
    out1, out2 = bam(x1), bam(x2)
    handle.remove()
    g1 = torch.autograd.grad(out1.sum(), x1, retain_graph=True)[0]
    g2 = torch.autograd.grad((out2 * out2).sum() + captured[1].sum(), x2, retain_graph=True)[0]
    g1_again = torch.autograd.grad(out1.sum(), x1)[0]
    ref1 = torch.autograd.grad(_plain_bam(bam, x1).sum(), x1)[0]
    ref_out2 = _plain_bam(bam, x2)
    ref2 = torch.autograd.grad((ref_out2 * ref_out2).sum() + _spatial_ref(bam, x2).sum(), x2)[0]
    for got, want in ((g1, ref1), (g2, ref2), (g1_again, ref1)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("combine", ["sum", "product"])
def test_custom_ops_called_directly_with_any_layout(combine):
    """torch.ops.bam_triton.* normalise their own inputs: a sliced x, permuted maps and a g in the other layout give
    the float64 formula's results; wrong shapes raise an error naming the op."""
    from reference import ref_apply, ref_grads

    gen = _gen("direct", combine)
    big = torch.randn(2, 10, 7, 6, generator=gen).to(TEST_DEVICE)
    x = big[:, 1:9:2]  # (2, 4, 7, 6), not dense
    mc = torch.randn(4, 2, generator=gen).to(TEST_DEVICE).t()  # (2, 4), transposed
    ms = torch.randn(2, 42, generator=gen).to(TEST_DEVICE)
    g = torch.randn(2, 4, 7, 6, generator=gen).to(TEST_DEVICE).contiguous(memory_format=torch.channels_last)
    ops = torch.ops.bam_triton
    torch.testing.assert_close(ops.channel_pool(x).double(), x.double().mean(dim=(2, 3)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ops.apply(x, mc, ms, combine).double(), ref_apply(x, mc, ms, combine), atol=1e-5,
                               rtol=1e-5)
    for got, want in zip(ops.apply_backward(g, x, mc, ms, combine), ref_grads(x, mc, ms, g, combine)):
        torch.testing.assert_close(got.double(), want.reshape(got.shape), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="bam_triton::apply: shapes"):
        ops.apply(x, mc[:, :3], ms, combine)


# ----------------------------------------------------------------------------------------------------------------------
# Every autograd feature on every backend: right against float64 autograd of the plain formula
# ----------------------------------------------------------------------------------------------------------------------


def _close64(got, want, what):
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7, msg=lambda m: f"{what}: {m}")


def _ops_inputs(*seed):
    gen = _gen("features", *seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(TEST_DEVICE)
            for shape in ((2, 3, 4, 5), (2, 3), (2, 4, 5))]


def _plain_apply(x, mc, ms, combine):
    n, c, h, w = x.shape
    a, b = mc.reshape(n, c, 1, 1), ms.reshape(n, 1, h, w)
    return x * (1 + torch.sigmoid(a + b if combine == "sum" else a * b))


def _feature_first_order(backend, combine):
    bam = _bam(combine)
    bam.backend = backend
    x = _x((3, 16, 5, 6), False, "first").requires_grad_()
    names = ["x"] + [name for name, _ in bam.named_parameters()]
    got = torch.autograd.grad(bam(x).pow(2).sum(), [x] + list(bam.parameters()))
    bam_ref = _bam(combine)  # the same parameters and (untouched) statistics
    want = torch.autograd.grad(_plain_bam(bam_ref, x).pow(2).sum(), [x] + list(bam_ref.parameters()))
    for name, a, b in zip(names, got, want):
        _close64(a, b, name)


def _feature_penalty_through_a_bam_resnet(backend, combine):
    from bam_triton.models import bam_modules, resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=4, width=16, reduction=4, combine=combine, backend=backend).double()
    model = model.to(TEST_DEVICE).eval()
    x = torch.randn(2, 3, 32, 32, generator=_gen("resnet"), dtype=torch.float64).to(TEST_DEVICE)

    def penalty():
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(model(xr).sum(), xr, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), [xr] + list(model.parameters()), allow_unused=True)

    got = penalty()
    for _, bam in bam_modules(model):  # the reference: the same network with each BAM as the plain formula
        bam.forward = (lambda b: (lambda t: _plain_bam(b, t)))(bam)
    want = penalty()
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), i  # the last layer's bias does not reach d(output)/dx
        if a is not None:
            _close64(a, b, f"gradient {i}")


def _feature_func_grad_params_and_input(backend, combine):
    from torch.func import functional_call, grad

    bam = _bam(combine).eval()
    bam.backend = backend
    x = _x((2, 16, 5, 5), True, "func")
    params, buffers = dict(bam.named_parameters()), dict(bam.named_buffers())
    got = grad(lambda p, t: functional_call(bam, (p, buffers), (t,)).pow(2).sum(), argnums=(0, 1))(params, x)
    want = grad(lambda p, t: functional_call(_PlainBAM(bam), ({f"bam.{k}": v for k, v in p.items()},
                                                              {f"bam.{k}": v for k, v in buffers.items()}),
                                             (t,)).pow(2).sum(), argnums=(0, 1))(params, x)
    for name in params:
        _close64(got[0][name], want[0][name], name)
    _close64(got[1], want[1], "x")


class _PlainBAM(torch.nn.Module):
    def __init__(self, bam):
        super().__init__()
        self.bam = bam

    def forward(self, x):
        return _plain_bam(self.bam, x)


def _feature_jacrev(backend, combine):
    from torch.func import jacrev

    bam = _bam(combine).eval()
    bam.backend = backend
    x = _x((2, 16, 3, 3), False, "jacrev")
    _close64(jacrev(lambda t: bam(t).sum(dim=(2, 3)))(x), jacrev(lambda t: _plain_bam(bam, t).sum(dim=(2, 3)))(x),
             "jacobian")


def _feature_vmap(backend, combine):
    from torch.func import vmap

    bam = _bam(combine).eval()
    bam.backend = backend
    xs = torch.stack([_x((2, 16, 4, 5), False, "vmap", i) for i in range(3)])
    _close64(vmap(bam)(xs), torch.stack([_plain_bam(bam, x) for x in xs]), "module")
    x, mc, ms = _ops_inputs("vmap", combine)
    batched = [t.unsqueeze(0).repeat(3, *[1] * t.dim()) * torch.arange(1, 4, dtype=t.dtype, device=t.device).reshape(
        3, *[1] * t.dim()) for t in (x, mc, ms)]
    got = vmap(lambda a, b, c: bam_apply(a, b, c, combine=combine, backend=backend))(*batched)
    _close64(got, torch.stack([_plain_apply(*(t[i] for t in batched), combine) for i in range(3)]), "bam_apply")


def _feature_jvp(backend, combine):
    from torch.func import jvp

    x, mc, ms = _ops_inputs("jvp", combine)
    tangents = tuple(torch.randn_like(t) for t in (x, mc, ms))
    got = jvp(lambda a, b, c: bam_apply(a, b, c, combine=combine, backend=backend), (x, mc, ms), tangents)
    want = jvp(lambda a, b, c: _plain_apply(a, b, c, combine), (x, mc, ms), tangents)
    _close64(got[1], want[1], "bam_apply tangent")
    bam = _bam(combine).eval()
    bam.backend = backend
    xb = _x((2, 16, 4, 4), True, "jvp-module")
    tangent = torch.randn_like(xb)
    _close64(jvp(bam, (xb,), (tangent,))[1], jvp(lambda t: _plain_bam(bam, t), (xb,), (tangent,))[1], "module tangent")


def _feature_forward_ad(backend, combine):
    import torch.autograd.forward_ad as fwad

    x, mc, ms = _ops_inputs("fwad", combine)
    tangent = torch.randn_like(x)
    with fwad.dual_level():
        got = fwad.unpack_dual(bam_apply(fwad.make_dual(x, tangent), mc, ms, combine=combine, backend=backend)).tangent
        want = fwad.unpack_dual(_plain_apply(fwad.make_dual(x, tangent), mc, ms, combine)).tangent
    _close64(got, want, "tangent")
    # The module with dual parameters and a plain x: its branches' outputs are dual where x is not (this raised in the
    # autograd Functions, which have no forward-AD rule).
    from torch.func import functional_call

    bam = _bam(combine).eval()
    bam.backend = backend
    xb = _x((2, 16, 4, 4), False, "fwad-params")
    params = dict(bam.named_parameters())
    directions = {name: torch.randn(p.shape, generator=_gen("fwad", name), dtype=p.dtype).to(p.device)
                  for name, p in params.items()}

    class Plain(torch.nn.Module):  # the reference on the same layers, so that functional_call swaps its parameters
        def __init__(self):
            super().__init__()
            self.bam = bam

        def forward(self, t):
            return _plain_bam(self.bam, t)

    tangents = []
    for module, prefix in ((bam, ""), (Plain(), "bam.")):
        with fwad.dual_level():
            duals = {prefix + name: fwad.make_dual(p.detach(), directions[name]) for name, p in params.items()}
            tangents.append(fwad.unpack_dual(functional_call(module, duals, (xb,))).tangent)
    _close64(tangents[0], tangents[1], "tangent of the parameters")


def _feature_gradgradcheck(backend, combine):
    x, mc, ms = (t.requires_grad_() for t in _ops_inputs("ggc", combine))
    assert torch.autograd.gradgradcheck(lambda *t: bam_apply(*t, combine=combine, backend=backend), (x, mc, ms))


AUTOGRAD_FEATURES = {
    "first-order": _feature_first_order,
    "penalty-through-bam-resnet": _feature_penalty_through_a_bam_resnet,
    "func.grad": _feature_func_grad_params_and_input,
    "jacrev": _feature_jacrev,
    "vmap": _feature_vmap,
    "jvp": _feature_jvp,
    "forward-ad": _feature_forward_ad,
    "gradgradcheck": _feature_gradgradcheck,
}


@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", sorted(AUTOGRAD_FEATURES))
def test_every_autograd_feature_is_right_on_every_backend(feature, backend, combine):
    """The README's autograd table: each feature gives float64 autograd's numbers of the plain formula (none of them
    raises today; a feature that could not work would have to raise an error naming bam_triton, never a wrong
    number)."""
    AUTOGRAD_FEATURES[feature](backend, combine)
