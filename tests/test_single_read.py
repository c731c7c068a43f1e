"""The opt-in single-read path of BAM (issue 14): ``BAM(single_read=True)`` or ``BAM_TRITON_SINGLE_READ=1`` on the
Triton path runs the front-end kernels (kernels/front.py: pooling and the 1x1 reduction from one read of x; dx, dW_r
and db_r in one backward pass). Checked against float64 autograd of the plain formula, as the other paths are (its
partial-backward case is in test_autograd_paths.py, beside the other paths')."""
import pytest
import torch

from bam_triton import BAM, _backend
from bam_triton import kernels as kernel_package
from devices import TEST_DEVICE
from test_autograd_paths import _bam, _plain_bam, _x

FRONT_LAUNCHERS = ("front_fwd", "front_bwd")
OTHER_LAUNCHERS = ("channel_pool_fwd", "apply_bwd_dx", "apply_bwd")


@pytest.fixture
def launches(monkeypatch):
    """Which launchers ran (the kernel package's attributes, as the op layer calls them)."""
    ran = []
    for name in FRONT_LAUNCHERS + OTHER_LAUNCHERS + ("apply_fwd", "apply_bwd_reduce"):
        real = getattr(kernel_package, name)
        monkeypatch.setattr(kernel_package, name, (lambda n, f: lambda *a, **k: (ran.append(n), f(*a, **k))[1])(
            name, real))
    return ran


def _single_read_bam(combine, train, **kwargs):
    bam = _bam(combine, **kwargs)
    bam.backend, bam.single_read = "triton", True
    return bam.train(train)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("combine", ["sum", "product"])
def test_forward_and_gradients_against_the_plain_formula(launches, combine, train, channels_last):
    bam = _single_read_bam(combine, train)
    x = _x((3, 16, 5, 6), channels_last, "single-read").requires_grad_()
    state = {k: v.clone() for k, v in bam.state_dict().items()}
    out = bam(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype).to(TEST_DEVICE)
    got = torch.autograd.grad(out, [x] + list(bam.parameters()), g)
    assert launches.count("front_fwd") == 1 and launches.count("front_bwd") == 1
    assert not set(OTHER_LAUNCHERS) & set(launches), launches  # the front end replaced the pooling and dx kernels
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    bam.load_state_dict(state)
    ref = _plain_bam(bam, x)
    want = torch.autograd.grad(ref, [x] + list(bam.parameters()), g)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    for (name, _), a, b in zip([("x", None)] + list(bam.named_parameters()), got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reduced_precision_within_the_tolerance_table(dtype):
    from bam_triton._dtypes import assert_close

    bam = _single_read_bam("product", True)
    x64 = _x((4, 16, 6, 6), True, "precision")
    ref = _plain_bam(bam, x64)
    bam64_state = {k: v.clone() for k, v in bam.state_dict().items()}
    low = _bam("product").to(dtype)
    low.load_state_dict(bam64_state)
    low.backend, low.single_read = "triton", True
    out = low.train(True)(x64.to(dtype))
    assert out.dtype == dtype
    # The reference runs on x rounded to dtype, the layers in float64: the tolerance of dtype, scaled by |out|.
    assert_close(out, _plain_bam(bam.train(True), x64.to(dtype).double()), dtype, what="output", scale_atol=True)
    assert ref.shape == out.shape


def test_gradient_penalty_through_the_single_read_path():
    bam = _single_read_bam("sum", True)
    x = _x((3, 16, 5, 5), False, "penalty-sr")
    state = {k: v.clone() for k, v in bam.state_dict().items()}

    def penalty(forward):
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(forward(xr).sum(), xr, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), [xr] + list(bam.parameters()))

    got = penalty(bam)
    bam.load_state_dict(state)
    for a, b in zip(got, penalty(lambda t: _plain_bam(bam, t))):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_switch_argument_and_environment_variable(monkeypatch, launches):
    x = _x((2, 16, 4, 4), False, "switch")
    bam = _bam("sum").eval()
    bam.backend = "triton"
    monkeypatch.delenv(_backend.SINGLE_READ_ENV_VAR, raising=False)
    bam(x)
    assert "front_fwd" not in launches  # off by default
    monkeypatch.setenv(_backend.SINGLE_READ_ENV_VAR, "1")
    bam(x)
    assert launches.count("front_fwd") == 1
    bam.single_read = False  # the argument wins over the environment
    bam(x)
    assert launches.count("front_fwd") == 1
    monkeypatch.setenv(_backend.SINGLE_READ_ENV_VAR, "maybe")
    bam.single_read = None
    with pytest.raises(ValueError, match=r"BAM_TRITON_SINGLE_READ must be one of 1, true, on, yes \(on\) or 0, false, "
                                         r"off, no \(off\), got 'maybe'"):
        bam(x)
    monkeypatch.setenv(_backend.SINGLE_READ_ENV_VAR, "Yes")  # any case
    bam(x)
    assert launches.count("front_fwd") == 2
    with pytest.raises(TypeError, match="single_read must be True, False or None"):
        BAM(16, reduction=4, single_read="yes")
    torch_path = BAM(16, reduction=4, backend="torch", single_read=True).double().to(TEST_DEVICE).eval()
    torch_path(x)
    assert launches.count("front_fwd") == 2  # the torch path has no front-end kernel: the switch is a no-op there


def test_state_dict_and_repr_unchanged_but_for_the_switch():
    a, b = BAM(64), BAM(64, single_read=True)
    assert list(a.state_dict()) == list(b.state_dict())
    assert "single_read=True" in repr(b) and "single_read" not in repr(a)
