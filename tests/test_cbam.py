"""The CBAM module and its functional ops on both backends (the torch path; the Triton path through the interpreter on
CPU, compiled in the CUDA run) against the authors' CBAM (``bench.providers.AuthorsCBAM``) run in float64 on the same
weights: outputs, every gradient, running statistics; every pool type, ``no_spatial``, both layouts and strided
inputs, every dtype; the authors' state_dict; argument validation; every autograd feature (double backward, torch.func,
forward-mode AD); the fused backward's hand-over across partial passes; torch.compile, autocast."""
import copy
import zlib

import pytest
import torch

import bam_triton
from bam_triton import CBAM, cbam_apply, cbam_channel_pool, cbam_spatial_pool
from bam_triton._dtypes import assert_close
from bam_triton.bench.providers import AuthorsCBAM
from devices import TEST_DEVICE

BACKENDS = ["torch", "triton"]
LAYOUTS = ["nchw", "channels_last", "sliced"]
POOL_TYPE_SETS = [("avg", "max"), ("avg",), ("max", "lp", "lse", "avg")]


def _gen(*parts):
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _cbam(channels=16, reduction=4, seed=0, **kwargs):
    """A CBAM whose spatial BatchNorm has non-default parameters and statistics (eval mode is then no identity)."""
    torch.manual_seed(seed)
    cbam = CBAM(channels, reduction=reduction, **kwargs)
    if not cbam.no_spatial:
        bn = cbam.SpatialGate.spatial.bn
        with torch.no_grad():
            bn.weight.fill_(1.5)
            bn.bias.fill_(0.2)
            bn.running_mean.fill_(0.1)
            bn.running_var.fill_(2.0)
    return cbam


def _input(shape, layout, dtype=torch.float32, *seed):
    n, c, h, w = shape
    gen = _gen(shape, layout, *seed)
    if layout == "sliced":  # a strided view: one documented copy
        return torch.randn(n, c, h, w + 2, generator=gen).to(dtype)[..., 1:-1].to(TEST_DEVICE)
    x = torch.randn(shape, generator=gen).to(dtype)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return x.to(TEST_DEVICE).contiguous(memory_format=fmt)


def _reference(cbam, x, g, train):
    """Output, input gradient, parameter gradients and state of the authors' CBAM in float64 on a copy of ``cbam``."""
    ref = copy.deepcopy(cbam).double().train(train)
    authors = AuthorsCBAM(ref)
    x64 = x.detach().double().requires_grad_()
    out = authors(x64)
    grads = torch.autograd.grad(out, [x64] + list(ref.parameters()), g.double())
    return out, grads, ref.state_dict()


def _run(cbam, x, g):
    x = x.detach().requires_grad_()
    out = cbam(x)
    grads = torch.autograd.grad(out, [x] + list(cbam.parameters()), g)
    return out, grads


