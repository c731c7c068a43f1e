"""BAM's front-end kernels (kernels/front.py: pooling + 1x1 conv forward from one read of x; dx with the conv's and
the pooling's gradients folded in, dW and db, backward) against float64 references that torch computes from the plain
formulas (F.conv2d, mean, autograd), never from the kernels' own formulas.

Tensors live on the run's device (tests/devices.py): through Triton's interpreter on CPU, compiled in a CUDA run.
The ahead-of-time evidence (no spills on sm_80 and sm_90 at the ResNet-50 BAM shapes, for every config the pruner
keeps; tensor-core instructions and 128-bit loads of x for fp16/bf16, FMA for fp32) compiles in subprocesses without
TRITON_INTERPRET, on CPU.

Tolerances: y, pooled and dx are stored in x's dtype: ``bam_triton.TOLERANCES`` relative to |ref| (the references use
the same rounded inputs, W rounded to x's dtype as the kernels' dots take it). dW and db are fp32 sums of products of
those inputs: |err| <= 2e-5·(1 + max|ref|) + 1e-5·|ref|.
"""
import math
import os
import zlib

import pytest
import torch
import torch.nn.functional as F
import triton

from bam_triton import TOLERANCES
from bam_triton.kernels import _common, front
from devices import ON_CUDA, TEST_DEVICE, cpu_only, run_compiled

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
LAYOUTS = [False, True]
LAYOUT_IDS = ["nchw", "channels_last"]
COMBINES = ["sum", "product"]
# (N, C, H, W, C_r)
SHAPES = [
    (1, 19, 7, 7, 3),  # N = 1, C_r = 3 < 16 (padded to 16), C not a multiple of any BLOCK_K
    (2, 37, 1, 13, 2),  # H·W = 13, prime
    (2, 70, 11, 13, 5),  # H·W = 143: ragged pixel blocks on both kernels
    (1, 40, 1, 151, 20),  # H·W = 151 prime, > 128: several pixel blocks and backward chunks; C_r = 20 -> R_PAD 32
    (3, 16, 8, 8, 1),  # C_r = 1; C smaller than every BLOCK_K
    (2, 150, 3, 5, 40),  # C over several channel chunks, C_r = 40 -> R_PAD 64
]
SHAPE_IDS = ["x".join(map(str, s[:4])) + f"-r{s[4]}" for s in SHAPES]
SUM_TOL = (2e-5, 1e-5)


def _seed(*parts):
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def make_inputs(shape, dtype, channels_last, gen, weight_dtype=torch.float32):
    """x, g, dy (x's dtype and layout), mc, ms, dpool (fp32), weight (C_r, C, 1, 1) and bias, on the test device;
    values drawn on CPU."""
    n, c, h, w, hidden = shape
    fmt = _fmt(channels_last)

    def full(channels):
        return torch.randn(n, channels, h, w, generator=gen).to(TEST_DEVICE, dtype).contiguous(memory_format=fmt)

    x, g, dy = full(c), full(c), full(hidden)
    small = [torch.randn(size, generator=gen).to(TEST_DEVICE) for size in ((n, c), (n, h * w), (n, c))]
    weight = (torch.randn(hidden, c, 1, 1, generator=gen) / math.sqrt(c)).to(TEST_DEVICE, weight_dtype)
    bias = torch.randn(hidden, generator=gen).to(TEST_DEVICE, weight_dtype)
    return dict(x=x, g=g, dy=dy, mc=small[0], ms=small[1], dpool=small[2], weight=weight, bias=bias)


def ref_forward(x, weight, bias):
    """(pooled, y) in float64 from the plain formulas, with W rounded to x's dtype as the kernel's dot takes it."""
    w64 = weight.to(x.dtype).double()
    return x.double().mean(dim=(2, 3)), F.conv2d(x.double(), w64, bias.double())


