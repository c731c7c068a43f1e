"""The host side of the Triton path (issue 13): memoised plans, the autotuner run once per plan, no custom-op dispatch
in eager mode, partial-sum buffers sized for the config that runs, and ``bam-triton overhead``, which times it all
with the kernels skipped. Timings are not asserted (a loaded machine would fail them); what makes them small is."""
import importlib
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.autotuner import Autotuner

from bam_triton import BAM, bam_apply, channel_pool, kernels
from bam_triton import ops as ops_mod
from bam_triton._dtypes import assert_close
from bam_triton.bench import overhead
from bam_triton.kernels import _common
from bam_triton.kernels import front as front_mod
from devices import TEST_DEVICE, cpu_only
from reference import ref_apply

bwd_mod = importlib.import_module("bam_triton.kernels.apply_bwd")


def _gen(*parts):
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _x(shape, *seed, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.randn(shape, generator=_gen(shape, *seed)).to(TEST_DEVICE).contiguous(memory_format=fmt)


@pytest.fixture
def autotuner_runs(monkeypatch):
    """Counts Autotuner.run calls (every kernel is an Autotuner)."""
    runs = []
    real = Autotuner.run

    def counting(self, *args, **kwargs):
        runs.append(self.base_fn.__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counting)
    return runs


def test_plans_are_memoised():
    shape = (2, 8, 4, 4)
    plan = kernels.apply_fwd_plan(shape, torch.float32, False, "sum")
    assert kernels.apply_fwd_plan(shape, torch.float32, False, "sum") is plan
    assert kernels.apply_fwd_plan(shape, torch.float32, True, "sum") is not plan
    _common.forget_plans()
    assert kernels.apply_fwd_plan(shape, torch.float32, False, "sum") is not plan


def test_the_autotuner_runs_once_per_plan_then_its_config_is_launched_directly(autotuner_runs):
    x = _x((2, 8, 5, 3), "once")
    mc, ms = torch.randn(2, 8, device=TEST_DEVICE), torch.randn(2, 15, device=TEST_DEVICE)
    expected = ref_apply(x, mc, ms.reshape(2, 5, 3), "sum")
    for _ in range(3):  # the kernel really runs each time, through the autotuner only the first
        assert_close(kernels.apply_fwd(x, mc, ms, "sum"), expected, torch.float32)
    assert autotuner_runs == ["apply_fwd_kernel"]
    plan = kernels.apply_fwd_plan(tuple(x.shape), x.dtype, False, "sum")
    [(state, (meta, jit_kwargs, grid, config))] = plan.tuned.items()
    assert state == _common.tuning_state(x.device, [x.dtype, mc.dtype, ms.dtype, x.dtype])
    assert config is plan.kernel.best_config and meta == config.kwargs and jit_kwargs["num_warps"] == config.num_warps
    assert grid == plan.grid_for(meta) and jit_kwargs["INNER"] == 15
    kernels.apply_fwd(_x((3, 8, 5, 3), "new"), torch.zeros(3, 8, device=TEST_DEVICE),
                      torch.zeros(3, 15, device=TEST_DEVICE), "sum")  # another shape: another plan
    assert autotuner_runs == ["apply_fwd_kernel"] * 2


def test_a_plan_is_tuned_per_dtype_of_its_small_maps(autotuner_runs):
    """Triton's autotuner keys its choice on every tensor argument's dtype: a plan tuned with fp32 maps is not reused
    for bf16 maps (the plan's own description, x's shape, dtype and layout, is the same), as it was."""
    x = _x((2, 8, 5, 3), "map dtypes")
    plan = kernels.apply_fwd_plan(tuple(x.shape), x.dtype, False, "sum")
    for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
        mc, ms = torch.randn(2, 8, device=TEST_DEVICE), torch.randn(2, 15, device=TEST_DEVICE)
        mc, ms = mc.to(dtype), ms.to(dtype)
        assert_close(kernels.apply_fwd(x, mc, ms, "sum"), ref_apply(x, mc.float(), ms.float().reshape(2, 5, 3), "sum"),
                     dtype)
    assert autotuner_runs == ["apply_fwd_kernel"] * 2
    assert {state[2] for state in plan.tuned} == {torch.float32, torch.bfloat16}


def test_a_bam_training_step_runs_no_autotuner_once_warm(autotuner_runs):
    bam = BAM(16, reduction=4, backend="triton").to(TEST_DEVICE)
    x = _x((2, 16, 6, 6), "warm").requires_grad_()
    bam(x).sum().backward()
    assert len(autotuner_runs) == 4  # pooling, apply, reductions, dx
    autotuner_runs.clear()
    bam(x).sum().backward()
    assert autotuner_runs == []


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_custom_ops(monkeypatch):
    """The Python entry points of the bam_triton custom ops raise: eager calls must not go through them."""
    def refuse(*args, **kwargs):
        raise AssertionError("a bam_triton custom op was dispatched in eager mode")

    for name in ("_triton_channel_pool", "_triton_apply", "_triton_apply_backward"):
        monkeypatch.setattr(ops_mod, name, refuse)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_eager_calls_launch_without_custom_op_dispatch(no_custom_ops, grad):
    x = _x((2, 8, 3, 5), "eager", grad).requires_grad_(grad)
    mc = torch.randn(2, 8, device=TEST_DEVICE, requires_grad=grad)
    ms = torch.randn(2, 3, 5, device=TEST_DEVICE, requires_grad=grad)
    out = bam_apply(x, mc, ms, backend="triton")
    pooled = channel_pool(x, backend="triton")
    bam = BAM(8, reduction=2, backend="triton").to(TEST_DEVICE).train(grad)
    y = bam(x)
    if grad:
        (out.sum() + pooled.sum() + y.sum()).backward()
        assert x.grad is not None and mc.grad is not None and ms.grad is not None


def test_a_dispatch_mode_sees_the_custom_ops():
    """Under a TorchDispatchMode (and for tensor subclasses, and under torch.compile) the custom ops run, so that what
    observes the ops sees them."""
    x = _x((2, 8, 3, 5), "mode").requires_grad_()
    mc = torch.randn(2, 8, device=TEST_DEVICE, requires_grad=True)
    ms = torch.randn(2, 3, 5, device=TEST_DEVICE, requires_grad=True)
    with _OpLog() as log:
        bam_apply(x, mc, ms, backend="triton").sum().backward()
        channel_pool(x.detach(), backend="triton")
    assert {"bam_triton.apply.default", "bam_triton.apply_backward.default",
            "bam_triton.channel_pool.default"} <= set(log.ops)


def test_skip_kernels_runs_nothing_and_records_each_launch():
    x = _x((2, 8, 4, 4), "skip")
    mc, ms = torch.zeros(2, 8, device=TEST_DEVICE), torch.zeros(2, 16, device=TEST_DEVICE)
    with _common.skip_kernels(), _common.record_launches() as launches:
        out = kernels.apply_fwd(x, mc, ms, "sum")
    assert [plan.kernel_name for plan, _ in launches] == ["apply_fwd_kernel"]
    assert launches[0][1]["out_ptr"] == out.numel() * 4
    assert not kernels.apply_fwd_plan((2, 8, 4, 4), torch.float32, False, "sum").tuned  # nothing ran: nothing tuned
    assert_close(kernels.apply_fwd(x, mc, ms, "sum"), x * 1.5, torch.float32)  # and the real launch still runs


def _partial_bytes(launcher, name):
    with _common.record_launches() as launches:
        launcher()
    return launches[-1][1][name]


def test_partial_buffers_are_sized_for_the_config_that_runs():
    """The dmc partials of the backward reduction and the front end's pooling partials have one row per block of the
    config: sized for it where it is known (META tensors: the first kept config), for the smallest block otherwise."""
    n, c, h, w = shape = (4, 64, 56, 56)
    x = torch.empty(shape, device="meta")
    mc, ms = torch.empty(n, c, device="meta"), torch.empty(n, h * w, device="meta")
    reduce = bwd_mod.reduce_plan(shape, torch.float32, False, "sum", False)
    block_hw = reduce.first_kept_meta["BLOCK_HW"]
    dmc_bytes = _partial_bytes(lambda: kernels.apply_bwd_reduce(x, x, mc, ms, "sum"), "dmc_partial_ptr")
    assert dmc_bytes == n * -(-h * w // block_hw) * c * 4
    front = front_mod.front_fwd_plan(shape, torch.float32, False, 4)
    block_p = front.first_kept_meta["BLOCK_P"]
    assert block_p > front_mod._MIN_FWD_BLOCK_P  # so the sizing matters here
    pool_bytes = _partial_bytes(lambda: kernels.front_fwd(x, torch.empty(4, c, 1, 1, device="meta"), None),
                                "pool_partial_ptr")
    assert pool_bytes == n * -(-h * w // block_p) * c * 4


def test_overhead_measurement_counts_the_launches_of_each_call():
    report = overhead.measure((2, 16, 4, 4), reps=3, device=TEST_DEVICE)
    assert [row["launches"] for row in report.values()] == [2, 4, 1, 1, 2]
    assert all(row["total_us"] > 0 for row in report.values())
    single = overhead.measure((2, 16, 4, 4), reps=3, device=TEST_DEVICE, single_read=True)
    assert single[overhead.CASES[0]]["launches"] == 2 and single[overhead.CASES[1]]["launches"] == 4
    text = overhead.format_report(report, "title")
    assert text.splitlines()[0] == "title" and all(case in text for case in overhead.CASES)


@cpu_only("the command's CPU report (on CUDA it also launches the kernels)")
def test_overhead_command_reports_against_the_same_machine_reference(tmp_path, capsys):
    import json

    from bam_triton.bench.timing import HOST_REFERENCE
    from bam_triton.cli import main

    assert main(["overhead", "--shape", "2x16x4x4", "--reps", "3", "--json", str(tmp_path / "o.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Same-machine reference, {HOST_REFERENCE}: ")
    saved = json.loads((tmp_path / "o.json").read_text())
    reference = (saved["reference"]["us_before"] + saved["reference"]["us_after"]) / 2
    assert reference > 0 and len(saved["reports"]) == 2
    for title, report in saved["reports"].items():
        table = out[out.index(title):].splitlines()
        assert "x ref" in table[1]
        own, ratio = table[2].split()[-5:-3]  # the first case's row: ... own, x ref, total, stand-ins, launches
        assert float(ratio) == pytest.approx(report[overhead.CASES[0]]["own_us"] / reference, abs=0.051)
        assert float(own) == pytest.approx(report[overhead.CASES[0]]["own_us"], abs=0.051)


@cpu_only("checks the CLI's refusal of CUDA where there is none")
def test_overhead_command_refuses_bad_arguments(capsys):
    from bam_triton.cli import main

    assert main(["overhead", "--reps", "0"]) == 2
    assert "error: bam-triton overhead: --reps must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["overhead", "--device", "cuda"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_skip_kernels_holds_for_its_own_thread_only():
    import threading

    x = _x((2, 8, 4, 4), "thread")
    mc, ms = torch.zeros(2, 8, device=TEST_DEVICE), torch.zeros(2, 16, device=TEST_DEVICE)
    results = {}
    with _common.skip_kernels():
        worker = threading.Thread(target=lambda: results.update(out=kernels.apply_fwd(x, mc, ms, "sum")))
        worker.start()
        worker.join()
    assert_close(results["out"], x * 1.5, torch.float32)  # the other thread's launch ran