# ----------------------------------------------------------------------------------------------------------------------
# The module against the authors' CBAM in float64
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_types", POOL_TYPE_SETS, ids=["-".join(p) for p in POOL_TYPE_SETS])
@pytest.mark.parametrize("no_spatial", [False, True], ids=["spatial", "no_spatial"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cbam_matches_the_authors_in_fp64(backend, train, layout, no_spatial, pool_types):
    shape = (4, 16, 5, 7)
    cbam = _cbam(pool_types=pool_types, no_spatial=no_spatial, backend=backend).double().to(TEST_DEVICE).train(train)
    x = _input(shape, layout, torch.float64, "fp64")
    g = _input(shape, "nchw", torch.float64, "g")
    want_out, want_grads, want_state = _reference(cbam, x, g, train)
    out, grads = _run(cbam, x, g)
    names = ["x"] + [name for name, _ in cbam.named_parameters()]
    assert_close(out, want_out, what="output")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and out.dtype == torch.float64
    for name, got, want in zip(names, grads, want_grads):
        assert_close(got, want, what=f"d{name}", scale_atol=True)
    for key, value in cbam.state_dict().items():  # running statistics: the same batch statistics
        assert_close(value.double(), want_state[key].double(), torch.float64, what=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cbam_in_lower_precision(backend, layout, dtype):
    """fp32/fp16/bf16 inputs against the float64 reference of the same (rounded) weights and inputs; fp32 training
    with 8 samples (the spatial BatchNorm over 2 is ill-conditioned)."""
    shape = (8, 32, 6, 6)
    cbam = _cbam(32, backend=backend).to(TEST_DEVICE, dtype).train()
    x = _input(shape, layout, dtype, "low")
    g = _input(shape, layout, dtype, "g-low")
    want_out, want_grads, _ = _reference(cbam, x, g, True)
    out, grads = _run(cbam, x, g)
    assert out.dtype == dtype
    assert_close(out, want_out, what="output", scale_atol=True)
    names = ["x"] + [n for n, _ in cbam.named_parameters()]
    if dtype == torch.float32:
        for name, got, want in zip(names, grads, want_grads):
            assert_close(got, want, what=f"d{name}", scale_atol=True)
        return
    # Each max routes its gradient to one element. In half precision x·a is rounded before its channel max (on the
    # torch path, as in the authors' code) and many channels tie: the first of them is as right as the float64
    # reference's choice, and the choice moves whole terms of dx and of the sums over it. So the gradients are held
    # to their relative norm error: at most four times the dtype's relative tolerance, or (bf16, where ties abound)
    # no more than 1.25 times the error of the authors' own code run in the same dtype on the same weights.
    xr = x.detach().requires_grad_()
    theirs = copy.deepcopy(cbam)
    authors_grads = torch.autograd.grad(AuthorsCBAM(theirs)(xr), [xr] + list(theirs.parameters()), g)
    rtol = bam_triton.TOLERANCES[dtype][1]
    for name, got, theirs, want in zip(names, grads, authors_grads, want_grads):
        error, their_error = (((t.double() - want).norm() / want.norm()).item() for t in (got, theirs))
        assert error < max(4 * rtol, 1.25 * their_error), \
            f"d{name}: relative norm error {error:.2e} (the authors' code in {dtype}: {their_error:.2e})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_at_odd_shapes(backend):
    """C/r = 1, a 1-pixel-high map, H·W prime, 7x7, 1x1 (eval: one value per channel is fine there)."""
    for shape, reduction, train in (((3, 4, 1, 13), 4, True), ((2, 19, 7, 7), 16, True), ((3, 8, 1, 1), 2, False)):
        cbam = _cbam(shape[1], reduction=reduction, backend=backend).double().to(TEST_DEVICE).train(train)
        x, g = _input(shape, "nchw", torch.float64, "odd"), _input(shape, "nchw", torch.float64, "odd-g")
        want_out, want_grads, _ = _reference(cbam, x, g, train)
        out, grads = _run(cbam, x, g)
        assert_close(out, want_out, what=f"output {shape}")
        for i, (got, want) in enumerate(zip(grads, want_grads)):
            assert_close(got, want, what=f"gradient {i} {shape}", scale_atol=True)


def test_inference_and_training_forward_agree(device):
    """The no-autograd forward (no argmax maps) and the fused training forward give the same numbers."""
    for backend in BACKENDS:
        cbam = _cbam(backend=backend).double().to(device).eval()
        x = _input((2, 16, 5, 6), "channels_last", torch.float64, "modes")
        with torch.no_grad():
            plain = cbam(x)
        assert_close(cbam(x.requires_grad_()), plain, torch.float64, what=backend)


# ----------------------------------------------------------------------------------------------------------------------
# Functional ops
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_ops_and_their_gradients(backend, layout):
    shape = (2, 6, 4, 5)
    n, c, h, w = shape
    x = _input(shape, layout, torch.float64, "ops").requires_grad_()
    a = torch.rand(n, c, 1, 1, generator=_gen("a"), dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
    b = torch.rand(n, 1, h, w, generator=_gen("b"), dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
    avg, mx = cbam_channel_pool(x, backend=backend)
    s = cbam_spatial_pool(x, a, backend=backend)
    out = cbam_apply(x, a, b, backend=backend)
    x1 = x * a
    want = (x.mean(dim=(2, 3)), x.amax(dim=(2, 3)), torch.cat((x1.amax(1, keepdim=True), x1.mean(1, keepdim=True)), 1),
            x1 * b)
    for name, got, ref in zip(("avg", "max", "s", "apply"), (avg, mx, s, out), want):
        assert_close(got, ref, what=name)
        got_grads = torch.autograd.grad(got.pow(2).sum(), (x, a, b), allow_unused=True, retain_graph=True)
        ref_grads = torch.autograd.grad(ref.pow(2).sum(), (x, a, b), allow_unused=True, retain_graph=True)
        for i, (gg, rg) in enumerate(zip(got_grads, ref_grads)):
            assert (gg is None) == (rg is None), (name, i)
            if gg is not None:
                assert_close(gg, rg, what=f"{name} gradient {i}")
    assert_close(cbam_apply(x, a.reshape(n, c), None, backend=backend), x1, what="apply without b")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck_of_the_functional_ops(backend):
    gen = _gen("ggc", backend)
    x = torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
    a = torch.rand(2, 3, generator=gen, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
    b = torch.rand(2, 2, 3, generator=gen, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda *t: cbam_apply(*t, backend=backend), (x, a, b))
    assert torch.autograd.gradgradcheck(lambda t, u: cbam_spatial_pool(t, u, backend=backend), (x, a))
    assert torch.autograd.gradgradcheck(lambda t: cbam_channel_pool(t, backend=backend), (x,))


# ----------------------------------------------------------------------------------------------------------------------
# Every autograd feature, against float64 autograd of the authors' formula
# ----------------------------------------------------------------------------------------------------------------------


def _close64(got, want, what):
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_through_cbam(backend, train):
    cbam = _cbam(backend=backend).double().to(TEST_DEVICE).train(train)
    x = _input((3, 16, 5, 6), "channels_last", torch.float64, "penalty")

    def penalty(module, forward):
        xr = x.detach().requires_grad_()
        (gx,) = torch.autograd.grad(forward(xr).sum(), xr, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), [xr] + list(module.parameters()), allow_unused=True)

    reference = copy.deepcopy(cbam)
    got = penalty(cbam, cbam)
    want = penalty(reference, AuthorsCBAM(reference))
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), i
        if a is not None:
            _close64(a, b, f"gradient {i}")


@pytest.mark.parametrize("feature", ["func.grad", "jacrev", "vmap", "jvp", "forward-ad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_and_forward_ad(backend, feature):
    from torch.func import functional_call, grad, jacrev, jvp, vmap

    cbam = _cbam(backend=backend).double().to(TEST_DEVICE).eval()
    authors = AuthorsCBAM(cbam)
    x = _input((2, 16, 4, 5), "nchw", torch.float64, feature)
    if feature == "func.grad":
        params, buffers = dict(cbam.named_parameters()), dict(cbam.named_buffers())
        got = grad(lambda p, t: functional_call(cbam, (p, buffers), (t,)).pow(2).sum(), argnums=(0, 1))(params, x)
        mapped = lambda p: {f"spatial.{k[len('SpatialGate.spatial.'):]}" if k.startswith("SpatialGate") else  # noqa
                            f"mlp.{k[len('ChannelGate.mlp.'):]}": v for k, v in p.items()}
        want = grad(lambda p, t: functional_call(authors, (mapped(p), mapped(buffers)), (t,)).pow(2).sum(),
                    argnums=(0, 1))(params, x)
        for name in params:
            _close64(got[0][name], want[0][name], name)
        _close64(got[1], want[1], "x")
    elif feature == "jacrev":
        _close64(jacrev(lambda t: cbam(t).sum(dim=(2, 3)))(x), jacrev(lambda t: authors(t).sum(dim=(2, 3)))(x),
                 "jacobian")
    elif feature == "vmap":
        xs = torch.stack([x, 2 * x, -x])
        _close64(vmap(cbam)(xs), torch.stack([authors(t) for t in xs]), "vmap")
    elif feature == "jvp":
        tangent = torch.randn_like(x)
        _close64(jvp(cbam, (x,), (tangent,))[1], jvp(authors, (x,), (tangent,))[1], "tangent")
    else:
        import torch.autograd.forward_ad as fwad

        tangent = torch.randn_like(x)
        with fwad.dual_level():
            got = fwad.unpack_dual(cbam(fwad.make_dual(x, tangent))).tangent
            want = fwad.unpack_dual(authors(fwad.make_dual(x, tangent))).tangent
        _close64(got, want, "tangent")
        # Dual parameters, x itself plain (a directional derivative in weight space): the MLP's and the gate's
        # outputs are dual where x is not (this raised in the autograd Functions, which have no forward-AD rule).
        params = dict(cbam.named_parameters())
        directions = {name: torch.randn_like(p) for name, p in params.items()}
        with fwad.dual_level():
            duals = {name: fwad.make_dual(p.detach(), directions[name]) for name, p in params.items()}
            got = fwad.unpack_dual(functional_call(cbam, duals, (x,))).tangent
        want = jvp(lambda p: functional_call(authors, {f"spatial.{k[len('SpatialGate.spatial.'):]}"
                                                       if k.startswith("SpatialGate") else
                                                       f"mlp.{k[len('ChannelGate.mlp.'):]}": v for k, v in p.items()},
                                             (x,)), (params,), (directions,))[1]
        _close64(got, want, "tangent of the parameters")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_partial_backward_leaves_nothing_for_a_later_pass(backend):
    """A pass that asks for the spatial conv's gradient only runs the apply step's backward (which hands g over) but
    not the junction: the next full pass must not pick up that stale hand-over."""
    cbam = _cbam(backend=backend).double().to(TEST_DEVICE).train()
    x = _input((3, 16, 5, 6), "nchw", torch.float64, "partial").requires_grad_()
    out = cbam(x)
    (conv_grad,) = torch.autograd.grad(out.sum(), cbam.SpatialGate.spatial.conv.weight, retain_graph=True)
    got = torch.autograd.grad(out.pow(2).sum(), [x] + list(cbam.parameters()))
    reference = copy.deepcopy(cbam)
    x_ref = x.detach().requires_grad_()
    want_out = AuthorsCBAM(reference)(x_ref)
    want = torch.autograd.grad(want_out.pow(2).sum(), [x_ref] + list(reference.parameters()), retain_graph=True)
    for i, (a, b) in enumerate(zip(got, want)):
        _close64(a, b, f"gradient {i}")
    (want_conv,) = torch.autograd.grad(want_out.sum(), reference.SpatialGate.spatial.conv.weight)
    _close64(conv_grad, want_conv, "conv weight, partial pass")


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_only_and_input_only_gradients(backend):
    """x without requires_grad (a first layer) and frozen parameters (fine-tuning the backbone only)."""
    cbam = _cbam(backend=backend).double().to(TEST_DEVICE).train()
    x = _input((3, 16, 5, 6), "channels_last", torch.float64, "only")
    g = _input((3, 16, 5, 6), "nchw", torch.float64, "only-g")
    _, want_grads, _ = _reference(cbam, x, g, True)
    got = torch.autograd.grad(cbam(x), list(cbam.parameters()), g)
    for i, (a, b) in enumerate(zip(got, want_grads[1:])):
        _close64(a, b, f"parameter {i}")
    for p in cbam.parameters():
        p.requires_grad_(False)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(cbam(xr), xr, g)
    _close64(gx, want_grads[0], "x with frozen parameters")


@pytest.mark.slow_on_gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    """The torch path traces as plain ops; the Triton path as the three custom ops, without a graph break, forward
    and backward."""
    cbam = _cbam(backend=backend).to(device).train()
    reference = copy.deepcopy(cbam)
    x = _input((4, 16, 6, 5), "nchw", torch.float32, "compile").requires_grad_()
    torch._dynamo.reset()
    out = torch.compile(cbam, fullgraph=True)(x)
    out.pow(2).sum().backward()
    x_ref = x.detach().requires_grad_()
    ref_out = reference(x_ref)
    ref_out.pow(2).sum().backward()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(cbam.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast(backend, device):
    cbam = _cbam(backend=backend).to(device)
    x = _input((2, 16, 5, 6), "nchw", torch.float32, "autocast").to(torch.bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = cbam(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), AuthorsCBAM(cbam)(x.float()), atol=0.05, rtol=0.05)


# ----------------------------------------------------------------------------------------------------------------------
# The authors' state_dict, the module's surface, validation
# ----------------------------------------------------------------------------------------------------------------------

# ../shared/official_cbam_keys.md, for CBAM(256, 16)
AUTHORS_KEYS = {
    "ChannelGate.mlp.1.weight": (16, 256), "ChannelGate.mlp.1.bias": (16,),
    "ChannelGate.mlp.3.weight": (256, 16), "ChannelGate.mlp.3.bias": (256,),
    "SpatialGate.spatial.conv.weight": (1, 2, 7, 7),
    "SpatialGate.spatial.bn.weight": (1,), "SpatialGate.spatial.bn.bias": (1,),
    "SpatialGate.spatial.bn.running_mean": (1,), "SpatialGate.spatial.bn.running_var": (1,),
    "SpatialGate.spatial.bn.num_batches_tracked": (),
}


def test_state_dict_is_the_authors():
    cbam = CBAM(256)
    assert {k: tuple(v.shape) for k, v in cbam.state_dict().items()} == AUTHORS_KEYS
    theirs = {k: torch.randn(shape) if k != "SpatialGate.spatial.bn.num_batches_tracked" else torch.tensor(7)
              for k, shape in AUTHORS_KEYS.items()}
    cbam.load_state_dict(theirs, strict=True)
    bn = cbam.SpatialGate.spatial.bn
    assert bn.eps == 1e-5 and bn.momentum == 0.01 and cbam.SpatialGate.spatial.conv.bias is None
    no_spatial = CBAM(256, no_spatial=True)
    assert set(no_spatial.state_dict()) == {k for k in AUTHORS_KEYS if k.startswith("ChannelGate")}


def test_extra_repr_and_defaults():
    cbam = CBAM(64)
    assert cbam.reduction == 16 and cbam.pool_types == ("avg", "max") and not cbam.no_spatial
    assert repr(cbam).startswith("CBAM(\n  channels=64, reduction=16, pool_types=('avg', 'max'), no_spatial=False, "
                                 "backend=None")
    assert CBAM(64, pool_types=["lse"], backend="torch").pool_types == ("lse",)
    half = CBAM(64, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())


def test_reset_parameters_restores_the_defaults():
    cbam = _cbam()
    cbam.reset_parameters()
    bn = cbam.SpatialGate.spatial.bn
    assert bn.weight.item() == 1 and bn.bias.item() == 0 and bn.running_var.item() == 1


BAD_ARGUMENTS = [
    (dict(channels=0), ValueError, "channels must be >= 1"),
    (dict(channels=16.0), TypeError, "channels must be an int"),
    (dict(channels=8, reduction=16), ValueError, "channels // reduction"),
    (dict(channels=16, pool_types="avg"), TypeError, "pool_types must be a sequence"),
    (dict(channels=16, pool_types=()), ValueError, "pool_types must name at least one"),
    (dict(channels=16, pool_types=("avg", "mean")), ValueError, r"pool_types has unknown pool type\(s\) \['mean'\]"),
    (dict(channels=16, no_spatial=1), TypeError, "no_spatial must be True or False"),
    (dict(channels=16, backend="cuda"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_ARGUMENTS, ids=[m for _, _, m in BAD_ARGUMENTS])
def test_bad_constructor_arguments_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        CBAM(**kwargs)


def test_bad_inputs_name_the_argument():
    cbam = CBAM(16, reduction=4)
    with pytest.raises(ValueError, match="x must have 16 channels"):
        cbam(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="x must be 4-D"):
        cbam(torch.randn(2, 16, 4))
    with pytest.raises(TypeError, match="x has dtype torch.float64 but this CBAM's parameters are torch.float32"):
        cbam(torch.randn(2, 16, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x is on meta but this CBAM's parameters are on cpu"):
        cbam(torch.randn(2, 16, 4, 4, device="meta"))
    with pytest.raises(ValueError, match=r"single value per channel \(N·H·W = 1\) in training mode"):
        cbam(torch.randn(1, 16, 1, 1))
    cbam(torch.randn(1, 16, 3, 3))  # a batch of one is fine: the spatial BatchNorm sees H·W values
    cbam.eval()(torch.randn(1, 16, 1, 1))
    CBAM(16, reduction=4, no_spatial=True)(torch.randn(1, 16, 1, 1))
    x = torch.randn(2, 16, 3, 3)
    with pytest.raises(ValueError, match=r"a must have shape \(N, C\)"):
        cbam_apply(x, torch.rand(2, 8))
    with pytest.raises(ValueError, match=r"b must have shape \(N, H, W\)"):
        cbam_apply(x, torch.rand(2, 16), torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match="x must have H·W > 0"):
        cbam_channel_pool(torch.randn(2, 16, 0, 3))
    with pytest.raises(TypeError, match="a must have a floating dtype"):
        cbam_spatial_pool(x, torch.ones(2, 16, dtype=torch.long))


@pytest.mark.parametrize("shape", [(0, 16, 4, 4), (2, 16, 0, 3)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend, shape, device):
    cbam = CBAM(16, reduction=4, backend=backend).to(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    out = cbam(x)
    assert out.shape == shape
    out.sum().backward()
    assert x.grad.shape == shape


def test_backend_none_follows_the_environment(monkeypatch):
    cbam = CBAM(16, reduction=4)
    monkeypatch.setenv("BAM_TRITON_BACKEND", "torch")
    cbam(torch.randn(2, 16, 3, 3))
    monkeypatch.setenv("BAM_TRITON_BACKEND", "gpu")
    with pytest.raises(ValueError, match="environment variable BAM_TRITON_BACKEND must be one of"):
        cbam(torch.randn(2, 16, 3, 3))


def test_jit_script_is_refused_with_a_clear_error():
    with pytest.raises(RuntimeError, match="bam_triton.CBAM cannot be compiled by torch.jit.script"):
        torch.jit.script(CBAM(16, reduction=4))


def test_plans_index_in_int64_past_2_31_elements():
    """The flat kernels switch to int64 offsets where x has 2**31 elements or more (plans only: no memory needed);
    the reductions index within an image in int32 (C·H·W < 2**31, checked before any launch) from an int64 base."""
    from bam_triton import kernels

    big, small = (2**15, 256, 16, 16), (2**14, 256, 16, 16)  # 2**31 and 2**30 elements
    for plan_of in (lambda s: kernels.cbam_apply_plan(s, torch.float16, False, True),
                    lambda s: kernels.grad_x_plan(s, torch.float16, True, True, True, True, False)):
        assert plan_of(big).constexpr_kwargs["INDEX_64"] and not plan_of(small).constexpr_kwargs["INDEX_64"]
    with pytest.raises(ValueError, match="fewer than 2\\*\\*31"):
        CBAM(2**16, backend="triton").to("meta")(torch.empty(1, 2**16, 2**8, 2**7, device="meta"))