def ref_backward(t, combine, dpool=True):
    """(dx, dW, db) in float64 by autograd through out = x·(1 + sigmoid(mc ⊕ ms)), pooled = mean_hw x and
    y = conv1x1(x, W, b), weighted by g, dpool and dy."""
    x, mc, ms = t["x"], t["mc"], t["ms"]
    n, c, h, w = x.shape
    x64 = x.detach().double().requires_grad_()
    w64 = t["weight"].to(x.dtype).double().requires_grad_()
    b64 = t["bias"].double().requires_grad_()
    a, b = mc.double().reshape(n, c, 1, 1), ms.double().reshape(n, 1, h, w)
    out = x64 * (1 + torch.sigmoid(a + b if combine == "sum" else a * b))
    loss = (out * t["g"].double()).sum() + (F.conv2d(x64, w64, b64) * t["dy"].double()).sum()
    if dpool:
        loss = loss + (x64.mean(dim=(2, 3)) * t["dpool"].double()).sum()
    return torch.autograd.grad(loss, (x64, w64, b64))


def assert_close(got, ref, atol, rtol, what=""):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    err = (got.double() - ref.double()).abs()
    bad = ~(err <= atol + rtol * ref.double().abs())  # NaN counts as bad
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} elements out of tolerance (atol={atol}, "
                           f"rtol={rtol}); max |err| {err.nan_to_num(float('inf')).max().item():.3e}")


def assert_stored(got, ref, like, what):
    """A result stored in ``like``'s dtype and memory format."""
    assert got.dtype == like.dtype and got.device == like.device, what
    assert got.is_contiguous(memory_format=_fmt(_common.is_channels_last(like))), (what, got.stride())
    assert_close(got, ref, *TOLERANCES[like.dtype], what=what)


def assert_sum(got, ref, what):
    """An fp32 sum, returned in fp32 or rounded to a lower precision (the weight's dtype)."""
    atol, rtol = SUM_TOL if got.dtype in (torch.float32, torch.float64) else TOLERANCES[got.dtype]
    assert_close(got, ref, atol * (1 + ref.abs().max().item()), rtol, what=what)


def check_forward(t, result):
    pooled, y = result
    ref_pooled, ref_y = ref_forward(t["x"], t["weight"], t["bias"])
    assert pooled.dtype == t["x"].dtype and pooled.shape == ref_pooled.shape
    assert_close(pooled, ref_pooled, *TOLERANCES[t["x"].dtype], what="pooled")
    assert y.dtype == t["x"].dtype and y.is_contiguous(memory_format=_fmt(_common.is_channels_last(t["x"])))
    assert_close(y, ref_y, *TOLERANCES[t["x"].dtype], what="y")


def check_backward(t, result, combine, dpool=True):
    dx, dw, db = result
    ref_dx, ref_dw, ref_db = ref_backward(t, combine, dpool)
    assert_stored(dx, ref_dx, t["x"], "dx")
    assert dw.shape == t["weight"].shape and dw.dtype == t["weight"].dtype
    assert db.shape == t["bias"].shape and db.dtype == t["weight"].dtype
    assert_sum(dw, ref_dw, "dW")
    assert_sum(db, ref_db, "db")


def run_backward(t, combine, dpool=True, config=None):
    return front.front_bwd(t["g"], t["x"], t["mc"], t["ms"], combine, t["dpool"] if dpool else None, t["dy"],
                           t["weight"], config=config)


def snapshot(t):
    return {k: v.clone() for k, v in t.items()}


def assert_untouched(t, before):
    for k, v in before.items():
        assert torch.equal(t[k], v), f"input {k} was modified"


# ----------------------------------------------------------------------------------------------------------------------
# The launchers against the plain formulas
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_matches_conv_and_mean(shape, dtype, channels_last):
    t = make_inputs(shape, dtype, channels_last, _seed("fwd", shape, dtype, channels_last))
    before = snapshot(t)
    check_forward(t, front.front_fwd(t["x"], t["weight"], t["bias"]))
    assert_untouched(t, before)


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_backward_matches_autograd(shape, dtype, channels_last, combine):
    t = make_inputs(shape, dtype, channels_last, _seed("bwd", shape, dtype, channels_last, combine))
    before = snapshot(t)
    result = run_backward(t, combine)
    check_backward(t, result, combine)
    assert all(result[0].data_ptr() != v.data_ptr() for v in t.values())  # dx is a new tensor
    assert_untouched(t, before)


