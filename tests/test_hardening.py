"""Hardening: property-based agreement with float64 over random shapes, dtypes and layouts; special values (NaN, ±inf,
huge logits, -0.0, subnormals) against the torch path; threads; and the text of every error a user can trigger.

The tensors live on the device of this run (``TEST_DEVICE``, tests/devices.py; the hypothesis tests cannot take a
fixture): on CPU the Triton kernels run through Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``),
on CUDA compiled. Random values are drawn on CPU and moved, so both runs check the same inputs.

Tolerances are ``bam_triton.TOLERANCES`` (``|got - ref| <= atol + rtol·|ref|`` against float64). dx and the forward
outputs are held to the table for their own dtype. dmc and dms are fp32 sums of many terms (returned in the maps'
dtype), whose rounding scales with the terms rather than with a possibly cancelled result, so their atol is scaled by
``1 + max|ref|`` (as in tests/test_kernel_apply_bwd.py).

Special values, what the interpreter does and where the backends differ (found while writing these tests):

- NaN and ±inf in x, mc, ms and in the incoming gradient propagate to the same positions with the same signs on both
  paths, with one documented exception: where x (forward) or g (backward dx) is ±inf and sigmoid(mc ⊕ ms) is exactly 0
  (the logit is -inf or below about -88 in fp32, where exp overflows), the kernels give ±inf, the value of the
  documented formula ``x·(1 + 0)``, while the torch path gives NaN: it computes ``x + x·s`` with one fused
  ``addcmul`` (fewer passes over memory on CPU) and ``inf·0`` is NaN. The kernels are right (``s`` = 0 stands for
  an underflowed positive number, for which ``x + x·s`` = ±inf too); the torch path keeps its one-pass form and the
  test pins the difference to exactly those positions. With maps in fp16 the torch path also rounds s to fp16, where
  it is 0 for any logit below about -17.3 and 1 above about 8.3 while the kernels' fp32 s·(1-s) is still positive:
  an infinite x or g then gives the kernels da = ±inf (right: the slope is positive) and the torch path inf·0 = NaN,
  so the dmc row and dms column holding that term are NaN on the torch path and ±inf or NaN in the kernels. The
  test exempts exactly those entries (and checks they are NaN, resp. not finite).
- Fixed: the backward reduction kernel let masked-out tile lanes (ragged C or H·W tails, which load 0 for the maps)
  into the dmc/dms sums: a valid mc = ±inf met a masked ms = 0 in ``combine="product"`` and inf·0 = NaN reached
  dmc[n, c] (likewise dms for ms = ±inf), where torch gives the finite sum. Masked lanes are now selected out.
- Fixed: the torch path's backward formed g·x in x's dtype first, so for fp16 any |g·x| > 65504 (a loss-scaled
  gradient times an activation of 10 is enough) overflowed to inf and dmc/dms became inf/NaN although
  da = g·x·s·(1-s) is at most |g·x| / 4; it now forms g·s·(1-s) first (in the maps' dtype), then multiplies by x.
- Huge logits never give NaN: the kernels compute the logit and sigmoid in fp32 whatever the input dtypes
  (``1 / (1 + exp(-a))``: exp overflows to inf, and 1/inf = 0), so out is exactly x·2 or x·1.
- -0.0 keeps its sign through apply (forward and dx). The channel mean of all -0.0 is +0.0 on both paths (sums start
  from +0.0, and -0.0 + +0.0 = +0.0), so only agreement with torch is checked there.
- Subnormals: fp32 and fp16 subnormals are not flushed (numpy does not flush, nor does torch on CPU): the results are
  within one subnormal ulp of float64. bf16 subnormals ARE flushed to ±0 by the interpreter: its bf16 -> fp32 load
  conversion (``triton.runtime.interpreter._convert_float``) maps every bf16 subnormal to zero (and its fp32 -> bf16
  store truncates instead of rounding to nearest even). On a GPU that conversion is an exact bit shift. The flushed
  results are within the bf16 atol, so only the tolerance is checked for bf16.
"""
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import threading
import zlib

import pytest
import torch

from bam_triton._dtypes import assert_close as check_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bam_triton import BAM, TOLERANCES, bam_apply, channel_pool
from bam_triton import _backend, kernels
from bam_triton import ops as ops_mod
from devices import ON_CUDA, TEST_DEVICE, cpu_only, cuda_only
from reference import logits64, ref_apply, ref_grads

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV_VAR = "BAM_TRITON_BACKEND"
COMBINES = ("sum", "product")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAUNCHERS = ("channel_pool_fwd", "apply_fwd", "apply_bwd", "apply_bwd_reduce", "apply_bwd_dx")
# NaN/inf inputs make numpy (inside Triton's interpreter) warn about invalid values and overflow: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def _gen(*parts):
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@cpu_only("interpreter-only: checks that the CPU run tests the kernels through Triton's CPU interpreter")
def test_interpreter_is_on():
    assert kernels.INTERPRETED, "tests/conftest.py must set TRITON_INTERPRET=1 before triton is imported"


@cuda_only("checks that the CUDA run tests the compiled kernels")
def test_kernels_are_compiled_in_a_cuda_run():
    assert ON_CUDA and not kernels.INTERPRETED, "a CUDA run must not set TRITON_INTERPRET"


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------

# name -> the memory format the output must be dense in
LAYOUTS = {
    "nchw": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "slice_c": torch.contiguous_format,  # x[:, ::2] of an NCHW tensor: not dense, copied to NCHW
    "permute_nhwc": torch.channels_last,  # randn(N, H, W, C).permute(0, 3, 1, 2): channels_last-dense, no copy
    "transpose_hw": torch.contiguous_format,  # randn(N, C, W, H).transpose(2, 3): dense in neither format
}


def make_x(shape, dtype, layout, gen, scale=1.0):
    n, c, h, w = shape

    def randn(*size):  # drawn and rounded on CPU, moved before the layout is made (views stay views)
        return (torch.randn(size, generator=gen) * scale).to(dtype).to(TEST_DEVICE)

    if layout == "nchw":
        return randn(n, c, h, w)
    if layout == "channels_last":
        return randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "slice_c":
        return randn(n, 2 * c, h, w)[:, ::2]
    if layout == "permute_nhwc":
        return randn(n, h, w, c).permute(0, 3, 1, 2)
    if layout == "transpose_hw":
        return randn(n, c, w, h).transpose(2, 3)
    raise AssertionError(layout)


