"""Training: gradients of the Triton path against the torch path, the fused block backward, gradcheck, determinism,
odd gradient layouts, torch.compile and autocast. On the ``device`` of this run (tests/devices.py): Triton's interpreter
on CPU, compiled kernels on CUDA; inputs are drawn on CPU and moved, so both runs use the same values."""
import pytest
import torch
from torch import nn

from bam_triton import BAM, TOLERANCES, bam_apply, channel_pool


def assert_close(got, ref, dtype=None):
    atol, rtol = TOLERANCES[dtype or got.dtype]
    torch.testing.assert_close(got.double(), ref.double(), atol=atol, rtol=rtol)


def _seeded_bam(channels, combine, backend, seed=0):
    torch.manual_seed(seed)
    bam = BAM(channels, reduction=4, combine=combine, backend=backend)
    with torch.no_grad():  # non-trivial BN affine parameters, so every gradient term matters
        for m in bam.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return bam


def _grads(module, x, g):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(g)
    return out, x.grad, {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 8, 7, 5), (3, 16, 14, 14), (2, 4, 1, 1)])
def test_block_gradients_match_torch_path(shape, channels_last, combine, device):
    """The fused block backward (junction + reductions + one dx write) gives torch-path gradients."""
    torch.manual_seed(1)
    x = torch.randn(shape).to(device)
    g = torch.randn(shape).to(device)
    if channels_last:
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    ref_out, ref_dx, ref_params = _grads(_seeded_bam(shape[1], combine, "torch").to(device), x, g)
    out, dx, params = _grads(_seeded_bam(shape[1], combine, "triton").to(device), x, g)
    assert_close(out, ref_out)
    assert_close(dx, ref_dx)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert dx.is_contiguous(memory_format=memory_format)
    for name in ref_params:
        # Parameter gradients sum thousands of terms in a different order on each path, and a conv bias feeding a
        # training-mode BatchNorm has a true gradient of 0 (pure rounding noise): compare at 1e-4 of their scale.
        scale = ref_params[name].abs().max().item() + 1.0
        torch.testing.assert_close(params[name], ref_params[name], atol=1e-4 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_gradients_reduced_precision(dtype, device):
    """In fp16/bf16 the branches (convs, norms) round too, so the whole block is held to its normwise error against
    float64: no worse than the torch path's own error in that dtype (plus a little)."""
    torch.manual_seed(2)
    x = torch.randn(2, 8, 6, 6).to(device)
    g = torch.randn(2, 8, 6, 6).to(device)
    _, ref_dx, _ = _grads(_seeded_bam(8, "sum", "torch").double().to(device), x.double(), g.double())
    _, dx, _ = _grads(_seeded_bam(8, "sum", "triton").to(device, dtype), x.to(dtype), g.to(dtype))
    _, torch_dx, _ = _grads(_seeded_bam(8, "sum", "torch").to(device, dtype), x.to(dtype), g.to(dtype))
    assert dx.dtype == dtype

    def normwise_error(got):
        return ((got.double() - ref_dx).norm() / ref_dx.norm()).item()

    assert normwise_error(dx) <= 1.5 * normwise_error(torch_dx) + TOLERANCES[dtype][1]


@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck_float64_through_interpreter(combine, channels_last, device):
    """(Through the interpreter in the CPU run, compiled in the CUDA run: the name predates the CUDA run.)"""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    mc = torch.randn(2, 3, dtype=torch.float64).to(device).requires_grad_()
    ms = torch.randn(2, 4, 5, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: bam_apply(a, b, c, combine=combine, backend="triton"),
                                    (x, mc, ms))
    assert torch.autograd.gradcheck(lambda a: channel_pool(a, backend="triton"), (x,))


def test_gradcheck_block_float64(device):
    """The fused block backward (junction, reductions, folded pooling gradient) in float64, training mode."""
    bam = _seeded_bam(4, "product", "triton").double().to(device)
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(bam, (x,), fast_mode=True)


def test_backward_is_deterministic(monkeypatch, device):
    # cuDNN may pick non-deterministic algorithms for the branches' conv backward: pin torch's part, so that the
    # comparison is about the kernels.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(4)
    x = torch.randn(2, 16, 12, 12).to(device)
    g = torch.randn(2, 16, 12, 12).to(device)
    bam = _seeded_bam(16, "sum", "triton").to(device)
    first = _grads(bam, x, g)
    bam.zero_grad()
    second = _grads(bam, x, g)
    assert torch.equal(first[1], second[1])
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name])