@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
def test_optional_parts_and_argument_forms(channels_last):
    """No dpool; no bias; weight as (C_r, C) and in bf16 (cast to x's dtype for the dot); dy in fp32 and in the other
    memory format (converted to x's dtype and layout); maps in x's dtype."""
    shape = (2, 37, 5, 9, 6)
    t = make_inputs(shape, torch.float16, channels_last, _seed("forms", channels_last))
    check_backward(t, run_backward(t, "product", dpool=False), "product", dpool=False)
    no_bias = dict(t, bias=torch.zeros_like(t["bias"]))
    check_forward(no_bias, front.front_fwd(t["x"], t["weight"], None))
    flat = t["weight"].reshape(shape[4], shape[1])
    assert torch.equal(front.front_fwd(t["x"], flat, t["bias"])[1], front.front_fwd(t["x"], t["weight"], t["bias"])[1])
    dx, dw, db = front.front_bwd(t["g"], t["x"], t["mc"], t["ms"], "sum", t["dpool"], t["dy"], flat)
    assert dw.shape == flat.shape
    t16 = dict(t, weight=t["weight"].to(torch.bfloat16), mc=t["mc"].half(), ms=t["ms"].half())
    check_forward(t16, front.front_fwd(t["x"], t16["weight"], t["bias"]))
    check_backward(t16, run_backward(t16, "sum"), "sum")
    other = dict(t, dy=t["dy"].float().contiguous(memory_format=_fmt(not channels_last)))
    result = run_backward(other, "sum")
    assert all(torch.equal(a, b) for a, b in zip(result, run_backward(t, "sum")))


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
def test_fp64_computes_in_fp64(channels_last, combine):
    """fp64 (the broadcast-multiply-sum path, no dot): every result within 1e-10 of the float64 references."""
    shape = (2, 21, 5, 7, 3)
    t = make_inputs(shape, torch.float64, channels_last, _seed("fp64", channels_last, combine), torch.float64)
    pooled, y = front.front_fwd(t["x"], t["weight"], t["bias"])
    ref_pooled, ref_y = ref_forward(t["x"], t["weight"], t["bias"])
    assert pooled.dtype == y.dtype == torch.float64
    assert_close(pooled, ref_pooled, 1e-12, 1e-12, "pooled")
    assert_close(y, ref_y, 1e-12, 1e-12, "y")
    for got, ref, what in zip(run_backward(t, combine), ref_backward(t, combine), ("dx", "dW", "db")):
        assert got.dtype == torch.float64
        assert_close(got, ref, 1e-12, 1e-12, what)


