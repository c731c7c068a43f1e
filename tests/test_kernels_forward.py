"""The forward Triton kernels (channel pooling, fused attention-apply) through Triton's CPU interpreter, against
float64 references written here: through the public ops (``backend="triton"``), through the launchers in
``bam_triton.kernels``, and through the raw jit functions with every GPU config of ``kernels._common.all_configs``."""
import dataclasses
import unittest.mock
import zlib

import pytest
import torch

from bam_triton._dtypes import assert_close as check_close
import triton

import bam_triton
from bam_triton import bam_apply, channel_pool
from bam_triton import kernels
from bam_triton.kernels import _common
from bam_triton.kernels import apply as apply_mod
from bam_triton.kernels import pool as pool_mod
from reference import ref_apply
from devices import cpu_only

# Interpreter tests of the kernels on CPU tensors; `make test` runs them in its CPU pass on a GPU machine too. Their
# compiled counterparts: every kept config at every launcher path in test_gpu_readiness.py, and the op, module,
# training and hardening tests, which run on the GPU in the CUDA pass.
pytestmark = cpu_only("interpreter tests of the kernels on CPU tensors (the CPU pass runs them; compiled: "
                      "test_gpu_readiness.py and the device-parametrised op/module tests)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
LAYOUTS = ["nchw", "channels_last", "slice_c", "slice_w", "channels_last_slice_w"]
COMBINES = ["sum", "product"]

SHAPES = [
    (2, 3, 7, 5),  # H != W, H·W = 35 (odd)
    (1, 1, 7, 7),  # N = 1, C = 1, 7x7
    (3, 5, 1, 1),  # 1x1 maps
    (2, 19, 11, 13),  # H·W = 143: not a multiple of any block size, C not a multiple of any channel block
    (1, 600, 3, 3),  # large C
    (1, 2, 48, 48),  # H·W = 2304 > 1024: the pooling splits H·W (few base programs)
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def _seed(*parts):
    """A generator seeded from the test's parameters (stable across processes, unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


# ----------------------------------------------------------------------------------------------------------------------
# Helpers: inputs, float64 references, the tolerance check
# ----------------------------------------------------------------------------------------------------------------------


def make_x(shape, dtype, layout, gen):
    """A (N, C, H, W) tensor of ``shape`` in the given layout; the slice layouts are non-dense views."""
    n, c, h, w = shape
    if layout == "nchw":
        return torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":
        return torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "slice_c":
        return torch.randn(n, 2 * c, h, w, generator=gen).to(dtype)[:, ::2]
    if layout == "slice_w":
        return torch.randn(n, c, h, w + 1, generator=gen).to(dtype)[..., 1:]
    if layout == "channels_last_slice_w":
        base = torch.randn(n, c, h, w + 1, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
        return base[..., 1:]
    raise AssertionError(layout)


def expected_memory_format(layout):
    """The layout the output must be dense in: the input's, or for a view the dense format it resembles."""
    return torch.channels_last if layout.startswith("channels_last") else torch.contiguous_format


def make_maps(shape, gen, form="flat", dtype=torch.float32):
    """mc, ms logits: ``flat`` = (N, C) and (N, H, W); ``4d`` = (N, C, 1, 1) and (N, 1, H, W)."""
    n, c, h, w = shape
    mc, ms = torch.randn(n, c, generator=gen), torch.randn(n, h, w, generator=gen)
    if form == "4d":
        mc, ms = mc.reshape(n, c, 1, 1), ms.reshape(n, 1, h, w)
    return mc.to(dtype), ms.to(dtype)


def ref_pool(x):
    return x.double().mean(dim=(2, 3))


def assert_close(got, ref, dtype):
    """|got - ref| <= atol + rtol·|ref| with the package's tolerance table; ``ref`` is float64."""
    assert ref.dtype == torch.float64
    assert got.dtype == dtype, f"dtype {got.dtype}, expected {dtype}"
    check_close(got, ref, dtype)


def assert_dense_in(t, memory_format):
    assert t.is_contiguous(memory_format=memory_format), f"strides {t.stride()} not dense in {memory_format}"


class LaunchSpy:
    """Stands in for an autotuned kernel: records each launch's grid (evaluated with the interpreter's pinned config)
    and keyword arguments, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = dict(self.kernel.configs[0].kwargs, **kwargs)
            self.launches.append((grid(meta) if callable(grid) else grid, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch

    def __getattr__(self, name):  # keys, arg_names, fn: those of the kernel
        return getattr(self.kernel, name)


def test_interpreter_is_on():
    assert kernels.INTERPRETED, "tests/conftest.py must set TRITON_INTERPRET=1 before triton is imported"


# ----------------------------------------------------------------------------------------------------------------------
# Channel pooling
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_channel_pool_op(shape, dtype, layout):
    x = make_x(shape, dtype, layout, _seed("pool", shape, dtype, layout))
    x_before = x.clone()
    got = channel_pool(x, backend="triton")
    assert_close(got, ref_pool(x), dtype)
    assert got.shape == shape[:2]
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(2, 19, 11, 13), (1, 2, 48, 48)], ids=["2x19x11x13", "1x2x48x48"])
def test_channel_pool_launcher(shape, dtype, channels_last):
    x = make_x(shape, dtype, "channels_last" if channels_last else "nchw", _seed("pool-launcher", shape, dtype))
    assert kernels.memory_plan(x).channels_last == (channels_last and shape[1] > 1)
    got = kernels.channel_pool_fwd(x, kernels.memory_plan(x).channels_last)
    assert_close(got, ref_pool(x), dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_channel_pool_splits_hw_when_few_programs(monkeypatch, dtype, channels_last):
    """(1, 2, 48, 48): one image, one channel block, H·W = 2304 -> the launcher splits H·W over grid[1] and sums the
    fp32 partials; a small map does not split. Both give the right mean."""
    spy = LaunchSpy(pool_mod.channel_pool_kernel)
    monkeypatch.setattr(pool_mod, "channel_pool_kernel", spy)
    layout = "channels_last" if channels_last else "nchw"
    x = make_x((1, 2, 48, 48), dtype, layout, _seed("split", dtype, layout))
    assert_close(channel_pool(x, backend="triton"), ref_pool(x), dtype)
    (grid, kwargs), = spy.launches
    assert grid[1] == triton.cdiv(48 * 48, _common.POOL_SPLIT_UNIT) == 3
    assert kwargs["CHANNELS_LAST"] == channels_last

    small = make_x((2, 3, 7, 5), dtype, layout, _seed("nosplit", dtype, layout))
    assert_close(channel_pool(small, backend="triton"), ref_pool(small), dtype)
    assert spy.launches[1][0][1] == 1


# NCHW maps whose H·W is not a multiple of 16 go to the row-group kernel; K channels per group row depend on the
# dtype (16-byte rows): fp32 196 -> 1, 49 -> 4, 9 -> 4; fp16/bf16 196 -> 2, 49 -> 8, 9 -> 8; fp64 49 -> 2.
ROW_GROUP_SHAPES = [(3, 16, 14, 14), (2, 40, 7, 7), (1, 72, 3, 3), (2, 8, 1, 1)]


def test_row_group_choice():
    row_group = _common.row_group
    assert [row_group(1024, 196, 4), row_group(1024, 196, 2), row_group(2048, 49, 4), row_group(2048, 49, 2)] == \
        [1, 2, 4, 8]
    assert row_group(64, 49, 8) == 2  # fp64
    assert row_group(256, 3136, 2) is None and row_group(512, 784, 4) is None  # H·W % 16 == 0: 2D tiles vectorise
    assert row_group(20, 49, 2) is None  # C not a multiple of K = 8
    assert row_group(64, 1999, 2) is None  # 8 x 1999 elements: longer than one tile row
    assert row_group(64, 225, 2) == 8 and 8 * 225 <= _common.MAX_GROUP_ROW


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=DTYPE_IDS + ["fp64"])
@pytest.mark.parametrize("shape", ROW_GROUP_SHAPES, ids=["x".join(map(str, s)) for s in ROW_GROUP_SHAPES])
def test_channel_pool_row_group_kernel(monkeypatch, shape, dtype):
    """The row-group kernel is what runs for these NCHW maps, with the launcher's K, and gives the mean."""
    kernel = pool_mod.channel_pool_rows_kernel
    spy = LaunchSpy(kernel)
    monkeypatch.setattr(pool_mod, "channel_pool_rows_kernel", spy)
    x = make_x(shape, dtype, "nchw", _seed("pool-rows", shape, dtype))
    assert_close(channel_pool(x, backend="triton"), ref_pool(x), dtype)
    (grid, kwargs), = spy.launches
    n, c, h, w = shape
    group = _common.row_group(c, h * w, x.element_size())
    assert kwargs["GROUP"] == group and kwargs["HW"] == h * w
    assert grid == (n * triton.cdiv(c // group, kernel.configs[0].kwargs["BLOCK_R"]),)


@pytest.mark.parametrize("config", _common.all_configs("rows"), ids=_common.config_id)
def test_channel_pool_row_group_kernel_every_config(config):
    for dtype, shape in ((torch.float32, (2, 140, 7, 7)), (torch.float16, (2, 40, 7, 7))):
        x = make_x(shape, dtype, "nchw", _seed("pool-rows-cfg", shape))
        assert kernels.channel_pool_plan(shape, dtype, False).kernel is pool_mod.channel_pool_rows_kernel
        assert_close(kernels.channel_pool_fwd(x, False, config=config), ref_pool(x), dtype)


def test_channel_pool_fp64_accumulates_in_fp64():
    x = make_x((2, 5, 9, 7), torch.float64, "nchw", _seed("pool64"))
    assert_close(channel_pool(x, backend="triton"), ref_pool(x), torch.float64)


# ----------------------------------------------------------------------------------------------------------------------
# Fused apply, forward
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_bam_apply_op(shape, dtype, layout, combine):
    gen = _seed("apply", shape, dtype, layout, combine)
    x = make_x(shape, dtype, layout, gen)
    mc, ms = make_maps(shape, gen)
    before = [t.clone() for t in (x, mc, ms)]
    got = bam_apply(x, mc, ms, combine=combine, backend="triton")
    assert_close(got, ref_apply(x, mc, ms, combine), dtype)
    assert_dense_in(got, expected_memory_format(layout))
    for t, t0 in zip((x, mc, ms), before):
        assert torch.equal(t, t0)


@pytest.mark.parametrize("map_dtype", ["fp32", "x"])
@pytest.mark.parametrize("form", ["flat", "4d"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bam_apply_map_shapes_and_dtypes(dtype, layout, form, map_dtype):
    """mc as (N, C) or (N, C, 1, 1), ms as (N, H, W) or (N, 1, H, W), in fp32 or in x's dtype."""
    shape = (2, 6, 5, 3)
    gen = _seed("maps", dtype, layout, form, map_dtype)
    x = make_x(shape, dtype, layout, gen)
    mc, ms = make_maps(shape, gen, form, torch.float32 if map_dtype == "fp32" else dtype)
    before = [t.clone() for t in (x, mc, ms)]
    for combine in COMBINES:
        got = bam_apply(x, mc, ms, combine=combine, backend="triton")
        assert_close(got, ref_apply(x, mc, ms, combine), dtype)
        assert_dense_in(got, expected_memory_format(layout))
    for t, t0 in zip((x, mc, ms), before):
        assert torch.equal(t, t0)


def test_bam_apply_combine_modes_differ():
    """Guards the references against a combine flag that is silently ignored."""
    shape = (2, 4, 3, 3)
    gen = _seed("combine-differ")
    x, (mc, ms) = make_x(shape, torch.float32, "nchw", gen), make_maps(shape, gen)
    s = bam_apply(x, mc, ms, combine="sum", backend="triton")
    p = bam_apply(x, mc, ms, combine="product", backend="triton")
    assert (s - p).abs().max() > 1e-2


def test_bam_apply_fp64_computes_in_fp64():
    shape = (2, 5, 9, 7)
    gen = _seed("apply64")
    x = make_x(shape, torch.float64, "nchw", gen)
    mc, ms = make_maps(shape, gen, dtype=torch.float64)
    for combine in COMBINES:
        assert_close(bam_apply(x, mc, ms, combine=combine, backend="triton"), ref_apply(x, mc, ms, combine),
                     torch.float64)


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_apply_launcher(dtype, channels_last, combine):
    """``kernels.apply_fwd`` with (N, C) and (N, H·W) maps returns x's dtype and memory format."""
    shape = (3, 37, 9, 11)
    gen = _seed("apply-launcher", dtype, channels_last, combine)
    x = make_x(shape, dtype, "channels_last" if channels_last else "nchw", gen)
    mc, ms = make_maps(shape, gen)
    got = kernels.apply_fwd(x, mc, ms.reshape(3, 99), combine)
    assert_close(got, ref_apply(x, mc, ms, combine), dtype)
    assert_dense_in(got, torch.channels_last if channels_last else torch.contiguous_format)


# ----------------------------------------------------------------------------------------------------------------------
# Every GPU config through the raw jit functions
# ----------------------------------------------------------------------------------------------------------------------

POOL_CONFIGS = _common.all_configs("pool")
ELEMENTWISE_CONFIGS = _common.all_configs("elementwise")


def test_config_lists_are_the_gpu_lists():
    """The interpreter pins one config; the GPU lists hold more, and every pool BLOCK_HW divides the split unit."""
    assert len(POOL_CONFIGS) > 1 and len(ELEMENTWISE_CONFIGS) > 1
    assert all(_common.POOL_SPLIT_UNIT % meta["BLOCK_HW"] == 0 for meta, _ in POOL_CONFIGS)
    assert max(meta["BLOCK"] for meta, _ in ELEMENTWISE_CONFIGS) == _common.MAX_BLOCK


@pytest.mark.parametrize("config", POOL_CONFIGS, ids=_common.config_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape,n_splits", [((2, 37, 5, 7), 1), ((1, 5, 33, 35), 2)], ids=["2x37x5x7", "1x5x33x35-split"])
def test_pool_kernel_every_config(config, channels_last, shape, n_splits):
    plan = kernels.channel_pool_plan(shape, torch.float32, channels_last)
    assert plan.kernel is pool_mod.channel_pool_kernel and plan.buffer("out")[0][1] == n_splits
    x = make_x(shape, torch.float32, "channels_last" if channels_last else "nchw", _seed("pool-cfg", shape))
    assert_close(kernels.channel_pool_fwd(x, channels_last, config=config), ref_pool(x), torch.float32)


def _raw_apply(x, mc, ms, combine, meta, warps, index_64=False):
    """The apply launcher with config (meta, warps) forced, and 64-bit indices forced on with ``index_64``."""
    n, c, h, w = x.shape
    real_plan = _common.layout_plan  # what flat_plan reads INDEX_64 from
    forced = (lambda *a: dataclasses.replace(real_plan(*a), index_64=True)) if index_64 else real_plan
    with unittest.mock.patch.object(_common, "layout_plan", forced):
        _common.forget_plans()  # plans are memoised: make this one with the forced layout plan, and forget it after
        try:
            return kernels.apply_fwd(x, mc, ms.reshape(n, h * w), combine, config=(meta, warps))
        finally:
            _common.forget_plans()


@pytest.mark.parametrize("config", ELEMENTWISE_CONFIGS, ids=_common.config_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_apply_kernel_every_config(config, channels_last):
    meta, warps = config
    shape = (3, 37, 9, 11)  # 10,989 elements: several blocks of every size, a ragged last block
    gen = _seed("apply-cfg", channels_last)
    x = make_x(shape, torch.float32, "channels_last" if channels_last else "nchw", gen)
    mc, ms = make_maps(shape, gen)
    for combine in COMBINES:
        assert_close(_raw_apply(x, mc, ms, combine, meta, warps), ref_apply(x, mc, ms, combine), torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# 64-bit indices
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_apply_kernel_index_64_gives_the_same_result(channels_last):
    shape = (2, 7, 5, 3)
    gen = _seed("idx64", channels_last)
    x = make_x(shape, torch.float32, "channels_last" if channels_last else "nchw", gen)
    mc, ms = make_maps(shape, gen)
    meta, warps = ELEMENTWISE_CONFIGS[0]
    out32 = _raw_apply(x, mc, ms, "product", meta, warps, index_64=False)
    out64 = _raw_apply(x, mc, ms, "product", meta, warps, index_64=True)
    assert torch.equal(out32, out64)
    assert_close(out64, ref_apply(x, mc, ms, "product"), torch.float32)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_memory_plan_switches_to_64_bit_indices(memory_format):
    """index_64 turns on exactly at numel + MAX_BLOCK >= 2**31 (meta tensors: nothing is allocated)."""
    limit = 2**31 - _common.MAX_BLOCK

    def plan(numel):
        # (2, C, 1, W) with a few channels so channels_last is a distinct layout.
        assert numel % 2 == 0
        shape = (2, 2, 1, numel // 4) if numel % 4 == 0 else (2, 1, 1, numel // 2)
        t = torch.empty(shape, device="meta", memory_format=memory_format)
        assert t.numel() == numel
        return _common.memory_plan(t)

    assert limit % 4 == 0
    assert not plan(limit - 4).index_64
    assert plan(limit).index_64
    assert plan(limit + 4).index_64
    assert not plan(2**20).index_64
    assert plan(limit).channels_last == (memory_format == torch.channels_last)
    # An expanded (stride-0) view of one element: numel counts, not storage.
    assert _common.memory_plan(torch.zeros(1, 1, 1, 1).expand(2, 2, 2**15, 2**15)).index_64


def test_apply_launcher_passes_index_64_from_the_plan(monkeypatch):
    """The launcher launches with INDEX_64 = plan.index_64: forced on for a small tensor, the result is unchanged."""
    spy = LaunchSpy(apply_mod.apply_fwd_kernel)
    monkeypatch.setattr(apply_mod, "apply_fwd_kernel", spy)
    shape = (2, 3, 4, 5)
    gen = _seed("plan64")
    x = make_x(shape, torch.float32, "nchw", gen)
    mc, ms = make_maps(shape, gen)
    ref = ref_apply(x, mc, ms, "sum")
    assert_close(kernels.apply_fwd(x, mc, ms.reshape(2, 20), "sum"), ref, torch.float32)
    assert spy.launches[-1][1]["INDEX_64"] is False

    real_plan = _common.layout_plan  # what flat_plan reads INDEX_64 from
    monkeypatch.setattr(_common, "layout_plan", lambda *a: dataclasses.replace(real_plan(*a), index_64=True))
    _common.forget_plans()  # plans are memoised: make it again with the forced layout plan
    assert_close(kernels.apply_fwd(x, mc, ms.reshape(2, 20), "sum"), ref, torch.float32)
    assert spy.launches[-1][1]["INDEX_64"] is True


def test_package_exports_the_launchers():
    assert callable(kernels.apply_fwd) and callable(kernels.channel_pool_fwd) and callable(kernels.memory_plan)
    assert bam_triton.TOLERANCES is bam_triton._dtypes.TOLERANCES
