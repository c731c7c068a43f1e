"""What a GPU runs and the interpreter hides (issue 11): float scalar arguments, the launch device, autotuner hooks,
autotune keys across batch sizes, the row-tile pruner, pinned configs; and, in a CUDA run, every config of every
kernel compiled at every code path the launchers choose.

The CPU tests run the real launchers through the interpreter with the GPU-only pieces observed or mocked (the launch
helper's device guard, the autotuner's timer); ahead-of-time compilation checks what the PTX does with fp64."""
import dataclasses
import importlib
import unittest.mock
import zlib

import pytest
import torch

from bam_triton import kernels
from bam_triton._dtypes import assert_close
from bam_triton.bench import inspect as aot
from bam_triton.kernels import _common
from bam_triton.kernels import apply as apply_mod
from bam_triton.kernels import pool as pool_mod
from devices import TEST_DEVICE, cpu_only, cuda_only, run_compiled
from reference import ref_apply, ref_grads

bwd_mod = importlib.import_module("bam_triton.kernels.apply_bwd")
KERNEL_MODULES = (pool_mod, apply_mod, bwd_mod)


def _gen(*parts):
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _inputs(shape, dtype, channels_last, *seed):
    """x, g (x's layout), mc (N, C), ms (N, H·W) on the test device; values drawn on CPU."""
    gen = _gen(shape, dtype, channels_last, *seed)
    n, c, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, g = (torch.randn(shape, generator=gen).to(TEST_DEVICE, dtype).contiguous(memory_format=fmt) for _ in range(2))
    mc = torch.randn(n, c, generator=gen).to(TEST_DEVICE)
    ms = torch.randn(n, h * w, generator=gen).to(TEST_DEVICE)
    return x, g, mc, ms


def _close(got, ref, dtype, what):
    assert_close(got, ref, dtype, what=what)


def _every_launcher(shape=(2, 16, 7, 7), dtype=torch.float32):
    """Run every launcher once (NCHW 7x7 fp32: the row-group pooling and reduction; channels_last: the 2D tiles)."""
    for channels_last in (False, True):
        x, g, mc, ms = _inputs(shape, dtype, channels_last, "launchers")
        kernels.channel_pool_fwd(x, channels_last)
        kernels.apply_fwd(x, mc, ms, "sum")
        kernels.apply_bwd(g, x, mc, ms, "product")
        kernels.apply_bwd_reduce(g, x, mc, ms, "sum")
        kernels.apply_bwd_dx(g, x, mc, ms, "sum", dpool=mc, dx_extra=g)


# ----------------------------------------------------------------------------------------------------------------------
# Float scalars: fp32 on a GPU
# ----------------------------------------------------------------------------------------------------------------------


def test_no_launch_passes_a_float_scalar(monkeypatch):
    """Compiled Triton types a Python float argument as fp32 (1 / (H·W) for fp64 means, say), where the interpreter
    keeps a double: every launch must pass ints only."""
    seen = []
    real = _common.launch

    def spy(plan, *tensors, config=None):
        seen.append((plan.kernel_name, plan.scalars, dict(plan.constexprs)))
        return real(plan, *tensors, config=config)

    for module in KERNEL_MODULES:
        monkeypatch.setattr(module, "launch", spy)
    _every_launcher(dtype=torch.float64)
    assert {name for name, _, _ in seen} == {"channel_pool_kernel", "channel_pool_rows_kernel", "apply_fwd_kernel",
                                             "apply_bwd_reduce_kernel", "apply_bwd_reduce_rows_kernel",
                                             "apply_bwd_dx_kernel"}
    for name, scalars, constexprs in seen:
        assert all(isinstance(v, int) for v in scalars), (name, scalars)
        assert not any(isinstance(v, float) for v in constexprs.values()), (name, constexprs)


def test_a_launch_plan_refuses_a_float_scalar():
    plan = kernels.apply_fwd_plan((1, 2, 3, 4), torch.float32, False, "sum")
    with pytest.raises(TypeError, match="float scalar"):
        _common.LaunchPlan(plan.kernel, plan.kind, plan.grid, plan.scalars[:-1] + (0.5,), plan.constexprs)