def make_maps(shape, dtype, form, strided, gen, scale=2.0):
    """mc, ms: (N, C) and (N, H, W), or (N, C, 1, 1) and (N, 1, H, W) for ``form="4d"``; ``strided`` makes them
    transposed views (not contiguous)."""
    n, c, h, w = shape
    if strided:
        mc = (torch.randn(c, n, generator=gen) * scale).to(dtype).to(TEST_DEVICE).t()
        ms = (torch.randn(n, w, h, generator=gen) * scale).to(dtype).to(TEST_DEVICE).transpose(1, 2)
    else:
        mc = (torch.randn(n, c, generator=gen) * scale).to(dtype).to(TEST_DEVICE)
        ms = (torch.randn(n, h, w, generator=gen) * scale).to(dtype).to(TEST_DEVICE)
    if form == "4d":
        mc, ms = mc[:, :, None, None], ms[:, None]
    return mc, ms


def storage_of(t):
    """The tensor owning ``t``'s memory (a view's base): compared before and after to prove nothing was written."""
    return t._base if t._base is not None else t


def assert_close(got, ref, dtype, what, scale_atol=False):
    """The package's check (``bam_triton._dtypes.assert_close``) against a float64 reference."""
    assert ref.dtype == torch.float64
    check_close(got, ref, dtype, what=what, scale_atol=scale_atol)


# ----------------------------------------------------------------------------------------------------------------------
# 1. Property-based: the Triton path against float64 over random shapes, dtypes, layouts, map forms
# ----------------------------------------------------------------------------------------------------------------------

MAX_ELEMENTS = 3000  # N·C·H·W: keeps each example to tens of milliseconds in the interpreter
SPATIAL = (1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 17)  # 1, primes, powers of two (ragged against every block size)
CHANNELS = (1, 2, 3, 5, 7, 8, 13, 16, 31, 33, 37)  # around the BLOCK_C of the pinned configs (4 and 32)
PROPERTY_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def shapes(draw):
    n = draw(st.sampled_from((1, 2, 3)))
    h = draw(st.sampled_from(SPATIAL))
    w = draw(st.sampled_from(SPATIAL))
    cap = MAX_ELEMENTS // (n * h * w)
    c = draw(st.sampled_from([c for c in CHANNELS if c <= cap]))
    return n, c, h, w


common = dict(
    shape=shapes(),
    dtype=st.sampled_from(sorted(DTYPES)),
    layout=st.sampled_from(sorted(LAYOUTS)),
    seed=st.integers(0, 2**32 - 1),
)
maps = dict(
    combine=st.sampled_from(COMBINES),
    map_dtype=st.sampled_from(("fp32", "x")),
    form=st.sampled_from(("flat", "4d")),
    strided=st.booleans(),
)


def _map_dtype(choice, dtype):
    return torch.float32 if choice == "fp32" else dtype


@pytest.mark.slow_on_gpu
@settings(max_examples=100, **PROPERTY_SETTINGS)
@given(**common)
def test_property_channel_pool(shape, dtype, layout, seed):
    dtype = DTYPES[dtype]
    x = make_x(shape, dtype, layout, _gen(seed), scale=3.0)
    before = storage_of(x).clone()
    pooled = channel_pool(x, backend="triton")
    assert pooled.dtype == dtype and pooled.shape == shape[:2] and pooled.is_contiguous()
    assert_close(pooled, x.double().mean(dim=(2, 3)), dtype, "pooled")
    assert torch.equal(storage_of(x), before), "channel_pool modified its input"


@pytest.mark.slow_on_gpu
@settings(max_examples=150, **PROPERTY_SETTINGS)
@given(**common, **maps)
def test_property_bam_apply_forward(shape, dtype, layout, seed, combine, map_dtype, form, strided):
    dtype = DTYPES[dtype]
    gen = _gen(seed)
    x = make_x(shape, dtype, layout, gen)
    mc, ms = make_maps(shape, _map_dtype(map_dtype, dtype), form, strided, gen)
    before = [storage_of(t).clone() for t in (x, mc, ms)]
    out = bam_apply(x, mc, ms, combine=combine, backend="triton")
    assert out.dtype == dtype and out.shape == shape
    assert out.is_contiguous(memory_format=LAYOUTS[layout]), f"{layout}: output strides {out.stride()}"
    assert_close(out, ref_apply(x, mc, ms, combine), dtype, "out")
    # Elementwise: the same values in another layout give bitwise the same result.
    assert torch.equal(bam_apply(x.contiguous(), mc, ms, combine=combine, backend="triton"), out)
    for t, t0 in zip((x, mc, ms), before):
        assert torch.equal(storage_of(t), t0), "bam_apply modified an input"


@pytest.mark.slow_on_gpu
@settings(max_examples=150, **PROPERTY_SETTINGS)
@given(**common, **maps, grad=st.sampled_from(("like_out", "nchw", "broadcast")))
def test_property_bam_apply_backward(shape, dtype, layout, seed, combine, map_dtype, form, strided, grad):
    dtype = DTYPES[dtype]
    map_dtype = _map_dtype(map_dtype, dtype)
    gen = _gen(seed)
    n, c, h, w = shape
    x = make_x(shape, dtype, layout, gen).requires_grad_()
    mc, ms = (t.requires_grad_() for t in make_maps(shape, map_dtype, form, strided, gen))
    out = bam_apply(x, mc, ms, combine=combine, backend="triton")
    if grad == "like_out":  # out's strides
        g = torch.randn(out.shape, generator=gen).to(dtype).to(TEST_DEVICE).contiguous(memory_format=LAYOUTS[layout])
    elif grad == "nchw":  # maybe not x's strides: copied once by the op
        g = torch.randn(shape, generator=gen).to(dtype).to(TEST_DEVICE)
    else:  # a broadcast view (strides 0), as a sum or mean's gradient is
        g = torch.randn(1, c, 1, 1, generator=gen).to(dtype).to(TEST_DEVICE).expand(shape)
    before = [storage_of(t).detach().clone() for t in (x, mc, ms, g)]
    dx, dmc, dms = torch.autograd.grad(out, (x, mc, ms), g)
    ref_dx, ref_dmc, ref_dms = ref_grads(x, mc, ms, g, combine)
    assert dx.dtype == dtype and dmc.dtype == map_dtype and dms.dtype == map_dtype
    assert dmc.shape == mc.shape and dms.shape == ms.shape
    if layout in ("nchw", "channels_last", "permute_nhwc"):  # dense x: dx in x's memory format
        assert dx.is_contiguous(memory_format=LAYOUTS[layout]), f"{layout}: dx strides {dx.stride()}"
    assert_close(dx, ref_dx, dtype, "dx")
    assert_close(dmc, ref_dmc, map_dtype, "dmc", scale_atol=True)
    assert_close(dms, ref_dms, map_dtype, "dms", scale_atol=True)
    for t, t0 in zip((x, mc, ms, g), before):
        assert torch.equal(storage_of(t).detach(), t0), "the backward modified an input"


