"""``bam-triton gpu-check`` and the Makefile's GPU paths, on CPU: the SUMMARY's verdicts on synthetic sweep rows, the
no-CUDA exit, the phase deadlines, ``make test``'s second (CUDA) pass with a stand-in Python, and the dry run end to
end."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from bam_triton.bench import gpu_check
from bam_triton.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = gpu_check.SHAPES


def _row(op, shape, dtype, provider="triton", mode="do_bench", **values):
    n, c, h, w = shape
    return dict(op=op, N=n, C=c, H=h, W=w, dtype=dtype, layout="nchw", provider=provider, timing_mode=mode, **values)


def _good_rows(dtypes=("fp16", "bf16")):
    """Rows of the triton provider that meet every target at every shape and dtype."""
    rows = []
    for shape in SHAPES:
        for dt in dtypes:
            rows += [_row("apply-fwd", shape, dt, frac_copy_bw=0.93, speedup_vs_authors_compiled=1.4, valid=True),
                     _row("apply-bwd", shape, dt, frac_copy_bw=0.91, speedup_vs_authors_compiled=1.1, valid=True),
                     _row("pool", shape, dt, frac_copy_bw=0.88, valid=True),
                     _row("bam-fwd", shape, dt, speedup_vs_authors_eager=2.3, valid=True),
                     _row("cbam-fwd", shape, dt, speedup_vs_authors_eager=1.7, valid=True),
                     _row("cbam-fwd-bwd", shape, dt, speedup_vs_authors_eager=3.1, valid=True)]
    return rows


def _by_target(judged):
    return {v["target"]: v for v in judged}


# ----------------------------------------------------------------------------------------------------------------------
# Verdicts
# ----------------------------------------------------------------------------------------------------------------------


def test_verdicts_all_met():
    judged = gpu_check.verdicts(_good_rows(), SHAPES, ["fp16", "bf16"])
    assert [v["verdict"] for v in judged] == ["met"] * len(gpu_check.TARGETS)
    fwd = judged[0]
    assert len(fwd["values"]) == 6 and fwd["detail"].startswith("lowest 93% (apply-fwd 32x256x56x56 fp16)")


def test_verdicts_not_met_names_the_cases_below():
    rows = _good_rows()
    for r in rows:
        if r["op"] == "apply-bwd" and r["C"] == 1024 and r["dtype"] == "bf16":
            r["frac_copy_bw"] = 0.84
        if r["op"] == "apply-fwd" and r["C"] == 512 and r["dtype"] == "fp16":
            r["speedup_vs_authors_compiled"] = 0.97
        if r["op"] == "pool" and r["C"] == 256:
            r["valid"] = False  # a wrong result is no speed at all
    judged = _by_target(gpu_check.verdicts(rows, SHAPES, ["fp16", "bf16"]))
    bwd = judged["apply step backward >= 90% of the copy bandwidth"]
    assert bwd["verdict"] == "not met" and bwd["below"] == ["apply-bwd 32x1024x14x14 bf16"]
    assert "below: apply-bwd 32x1024x14x14 bf16 84%" in bwd["detail"]
    compiled = judged["apply step (fwd and bwd) no slower than torch.compile (authors-compiled)"]
    assert compiled["verdict"] == "not met" and "apply-fwd 32x512x28x28 fp16 0.97x" in compiled["detail"]
    assert judged["pooling >= 85% of the copy bandwidth"]["verdict"] == "not met"
    assert judged["apply step forward >= 90% of the copy bandwidth"]["verdict"] == "met"


def test_cbam_verdicts_beside_bam():
    rows = _good_rows()
    for r in rows:
        if r["op"] == "cbam-fwd-bwd" and r["C"] == 512 and r["dtype"] == "fp16":
            r["speedup_vs_authors_eager"] = 2.2
    judged = _by_target(gpu_check.verdicts(rows, SHAPES, ["fp16", "bf16"]))
    assert judged["whole CBAM forward >= 1.5x the authors' eager code"]["verdict"] == "met"
    step = judged["CBAM training step (forward+backward) >= 2.5x the authors' eager code"]
    assert step["verdict"] == "not met" and step["below"] == ["cbam-fwd-bwd 32x512x28x28 fp16"]


def test_verdicts_missing_cases_and_other_rows_ignored():
    """A case not measured (a row cut by the time budget, or a speedup whose other provider never ran) makes a
    target 'missing', unless a measured case is already below it. Rows of other providers and timing modes (the
    interpreter's, CUDA graphs') are not judged."""
    rows = [r for r in _good_rows() if not (r["op"] == "bam-fwd" and r["dtype"] == "bf16")]
    for r in rows:
        if r["op"] == "apply-bwd" and r["C"] == 256:
            del r["speedup_vs_authors_compiled"]
    rows += [_row("bam-fwd", SHAPES[0], "bf16", mode="cudagraph", speedup_vs_authors_eager=3.0),
             _row("bam-fwd", SHAPES[0], "bf16", provider="triton-compiled", speedup_vs_authors_eager=3.0),
             _row("pool", SHAPES[0], "fp16", mode="interpreter", frac_copy_bw=None)]
    judged = _by_target(gpu_check.verdicts(rows, SHAPES, ["fp16", "bf16"]))
    bam = judged["whole BAM forward >= 2x the authors' eager code"]
    assert bam["verdict"] == "missing" and len(bam["missing"]) == 3 and "not measured: bam-fwd 32x256x56x56 bf16" in \
        bam["detail"]
    compiled = judged["apply step (fwd and bwd) no slower than torch.compile (authors-compiled)"]
    assert compiled["verdict"] == "missing" and compiled["missing"] == ["apply-bwd 32x256x56x56 fp16",
                                                                       "apply-bwd 32x256x56x56 bf16"]
    assert gpu_check.verdicts([], SHAPES, ["fp16"])[0] == dict(
        target="apply step forward >= 90% of the copy bandwidth", verdict="missing", threshold=0.9, values={},
        below=[], detail="not measured: " + ", ".join(f"apply-fwd {'x'.join(map(str, s))} fp16" for s in SHAPES),
        missing=[f"apply-fwd {'x'.join(map(str, s))} fp16" for s in SHAPES])


def test_summary_from_a_sweep_json(tmp_path):
    """SUMMARY.md states each verdict, the test counts, the device and versions, and lists what the budget left out
    (cases skipped by --time-budget and cases still pending when the sweep was stopped)."""
    rows = [r for r in _good_rows(("fp16",)) if r["op"] != "bam-fwd"]
    left = dict(op="bam-fwd", shape=[32, 256, 56, 56], dtype="fp16", layout="nchw", providers=["triton-compiled"],
                reason="time budget")
    sweep = dict(environment=dict(copy_bandwidth_gbps=3000.0, copy_bandwidth_method="clone", copy_bandwidth_mib=256),
                 rows=rows, not_run=[left], pending=[], failures=[], skipped_providers={},
                 cudagraph_skipped_ops={"apply-bwd": "not capturable"})
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    run = gpu_check.Run(str(tmp_path), "quick")
    run.record("tests", "ok", 50.0, "tests.log", "300 passed")
    run.record("inspect", "not run: time budget")
    info = dict(device="NVIDIA H100 80GB HBM3", sm=90, memory_gib=79.1, sm_count=132, driver="550.54.15",
                cuda="12.4", torch="2.6.0", triton="3.2.0", bam_triton="0.1.0", python="3.11")
    tests = dict(passed=300, failed=0, errors=0, skipped=4, deselected=20, xfailed=0, xpassed=0, complete=True)
    judged = gpu_check.write_summary(run, info, tests, ["bam-triton", "gpu-check", "--quick"])
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "DRY RUN" not in text and "quick run" in text
    assert "NVIDIA H100 80GB HBM3, sm_90" in text and "550.54.15" in text and "torch 2.6.0, triton 3.2.0" in text
    assert "| apply step forward >= 90% of the copy bandwidth | met |" in text
    assert "| whole BAM forward >= 2x the authors' eager code | missing |" in text
    assert "300 passed, 4 skipped, 20 deselected" in text
    assert "## Not run: time budget" in text and "- sweep bam-fwd 32x256x56x56 fp16: triton-compiled" in text
    assert "- phase inspect" in text and "cudagraph timing of apply-bwd: not capturable" in text
    assert {v["target"]: v["verdict"] for v in judged}["whole BAM forward >= 2x the authors' eager code"] == "missing"
    assert "| whole CBAM forward >= 1.5x the authors' eager code | met |" in text
    assert json.loads((tmp_path / "summary.json").read_text())["verdicts"][0]["verdict"] == "met"


def test_test_counter_reads_pytest_lines():
    run = gpu_check.Run("/nonexistent", "dry")
    counter = gpu_check.TestCounter(run)
    for line in ("tests/test_a.py::test_x PASSED                                  [ 10%]",
                 "tests/test_a.py::test_y[fp16-nchw] FAILED                       [ 20%]",
                 "tests/test_a.py::test_z SKIPPED (needs CUDA)                    [ 30%]",
                 "FAILED tests/test_a.py::test_y[fp16-nchw] - AssertionError: nope"):
        counter(line)
    assert counter.result() == dict(passed=1, failed=1, errors=0, skipped=1, deselected=0, xfailed=0, xpassed=0,
                                    complete=False)
    counter("===== 1 failed, 1 passed, 1 skipped, 7 deselected, 2 warnings in 3.21s =====")
    assert counter.result()["deselected"] == 7 and counter.result()["complete"]


# ----------------------------------------------------------------------------------------------------------------------
# No CUDA, deadlines
# ----------------------------------------------------------------------------------------------------------------------


def test_no_cuda_stops_at_once_with_exit_status_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["gpu-check", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bam-triton gpu-check needs a CUDA GPU") and "--dry-run" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert main(["gpu-check", "--quick", "--out", str(tmp_path / "out")]) == 2


def test_no_triton_stops_with_exit_status_2(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert main(["gpu-check", "--out", str(tmp_path)]) == 2
    assert "needs triton" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the real no-CUDA exit")
def test_no_cuda_cli_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bam_triton", "gpu-check", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_a_phase_is_killed_at_its_deadline_and_later_ones_not_started(monkeypatch, tmp_path):
    monkeypatch.setitem(gpu_check.DRY_DEADLINES, "check", 4)
    run = gpu_check.Run(str(tmp_path), "dry")
    t0 = time.time()
    code, seconds = gpu_check.run_phase(run, "check", [sys.executable, "-c", "import time; print('hi', flush=True); "
                                                                          "time.sleep(60)"])
    assert code is None and time.time() - t0 < 20
    assert (tmp_path / "check.log").read_text().splitlines()[1] == "hi"
    run.t0 -= 1000  # every deadline has passed
    assert gpu_check.run_phase(run, "plot", [sys.executable, "-c", "pass"]) is None
    assert run.phases[-1]["phase"] == "plot" and run.phases[-1]["status"] == "not run: time budget"


# ----------------------------------------------------------------------------------------------------------------------
# Makefile, with a stand-in Python that logs its calls
# ----------------------------------------------------------------------------------------------------------------------

_FAKE = """#!/bin/sh
echo "device=$BAM_TRITON_TEST_DEVICE $(basename "$0") $*" >> "$FAKE_LOG"
if [ "$1" = "-c" ]; then exit "$FAKE_NO_CUDA"; fi
exit 0
"""


@pytest.fixture
def fake_venv(tmp_path):
    """A venv whose python and bam-triton only log their arguments; ``.installed`` is newer than pyproject.toml."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "bam-triton"):
        (bin_dir / name).write_text(_FAKE)
        (bin_dir / name).chmod(0o755)
    (bin_dir / ".installed").touch()
    future = time.time() + 3600
    os.utime(bin_dir / ".installed", (future, future))

    def make(target, cuda, **variables):
        log = tmp_path / "calls.log"
        log.write_text("")
        env = dict(os.environ, FAKE_LOG=str(log), FAKE_NO_CUDA="0" if cuda else "1")
        # Under an outer make (`make gpu-check-dry GPU_RESULTS=...`) its variables come in through the environment.
        for name in ("BAM_TRITON_TEST_DEVICE", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "GPU_RESULTS", "PYTHON", "VENV"):
            env.pop(name, None)
        args = [f"{k}={v}" for k, v in dict(VENV=str(tmp_path / "venv"), **variables).items()]
        subprocess.run(["make", "-s", "-C", ROOT, target] + args, env=env, check=True, capture_output=True,
                       timeout=60)
        return log.read_text().splitlines()

    return make, bin_dir