@cpu_only("compiles ahead of time on the CPU; the CUDA run compiles for real")
def test_fp64_pooling_has_no_fp32_parameter_in_ptx():
    """The compiled fp64 pooling kernels take no fp32 parameter and divide in fp64 (sm_90 PTX)."""
    jobs = [aot.make_job(kernel, kind, 0, 90, "fp64", shape, "nchw")
            for kernel, kind, shape in (("channel_pool_kernel", "pool", (2, 64, 56, 56)),
                                        ("channel_pool_rows_kernel", "rows", (2, 64, 7, 7)))]
    for result in aot.run_jobs(jobs):
        assert "error" not in result, result.get("error")
        assert result["float_params"] == {}, result["float_params"]
        assert result["f64_divisions"] > 0


# ----------------------------------------------------------------------------------------------------------------------
# Device and stream
# ----------------------------------------------------------------------------------------------------------------------


def test_every_launch_runs_under_a_guard_of_its_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device and its current stream: every launch enters a guard of its first
    tensor's device (in a CUDA run, tensors on cuda:1 with cuda:0 current are tested in test_multi_gpu.py)."""
    guarded = []
    real = _common.device_guard

    def spy(device):
        guarded.append(device)
        return real(device)

    monkeypatch.setattr(_common, "device_guard", spy)
    _every_launcher()
    assert len(guarded) == 10 and set(guarded) == {TEST_DEVICE}


def test_device_guard_of_a_cuda_device_selects_it():
    guard = _common.device_guard(torch.device("cuda", 1))  # built, not entered: needs no GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_common.device_guard(torch.device("cpu")), torch.cuda.device)


# ----------------------------------------------------------------------------------------------------------------------
# Autotuner: hooks, keys, pruning, pinning
# ----------------------------------------------------------------------------------------------------------------------


def _autotuners():
    from triton.runtime.autotuner import Autotuner

    return {name: obj for module in KERNEL_MODULES for name, obj in vars(module).items() if isinstance(obj, Autotuner)}


def test_no_autotuner_times_hooks_or_copies():
    """With ``restore_value``/``reset_to_zero`` the autotuner clones and restores buffers inside the timed call, so
    the chosen config reflects the copies more than the kernel; no kernel writes over its inputs instead."""
    tuners = _autotuners()
    assert len(tuners) == 6
    for name, tuner in tuners.items():
        assert not tuner.restore_value and not tuner.reset_to_zero, name
        assert not tuner.user_defined_pre_hook and not tuner.user_defined_post_hook, name
        assert "n_elements" not in tuner.keys and "batch_bucket" in tuner.keys, (name, tuner.keys)


def test_batch_bucket():
    assert [_common.n_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 33, 64, 65)] == [1, 2, 4, 4, 8, 8, 16, 64, 64, 128]


# (launcher call, shape): each reaches one kernel; tiny so that tuning every config in the interpreter stays cheap.
_TUNED = {
    "channel_pool_kernel": (lambda x, g, mc, ms: kernels.channel_pool_fwd(x, True), (8, 4, 4), True),
    "channel_pool_rows_kernel": (lambda x, g, mc, ms: kernels.channel_pool_fwd(x, False), (16, 3, 3), False),
    "apply_fwd_kernel": (lambda x, g, mc, ms: kernels.apply_fwd(x, mc, ms, "sum"), (8, 4, 4), False),
    "apply_bwd_reduce_kernel": (lambda x, g, mc, ms: kernels.apply_bwd_reduce(g, x, mc, ms, "sum"), (8, 4, 4), True),
    "apply_bwd_reduce_rows_kernel": (lambda x, g, mc, ms: kernels.apply_bwd(g, x, mc, ms, "sum"), (16, 3, 3), False),
    "apply_bwd_dx_kernel": (lambda x, g, mc, ms: kernels.apply_bwd_dx(g, x, mc, ms, "sum", dx_extra=g), (8, 4, 4),
                            False),
}