class _Front(torch.autograd.Function):
    """out = x·(1 + sigmoid(mc ⊕ ms)) by torch, (pooled, y) by front_fwd; the backward of all three by front_bwd."""

    @staticmethod
    def forward(ctx, x, weight, bias, mc, ms, combine):
        pooled, y = front.front_fwd(x, weight, bias)
        n, c, h, w = x.shape
        a, b = mc.reshape(n, c, 1, 1), ms.reshape(n, 1, h, w)
        out = x * (1 + torch.sigmoid(a + b if combine == "sum" else a * b))
        ctx.save_for_backward(x, weight, mc, ms)
        ctx.combine = combine
        return out, pooled, y

    @staticmethod
    def backward(ctx, g, dpool, dy):
        x, weight, mc, ms = ctx.saved_tensors
        g = g.contiguous(memory_format=_fmt(_common.is_channels_last(x)))
        dx, dw, db = front.front_bwd(g, x, mc, ms, ctx.combine, dpool.contiguous(), dy, weight)
        return dx, dw, db, None, None, None


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
def test_gradcheck(channels_last, combine):
    """torch.autograd.gradcheck in float64: front_bwd's dx, dW, db against finite differences of the forward (both
    kernels), and against autograd of the plain formula (the same Function with torch ops) via gradcheck's own
    comparison of the analytical Jacobian."""
    shape = (2, 5, 3, 4, 2)
    t = make_inputs(shape, torch.float64, channels_last, _seed("gradcheck", channels_last, combine), torch.float64)
    leaves = [t[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias")]
    fast = (channels_last, combine) != (False, "sum")  # one full Jacobian, the rest projected (fast mode)
    assert torch.autograd.gradcheck(lambda x, w, b: _Front.apply(x, w, b, t["mc"], t["ms"], combine), leaves,
                                    eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=fast)


# ----------------------------------------------------------------------------------------------------------------------
# Every config of both lists through the launchers (the interpreter's autotuner runs only the first)
# ----------------------------------------------------------------------------------------------------------------------


def test_config_lists():
    """Each list has several configs; the backward's split unit is a multiple of every BLOCK_P; the forward's partial
    buffer is sized for the smallest BLOCK_P; every dot is at least 16 wide."""
    for kind in ("front_fwd", "front_bwd"):
        configs = _common.all_configs(kind)
        assert len(configs) > 1 and len({_common.config_id(cf) for cf in configs}) == len(configs)
        assert all(meta["BLOCK_P"] >= 16 and meta["BLOCK_K"] >= 16 for meta, _ in configs)
    assert all(front.P_SPLIT_UNIT % meta["BLOCK_P"] == 0 for meta, _ in _common.all_configs("front_bwd"))
    assert front._MIN_FWD_BLOCK_P == min(meta["BLOCK_P"] for meta, _ in _common.all_configs("front_fwd"))
    assert [front.hidden_pad(h) for h in (1, 3, 16, 17, 32, 40, 64)] == [16, 16, 16, 32, 32, 64, 64]


@pytest.mark.parametrize("config", _common.all_configs("front_fwd"), ids=_common.config_id)
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
def test_forward_every_config(config, channels_last):
    for dtype, shape in ((torch.float32, (2, 70, 11, 13, 5)), (torch.bfloat16, (1, 150, 3, 5, 40))):
        t = make_inputs(shape, dtype, channels_last, _seed("fwd-cfg", dtype, channels_last))
        check_forward(t, front.front_fwd(t["x"], t["weight"], t["bias"], config=config))


@pytest.mark.parametrize("config", _common.all_configs("front_bwd"), ids=_common.config_id)
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
def test_backward_every_config(config, channels_last):
    # (3, 70, 17, 19): H·W = 323 in 3 chunks per image, 9 chunks in 9 splits (interpreter plan), ragged blocks.
    for dtype, combine, shape in ((torch.float32, "sum", (3, 70, 17, 19, 5)),
                                  (torch.float16, "product", (1, 150, 3, 5, 40))):
        t = make_inputs(shape, dtype, channels_last, _seed("bwd-cfg", dtype, channels_last))
        check_backward(t, run_backward(t, combine, config=config), combine)


# ----------------------------------------------------------------------------------------------------------------------
# Plans: splits, scalars, determinism
# ----------------------------------------------------------------------------------------------------------------------

RESNET_SHAPES = ((32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14))


def test_plans_pass_ints_and_cover_the_work():
    """Scalars are ints (a Python float would be fp32 on a GPU); the backward's splits cover every chunk once."""
    for shape in RESNET_SHAPES + ((1, 19, 7, 7), (3, 70, 17, 19)):
        for dtype in (torch.float16, torch.float32, torch.float64):
            for channels_last in LAYOUTS:
                hidden = max(1, shape[1] // 16)
                plans = (front.front_fwd_plan(shape, dtype, channels_last, hidden, 132),
                         front.front_bwd_plan(shape, dtype, channels_last, hidden, "sum", True, 132))
                for plan in plans:
                    assert all(type(v) is int for v in plan.scalars), plan.scalars
                    assert not any(isinstance(v, float) for _, v in plan.constexprs)
                    assert "batch_bucket" in plan.kernel.keys and plan.tuning_key[0] == _common.n_bucket(shape[0])
                n_chunks, per_split, batch_bucket = plans[1].scalars
                n_splits = plans[1].grid[1][0]
                assert n_chunks == shape[0] * -(-shape[2] * shape[3] // front.P_SPLIT_UNIT)
                assert (n_splits - 1) * per_split < n_chunks <= n_splits * per_split
                assert plans[1].buffer("dw_partial")[0] == (n_splits, hidden, shape[1])


def test_backward_split_at_the_resnet_shapes():
    """On a 132-SM GPU: the dW/db partials (written and read once) stay under 1/8 of the bytes of g, x and dx, and
    within that as many programs as the GPU needs: 800 at 256x56x56 (200 splits x 4 channel chunks of 64), the
    most the bound allows at 512x28x28 (448) and 1024x14x14 (128; 256 with BLOCK_K = 32)."""
    expected_splits = {256: 200, 512: 56, 1024: 8}
    for shape in RESNET_SHAPES:
        n, c, h, w = shape
        hidden = c // 16
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            plan = front.front_bwd_plan(shape, dtype, True, hidden, "sum", True, 132)
            n_splits = plan.grid[1][0]
            partial_bytes = 2 * 4 * n_splits * hidden * (c + 1)
            assert partial_bytes <= 3 * dtype.itemsize * n * c * h * w / 8, (shape, dtype, n_splits)
            if dtype != torch.float32:
                assert n_splits == expected_splits[c], (shape, n_splits)


@pytest.mark.parametrize("channels_last", LAYOUTS, ids=LAYOUT_IDS)
def test_deterministic(channels_last):
    """No atomics: two runs are bitwise equal (several pixel blocks, channel chunks and pixel splits)."""
    shape = (3, 150, 17, 19, 10)
    t = make_inputs(shape, torch.float16, channels_last, _seed("det", channels_last))
    assert front.front_bwd_plan(shape[:4], torch.float16, channels_last, 10, "sum").grid[1][0] > 1
    first, second = front.front_fwd(t["x"], t["weight"], t["bias"]), front.front_fwd(t["x"], t["weight"], t["bias"])
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for combine in COMBINES:
        first, second = run_backward(t, combine), run_backward(t, combine)
        assert all(torch.equal(a, b) for a, b in zip(first, second))


# ----------------------------------------------------------------------------------------------------------------------
# Autotuning: keys, hooks, pruning, pinning
# ----------------------------------------------------------------------------------------------------------------------

TUNERS = {"front_fwd": front.front_fwd_kernel, "front_bwd": front.front_bwd_kernel}


def test_autotuners_follow_the_project_rules():
    """Keyed on the batch bucket (not specialised on it), no hooks or restore_value; the interpreter runs the first
    config only."""
    for kind, tuner in TUNERS.items():
        assert "batch_bucket" in tuner.keys and "n_chunks" not in tuner.keys
        # Compiled mode keeps do_not_specialize on the JITFunction; the interpreter of Triton >= 3.3 in its kwargs, that
        # of 3.2 nowhere (the compiled-mode subprocess test below checks it there).
        jit_options = getattr(tuner.fn, "kwargs", None) or vars(tuner.fn)
        if "do_not_specialize" in jit_options:
            assert "batch_bucket" in jit_options["do_not_specialize"]
        assert not tuner.restore_value and not tuner.reset_to_zero
        assert not tuner.user_defined_pre_hook and not tuner.user_defined_post_hook
        assert tuner.early_config_prune is not None
        if _common.INTERPRETED:
            assert len(tuner.configs) == 1 and tuner.configs[0].kwargs == _common.all_configs(kind)[0][0]
        else:
            assert len(tuner.configs) == len(_common.all_configs(kind))


def _plan(kind, shape, dtype, channels_last, sms=132):
    hidden = max(1, shape[1] // 16)
    if kind == "front_fwd":
        return front.front_fwd_plan(shape, dtype, channels_last, hidden, sms)
    return front.front_bwd_plan(shape, dtype, channels_last, hidden, "sum", True, sms)


def test_pruner():
    """Never empty; at the ResNet-50 shapes it keeps the first config (the pinned default) and at least two others;
    every kept config respects the register budget and the 32-element contiguous block."""
    for kind in TUNERS:
        for shape in RESNET_SHAPES + ((1, 8, 1, 1), (2, 19, 7, 7), (1, 4096, 3, 3)):
            for channels_last in LAYOUTS:
                plan = _plan(kind, shape, torch.float16, channels_last)
                kept = plan.kept_configs()
                assert kept
                if shape in RESNET_SHAPES:
                    assert kept[0] == _common.all_configs(kind)[0] and len(kept) >= 3, (kind, shape, kept)
                    for meta, warps in kept:
                        assert meta["BLOCK_K" if channels_last else "BLOCK_P"] >= 32
                        sizes = front.tile_elements(kind, meta, warps, front.hidden_pad(shape[1] // 16))
                        limits = front._FWD_LIMITS if kind == "front_fwd" else front._BWD_LIMITS
                        assert all(sizes[k] <= v for k, v in limits.items())
                        if kind == "front_bwd":
                            assert front.hidden_pad(shape[1] // 16) * meta["BLOCK_P"] <= front._BWD_DY_TILE


# The fp32-only entries at the end of kernels/_common.py's lists: the FMA budget needs them where no other config fits
# it (forward at C_r = 128, backward everywhere: 16 warps, one element of dx per thread).
FP32_CONFIGS = {"front_fwd": [(dict(BLOCK_P=32, BLOCK_K=32), 8)],
                "front_bwd": [(dict(BLOCK_K=32, BLOCK_P=16), 16), (dict(BLOCK_K=16, BLOCK_P=32), 16)]}
AOT_SHAPES = RESNET_SHAPES + ((32, 2048, 7, 7),)


def _kept(kind, shape, dtype, channels_last, configs):
    """What ``kind``'s pruner keeps of ``configs`` ((meta, warps) pairs) for a launch at ``shape`` (r = 16)."""
    plan = _plan(kind, shape, dtype, channels_last)
    kept = plan.kernel.early_config_prune([triton.Config(dict(meta), num_warps=w) for meta, w in configs],
                                          dict(zip(plan.scalar_names(), plan.scalars)), **plan.constexpr_kwargs)
    return [(dict(cf.kwargs), cf.num_warps) for cf in kept]


def test_pruner_fp32():
    """fp32 keeps at the ResNet-50 shapes (2048x7x7 too) only configs within the FMA budget, at least one; fp16, bf16
    and fp64 never keep the fp32-only configs: they keep what they would keep without them."""
    for kind in TUNERS:
        configs = _common.all_configs(kind)
        assert configs[-len(FP32_CONFIGS[kind]):] == FP32_CONFIGS[kind]
        others = configs[:-len(FP32_CONFIGS[kind])]
        for shape in AOT_SHAPES + ((1, 8, 1, 1), (2, 19, 7, 7), (1, 4096, 3, 3)):
            for channels_last in LAYOUTS:
                if shape in AOT_SHAPES:
                    kept = _kept(kind, shape, torch.float32, channels_last, configs)
                    r_pad = front.hidden_pad(shape[1] // 16)
                    assert kept and all(front.fits(kind, meta, warps, r_pad, front.DOT_FMA) for meta, warps in kept)
                for dtype in (torch.float16, torch.bfloat16, torch.float64):
                    assert _kept(kind, shape, dtype, channels_last, configs) == \
                        _kept(kind, shape, dtype, channels_last, others)


@pytest.mark.skipif(triton.__version__.startswith("3.2."), reason="Triton 3.2's triton.autotune drops do_bench (the "
                    "counting timer); tests/triton_compat gives it one that refuses to time without a GPU")
def test_one_tuning_per_batch_bucket(monkeypatch):
    """A fresh autotuner with each kernel's key, pruner and GPU configs, timed by a counting mock (that really runs
    each config): batch sizes 1, 2, 3, 4, 5 tune 3 times (buckets 1, 2, 4, 8), not once per N."""
    for kind, name in (("front_fwd", "front_fwd_kernel"), ("front_bwd", "front_bwd_kernel")):
        tuner = TUNERS[kind]
        timed = []

        def timer(kernel_call, quantiles):
            kernel_call()
            timed.append(1)
            return [float(len(timed))] * 3

        configs = [triton.Config(meta, num_warps=w) for meta, w in _common.all_configs(kind)]
        fresh = triton.autotune(configs=configs, key=tuner.keys, do_bench=timer,
                                prune_configs_by={"early_config_prune": tuner.early_config_prune})(tuner.fn)
        monkeypatch.setattr(front, name, fresh)
        for n in (1, 2, 3, 4, 5):
            t = make_inputs((n, 16, 8, 8, 2), torch.float32, False, _seed("buckets", n))
            if kind == "front_fwd":
                check_forward(t, front.front_fwd(t["x"], t["weight"], t["bias"]))
            else:
                check_backward(t, run_backward(t, "sum"), "sum")
        assert len(fresh.cache) == 4, sorted(fresh.cache)


@cpu_only("imports the kernels in a compiled-mode subprocess of the CPU machine")
def test_bam_triton_autotune_0_pins_the_front_kernels():
    code = ("import torch\n"
            "from bam_triton.kernels import _common, front\n"
            "assert _common.PINNED and not _common.INTERPRETED\n"
            "for kind, k in (('front_fwd', front.front_fwd_kernel), ('front_bwd', front.front_bwd_kernel)):\n"
            "    plan = (front.front_fwd_plan if kind == 'front_fwd' else\n"
            "            lambda *a: front.front_bwd_plan(*a[:4], 'sum', True, a[4]))((32, 256, 56, 56),\n"
            "            torch.float16, True, 16, 132)\n"
            "    assert len(k.configs) > 1 and len(plan.kept_configs()) > 1\n"
            "    assert 'batch_bucket' in k.fn.do_not_specialize\n"
            "    assert _common.untimed_config(plan) == _common.all_configs(kind)[0]\n")
    run_compiled(code, BAM_TRITON_AUTOTUNE="0")


# ----------------------------------------------------------------------------------------------------------------------
# Ahead-of-time evidence: sm_80 and sm_90, every kept config at the ResNet-50 BAM shapes (r = 16), fp16, bf16, fp32
# ----------------------------------------------------------------------------------------------------------------------

AOT_ARCHS = (80, 90)
# The tensor-core dtypes compiled; `make test-triton-compat` compiles fp16 only under the versions between the oldest
# and the newest (bf16 takes the same path: the same configs spilled by the same amounts on 3.4, within 16 bytes).
AOT_DTYPES = tuple(os.environ.get("BAM_TRITON_AOT_DTYPES", "fp16,bf16").split(","))
_TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
KERNEL_OF = {"front_fwd": "front_fwd_kernel", "front_bwd": "front_bwd_kernel"}


def aot_jobs():
    """Every config the pruner keeps, for both kernels, at the ResNet-50 BAM shapes (batch 32, r = 16) and 2048x7x7
    (C_r = 128, where Triton 3.4 and 3.5 spilled), fp16 and bf16, both layouts, sm_80 and sm_90 (``bam-triton
    inspect``'s jobs: the launchers' plans); fp32 the same."""
    from bam_triton.bench import inspect as aot

    jobs = []
    for kind in TUNERS:
        kernel = KERNEL_OF[kind]
        for arch in AOT_ARCHS:
            for dtype in AOT_DTYPES + ("fp32",):
                for shape in AOT_SHAPES:
                    for layout in LAYOUT_IDS:
                        for index in range(len(_common.all_configs(kind))):
                            if aot.runs(kernel, kind, index, dtype, shape, layout, arch):
                                jobs.append(aot.make_job(kernel, kind, index, arch, dtype, shape, layout))
    return jobs


def x_load_bits(shape, dtype, layout):
    """The widest vector x's contiguous rows allow: 128 bits when a row start is 16-byte aligned (H·W·itemsize for
    NCHW, C·itemsize for channels_last), else the alignment they have (NCHW 14x14 fp16: 392-byte rows, 64 bits)."""
    n, c, h, w = shape
    row = (c if layout == "channels_last" else h * w) * _TORCH_DTYPE[dtype].itemsize
    return 8 * math.gcd(row, 16)


@pytest.fixture(scope="module")
def aot_results():
    from bam_triton.bench import inspect as aot

    return aot.run_jobs(aot_jobs())


def _aot_head(r):
    """A compiled variant's name in failure messages: kind, config, arch, dtype, shape, layout."""
    config = _common.config_id((r["meta"], r["num_warps"])) if "meta" in r else r["config"]
    return f"{r['kind']} {config} sm_{r['arch']} {r['dtype']} {'x'.join(map(str, r['shape']))} {r['layout']}"


def _spill_bytes(r):
    return r.get("spill_stores", 0) + r.get("spill_loads", 0)


@cpu_only("compiles ahead of time in subprocesses without the interpreter; a CUDA run compiles for real")
def test_aot_tensor_cores_vector_loads_no_spills(aot_results):
    """Every kept config: compiles, uses tensor cores (mma.sync on sm_80; wgmma or mma.sync on sm_90), loads x only
    in vectors as wide as its rows' alignment allows (128-bit everywhere but NCHW 14x14), spills nothing."""
    lines, failures = [], []
    for r in aot_results:
        if r["dtype"] == "fp32":  # test_aot_fp32_fma_no_spills
            continue
        head = _aot_head(r)
        if "error" in r:
            failures.append(f"{head}: {r['error']}")
            continue
        x_bits = sorted(int(b) for b in r["access"].get("x_ptr", {}).get("load", {}))
        spill = _spill_bytes(r)
        lines.append(f"{head}: {r.get('registers', r.get('ptxas_registers'))} registers, {spill} spill bytes, "
                     f"mma {r['mma']}, wgmma {r['wgmma']}, x loads {x_bits}")
        expected = x_load_bits(r["shape"], r["dtype"], r["layout"])
        problems = [what for what, bad in (
            ("no tensor-core instruction", (r["mma"] if r["arch"] == 80 else r["mma"] + r["wgmma"]) == 0),
            (f"x loads {x_bits}, expected [{expected}]", x_bits != [expected]),
            (f"{spill} spill bytes", spill != 0 or not r["ptxas_ok"])) if bad]
        if problems:
            failures.append(f"{head}: {'; '.join(problems)}")
    print("\n".join(lines))
    assert not failures, "\n".join(failures)
    kinds = {(r["kind"], r["arch"], r["dtype"], r["layout"]) for r in aot_results if r["dtype"] != "fp32"}
    assert len(kinds) == len(TUNERS) * len(AOT_ARCHS) * len(AOT_DTYPES) * len(LAYOUT_IDS)


@cpu_only("compiles ahead of time in subprocesses without the interpreter; a CUDA run compiles for real")
def test_aot_fp32_fma_no_spills(aot_results):
    """fp32, every kept config at AOT_SHAPES: compiles to FMA (IEEE: no TF32 tensor cores) and spills nothing."""
    lines, failures = [], []
    results = [r for r in aot_results if r["dtype"] == "fp32"]
    for r in results:
        head = _aot_head(r)
        if "error" in r:
            failures.append(f"{head}: {r['error']}")
            continue
        spill = _spill_bytes(r)
        lines.append(f"{head}: {r.get('registers', r.get('ptxas_registers'))} registers, {spill} spill bytes")
        if r["tf32"] or r["mma"] or r["wgmma"]:
            failures.append(f"{head}: the fp32 dot uses TF32 tensor cores")
        if spill or not r["ptxas_ok"]:
            failures.append(f"{head}: {spill} spill bytes")
    print("\n".join(lines))
    assert not failures, "\n".join(failures)
    cases = {(r["kind"], r["arch"], tuple(r["shape"]), r["layout"]) for r in results}
    assert len(cases) == len(TUNERS) * len(AOT_ARCHS) * len(AOT_SHAPES) * len(LAYOUT_IDS)


@cpu_only("the device test run has no ahead-of-time part")
def test_x_load_bits():
    assert x_load_bits((32, 256, 56, 56), "fp16", "nchw") == 128
    assert x_load_bits((32, 1024, 14, 14), "bf16", "nchw") == 64
    assert x_load_bits((32, 1024, 14, 14), "fp16", "channels_last") == 128


def test_device_of_the_run():
    assert TEST_DEVICE.type == ("cuda" if ON_CUDA else "cpu")
    assert _common.INTERPRETED != ON_CUDA
