"""The backward Triton kernels of the attention-apply step (kernels/apply_bwd.py) through Triton's CPU interpreter,
against float64 references that torch.autograd computes from the forward formula (never from the backward formulas
the kernels implement): the three launchers, dx with ``dx_extra`` and the pooling gradient folded in, maps
in fp32 and in x's dtype, inputs left untouched, determinism, and every GPU config through the raw jit functions.

Tolerances: dx is stored in x's dtype, so it is held to the package's table ``bam_triton.TOLERANCES`` (fp32 1e-5,
fp16 ~1e-3, bf16 ~1e-2, relative to |ref|). dmc and dms are fp32 sums of up to a few thousand fp32 terms computed
from the (exactly representable) inputs, whatever x's dtype: |err| <= 2e-5·(1 + max|ref|) + 1e-5·|ref|.
"""
import importlib
import zlib

import pytest
import torch

from bam_triton._dtypes import assert_close as check_close

from bam_triton import TOLERANCES
from bam_triton.kernels import _common, apply_bwd, apply_bwd_dx, apply_bwd_reduce
from devices import cpu_only

# Interpreter tests of the kernels on CPU tensors; `make test` runs them in its CPU pass on a GPU machine too. Their
# compiled counterparts: every kept config at every launcher path in test_gpu_readiness.py, and the op, module,
# training and hardening tests, which run on the GPU in the CUDA pass.
pytestmark = cpu_only("interpreter tests of the kernels on CPU tensors (the CPU pass runs them; compiled: "
                      "test_gpu_readiness.py and the device-parametrised op/module tests)")