# ----------------------------------------------------------------------------------------------------------------------
# 2. Special values
# ----------------------------------------------------------------------------------------------------------------------

SPECIALS = torch.tensor([float("nan"), float("inf"), float("-inf")])


def inject_specials(t, gen, fraction=0.2):
    """A copy of ``t`` (same strides) with ``fraction`` of its elements set to NaN, +inf or -inf."""
    dense = t.contiguous()
    flat = dense.view(-1).clone()
    k = max(1, int(flat.numel() * fraction))
    idx = torch.randperm(flat.numel(), generator=gen)[:k].to(t.device)
    flat[idx] = SPECIALS[torch.randint(0, 3, (k,), generator=gen)].to(t.dtype).to(t.device)
    return torch.empty_like(t).copy_(flat.view(t.shape))


def special_classes(t):
    t = t.double()
    return {"NaN": t.isnan(), "+inf": t == float("inf"), "-inf": t == float("-inf")}


def assert_specials_match(got, want, what, exempt=None):
    """Same NaN, +inf and -inf positions (outside ``exempt``); the finite values agree within a doubled tolerance."""
    keep = torch.ones_like(got, dtype=torch.bool) if exempt is None else ~exempt
    for name, (a, b) in zip(special_classes(got), zip(special_classes(got).values(),
                                                      special_classes(want).values())):
        diff = (a ^ b) & keep
        assert not diff.any(), (f"{what}: {name} at different positions, e.g. {diff.nonzero()[:4].tolist()}: "
                                f"triton {got[diff][:4].tolist()} vs torch {want[diff][:4].tolist()}")
    finite = got.isfinite() & want.isfinite() & keep
    if finite.any():
        atol, rtol = TOLERANCES[got.dtype]
        atol *= 1 + want[finite].double().abs().max().item()
        err = (got[finite].double() - want[finite].double()).abs()
        bad = ~(err <= 2 * (atol + rtol * want[finite].double().abs()))
        assert not bad.any(), (f"{what}: finite values differ: triton {got[finite][bad][:4].tolist()} vs torch "
                               f"{want[finite][bad][:4].tolist()}")


def assert_documented_inf_case(got, want, value, exempt, what):
    """Where ``value`` is ±inf and sigmoid is exactly 0: the kernels give ``value`` (x·(1 + 0)); the torch path gives
    ``value`` or NaN (inf·0 in its x + x·s)."""
    if exempt.any():
        assert torch.equal(got[exempt], value[exempt]), f"{what}: kernels must give x·(1 + 0) = ±inf"
        w, v = want[exempt], value[exempt]
        assert ((w == v) | w.isnan()).all(), f"{what}: torch path gave something other than ±inf or NaN"


# fp32 uses a shape with two tiles on both axes of the reduction kernels (C > 32, H·W > 64) and ragged tails;
# fp16/bf16 a shape inside one tile, where most lanes of every tile are masked.
SPECIAL_SHAPES = {torch.float32: (2, 37, 9, 8), torch.float16: (2, 5, 3, 4), torch.bfloat16: (2, 5, 3, 4)}


@pytest.mark.parametrize("which", ["x", "mc", "ms", "g", "all"])
@pytest.mark.parametrize("variant", ["nchw-fp32maps", "channels_last-xmaps"])
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_special_values_propagate_like_torch(dtype, combine, variant, which):
    shape = SPECIAL_SHAPES[dtype]
    n, c, h, w = shape
    gen = _gen("specials", dtype, combine, variant, which)
    fmt = torch.channels_last if variant.startswith("channels_last") else torch.contiguous_format
    map_dtype = torch.float32 if variant.endswith("fp32maps") else dtype
    x = make_x(shape, dtype, "nchw", gen).contiguous(memory_format=fmt)
    mc, ms = make_maps(shape, map_dtype, "flat", False, gen, scale=3.0)
    g = make_x(shape, dtype, "nchw", gen).contiguous(memory_format=fmt)
    if which in ("x", "all"):
        x = inject_specials(x, gen)
    if which in ("mc", "all"):
        mc = inject_specials(mc, gen)
    if which in ("ms", "all"):
        ms = inject_specials(ms, gen)
    if which in ("g", "all"):
        g = inject_specials(g, gen)
    before = [t.clone() for t in (x, mc, ms, g)]
    results = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, mc, ms)]
        pooled = channel_pool(x, backend=backend)
        out = bam_apply(*leaves, combine=combine, backend=backend)
        results[backend] = (pooled, out, *torch.autograd.grad(out, leaves, g))
    # s as each path computes it: the torch path in the maps' promoted dtype (fp16 maps: s rounds to 0 below a logit
    # of about -17.3 and to 1 above about 8.3), the kernels in fp32 as 1 / (1 + exp(-a)).
    n, c, h, w = x.shape
    map_type = torch.promote_types(mc.dtype, ms.dtype)
    mc4, ms4 = mc.to(map_type).reshape(n, c, 1, 1), ms.to(map_type).reshape(n, 1, h, w)
    s_torch = torch.sigmoid(mc4 + ms4 if combine == "sum" else mc4 * ms4)
    mc4, ms4 = mc4.float(), ms4.float()
    s_kernel = 1 / (1 + torch.exp(-(mc4 + ms4 if combine == "sum" else mc4 * ms4)))
    # out = x + x·s on the torch path: NaN where x = ±inf and s = 0 (dx likewise with g), the kernels give x·(1 + 0).
    exempt_out, exempt_dx = x.isinf() & (s_torch == 0), g.isinf() & (s_torch == 0)
    # da = g·x·s·(1-s): where the torch path's s·(1-s) is 0 but the kernels' is not (fp16 maps), an infinite x or g
    # makes the kernels' da ±inf (right: the slope is positive) and the torch path's NaN: the dmc rows and dms
    # columns holding such a term are NaN on the torch path and ±inf or NaN in the kernels.
    poisoned = ((x.isinf() | g.isinf()) & ((s_torch == 0) | (s_torch == 1))
                & (s_kernel > 0) & (1 - s_kernel > 0))
    got, want = results["triton"], results["torch"]
    assert_specials_match(got[0], want[0], "pooled")
    assert_specials_match(got[1], want[1], "out", exempt_out)
    assert_specials_match(got[2], want[2], "dx", exempt_dx)
    exempt_dmc, exempt_dms = poisoned.any(dim=(2, 3)), poisoned.any(dim=1)
    assert_specials_match(got[3], want[3], "dmc", exempt_dmc)
    assert_specials_match(got[4], want[4], "dms", exempt_dms)
    assert_documented_inf_case(got[1], want[1], x, exempt_out, "out")
    assert_documented_inf_case(got[2], want[2], g, exempt_dx, "dx")
    for name, got_, want_, exempt in (("dmc", got[3], want[3], exempt_dmc), ("dms", got[4], want[4], exempt_dms)):
        assert want_[exempt].isnan().all() and not got_[exempt].isfinite().any(), name
    for t, t0 in zip((x, mc, ms, g), before):
        assert torch.equal(t.nan_to_num(), t0.nan_to_num()) and torch.equal(t.isnan(), t0.isnan())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("where", ["mc", "ms"])
