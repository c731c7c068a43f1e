"""CBAM's steps (``kernels/cbam.py`` and the pooling's WITH_MAX variant through Triton's interpreter; the torch step
set of ``bam_triton/cbam_ops.py``) against float64 formulas written here: every step, both memory formats, fp32 /
fp16 / bf16 / fp64, odd shapes (H·W prime, a 1-pixel-high map, C not a multiple of any tile, 7x7 on the row-group
path, split reductions), ties and NaN in the maxima, and every GPU config of each kernel."""
import zlib

import pytest
import torch

from bam_triton._dtypes import assert_close
from bam_triton.cbam_ops import TorchSteps
from bam_triton import kernels
from bam_triton.kernels import _common, cbam as cbam_kernels, pool as pool_mod
from devices import cpu_only

pytestmark = cpu_only("interpreter tests of CBAM's kernels on CPU tensors (compiled: the CBAM module tests in the "
                      "CUDA run, tests/test_cbam.py)")

STEP_SETS = {"triton": kernels.cbam_steps, "torch": TorchSteps}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
SHAPES = [
    (2, 5, 3, 4),  # small, C odd
    (1, 19, 1, 13),  # a 1-pixel-high map, H·W = 13 (prime), C not a multiple of any channel tile
    (2, 16, 7, 7),  # 7x7: the row-group pooling for NCHW (K = 4 fp32, 8 fp16)
    (1, 2, 48, 48),  # H·W = 2304: the pooling and hw_reduce split H·W
    (1, 130, 2, 3),  # C = 130: channel_reduce splits the channels
    (2, 3, 1, 1),  # 1x1 maps
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
LAYOUTS = ["nchw", "channels_last"]


def _gen(*parts):
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _x(shape, dtype, layout, *seed):
    x = torch.randn(shape, generator=_gen(shape, dtype, layout, *seed)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def _maps(shape, dtype, *seed):
    """a (N, C) in (0, 1), b (N, H·W) in (0, 1), as the sigmoids give them."""
    n, c, h, w = shape
    gen = _gen(shape, *seed)
    return torch.rand(n, c, generator=gen).to(dtype), torch.rand(n, h * w, generator=gen).to(dtype)


def _check_argmax(index, values, maxima, dim, what):
    """``index`` points at a maximal element of ``values`` along ``dim`` (near-ties may resolve either way once
    rounded; exact ties are tested separately)."""
    picked = values.gather(dim, index.long().unsqueeze(dim)).squeeze(dim)
    assert_close(picked, maxima, torch.float64, what=what, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# Forward steps
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("steps", sorted(STEP_SETS))
def test_pool_mean_max_argmax(steps, shape, dtype, layout):
    x = _x(shape, dtype, layout, "pool")
    avg, mx, argmax = STEP_SETS[steps].pool(x)
    x64 = x.double().flatten(2)
    assert avg.dtype == mx.dtype == dtype and avg.shape == mx.shape == argmax.shape == shape[:2]
    assert_close(avg, x64.mean(dim=2), what="avg")
    assert_close(mx, x64.amax(dim=2), what="max")
    _check_argmax(argmax, x64, x64.amax(dim=2), 2, "argmax over H·W")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("steps", sorted(STEP_SETS))
def test_spatial_pool_max_mean_over_channels_of_x_times_a(steps, shape, dtype, layout):
    n, c, h, w = shape
    x = _x(shape, dtype, layout, "spatial")
    a, _ = _maps(shape, dtype, "spatial")
    s, argmax = STEP_SETS[steps].spatial_pool(x, a)
    x1 = (x.double() * a.double()[:, :, None, None]).flatten(2)
    assert s.shape == (n, 2, h, w) and s.dtype == dtype and argmax.shape == (n, h * w)
    # The kernels multiply in fp32 (the torch steps round x·a to x's dtype, as the authors' code does).
    assert_close(s[:, 0].reshape(n, -1), x1.amax(dim=1), what="max over C")
    assert_close(s[:, 1].reshape(n, -1), x1.mean(dim=1), what="mean over C")
    _check_argmax(argmax, x1.to(dtype).double() if steps == "torch" else x1, s[:, 0].reshape(n, -1).double()
                  if steps == "torch" else x1.amax(dim=1), 1, "argmax over C")


@pytest.mark.parametrize("with_b", [True, False], ids=["x·a·b", "x·a"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
@pytest.mark.parametrize("steps", sorted(STEP_SETS))
def test_apply(steps, shape, dtype, layout, with_b):
    n, c, h, w = shape
    x = _x(shape, dtype, layout, "apply")
    a, b = _maps(shape, torch.float32, "apply")
    out = STEP_SETS[steps].apply(x, a, b if with_b else None)
    want = x.double() * a.double()[:, :, None, None] * (b.double().reshape(n, 1, h, w) if with_b else 1)
    assert out.dtype == dtype and out.stride() == x.stride()
    # The torch steps round x·a before multiplying by b (two roundings), the kernel once.
    assert_close(out, want, what="x·a·b", scale_atol=steps == "torch")


# ----------------------------------------------------------------------------------------------------------------------
# Backward steps
# ----------------------------------------------------------------------------------------------------------------------


def _pixel_grads(shape, dtype, *seed):
    """argmax_c (valid channels), dmax_c, dmean_c (N, H·W)."""
    n, c, h, w = shape
    gen = _gen(shape, "pixel", *seed)
    return (torch.randint(0, c, (n, h * w), generator=gen, dtype=torch.int32),
            torch.randn(n, h * w, generator=gen).to(dtype), torch.randn(n, h * w, generator=gen).to(dtype))


def _dy64(g, b, argmax_c, dmax_c, dmean_c):
    n, c, h, w = g.shape
    dy = g.double().reshape(n, c, h * w)
    if b is None:
        return dy
    route = torch.zeros(n, c, h * w, dtype=torch.float64).scatter(1, argmax_c.long()[:, None], dmax_c.double()[:, None])
    return dy * b.double()[:, None] + route + dmean_c.double()[:, None] / c


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("steps", sorted(STEP_SETS))
def test_grad_b(steps, shape, dtype, layout):
    n, c, h, w = shape
    x, g = _x(shape, dtype, layout, "x"), _x(shape, dtype, layout, "g")
    a, _ = _maps(shape, dtype, "grad_b")
    got = STEP_SETS[steps].grad_b(g, x, a)
    want = (g.double() * x.double() * a.double()[:, :, None, None]).sum(dim=1).reshape(n, h * w)
    assert got.shape == (n, h * w) and got.dtype == torch.promote_types(dtype, torch.float32)
    assert_close(got, want, dtype, what="db", scale_atol=True)


@pytest.mark.parametrize("spatial", [True, False], ids=["spatial", "no_spatial"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("steps", sorted(STEP_SETS))
def test_grad_a(steps, shape, dtype, layout, spatial):
    n, c, h, w = shape
    x, g = _x(shape, dtype, layout, "x"), _x(shape, dtype, layout, "g")
    _, b = _maps(shape, dtype, "grad_a")
    argmax_c, dmax_c, dmean_c = _pixel_grads(shape, dtype, "grad_a") if spatial else (None, None, None)
    b = b if spatial else None
    got = STEP_SETS[steps].grad_a(g, x, b, argmax_c, dmax_c, dmean_c)
    want = (_dy64(g, b, argmax_c, dmax_c, dmean_c) * x.double().reshape(n, c, h * w)).sum(dim=2)
    assert got.shape == (n, c)
    assert_close(got, want, dtype, what="da", scale_atol=True)


GRAD_X_CASES = {
    "all": dict(spatial=True, d_avg=True, d_max=True, extra=True),
    "no_spatial": dict(spatial=False, d_avg=True, d_max=True, extra=False),
    "avg_only": dict(spatial=True, d_avg=True, d_max=False, extra=False),
    "max_only": dict(spatial=True, d_avg=False, d_max=True, extra=False),
}


@pytest.mark.parametrize("case", sorted(GRAD_X_CASES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=SHAPE_IDS[:4])
@pytest.mark.parametrize("steps", sorted(STEP_SETS))
def test_grad_x(steps, shape, dtype, layout, case):
    n, c, h, w = shape
    parts = GRAD_X_CASES[case]
    g = _x(shape, dtype, layout, "g")
    a, b = _maps(shape, dtype, "grad_x")
    argmax_c, dmax_c, dmean_c = _pixel_grads(shape, dtype, "grad_x")
    gen = _gen(shape, "grad_x-channel")
    d_avg, d_max = torch.randn(n, c, generator=gen).to(dtype), torch.randn(n, c, generator=gen).to(dtype)
    argmax_hw = torch.randint(0, h * w, (n, c), generator=gen, dtype=torch.int32)
    extra = _x(shape, dtype, layout, "extra")
    if not parts["spatial"]:
        b = argmax_c = dmax_c = dmean_c = None
    got = STEP_SETS[steps].grad_x(g, a, b, argmax_c, dmax_c, dmean_c, d_avg if parts["d_avg"] else None,
                                  d_max if parts["d_max"] else None, argmax_hw if parts["d_max"] else None,
                                  extra if parts["extra"] else None)
    want = _dy64(g, b, argmax_c, dmax_c, dmean_c) * a.double()[:, :, None]
    if parts["d_avg"]:
        want = want + d_avg.double()[:, :, None] / (h * w)
    if parts["d_max"]:
        want = want + torch.zeros_like(want).scatter(2, argmax_hw.long()[:, :, None], d_max.double()[:, :, None])
    if parts["extra"]:
        want = want + extra.double().reshape(n, c, h * w)
    assert got.dtype == dtype and got.stride() == g.stride()
    assert_close(got, want.reshape(shape), what="dx")


# ----------------------------------------------------------------------------------------------------------------------
# Ties and NaN go where torch's CPU max sends them
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 16, 7, 7), (1, 2, 48, 48), (1, 130, 2, 3)],
                         ids=["5x7", "7x7-rows", "hw-split", "c-split"])
@pytest.mark.parametrize("steps", sorted(STEP_SETS))
def test_ties_go_to_the_first_maximum_like_torch_max(steps, shape, layout):
    """Small integers make exact ties everywhere: the argmax is the first maximal position (over H·W) and channel
    (over C), what ``torch.max(dim)`` returns on CPU, also across split partials and group rows."""
    x = torch.randint(0, 3, shape, generator=_gen("ties", shape)).float()
    x = x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    _, _, argmax_hw = STEP_SETS[steps].pool(x)
    assert torch.equal(argmax_hw.long(), x.flatten(2).max(dim=2).indices)
    a = torch.ones(shape[:2])
    _, argmax_c = STEP_SETS[steps].spatial_pool(x, a)
    assert torch.equal(argmax_c.long(), x.max(dim=1).indices.flatten(1))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("steps", sorted(STEP_SETS))
def test_nan_propagates_into_the_maxima_and_mean(steps, layout):
    shape = (2, 6, 5, 7)
    x = torch.randn(shape, generator=_gen("nan"))
    x[0, 1, 2, 3] = x[0, 1, 4, 0] = float("nan")
    x[1, :, 1, 1] = float("inf")
    x = x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    avg, mx, argmax_hw = STEP_SETS[steps].pool(x)
    assert mx[0, 1].isnan() and avg[0, 1].isnan() and argmax_hw[0, 1] == 2 * 7 + 3  # the first NaN
    assert not mx[0, 0].isnan() and mx[1].isinf().all()
    s, argmax_c = STEP_SETS[steps].spatial_pool(x, torch.ones(shape[:2]))
    assert s[0, 0, 2, 3].isnan() and s[0, 1, 2, 3].isnan() and argmax_c[0, 2 * 7 + 3] == 1
    assert s[1, 0, 1, 1] == float("inf") and argmax_c[1, 7 + 1] == 0
    assert not s[0, :, 0, 0].isnan().any()


# ----------------------------------------------------------------------------------------------------------------------
# Every GPU config of every CBAM kernel
# ----------------------------------------------------------------------------------------------------------------------


def _every_config_cases():
    cases = []
    for kind, launcher in (("pool", "pool"), ("rows", "pool-rows"), ("reduce2d", "spatial_pool"),
                           ("reduce2d", "grad_b"), ("pool", "grad_a"), ("elementwise", "apply"),
                           ("elementwise", "grad_x")):
        for index, config in enumerate(_common.all_configs(kind)):
            cases.append(pytest.param(launcher, config, id=f"{launcher}-{_common.config_id(config)}"))
    return cases


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("launcher, config", _every_config_cases())
def test_every_config(launcher, config, layout):
    # H·W = 32 keeps NCHW pooling on the 2D tiles (a multiple of 16); the others see an H·W tail.
    shape = {"pool-rows": (2, 16, 7, 7), "pool": (2, 19, 4, 8)}.get(launcher, (2, 20, 5, 9))
    if launcher == "pool-rows" and layout == "channels_last":
        pytest.skip("the row-group pooling runs on NCHW only")
    n, c, h, w = shape
    x, g = _x(shape, torch.float32, layout, "cfg-x"), _x(shape, torch.float32, layout, "cfg-g")
    a, b = _maps(shape, torch.float32, "cfg")
    argmax_c, dmax_c, dmean_c = _pixel_grads(shape, torch.float32, "cfg")
    if launcher.startswith("pool"):
        plan = kernels.channel_pool_plan(shape, torch.float32, layout == "channels_last", None, True)
        assert plan.kernel is (pool_mod.channel_pool_rows_kernel if launcher == "pool-rows"
                               else pool_mod.channel_pool_kernel)
        avg, mx, _ = cbam_kernels.pool(x, config=config)
        assert_close(avg, x.double().mean(dim=(2, 3)), what="avg")
        assert_close(mx, x.double().amax(dim=(2, 3)), what="max")
    elif launcher == "spatial_pool":
        s, _ = cbam_kernels.spatial_pool(x, a, config=config)
        want = TorchSteps.spatial_pool(x.double(), a.double())[0]
        assert_close(s, want, what="s")
    elif launcher == "grad_b":
        assert_close(cbam_kernels.grad_b(g, x, a, config=config), TorchSteps.grad_b(g.double(), x.double(), a.double()),
                     what="db")
    elif launcher == "grad_a":
        got = cbam_kernels.grad_a(g, x, b, argmax_c, dmax_c, dmean_c, config=config)
        assert_close(got, TorchSteps.grad_a(g.double(), x.double(), b.double(), argmax_c, dmax_c.double(),
                                            dmean_c.double()), what="da", scale_atol=True)
    elif launcher == "apply":
        assert_close(cbam_kernels.apply(x, a, b, config=config), TorchSteps.apply(x.double(), a.double(), b.double()),
                     what="out")
    else:
        d_avg, d_max = a * 2, a - 0.5
        argmax_hw = torch.randint(0, h * w, (n, c), generator=_gen("cfg-hw"), dtype=torch.int32)
        got = cbam_kernels.grad_x(g, a, b, argmax_c, dmax_c, dmean_c, d_avg, d_max, argmax_hw, x, config=config)
        want = TorchSteps.grad_x(g.double(), a.double(), b.double(), argmax_c, dmax_c.double(), dmean_c.double(),
                                 d_avg.double(), d_max.double(), argmax_hw, x.double())
        assert_close(got, want, what="dx")


def test_plans_name_what_each_launch_writes_and_leaves_untouched():
    """The plans' ``writes`` and ``unused`` are what ``bam-triton traffic`` charges: absent inputs are never read."""
    spatial = kernels.channel_reduce_plan((2, 64, 8, 8), torch.float16, False, False)
    db = kernels.channel_reduce_plan((2, 64, 8, 8), torch.float16, False, True)
    assert spatial.writes == ("sum_ptr", "max_ptr", "argmax_ptr") and spatial.unused == ("g_ptr",)
    assert db.writes == ("sum_ptr",) and set(db.unused) == {"max_ptr", "argmax_ptr"}
    no_spatial = kernels.hw_reduce_plan((2, 64, 8, 8), torch.float16, False, False)
    assert set(no_spatial.unused) == {"b_ptr", "argmax_c_ptr", "dmax_c_ptr", "dmean_c_ptr"}
    dx = kernels.grad_x_plan((2, 64, 8, 8), torch.float16, True, True, True, False, False)
    assert set(dx.unused) == {"d_max_ptr", "argmax_hw_ptr", "extra_ptr"} and dx.writes == ("dx_ptr",)
    pool = kernels.channel_pool_plan((2, 64, 8, 8), torch.float16, False, None, True)
    assert pool.writes == ("out_ptr", "max_ptr", "argmax_ptr") and not pool.unused
    assert set(kernels.channel_pool_plan((2, 64, 8, 8), torch.float16, False).unused) == {"max_ptr", "argmax_ptr"}