# ``bam_triton.kernels.apply_bwd`` is the launcher (the package exports it): reach the module through sys.modules.
bwd_mod = importlib.import_module("bam_triton.kernels.apply_bwd")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
COMBINES = ["sum", "product"]
LAYOUTS = [False, True]
LAYOUT_IDS = ["nchw", "channels_last"]
SHAPES = [
    (1, 1, 1, 1),
    (2, 3, 7, 5),  # H != W
    (1, 5, 7, 7),
    (2, 19, 11, 13),  # H·W = 143 and C = 19: ragged on both tile axes
    (2, 32, 14, 14),
    (2, 8, 56, 56),  # H·W = 3136: more than any BLOCK_HW
    (1, 301, 3, 3),  # large C, not a multiple of BLOCK_C: the launcher splits the channels
    (2, 40, 7, 7),  # NCHW: the row-group kernel, K = 4 (fp32) or 8 (fp16/bf16), a ragged last tile of group rows
    (2, 144, 7, 7),  # NCHW fp32: 36 group rows in 3 channel splits of 16, the last one ragged
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
MAP_SUM_TOL = (2e-5, 1e-5)


def _seed(*parts):
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def make_inputs(shape, dtype, channels_last, gen, map_dtype=torch.float32):
    """g and x with the same strides, mc (N, C) and ms (N, H·W) contiguous."""
    n, c, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    g = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    mc = torch.randn(n, c, generator=gen).to(map_dtype)
    ms = torch.randn(n, h * w, generator=gen).to(map_dtype)
    return g, x, mc, ms


def reference(g, x, mc, ms, combine, dpool=None, dx_extra=None):
    """(dx, dmc, dms) in float64 by autograd through ``x·(1 + sigmoid(mc ⊕ ms))`` (plus the channel mean of x
    weighted by ``dpool`` and x weighted by ``dx_extra``, whose gradients are the extra dx terms)."""
    n, c, h, w = x.shape
    x64, mc64, ms64 = (t.detach().double().requires_grad_() for t in (x, mc, ms))
    a, b = mc64.reshape(n, c, 1, 1), ms64.reshape(n, 1, h, w)
    out = x64 * (1 + torch.sigmoid(a + b if combine == "sum" else a * b))
    loss = (out * g.double()).sum()
    if dpool is not None:
        loss = loss + (x64.mean(dim=(2, 3)) * dpool.double()).sum()
    if dx_extra is not None:
        loss = loss + (x64 * dx_extra.double()).sum()
    loss.backward()
    return x64.grad, mc64.grad, ms64.grad


def assert_close(got, ref, atol, rtol):
    check_close(got, ref, atol=atol, rtol=rtol)


def assert_dx(got, ref, like):
    assert got.dtype == like.dtype and got.stride() == like.stride()
    assert_close(got, ref, *TOLERANCES[like.dtype])


def assert_map_grad(got, ref):
    assert got.dtype == torch.float32
    atol, rtol = MAP_SUM_TOL
    assert_close(got, ref, atol * (1 + ref.abs().max().item()), rtol)


def check_all(result, ref, x):
    dx, dmc, dms = result
    assert_dx(dx, ref[0], x)
    assert_map_grad(dmc, ref[1])
    assert_map_grad(dms, ref[2])


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def test_interpreter_is_on():
    assert _common.INTERPRETED, "TRITON_INTERPRET=1 must be set before triton is imported"


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_launchers_match_autograd(shape, dtype, channels_last, combine):
    """apply_bwd (one pass) against autograd; apply_bwd_reduce + apply_bwd_dx give bitwise the same results."""
    g, x, mc, ms = make_inputs(shape, dtype, channels_last, _seed("launchers", shape, dtype, channels_last, combine))
    before = [t.clone() for t in (g, x, mc, ms)]
    ref = reference(g, x, mc, ms, combine)
    dx, dmc, dms = apply_bwd(g, x, mc, ms, combine)
    check_all((dx, dmc, dms), ref, x)
    assert dmc.shape == mc.shape and dms.shape == ms.shape
    dmc2, dms2 = apply_bwd_reduce(g, x, mc, ms, combine)
    dx2 = apply_bwd_dx(g, x, mc, ms, combine)
    assert torch.equal(dmc2, dmc) and torch.equal(dms2, dms) and torch.equal(dx2, dx)
    assert dx2.stride() == x.stride()
    for t, t0 in zip((g, x, mc, ms), before):
        assert torch.equal(t, t0)


@pytest.mark.parametrize("map_dtype", ["fp32", "x"])
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_maps_in_fp32_or_x_dtype(dtype, channels_last, map_dtype):
    shape = (2, 19, 5, 3)
    gen = _seed("maps", dtype, channels_last, map_dtype)
    g, x, mc, ms = make_inputs(shape, dtype, channels_last, gen, torch.float32 if map_dtype == "fp32" else dtype)
    for combine in COMBINES:
        ref = reference(g, x, mc, ms, combine)
        check_all(apply_bwd(g, x, mc, ms, combine), ref, x)
        assert_dx(apply_bwd_dx(g, x, mc, ms, combine), ref[0], x)


@pytest.mark.parametrize("parts", ["dpool+extra", "dpool", "extra"])
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dx_folds_dpool_and_dx_extra(dtype, channels_last, parts):
    """dx = g·(1+s) + dpool/(H·W) + dx_extra, a new tensor in x's layout (every input left untouched, dx_extra
    included: the autotuner runs each config on the same arguments); dpool in fp32 and in x's dtype."""
    shape = (2, 37, 9, 11)
    gen = _seed("fold", dtype, channels_last, parts)
    g, x, mc, ms = make_inputs(shape, dtype, channels_last, gen)
    for combine, dpool_dtype in (("sum", torch.float32), ("product", dtype)):
        dpool = torch.randn(shape[:2], generator=gen).to(dpool_dtype) if "dpool" in parts else None
        extra = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=_fmt(x)) if "extra" in parts \
            else None
        ref = reference(g, x, mc, ms, combine, dpool=dpool, dx_extra=extra)
        inputs = [t for t in (g, x, mc, ms, dpool, extra) if t is not None]
        before = [t.clone() for t in inputs]
        dx = apply_bwd_dx(g, x, mc, ms, combine, dpool=dpool, dx_extra=extra)
        assert all(dx.data_ptr() != t.data_ptr() for t in inputs)
        assert_dx(dx, ref[0], x)
        for t, t0 in zip(inputs, before):
            assert torch.equal(t, t0)


def _fmt(x):
    return torch.channels_last if _common.memory_plan(x).channels_last else torch.contiguous_format


def test_fp64_computes_in_fp64():
    shape = (2, 5, 9, 7)
    gen = _seed("fp64")
    g, x, mc, ms = make_inputs(shape, torch.float64, False, gen, torch.float64)
    dpool = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    for combine in COMBINES:
        ref = reference(g, x, mc, ms, combine, dpool=dpool)
        dx, dmc, dms = apply_bwd(g, x, mc, ms, combine)
        assert dmc.dtype == dms.dtype == torch.float64
        for got, r in zip((dmc, dms), ref[1:]):
            assert_close(got, r, *TOLERANCES[torch.float64])
        assert_close(apply_bwd_dx(g, x, mc, ms, combine, dpool=dpool), ref[0], *TOLERANCES[torch.float64])