def test_masked_lanes_do_not_reach_the_map_gradients(where, layout):
    """Regression (kernels/apply_bwd.py), combine="product": mc[0, 0] = +inf with finite nonzero ms saturates every
    sigmoid of channel 0, so da = 0 there and dmc[0, 0] = Σ_hw 0·ms = 0 exactly, as torch gives. The tile's masked
    lanes (ms loaded as 0) used to add inf·0 = NaN to it. Likewise ms[0, 1, 1] = +inf and dms[0, 1, 1]."""
    shape = (1, 3, 2, 3)
    gen = _gen("masked-lanes", where, layout)
    x, g = (make_x(shape, torch.float32, layout, gen) for _ in range(2))
    mc, ms = make_maps(shape, torch.float32, "flat", False, gen)
    (mc[0, 0] if where == "mc" else ms[0, 1, 1]).fill_(float("inf"))
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, mc, ms)]
        _, dmc, dms = torch.autograd.grad(bam_apply(*leaves, combine="product", backend=backend), leaves, g)
        value = dmc[0, 0] if where == "mc" else dms[0, 1, 1]
        assert value.item() == 0.0, f"{backend}: the saturated {where}'s gradient must be exactly 0, got {value}"


# x dtype, map dtype, magnitude M: mc = ±M, ms = ±M/2, so mc + ms and mc·ms are both huge (or ±inf) everywhere.
HUGE_CASES = {
    "fp32-1e4": (torch.float32, torch.float32, 1e4),
    "fp32-3e38": (torch.float32, torch.float32, 3e38),
    "fp16-6e4": (torch.float16, torch.float16, 6e4),
    "fp16x-fp32maps-3e38": (torch.float16, torch.float32, 3e38),
    "bf16-3e38": (torch.bfloat16, torch.bfloat16, 3e38),
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("case", list(HUGE_CASES))
def test_huge_logits_saturate_exactly(case, combine, backend, layout):
    dtype, map_dtype, magnitude = HUGE_CASES[case]
    shape = (2, 5, 3, 7)
    n, c, h, w = shape
    gen = _gen("huge", case, combine, layout)

    def signs(*size):
        return torch.randint(0, 2, size, generator=gen).double() * 2 - 1

    mc = (signs(n, c) * magnitude).to(map_dtype).to(TEST_DEVICE)
    ms = (signs(n, h, w) * (magnitude / 2)).to(map_dtype).to(TEST_DEVICE)
    x = make_x(shape, dtype, layout, gen).requires_grad_()
    g = make_x(shape, dtype, layout, gen)
    positive = logits64(x, mc, ms, combine) > 0
    assert (logits64(x, mc, ms, combine).abs() >= 1e3).all()
    leaves = [x, mc.requires_grad_(), ms.requires_grad_()]
    out = bam_apply(*leaves, combine=combine, backend=backend)
    dx, dmc, dms = torch.autograd.grad(out, leaves, g)
    assert not out.isnan().any() and not dx.isnan().any() and not dmc.isnan().any() and not dms.isnan().any()
    assert torch.equal(out, torch.where(positive, x.detach() * 2, x.detach())), "out must be exactly x·2 or x·1"
    assert torch.equal(dx, torch.where(positive, g * 2, g)), "dx must be exactly g·2 or g·1"
    assert torch.equal(dmc, torch.zeros_like(dmc)) and torch.equal(dms, torch.zeros_like(dms)), \
        "a saturated sigmoid has zero slope: dmc and dms must be exactly 0"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("case", ["fp16-gx-overflows", "bf16"])
def test_fp32_map_gradients_of_half_inputs(case, combine, backend, layout):
    """Regression (bam_triton/ops.py, torch path): fp16/bf16 x and g with fp32 maps; dmc and dms are fp32 and must be
    fp32-accurate and finite. For fp16, x and g of a few hundred (a loss-scaled gradient) make |g·x| pass the fp16
    maximum (65504) although da = g·x·s·(1-s) <= |g·x| / 4. The torch path used to form g·x in x's dtype first:
    inf (then inf - inf = NaN) in fp16, and a bf16 rounding (~4e-3) inside every fp32 map gradient."""
    dtype, scale = (torch.float16, 400.0) if case.startswith("fp16") else (torch.bfloat16, 1.0)
    shape = (2, 6, 5, 7)
    gen = _gen("half-map-grads", case, combine, layout)
    x, g = (make_x(shape, dtype, layout, gen, scale=scale) for _ in range(2))
    if dtype == torch.float16:
        assert ((x.float() * g.float()).abs() > 65504).any()
    mc, ms = make_maps(shape, torch.float32, "flat", False, gen, scale=1.0)
    leaves = [t.clone().requires_grad_() for t in (x, mc, ms)]
    dx, dmc, dms = torch.autograd.grad(bam_apply(*leaves, combine=combine, backend=backend), leaves, g)
    ref_dx, ref_dmc, ref_dms = ref_grads(x, mc, ms, g, combine)
    assert_close(dx, ref_dx, dtype, "dx")
    assert_close(dmc, ref_dmc, torch.float32, "dmc", scale_atol=True)
    assert_close(dms, ref_dms, torch.float32, "dms", scale_atol=True)


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_signed_zero(dtype, layout, combine):
    """x = ±0.0 gives out = ±0.0 with x's sign bit, g = ±0.0 gives dx = ±0.0 with g's sign bit, on both paths; the
    pooled mean of zeros has the torch path's sign (+0.0 for all -0.0: see the module docstring)."""
    shape = (2, 6, 5, 3)
    gen = _gen("zero", dtype, layout, combine)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def signed_zeros():
        negative = torch.rand(shape, generator=gen) < 0.7
        return torch.where(negative, -0.0, 0.0).to(dtype).to(TEST_DEVICE).contiguous(memory_format=fmt)

    x, g = signed_zeros(), signed_zeros()
    x[0] = -0.0  # image 0 all -0.0: its channel means
    mc, ms = make_maps(shape, torch.float32, "flat", False, gen)
    pooled = {}
    for backend in ("triton", "torch"):
        leaves = [x.clone().requires_grad_(), mc.clone().requires_grad_(), ms.clone().requires_grad_()]
        out = bam_apply(*leaves, combine=combine, backend=backend)
        (dx,) = torch.autograd.grad(out, leaves[0], g)
        assert (out == 0).all() and torch.equal(out.signbit(), x.signbit()), f"{backend}: out lost the sign of x"
        assert (dx == 0).all() and torch.equal(dx.signbit(), g.signbit()), f"{backend}: dx lost the sign of g"
        pooled[backend] = channel_pool(x, backend=backend)
    assert (pooled["triton"] == 0).all()
    assert torch.equal(pooled["triton"].signbit(), pooled["torch"].signbit())


# dtype, a subnormal value of it, and its subnormal spacing (ulp), None where the interpreter flushes (bf16).
SUBNORMALS = {
    "fp32-1e-40": (torch.float32, 1e-40, 2.0**-149),
    "fp16-6e-8": (torch.float16, 6e-8, 2.0**-24),
    "fp16-3e-6": (torch.float16, 3e-6, 2.0**-24),
    "bf16-1e-40": (torch.bfloat16, 1e-40, None),
}


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(SUBNORMALS))
def test_subnormal_inputs(case, layout, combine):
    dtype, value, ulp = SUBNORMALS[case]
    assert 0 < torch.tensor(value, dtype=dtype).abs() < torch.finfo(dtype).tiny, "not a subnormal of this dtype"
    shape = (2, 7, 5, 3)
    gen = _gen("subnormal", case, layout, combine)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    k = torch.randint(1, 4, shape, generator=gen) * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)
    x = (k.double() * value).to(dtype).to(TEST_DEVICE).contiguous(memory_format=fmt)
    assert (x != 0).all() and (x.abs() < torch.finfo(dtype).tiny).all()
    mc, ms = make_maps(shape, torch.float32, "flat", False, gen)
    g = make_x(shape, dtype, layout, gen)
    results = {}
    for backend in ("triton", "torch"):
        leaves = [x.clone().requires_grad_(), mc.clone().requires_grad_(), ms.clone().requires_grad_()]
        out = bam_apply(*leaves, combine=combine, backend=backend)
        results[backend] = (channel_pool(x, backend=backend), out, *torch.autograd.grad(out, leaves, g))
    for name, got, want, tol_dtype in zip(("pooled", "out", "dx", "dmc", "dms"), results["triton"], results["torch"],
                                          (dtype, dtype, dtype, torch.float32, torch.float32)):
        assert_close(got, want.double(), tol_dtype, f"{name} (triton vs torch)", scale_atol=name in ("dmc", "dms"))
    ref = ref_apply(x, mc, ms, combine)
    if ulp is not None:  # not flushed: within one subnormal ulp of float64, on both paths
        for backend in ("triton", "torch"):
            out = results[backend][1]
            assert (out != 0).all() and torch.equal(out.signbit(), x.signbit()), f"{backend}: flushed to zero"
            err = (out.double() - ref).abs().max().item()
            assert err <= ulp, f"{backend}: {err / ulp:.2f} subnormal ulps from float64"
    else:  # bf16: the interpreter flushes to ±0 (see the module docstring), a GPU need not; never a sign flip
        assert (results["triton"][1].double() * x.double() >= 0).all()