@pytest.mark.parametrize("kernel", sorted(_TUNED))
def test_one_tuning_per_batch_bucket(monkeypatch, kernel):
    """A fresh autotuner with the kernel's own key, pruner and GPU configs, timed by a counting mock: batch sizes
    1, 2, 3, 4, 5, 8, 9 tune 5 times (buckets 1, 2, 4, 8, 16), not once per N nor once for all N (grids and splits
    change with N)."""
    import triton

    tuner = _autotuners()[kernel]
    timed = []

    def timer(kernel_call, quantiles):
        kernel_call()  # really runs (interpreter): a config that cannot run fails here
        timed.append(1)
        return [float(len(timed))] * 3

    prune = {"early_config_prune": tuner.early_config_prune} if tuner.early_config_prune else None
    fresh = triton.autotune(configs=_common.gpu_configs(aot.KERNELS_KIND[kernel]), key=tuner.keys,
                            prune_configs_by=prune, do_bench=timer)(tuner.fn)
    module = next(m for m in KERNEL_MODULES if getattr(m, kernel, None) is tuner)
    monkeypatch.setattr(module, kernel, fresh)
    call, (c, h, w), channels_last = _TUNED[kernel]
    for n in (1, 2, 3, 4, 5, 8, 9):
        call(*_inputs((n, c, h, w), torch.float32, channels_last, "buckets"))
    assert len(fresh.cache) == 5, sorted(fresh.cache)  # a key whose pruner keeps one config is cached untimed


def test_row_tile_pruner_keeps_the_largest_tile_that_fits_tiny_rows():
    configs = _common.gpu_configs("rows")
    prune = _common.row_tile_pruner(max_per_thread=8)

    def tiles(block_l):
        return sorted((cf.kwargs["BLOCK_R"] * block_l, cf.num_warps) for cf in prune(configs, {}, BLOCK_L=block_l))

    assert tiles(4) == [(64, 8)]  # fp32 H·W = 1 (K = 4): 16 rows of 4, the largest; it was 1 row of 4
    assert tiles(8) == [(128, 8)]
    assert all(1024 <= e <= 8192 for e, _ in tiles(512)) and len(tiles(512)) > 1  # the usual case is unchanged


@cpu_only("imports the kernels in a compiled-mode subprocess of the CPU machine")
def test_bam_triton_autotune_0_runs_the_first_kept_config_untimed():
    """BAM_TRITON_AUTOTUNE=0 (compiled mode): every plan's first launch runs the first config its pruner keeps without
    the autotuner (Triton 3.2 to 3.7 would time even one config), and where the pruner keeps one config that is so
    without pinning too. The launches themselves: tests/test_compiled_launches.py."""
    code = ("import torch\n"
            "from bam_triton.kernels import _common, pool\n"
            "assert _common.PINNED and not _common.INTERPRETED\n"
            "plan = pool.channel_pool_plan((32, 256, 56, 56), torch.float16, True, 132)\n"
            "kept = plan.kept_configs()\n"
            "assert len(kept) > 1 and kept[0][0]['BLOCK_C'] >= 32, kept\n"
            "assert _common.untimed_config(plan) == kept[0]\n"
            "_common.PINNED = False\n"
            "assert _common.untimed_config(plan) is None\n"
            "one = pool.channel_pool_plan((2, 8, 1, 1), torch.float32, False)  # rows of 4: one tile fits\n"
            "assert len(one.kept_configs()) == 1 and _common.untimed_config(one) == one.kept_configs()[0]\n")
    run_compiled(code, BAM_TRITON_AUTOTUNE="0")


@cpu_only("imports the kernels in a compiled-mode subprocess of the CPU machine")
def test_bam_triton_autotune_is_parsed_once_and_strictly_by_the_kernels():
    """The kernels read BAM_TRITON_AUTOTUNE through _backend's parser: 'off' pins as '0' does, and a value it does not
    know fails their import with the variable's name (it used to mean "autotune" silently)."""
    run_compiled("from bam_triton.kernels import _common\nassert _common.PINNED\n", BAM_TRITON_AUTOTUNE="Off")
    code = ("try:\n"
            "    from bam_triton.kernels import _common\n"
            "except ValueError as e:\n"
            "    assert 'BAM_TRITON_AUTOTUNE' in str(e) and 'perhaps' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('imported with BAM_TRITON_AUTOTUNE=perhaps')\n")
    run_compiled(code, BAM_TRITON_AUTOTUNE="perhaps")


# ----------------------------------------------------------------------------------------------------------------------
# CUDA: every config of every kernel, compiled, at every code path the launchers choose
# ----------------------------------------------------------------------------------------------------------------------

# (name, shape, dtype, channels_last): the 2D-tile pooling with and without an H·W split, the row-group kernels, the
# channel split of the 2D-tile reduction; the flat kernels get INDEX_64 forced on besides.
_PATHS = [
    ("2d-tiles", (2, 37, 9, 11), torch.float16, False),
    ("2d-tiles-cl", (2, 150, 9, 11), torch.bfloat16, True),
    ("hw-split", (1, 5, 48, 48), torch.float32, True),
    ("rows-fp16", (2, 40, 7, 7), torch.float16, False),
    ("rows-fp32-14x14", (2, 48, 14, 14), torch.float32, False),
]