@pytest.mark.parametrize("grad_layout", ["transposed_view", "channels_last", "expanded"])
def test_odd_upstream_gradient_layouts(grad_layout, device):
    torch.manual_seed(5)
    x = torch.randn(2, 6, 5, 4).to(device).requires_grad_()
    mc = torch.randn(2, 6).to(device).requires_grad_()
    ms = torch.randn(2, 5, 4).to(device).requires_grad_()
    if grad_layout == "transposed_view":
        g = torch.randn(2, 6, 4, 5).to(device).transpose(2, 3)
    elif grad_layout == "channels_last":
        g = torch.randn(2, 6, 5, 4).to(device).to(memory_format=torch.channels_last)
    else:
        g = torch.randn(1, 6, 1, 4).to(device).expand(2, 6, 5, 4)
    grads = torch.autograd.grad(bam_apply(x, mc, ms, backend="triton"), (x, mc, ms), g)
    ref = torch.autograd.grad(bam_apply(x, mc, ms, backend="torch"), (x, mc, ms), g)
    for got, want in zip(grads, ref):
        assert_close(got, want)


class _TinyNet(nn.Module):
    def __init__(self, backend):
        super().__init__()
        torch.manual_seed(6)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bam1 = BAM(16, reduction=4, backend=backend)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bam2 = BAM(32, reduction=4, combine="product", backend=backend)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.bam1(torch.relu(self.stem(x)))
        x = self.bam2(torch.relu(self.down(x)))
        return self.head(x.mean((2, 3)))


def _train(backend, device, steps=4):
    net = _TinyNet(backend).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 12, 10, generator=gen).to(device)  # one batch, fitted a few steps: the loss must fall
    y = torch.randint(0, 5, (4,), generator=gen).to(device)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, net.state_dict()


def test_training_equivalence_between_backends(device):
    losses_torch, state_torch = _train("torch", device)
    losses_triton, state_triton = _train("triton", device)
    assert losses_triton == pytest.approx(losses_torch, rel=1e-4, abs=1e-5)
    assert losses_torch[-1] < losses_torch[0]
    for key, value in state_torch.items():
        torch.testing.assert_close(state_triton[key], value, atol=1e-4, rtol=1e-4)


@pytest.mark.slow_on_gpu
@pytest.mark.parametrize("cpu_chunk", [None, 1], ids=["default", "eager-chunks-every-image"])
def test_torch_compile_fullgraph_torch_path(monkeypatch, cpu_chunk):
    """dynamo traces the torch path in one graph. Where eager mode would run the CPU apply image by image, the graph
    still has one sigmoid per BAM: under compile the passes are whole-tensor ops for inductor to fuse."""
    from bam_triton import _cpu

    if cpu_chunk is not None:
        monkeypatch.setattr(_cpu, "APPLY_CHUNK_ELEMENTS", cpu_chunk)
    sigmoids = []

    def counting_backend(gm, example_inputs):
        sigmoids.append(sum(node.target in ("sigmoid_", torch.sigmoid, torch.sigmoid_) for node in gm.graph.nodes))
        return gm.forward

    net = _TinyNet("torch").eval()
    x = torch.randn(2, 3, 12, 10)
    compiled = torch.compile(net, fullgraph=True)
    torch.testing.assert_close(compiled(x), net(x), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    with torch.no_grad():  # inference: the apply's ops sit in the graph itself, not in an autograd.Function's
        torch.compile(net, fullgraph=True, backend=counting_backend)(x)
    assert sigmoids == [2]  # two BAMs, one sigmoid each


@pytest.mark.slow_on_gpu
def test_torch_compile_fullgraph_triton_ops_train(device):
    """The Triton path's custom ops (fake impls + registered autograd) compile without a graph break."""
    net = _TinyNet("triton").train().to(device)
    x = torch.randn(2, 3, 12, 10).to(device)
    compiled = torch.compile(net, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    ref = _TinyNet("torch").train().to(device)
    ref_out = ref(x)
    ref_out.sum().backward()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_returns_the_dtype_of_the_surrounding_convs(backend, device):
    net = _TinyNet(backend).to(device)
    x = torch.randn(2, 3, 12, 10).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        feature = torch.relu(net.stem(x))
        out = net.bam1(feature)
    assert feature.dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16
    ref = net.bam1.float()(feature.float())
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    out.float().sum().backward()