@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
def test_deterministic(channels_last):
    """No atomics: two runs are bitwise equal (reductions go through fixed-order partial sums)."""
    shape = (2, 300, 5, 7)  # several channel splits and several hw blocks
    g, x, mc, ms = make_inputs(shape, torch.float16, channels_last, _seed("det", channels_last))
    dpool = torch.randn(2, 300)
    for combine in COMBINES:
        first, second = apply_bwd(g, x, mc, ms, combine), apply_bwd(g, x, mc, ms, combine)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        dx1, dx2 = (apply_bwd_dx(g, x, mc, ms, combine, dpool=dpool) for _ in range(2))
        assert torch.equal(dx1, dx2)


class _GridSpy:
    """Stands in for an autotuned reduce kernel: records each launch's grid (under the pinned config)."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.grids.append(grid(dict(self.kernel.configs[0].kwargs, **kwargs)) if callable(grid) else grid)
            return self.kernel[grid](*args, **kwargs)

        return run

    def __getattr__(self, name):  # keys, arg_names, fn: those of the kernel
        return getattr(self.kernel, name)


def test_channels_split_only_when_programs_are_few(monkeypatch):
    spy = _GridSpy(bwd_mod.apply_bwd_reduce_kernel)
    monkeypatch.setattr(bwd_mod, "apply_bwd_reduce_kernel", spy)
    # One 3x3 image gives a single program per split: the launcher splits C into as many units as it has.
    few_programs_splits = -(-301 // bwd_mod._C_SPLIT_UNIT)
    assert few_programs_splits > 1
    for shape, splits in (((1, 301, 3, 3), few_programs_splits), ((2, 8, 56, 56), 1)):
        g, x, mc, ms = make_inputs(shape, torch.float32, False, _seed("split", shape))
        check_all(apply_bwd(g, x, mc, ms, "product"), reference(g, x, mc, ms, "product"), x)
        assert spy.grids[-1][1] == splits


# ----------------------------------------------------------------------------------------------------------------------
# Every GPU config through the raw jit functions
# ----------------------------------------------------------------------------------------------------------------------

REDUCE_CONFIGS = _common.all_configs("reduce2d")
ELEMENTWISE_CONFIGS = _common.all_configs("elementwise")


def test_reduce_config_list():
    """More than one GPU config; the channel split unit is a multiple of every BLOCK_C, and the dmc partial buffer
    is sized for the smallest BLOCK_HW."""
    assert len(REDUCE_CONFIGS) > 1
    assert all(bwd_mod._C_SPLIT_UNIT % meta["BLOCK_C"] == 0 for meta, _ in REDUCE_CONFIGS)
    assert bwd_mod._MIN_BLOCK_HW == min(meta["BLOCK_HW"] for meta, _ in REDUCE_CONFIGS) >= 32


def _forced_reduce(g, x, mc, ms, combine, config, write_dx):
    """The reduce launchers with ``config`` forced: (dx or None, dmc, dms), and g checked untouched (the kernel gets
    g as its dx pointer when dx is not written)."""
    g_before = g.clone()
    if write_dx:
        dx, dmc, dms = apply_bwd(g, x, mc, ms, combine, config=config)
    else:
        dx, (dmc, dms) = None, apply_bwd_reduce(g, x, mc, ms, combine, config=config)
    assert torch.equal(g, g_before)
    return dx, dmc, dms


def check_forced_reduce(result, ref, x):
    dx, dmc, dms = result
    assert_map_grad(dmc, ref[1])
    assert_map_grad(dms, ref[2])
    if dx is not None:
        assert_dx(dx, ref[0], x)


@pytest.mark.parametrize("config", REDUCE_CONFIGS, ids=_common.config_id)
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
def test_reduce_kernel_every_config(config, channels_last):
    meta, warps = config
    shape = (2, 150, 9, 11)  # H·W = 99, C = 150: ragged on both axes; 3 channel splits of 64, the last ragged
    plan = bwd_mod.reduce_plan(shape, torch.float32, channels_last, "sum", True)
    assert plan.scalars[2] == bwd_mod._C_SPLIT_UNIT and plan.grid[1][0] == 3
    g, x, mc, ms = make_inputs(shape, torch.float32, channels_last, _seed("reduce-cfg", channels_last))
    for combine, write_dx in (("sum", True), ("product", False)):
        ref = reference(g, x, mc, ms, combine)
        check_forced_reduce(_forced_reduce(g, x, mc, ms, combine, config, write_dx), ref, x)


@pytest.mark.parametrize("config", ELEMENTWISE_CONFIGS, ids=_common.config_id)
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
def test_dx_kernel_every_config(config, channels_last):
    meta, warps = config
    shape = (3, 37, 9, 11)  # 10,989 elements: several blocks of every size, a ragged last block
    gen = _seed("dx-cfg", channels_last)
    g, x, mc, ms = make_inputs(shape, torch.float32, channels_last, gen)
    dpool = torch.randn(shape[:2], generator=gen)
    extra = torch.randn(shape, generator=gen).contiguous(memory_format=_fmt(x))
    for combine in COMBINES:
        ref = reference(g, x, mc, ms, combine, dpool=dpool, dx_extra=extra)
        assert_dx(apply_bwd_dx(g, x, mc, ms, combine, dpool=dpool, dx_extra=extra, config=config), ref[0], x)


# ----------------------------------------------------------------------------------------------------------------------
# The row-group kernel (NCHW, H·W not a multiple of 16)
# ----------------------------------------------------------------------------------------------------------------------


ROW_GROUP_SHAPES = [(2, 144, 7, 7), (3, 16, 14, 14), (1, 72, 3, 3)]
# Channel splits the launcher plans for (2, 144, 7, 7) (only as many as keep the dms partials under 1/16 of the bytes
# read): fp32 K = 4 -> 36 group rows in splits of 16 (16, 16, 4); fp64 K = 2 -> 72 rows in 5 (the last 8).
ROW_GROUP_SPLITS = {torch.float32: 3, torch.float64: 5, torch.float16: 1, torch.bfloat16: 1}


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=DTYPE_IDS + ["fp64"])
@pytest.mark.parametrize("shape", ROW_GROUP_SHAPES, ids=["x".join(map(str, s)) for s in ROW_GROUP_SHAPES])
def test_row_group_reduce_runs_and_splits(monkeypatch, shape, dtype):
    """These NCHW maps go to the row-group kernel (split over channels where planned) through both launchers."""
    spy = _GridSpy(bwd_mod.apply_bwd_reduce_rows_kernel)
    monkeypatch.setattr(bwd_mod, "apply_bwd_reduce_rows_kernel", spy)
    g, x, mc, ms = make_inputs(shape, dtype, False, _seed("rows", shape, dtype))
    if dtype == torch.float64:
        g, x, mc, ms = (t.double() for t in (g, x, mc, ms))
    for combine in COMBINES:
        ref = reference(g, x, mc, ms, combine)
        dx, dmc, dms = apply_bwd(g, x, mc, ms, combine)
        if dtype == torch.float64:
            for got, want in zip((dx, dmc, dms), ref):
                assert_close(got, want, 1e-12, 1e-12)
        else:
            check_all((dx, dmc, dms), ref, x)
        assert all(torch.equal(a, b) for a, b in zip(apply_bwd_reduce(g, x, mc, ms, combine), (dmc, dms)))
    assert len(spy.grids) == 4 and len(set(spy.grids)) == 1
    n_images, splits = spy.grids[0]
    assert n_images == shape[0]
    if shape == ROW_GROUP_SHAPES[0]:
        assert splits == ROW_GROUP_SPLITS[dtype]


@pytest.mark.parametrize("config", _common.all_configs("rows"), ids=_common.config_id)
def test_reduce_rows_kernel_every_config(config):
    meta, warps = config
    for dtype, shape in ((torch.float32, (2, 140, 7, 7)), (torch.float16, (2, 40, 7, 7))):
        g, x, mc, ms = make_inputs(shape, dtype, False, _seed("rows-cfg", shape))
        assert bwd_mod.reduce_plan(shape, dtype, False, "sum", True).kernel is bwd_mod.apply_bwd_reduce_rows_kernel
        for combine, write_dx in (("product", True), ("sum", False)):
            ref = reference(g, x, mc, ms, combine)
            check_forced_reduce(_forced_reduce(g, x, mc, ms, combine, config, write_dx), ref, x)