@cuda_only("compiles every config for the GPU; the interpreter runs the same configs in test_kernels_forward.py and "
           "test_kernel_apply_bwd.py")
@pytest.mark.parametrize("path", _PATHS, ids=[p[0] for p in _PATHS])
def test_every_config_of_every_kernel_compiled(path):
    _, shape, dtype, channels_last = path
    n, c, h, w = shape
    x, g, mc, ms = _inputs(shape, dtype, channels_last, "every-config")
    ref_pool = x.double().mean(dim=(2, 3))
    ref_out = ref_apply(x, mc, ms, "product")
    dx_ref, dmc_ref, dms_ref = ref_grads(x, mc, ms, g, "product")
    sms = _common.sm_count(x.device)
    checks = 0
    plan = kernels.channel_pool_plan(shape, dtype, channels_last, sms)
    for config in plan.kept_configs():
        _close(kernels.channel_pool_fwd(x, channels_last, config=config), ref_pool, dtype, f"pool {config}")
        checks += 1
    # The flat kernels index the same way on every path: every config at the first path, with INDEX_64 forced too;
    # at the others the autotuned launch below (each compile costs about a second of a time-boxed GPU run).
    for index_64 in (False, True) if path is _PATHS[0] else ():
        real = _common.layout_plan  # what flat_plan reads INDEX_64 from
        forced = (lambda *a: dataclasses.replace(real(*a), index_64=True)) if index_64 else real
        with unittest.mock.patch.object(_common, "layout_plan", forced):
            _common.forget_plans()  # plans are memoised: make them again with the forced layout plan
            for config in kernels.apply_fwd_plan(shape, dtype, channels_last, "product").kept_configs():
                _close(kernels.apply_fwd(x, mc, ms, "product", config=config), ref_out, dtype, f"apply {config}")
                dx = kernels.apply_bwd_dx(g, x, mc, ms, "product", config=config)
                _close(dx, dx_ref, dtype, f"dx {config} index_64={index_64}")
                checks += 2
        _common.forget_plans()
    plan = kernels.reduce_plan(shape, dtype, channels_last, "product", True, sms)
    for config in plan.kept_configs():
        dx, dmc, dms = kernels.apply_bwd(g, x, mc, ms, "product", config=config)
        _close(dx, dx_ref, dtype, f"reduce dx {config}")
        torch.testing.assert_close(dmc.double().cpu(), dmc_ref.cpu(), atol=2e-3, rtol=1e-4)
        torch.testing.assert_close(dms.double().cpu(), dms_ref.cpu(), atol=2e-3, rtol=1e-4)
        checks += 1
    # And once through the real autotuner: pruning and timing every kept config on the GPU.
    _close(kernels.channel_pool_fwd(x, channels_last), ref_pool, dtype, "pool, autotuned")
    _close(kernels.apply_bwd(g, x, mc, ms, "product")[0], dx_ref, dtype, "backward, autotuned")
    _close(kernels.apply_fwd(x, mc, ms, "product"), ref_out, dtype, "apply, autotuned")
    _close(kernels.apply_bwd_dx(g, x, mc, ms, "product"), dx_ref, dtype, "dx, autotuned")
    assert checks >= 2


def test_check_reports_the_triton_features_that_change_what_runs():
    """`bam-triton check` says what this Triton has (read from its API where it shows) and what it changes; under
    every version of ``make test-triton-compat`` the API agrees with the versions read in Triton's sources."""
    import triton

    from bam_triton import selftest

    lines = selftest.triton_features()
    version = selftest._version(triton.__version__)
    cache, timing, stages, configs = lines[:4]
    assert cache.startswith("on-disk autotune cache: " + ("yes" if version >= (3, 4) else "no")), cache
    assert ("skipped by Triton" in timing) == (version >= (3, 8)), timing
    assert stages.startswith(f"triton.Config's default num_stages: {2 if version < (3, 3) else 3};"), stages
    assert "interpreter runs the first" in configs if _common.INTERPRETED else "config" in configs
    text = "\n".join(selftest.environment(torch.device("cpu")))
    assert all(line in text for line in lines)