# ----------------------------------------------------------------------------------------------------------------------
# 3. Concurrency
# ----------------------------------------------------------------------------------------------------------------------

N_THREADS = 4
# One shape per thread (distinct autotuning keys and constexpr specialisations, cold when the threads start), both
# memory formats.
THREAD_SHAPES = [(2, 16, 7, 9), (3, 8, 5, 11), (2, 24, 6, 6), (1, 12, 13, 3)]


def run_threads(target, n=N_THREADS):
    """Run ``target(i)`` in ``n`` threads released together by a barrier; re-raise the first failure."""
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def run(i):
        try:
            barrier.wait(timeout=60)
            results[i] = target(i)
        except BaseException as e:  # noqa: BLE001 - reported below with the thread's index
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,), name=f"hardening-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        i, e = errors[0]
        raise AssertionError(f"thread {i} failed: {type(e).__name__}: {e}") from e
    return results


def make_module(channels, combine, seed):
    torch.manual_seed(seed)
    bam = BAM(channels, reduction=4, combine=combine, backend="triton")
    gen = _gen("module", channels, seed)
    with torch.no_grad():
        for p in bam.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5 if p.dim() > 1 else 5))
    return bam.eval().to(TEST_DEVICE)


def thread_work(i, iterations=2):
    """channel_pool, bam_apply forward and backward, BAM forward and backward, all on the Triton path, checked
    against float64; returns the kernel results of the last iteration (bitwise comparable across runs)."""
    shape = THREAD_SHAPES[i]
    n, c, h, w = shape
    fmt = torch.channels_last if i % 2 else torch.contiguous_format
    combine = COMBINES[i % 2]
    gen = _gen("thread", i)
    x = torch.randn(shape, generator=gen).to(TEST_DEVICE).contiguous(memory_format=fmt)
    mc, ms = torch.randn(n, c, generator=gen).to(TEST_DEVICE), torch.randn(n, 1, h, w, generator=gen).to(TEST_DEVICE)
    g = torch.randn(shape, generator=gen).to(TEST_DEVICE).contiguous(memory_format=fmt)
    bam = make_module(c, combine, seed=i)
    bam64 = make_module(c, combine, seed=i).double()
    bam64.backend = "torch"
    x64 = x.double().requires_grad_()
    ref_out = bam64(x64)
    (ref_dx,) = torch.autograd.grad(ref_out, x64, g.double())
    ref_pool, ref_apply_out = x.double().mean(dim=(2, 3)), ref_apply(x, mc, ms, combine)
    refs = ref_grads(x, mc, ms, g, combine)
    for _ in range(iterations):
        pooled = channel_pool(x, backend="triton")
        assert_close(pooled, ref_pool, torch.float32, f"thread {i} pooled")
        leaves = [t.clone().requires_grad_() for t in (x, mc, ms)]
        out = bam_apply(*leaves, combine=combine, backend="triton")
        assert_close(out, ref_apply_out, torch.float32, f"thread {i} out")
        grads = torch.autograd.grad(out, leaves, g)
        for name, got, ref in zip(("dx", "dmc", "dms"), grads, refs):
            assert_close(got, ref, torch.float32, f"thread {i} {name}", scale_atol=name != "dx")
        xb = x.clone().requires_grad_()
        bam_out = bam(xb)
        (bam_dx,) = torch.autograd.grad(bam_out, xb, g)
        assert_close(bam_out, ref_out.detach(), torch.float32, f"thread {i} BAM out")
        assert_close(bam_dx, ref_dx, torch.float32, f"thread {i} BAM dx", scale_atol=True)
    return [pooled, out.detach(), *grads]