def test_make_installs_torch_from_the_index_given(tmp_path):
    """TORCH_INDEX (e.g. PyTorch's CPU-only index) is used for torch alone; without it pip's default index decides."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TORCH_INDEX")}

    def recipe(*variables):
        target = str(tmp_path / "venv" / "bin" / ".installed")
        out = subprocess.run(["make", "-n", "-s", "-C", ROOT, f"VENV={tmp_path / 'venv'}", *variables, target],
                             env=env, check=True, capture_output=True, text=True, timeout=60).stdout
        return [line.split("-m pip install --quiet ")[1].strip() for line in out.splitlines() if "pip install" in line]

    assert recipe() == ['"torch==2.13.0"', '-e ".[dev]"']
    assert recipe("TORCH_INDEX=https://download.pytorch.org/whl/cpu") == [
        '"torch==2.13.0" --index-url "https://download.pytorch.org/whl/cpu"', '-e ".[dev]"']


def test_make_test_runs_the_suite_again_on_the_gpu_when_cuda_is_there(fake_venv):
    make, _ = fake_venv
    cuda_check = 'device= python -c import torch, sys; sys.exit(not torch.cuda.is_available())'
    assert make("test", cuda=False) == ["device= python -m pytest tests", cuda_check]
    assert make("test", cuda=True) == ["device= python -m pytest tests", cuda_check,
                                       "device=cuda python -m pytest tests"]


def test_make_gpu_check_targets(fake_venv):
    """gpu-check installs the project into $(PYTHON) without a venv or downloads, then runs; the dry run uses .venv."""
    make, bin_dir = fake_venv
    python = str(bin_dir / "python")
    install = "device= python -m pip install --quiet --no-deps --no-build-isolation -e ."
    assert make("gpu-check", cuda=True, PYTHON=python) == [
        install, "device= python -m bam_triton gpu-check --out gpu-results"]
    assert make("gpu-check-quick", cuda=True, PYTHON=python) == [
        install, "device= python -m bam_triton gpu-check --quick --out gpu-results"]
    assert make("gpu-check-dry", cuda=False) == ["device= bam-triton gpu-check --dry-run --out gpu-results-dry"]


# ----------------------------------------------------------------------------------------------------------------------
# The dry run, end to end (about 30-50 s on 2 CPU cores)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow_on_gpu
def test_dry_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "gpu-results"
    t0 = time.time()
    code = main(["gpu-check", "--dry-run", "--out", str(out)])
    seconds = time.time() - t0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0, (summary["phases"], printed[-3000:])
    assert [p["phase"] for p in summary["phases"]] == ["tests", "check", "overhead", "sweep", "inspect", "plot"]
    assert all(p["status"] == "ok" for p in summary["phases"]), summary["phases"]
    text = (out / "SUMMARY.md").read_text()
    assert "DRY RUN on CPU: no verdict below is valid" in text
    assert summary["dry_run"] and summary["tests"]["passed"] > 0 and summary["tests"]["failed"] == 0
    assert summary["tests"]["complete"]
    for name in ("sweep.csv", "sweep.json", "inspect.json", "overhead.json", "tests.log", "check.log",
                 "overhead.log", "sweep.log", "plot.log"):
        assert (out / name).exists(), name
    assert "## Host overhead (bam-triton overhead)" in text
    assert list((out / "plots").glob("*.png"))
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["finished"] and not sweep["failures"] and not sweep["not_run"]
    assert {r["timing_mode"] for r in sweep["rows"] if r["provider"] == "triton"} == {"interpreter"}
    assert all(r["valid"] for r in sweep["rows"] if r["provider"] == "triton")
    assert "[gpu-check" in printed and "tests:" in printed and "wrote" in printed
    assert seconds < 120, f"the dry run took {seconds:.0f} s"


# ----------------------------------------------------------------------------------------------------------------------
# A GPU run's commands, with CUDA and the phases mocked
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quick, sm", [(False, 90), (True, 80), (False, 86)])
def test_gpu_run_commands(quick, sm, monkeypatch, tmp_path):
    """What a GPU run starts: the suite on CUDA without the slow tests and with one config per kernel, check on
    CUDA, the host-overhead measurement, the sweep of the ResNet-50 shapes at batch 32 (fp16 and bf16, all five providers; --quick: fp16, no
    triton-compiled) within its time budget, inspect for the local sm (skipped off sm_80/sm_90), plot."""
    started = []

    def fake_phase(run, phase, cmd, env=None, echo=None, cwd=None):
        started.append((phase, cmd, env))
        return 0, 1.0

    monkeypatch.setattr(gpu_check, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(gpu_check, "device_info", lambda dry: dict(
        device="Fake GPU", sm=sm, memory_gib=80.0, sm_count=132, driver="550", cuda="12.4", torch="2.6.0",
        triton="3.2.0", bam_triton="0.1.0", python="3.11"))
    monkeypatch.setattr(gpu_check, "run_phase", fake_phase)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (tmp_path / "sweep.csv").write_text("")  # plot runs only after a sweep wrote its CSV
    real_clear = gpu_check._clear
    monkeypatch.setattr(gpu_check, "_clear", lambda out: None)
    assert main(["gpu-check", "--out", str(tmp_path)] + (["--quick"] if quick else [])) == 0
    by_phase = {phase: (cmd, env) for phase, cmd, env in started}
    assert list(by_phase) == ["tests", "check", "overhead", "sweep"] + (["inspect"] if sm in (80, 90) else []) \
        + ["plot"]
    cmd, env = by_phase["tests"]
    assert cmd[-3:] == ["-m", "not slow_on_gpu", "tests"] and cmd[1:3] == ["-m", "pytest"]
    assert env["BAM_TRITON_TEST_DEVICE"] == "cuda" and env["BAM_TRITON_AUTOTUNE"] == "0"
    assert "TRITON_INTERPRET" not in env  # the GPU phases never run the interpreter
    assert by_phase["check"][0][-3:] == ["check", "--device", "cuda"]
    cmd, env = by_phase["overhead"]  # real launches too on CUDA; pinned configs: nothing to tune
    assert cmd[3:6] == ["overhead", "--device", "cuda"] and env["BAM_TRITON_AUTOTUNE"] == "0"
    sweep = by_phase["sweep"][0]
    opt = {sweep[i]: sweep[i + 1] for i in range(len(sweep) - 1) if sweep[i].startswith("--")}
    assert opt["--device"] == "cuda" and opt["--batch"] == "32" and "--interpret" not in sweep
    # BAM's own ops, CBAM's, then the cost inside ResNet-50 (last: the time budget cuts them first)
    assert opt["--ops"] == "pool,apply-fwd,apply-bwd,bam-fwd,bam-fwd-bwd,cbam-fwd,cbam-fwd-bwd,resnet50-fwd," \
        "resnet50-train"
    assert opt["--dtype"] == ("fp16" if quick else "fp16,bf16")
    assert opt["--providers"].split(",") == (
        ["authors-eager", "torch-path", "authors-compiled", "triton", "triton-single-read"] if quick else
        ["authors-eager", "torch-path", "authors-compiled", "triton", "triton-compiled", "triton-single-read"])
    assert 0 < float(opt["--time-budget"]) <= (150 if quick else 330)
    if sm in (80, 90):
        inspect = by_phase["inspect"][0]
        assert inspect[inspect.index("--arch") + 1] == str(sm) and ("--quick" in inspect) == quick
    else:
        text = (tmp_path / "SUMMARY.md").read_text()
        assert "| inspect | skipped |" in text and "sm_86" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == ("quick" if quick else "full") and not summary["dry_run"]
    assert "DRY RUN" not in (tmp_path / "SUMMARY.md").read_text()
    real_clear(str(tmp_path))
    assert not (tmp_path / "SUMMARY.md").exists()


def test_summary_says_which_bam_path_is_faster_and_what_bam_adds_to_resnet50():
    rows = [dict(op="bam-fwd", N=32, C=256, H=56, W=56, dtype="fp16", layout="nchw", timing_mode="do_bench",
                 provider=p, median_ms=t) for p, t in (("triton", 1.0), ("triton-single-read", 0.8))]
    rows += [dict(op="bam-fwd-bwd", N=32, C=256, H=56, W=56, dtype="fp16", layout="nchw", timing_mode="do_bench",
                  provider=p, median_ms=t) for p, t in (("triton", 2.0), ("triton-single-read", 2.5))]
    lines = gpu_check.single_read_lines(rows)
    assert any("bam-fwd 32x256x56x56 fp16 | 1.000 | 0.800 | single read (1.25x)" in line for line in lines)
    assert any("bam-fwd-bwd 32x256x56x56 fp16 | 2.000 | 2.500 | standard (0.80x)" in line for line in lines)
    net = [dict(op="resnet50-fwd", N=32, C=3, H=224, W=224, dtype="fp16", layout="nchw", timing_mode="do_bench",
                provider=p, median_ms=t, attention_overhead=o) for p, t, o in
           (("no-bam", 10.0, None), ("authors-eager", 11.0, 0.1), ("triton", 10.5, 0.05),
            ("authors-eager-cbam", 12.0, 0.2), ("triton-cbam", 11.5, 0.15))]
    bam, cbam = [line for line in gpu_check.network_lines(net) if line.startswith("- ")]
    assert "BAM adds 10.0 % with the authors' code; 5.0 % with ours (triton)" in bam
    assert "CBAM adds 20.0 % with the authors' code; 15.0 % with ours (triton)" in cbam
    assert cbam.endswith("target, ours at most half of theirs: triton does NOT meet")


def test_summary_reports_the_host_overhead_against_its_targets(tmp_path):
    from bam_triton.bench.overhead import CASES

    def report(fwd, train):
        return {case: dict(own_us=us, total_us=us + 1.0, stand_ins_us=1.0, launches=2)
                for case, us in zip(CASES, (fwd, train, 5.0, 6.0, 7.0))}

    (tmp_path / "overhead.json").write_text(json.dumps({
        "reference": {"what": "a small module call", "us_before": 4.25, "us_after": 4.5},
        "reports": {"standard Triton path, kernels skipped, cuda, 8x64x14x14 fp32 nchw": report(21.5, 140.0),
                    "single-read Triton path, kernels skipped, cuda, 8x64x14x14 fp32 nchw": report(35.0, 90.0)}}))
    lines = gpu_check.overhead_lines(str(tmp_path))
    assert any("Same-machine reference, a small module call: 4.2 us before the cases, 4.5 after." in line
               for line in lines)
    assert "| standard Triton path, kernels skipped, cuda, 8x64x14x14 fp32 nchw | 21.5 (met) | 140.0 (**not met**) |" \
        in lines
    assert "| single-read Triton path, kernels skipped, cuda, 8x64x14x14 fp32 nchw | 35.0 | 90.0 |" in lines
    assert gpu_check.overhead_lines(str(tmp_path / "nothing")) == []