def test_threads_share_the_kernels():
    """4 threads at once, each on its own inputs and its own module (launches are serialised by the lock in
    kernels/_common.py); each thread's kernel results are bitwise those of the same work run alone."""
    alone = [thread_work(i, iterations=1) for i in range(N_THREADS)]
    together = run_threads(thread_work)
    for i in range(N_THREADS):
        for a, b in zip(alone[i], together[i]):
            assert torch.equal(a, b), f"thread {i}: results differ from the single-threaded run"


def test_env_default_backend_read_concurrently(monkeypatch):
    """``$BAM_TRITON_BACKEND`` read by several threads at once (backend=None everywhere): each resolves the same
    backend, and only the Triton setting launches kernels."""
    launches, lock = [], threading.Lock()
    originals = {name: getattr(kernels, name) for name in LAUNCHERS}

    def counting(name):
        def launcher(*args, **kwargs):
            with lock:
                launches.append(name)
            return originals[name](*args, **kwargs)
        return launcher

    for name in LAUNCHERS:
        monkeypatch.setattr(kernels, name, counting(name))

    def work(i):
        backend = _backend.default_backend()
        for _ in range(200):
            assert _backend.default_backend() == backend
            assert _backend.resolve(None, TEST_DEVICE) == backend
        shape = (2, 8, 3, 5)
        x = torch.randn(shape, generator=_gen("env", i)).to(TEST_DEVICE).requires_grad_()
        bam = make_module(8, "sum", seed=i)
        bam.backend = None
        bam(x).sum().backward()
        channel_pool(x.detach())
        bam_apply(x.detach(), torch.zeros(2, 8, device=TEST_DEVICE), torch.zeros(2, 3, 5, device=TEST_DEVICE))
        return backend

    for value, launched in (("torch", False), (" Triton ", True)):
        monkeypatch.setenv(ENV_VAR, value)
        launches.clear()
        assert run_threads(work) == [value.strip().lower()] * N_THREADS
        assert bool(launches) == launched, f"{ENV_VAR}={value!r}: launches {sorted(set(launches))}"


_COLD_START = """
import json, sys, threading, torch, bam_triton
assert "triton" not in sys.modules, "import bam_triton must not import triton"
barrier, errors, n = threading.Barrier(4), [], 4
device = torch.device(sys.argv[1])

def work(i):
    try:
        g = torch.Generator().manual_seed(i)
        shape = (2, 3 + i, 5, 4 + i)
        fmt = torch.channels_last if i % 2 else torch.contiguous_format
        x = torch.randn(shape, generator=g).to(device).contiguous(memory_format=fmt).requires_grad_()
        mc, ms = torch.randn(2, 3 + i, generator=g).to(device), torch.randn(2, 5, 4 + i, generator=g).to(device)
        barrier.wait(timeout=60)  # the first launch (kernel import, first autotune) happens in 4 threads at once
        out = bam_triton.bam_apply(x, mc, ms, combine="product", backend="triton")
        pooled = bam_triton.channel_pool(x, backend="triton")
        (dx,) = torch.autograd.grad(out.sum(), x)
        x64 = x.detach().double()
        ref = x64 * (1 + torch.sigmoid(mc.double()[:, :, None, None] * ms.double()[:, None]))
        ref_dx = 1 + torch.sigmoid(mc.double()[:, :, None, None] * ms.double()[:, None])
        for got, want in ((out, ref), (pooled, x64.mean(dim=(2, 3))), (dx, ref_dx)):
            assert (got.double() - want).abs().max().item() < 1e-5, "wrong result"
    except BaseException as e:
        errors.append(f"thread {i}: {type(e).__name__}: {e}")

threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
[t.start() for t in threads]
[t.join(timeout=300) for t in threads]
print(json.dumps({"errors": errors, "alive": sum(t.is_alive() for t in threads)}))
"""


def test_cold_start_in_threads():
    """A fresh interpreter whose first kernel launches (the lazy import of the kernel package, the autotuners'
    first runs) happen in 4 threads at once, on this run's device (compiled on CUDA, interpreted on CPU)."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "TRITON_INTERPRET")}
    if not ON_CUDA:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_COLD_START), str(TEST_DEVICE)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"errors": [], "alive": 0}, report


# ----------------------------------------------------------------------------------------------------------------------
# 4. Failure messages: each names the argument and what was expected
# ----------------------------------------------------------------------------------------------------------------------

_X = torch.zeros(2, 8, 5, 6)
_MC, _MS = torch.zeros(2, 8), torch.zeros(2, 5, 6)
_FLOATS = r"\(float32, float16, bfloat16, float64\)"
_COMBINES = re.escape("('sum', 'product')")
_BACKENDS = re.escape("('auto', 'torch', 'triton')")
_SHAPE = re.escape("(2, 8, 5, 6)")
_MC_SHAPE = re.escape("mc must have shape (N, C) = (2, 8) or (N, C, 1, 1) = (2, 8, 1, 1) to match x of shape ")
_MS_SHAPE = re.escape("ms must have shape (N, H, W) = (2, 5, 6) or (N, 1, H, W) = (2, 1, 5, 6) to match x of shape ")


def _bam(**kwargs):
    return BAM(**{"channels": 8, "reduction": 4, **kwargs})


def _with_env(value, call):
    def run(mp):
        mp.setenv(ENV_VAR, value)
        return call()
    return run


# id -> (call(monkeypatch), exception type, regex the message must match)
ERRORS = {
    # x: wrong number of dimensions
    "pool-x-3d": (lambda mp: channel_pool(_X[0]), ValueError, r"^x must be 4-D \(N, C, H, W\), got 3-D with shape"),
    "apply-x-5d": (lambda mp: bam_apply(_X[None], _MC, _MS), ValueError, r"^x must be 4-D \(N, C, H, W\), got 5-D"),
    "apply-x-0d": (lambda mp: bam_apply(torch.tensor(1.0), _MC, _MS), ValueError, r"^x must be 4-D .*got 0-D"),
    "module-x-2d": (lambda mp: _bam()(_X[0, 0]), ValueError, r"^x must be 4-D \(N, C, H, W\), got 2-D"),
    # non-tensors
    "pool-x-list": (lambda mp: channel_pool(_X.tolist()), TypeError, r"^x must be a torch\.Tensor, got list"),
    "apply-x-numpy": (lambda mp: bam_apply(_X.numpy(), _MC, _MS), TypeError, r"^x must be a torch\.Tensor, got "
                      r"ndarray"),
    "apply-mc-float": (lambda mp: bam_apply(_X, 0.5, _MS), TypeError, r"^mc must be a torch\.Tensor, got float"),
    "apply-ms-none": (lambda mp: bam_apply(_X, _MC, None), TypeError, r"^ms must be a torch\.Tensor, got NoneType"),
    "module-x-none": (lambda mp: _bam()(None), TypeError, r"^x must be a torch\.Tensor, got NoneType"),
    # integer / bool / complex dtypes
    "pool-x-int64": (lambda mp: channel_pool(_X.long()), TypeError, rf"^x must have a floating dtype {_FLOATS}, "
                     r"got torch\.int64"),
    "apply-x-bool": (lambda mp: bam_apply(_X.bool(), _MC, _MS), TypeError, rf"^x must have a floating dtype "
                     rf"{_FLOATS}, got torch\.bool"),
    "apply-x-complex": (lambda mp: bam_apply(_X.to(torch.complex64), _MC, _MS), TypeError,
                        rf"^x must have a floating dtype {_FLOATS}, got torch\.complex64"),
    "apply-mc-int32": (lambda mp: bam_apply(_X, _MC.int(), _MS), TypeError, rf"^mc must have a floating dtype "
                       rf"{_FLOATS}, got torch\.int32"),
    "apply-ms-bool": (lambda mp: bam_apply(_X, _MC, _MS.bool()), TypeError, rf"^ms must have a floating dtype "
                      rf"{_FLOATS}, got torch\.bool"),
    "apply-ms-uint8": (lambda mp: bam_apply(_X, _MC, _MS.to(torch.uint8)), TypeError, r"^ms must have a floating "
                       r"dtype .*got torch\.uint8"),
    "module-x-int": (lambda mp: _bam()(_X.int()), TypeError, rf"^x must have a floating dtype {_FLOATS}"),
    # map shapes
    "apply-mc-channels": (lambda mp: bam_apply(_X, torch.zeros(2, 9), _MS), ValueError,
                          rf"^{_MC_SHAPE}{_SHAPE}, got \(2, 9\)$"),
    "apply-mc-batch": (lambda mp: bam_apply(_X, torch.zeros(1, 8), _MS), ValueError,
                       rf"^{_MC_SHAPE}{_SHAPE}, got \(1, 8\)$"),
    "apply-mc-3d": (lambda mp: bam_apply(_X, torch.zeros(2, 8, 1), _MS), ValueError,
                    rf"^{_MC_SHAPE}{_SHAPE}, got \(2, 8, 1\)$"),
    "apply-ms-swapped": (lambda mp: bam_apply(_X, _MC, torch.zeros(2, 6, 5)), ValueError,
                         rf"^{_MS_SHAPE}{_SHAPE}, got \(2, 6, 5\)$"),
    "apply-ms-flat": (lambda mp: bam_apply(_X, _MC, torch.zeros(2, 30)), ValueError,
                      rf"^{_MS_SHAPE}{_SHAPE}, got \(2, 30\)$"),
    "apply-ms-channels": (lambda mp: bam_apply(_X, _MC, torch.zeros(2, 8, 5, 6)), ValueError,
                          rf"^{_MS_SHAPE}{_SHAPE}, got \(2, 8, 5, 6\)$"),
    # mixed devices (meta: nothing is allocated)
    "apply-mc-meta": (lambda mp: bam_apply(_X, _MC.to("meta"), _MS), ValueError,
                      r"^mc is on meta but x is on cpu: all inputs must be on one device$"),
    "apply-ms-meta": (lambda mp: bam_apply(_X, _MC, _MS.to("meta"), backend="triton"), ValueError,
                      r"^ms is on meta but x is on cpu: all inputs must be on one device$"),
    "apply-x-meta": (lambda mp: bam_apply(_X.to("meta"), _MC, _MS), ValueError, r"^mc is on cpu but x is on meta"),
    # a device the Triton path cannot run on (META runs shape-only: its launches are recorded, see bench/traffic.py)
    "resolve-xpu-triton": (lambda mp: _backend.resolve("triton", torch.device("xpu")), RuntimeError,
                           r"^backend='triton' supports CUDA tensors .*got a tensor on xpu"),
    # combine
    "apply-combine": (lambda mp: bam_apply(_X, _MC, _MS, combine="add"), ValueError,
                      rf"^combine must be one of {_COMBINES}, got 'add'$"),
    "apply-combine-none": (lambda mp: bam_apply(_X, _MC, _MS, combine=None), ValueError,
                           rf"^combine must be one of {_COMBINES}, got None$"),
    "module-combine": (lambda mp: _bam(combine="mul"), ValueError, rf"^combine must be one of {_COMBINES}, "
                       r"got 'mul'$"),
    "module-combine-case": (lambda mp: _bam(combine="Sum"), ValueError, rf"^combine must be one of {_COMBINES}"),
    # backend
    "pool-backend": (lambda mp: channel_pool(_X, backend="gpu"), ValueError,
                     rf"^backend must be one of {_BACKENDS} \(or None for the default\), got 'gpu'$"),
    "apply-backend": (lambda mp: bam_apply(_X, _MC, _MS, backend="cuda"), ValueError,
                      rf"^backend must be one of {_BACKENDS} \(or None for the default\), got 'cuda'$"),
    "module-backend": (lambda mp: _bam(backend="Triton"), ValueError,
                       rf"^backend must be one of {_BACKENDS} \(or None for the default\), got 'Triton'$"),
    "module-backend-set-later": (lambda mp: setattr(m := _bam(), "backend", "gpu") or m(_X), ValueError,
                                 rf"^backend must be one of {_BACKENDS}"),
    # the environment variable
    "env-pool": (_with_env("gpu", lambda: channel_pool(_X)), ValueError,
                 rf"^environment variable {ENV_VAR} must be one of {_BACKENDS}, got 'gpu'$"),
    "env-apply": (_with_env("1", lambda: bam_apply(_X, _MC, _MS)), ValueError,
                  rf"^environment variable {ENV_VAR} must be one of {_BACKENDS}, got '1'$"),
    "env-module": (_with_env("cuda", lambda: _bam()(_X)), ValueError,
                   rf"^environment variable {ENV_VAR} must be one of {_BACKENDS}, got 'cuda'$"),
    # BAM: input against the module
    "module-channels-mismatch": (lambda mp: BAM(16, reduction=4)(_X), ValueError,
                                 rf"^x must have 16 channels \(dim 1\) for this BAM, got shape {_SHAPE}$"),
    "module-batch-1-train": (lambda mp: _bam().train()(_X[:1]), ValueError,
                             r"^BAM got a batch of 1 in training mode.*batch size >= 2.*call \.eval\(\)"),
    # BAM constructor numbers
    "module-hidden-zero": (lambda mp: BAM(8, reduction=16), ValueError,
                           r"^channels // reduction must be >= 1 \(the hidden width\), got channels=8, reduction=16$"),
    "module-channels-float": (lambda mp: BAM(8.0), TypeError, r"^channels must be an int, got float$"),
    "module-channels-bool": (lambda mp: BAM(True), TypeError, r"^channels must be an int, got bool$"),
    "module-channels-zero": (lambda mp: BAM(0), ValueError, r"^channels must be >= 1, got 0$"),
    "module-reduction-str": (lambda mp: BAM(8, reduction="4"), TypeError, r"^reduction must be an int, got str$"),
    "module-reduction-zero": (lambda mp: BAM(8, reduction=0), ValueError, r"^reduction must be >= 1, got 0$"),
    "module-dilation-float": (lambda mp: _bam(dilation=2.5), TypeError, r"^dilation must be an int, got float$"),
    "module-dilation-zero": (lambda mp: _bam(dilation=0), ValueError, r"^dilation must be >= 1, got 0$"),
    "module-convs-none": (lambda mp: _bam(num_dilated_convs=None), TypeError,
                          r"^num_dilated_convs must be an int, got NoneType$"),
    "module-convs-negative": (lambda mp: _bam(num_dilated_convs=-1), ValueError,
                              r"^num_dilated_convs must be >= 0, got -1$"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_message(monkeypatch, case):
    call, exc, pattern = ERRORS[case]
    before = [t.clone() for t in (_X, _MC, _MS)]
    with pytest.raises(exc) as info:
        call(monkeypatch)
    message = str(info.value)
    assert info.type is exc, f"{info.type.__name__}: {message}"
    assert re.search(pattern, message), f"message {message!r} does not match {pattern!r}"
    for t, t0 in zip((_X, _MC, _MS), before):
        assert torch.equal(t, t0)


def test_zero_num_dilated_convs_is_valid():
    """The lower bound of num_dilated_convs is 0 (inclusive): the error above is for negatives only."""
    bam = BAM(8, reduction=4, num_dilated_convs=0).eval()
    assert bam(_X).shape == _X.shape


# An image of exactly 2**31 elements (C·H·W), as an expanded view of one element: nothing big is allocated.
BIG_C, BIG_H, BIG_W = 2**16, 2**8, 2**7
_TOO_BIG = re.escape(f"x has {2**31} elements per image (C·H·W); the Triton kernels support fewer than 2**31")


def _big(requires_grad=False):
    one = torch.zeros(1, 1, 1, 1, device=TEST_DEVICE, requires_grad=requires_grad)
    return one.expand(2, BIG_C, BIG_H, BIG_W)


def _big_maps():
    return torch.zeros(1, device=TEST_DEVICE).expand(2, BIG_C), torch.zeros(2, BIG_H, BIG_W, device=TEST_DEVICE)


def _big_bam():
    return BAM(BIG_C, reduction=BIG_C, num_dilated_convs=0, backend="triton").to(TEST_DEVICE)


class LaunchedOrCopied(Exception):
    pass


@pytest.fixture
def nothing_may_run(monkeypatch):
    """Every launcher and the dense copy raise: an op that checks its limits first never reaches them."""
    def refuse(*args, **kwargs):
        raise LaunchedOrCopied

    for name in LAUNCHERS:
        monkeypatch.setattr(kernels, name, refuse)
    monkeypatch.setattr(ops_mod, "_dense", refuse)


BIG_CALLS = {
    "channel_pool": lambda: channel_pool(_big(), backend="triton"),
    "bam_apply": lambda: bam_apply(_big(), *_big_maps(), backend="triton"),
    "bam_apply-grad": lambda: bam_apply(_big(True), *_big_maps(), backend="triton"),
    "BAM-eval": lambda: _big_bam().eval()(_big()),
    "BAM-train-grad": lambda: _big_bam()(_big(True)),
}


@pytest.mark.parametrize("what", list(BIG_CALLS))
def test_image_of_2_31_elements_raises_before_any_launch(nothing_may_run, what):
    with pytest.raises(ValueError, match=f"^{_TOO_BIG}$"):
        BIG_CALLS[what]()


def test_image_of_2_31_minus_1_elements_passes_the_check():
    ops_mod._check_kernel_limits(torch.zeros(1, 1, 1, 1).expand(3, 1, 1, 2**31 - 1))
    with pytest.raises(ValueError, match=_TOO_BIG):
        ops_mod._check_kernel_limits(torch.zeros(1, 1, 1, 1).expand(1, 2, 1, 2**30))
