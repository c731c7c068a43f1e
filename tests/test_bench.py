"""The benchmarking tools (``bam_triton.bench``): sweep, plot, traffic, inspect (AOT compile for sm_80/sm_90), tune.

Everything here runs on a CPU-only machine. The AOT part compiles only the variants it asserts on, once per session,
in two worker processes started without TRITON_INTERPRET (about 100 compiles, ~20-40 s on 2 cores).
"""
import importlib
import csv
import json
import os
import sys

import pytest
import torch

from bam_triton.bench import inspect as aot
from bam_triton.bench.sweep import COLUMNS
from bam_triton.bench.traffic import minimal_bytes, provider_traffic
from bam_triton.cli import main
from devices import ON_CUDA

RESNET50 = [(256, 56, 56), (512, 28, 28), (1024, 14, 14)]


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


# ----------------------------------------------------------------------------------------------------------------------
# sweep
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    """``sweep --quick --interpret`` on CPU with the fast providers (interpreter rows included)."""
    if ON_CUDA:
        pytest.skip("skipped in the CUDA run: --interpret needs Triton's interpreter, chosen at import (the CPU pass "
                    "runs it; make gpu-check runs the GPU sweep)")
    out = tmp_path_factory.mktemp("sweep")
    code = main(["sweep", "--quick", "--interpret", "--ops", "pool,apply-fwd,bam-fwd",
                 "--providers", "authors-eager,torch-path,triton,triton-compiled", "--out", str(out),
                 "--min-time", "0.01", "--max-reps", "5", "--copy-mib", "16", "--cpu-allocator", "system"])
    assert code == 0
    return out


def test_sweep_quick_writes_csv_and_json(quick_sweep):
    fields, rows = _read_csv(quick_sweep / "sweep.csv")
    assert fields == COLUMNS
    for col in ("device", "provider", "op", "N", "C", "H", "W", "dtype", "layout", "median_ms", "p20_ms", "p80_ms",
                "gbps", "frac_copy_bw", "speedup_vs_authors_eager", "timing_mode", "config"):
        assert col in fields
    # 3 quick shapes x 3 ops x (2 timed providers + 1 interpreter row)
    assert len(rows) == 3 * 3 * 3
    timed = [r for r in rows if r["timing_mode"] == "cpu-timer"]
    assert {r["provider"] for r in timed} == {"authors-eager", "torch-path"}
    for r in timed:
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert 1 <= int(r["reps"]) <= 5  # --max-reps is the total over the interleaved rounds
        assert float(r["gbps"]) > 0 and float(r["frac_copy_bw"]) > 0
        assert float(r["speedup_vs_authors_eager"]) > 0
        assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["layout"] == "nchw"
    base = [r for r in timed if r["provider"] == "authors-eager"]
    assert all(abs(float(r["speedup_vs_authors_eager"]) - 1) < 1e-9 for r in base)
    meta = json.loads((quick_sweep / "sweep.json").read_text())
    env = meta["environment"]
    for key in ("date", "torch", "triton", "cpu", "copy_bandwidth_gbps", "driver", "cuda"):
        assert key in env
    assert env["copy_bandwidth_gbps"] > 0 and env["host_reference_us"] > 0
    assert "triton-compiled" in meta["skipped_providers"]
    assert meta["chosen_configs"]["triton"]  # the (pinned) config of each kernel the interpreter ran


def test_sweep_interpreter_rows_are_validated_and_not_speed(quick_sweep):
    _, rows = _read_csv(quick_sweep / "sweep.csv")
    interp = [r for r in rows if r["timing_mode"] == "interpreter"]
    assert len(interp) == 9 and {r["provider"] for r in interp} == {"triton"}
    for r in interp:
        assert r["valid"] == "True", r
        assert r["speedup_vs_authors_eager"] == "" and r["gbps"] == "" and r["frac_copy_bw"] == ""
        assert "BLOCK" in r["config"]


def test_summary_judges_the_cpu_target_only_on_the_default_grid():
    """The 1.5x CPU target line: a verdict at the default grid's shapes (ResNet-50 placements, batch 32/64/128), none
    elsewhere (a batch-8 demo run is not the target's grid)."""
    from bam_triton.bench.sweep import summary_table

    def row(n, c, hw, speedup):
        return dict(op="bam-fwd", N=n, C=c, H=hw, W=hw, dtype="fp32", layout="nchw", provider="torch-path",
                    timing_mode="cpu-timer", median_ms=1.0, p20_ms=0.9, p80_ms=1.1, gbps=1.0, frac_copy_bw=0.1,
                    speedup_vs_authors_eager=speedup)

    env = dict(gpu=None, cpu="test cpu", cpu_cores=2, copy_bandwidth_gbps=10.0)
    text = summary_table([row(32, 1024, 14, 1.6), row(128, 256, 56, 1.4), row(8, 1024, 14, 1.2)], env)
    assert "at 32x1024x14x14 fp32 nchw: 1.60x (meets the 1.5x CPU target)" in text
    assert "at 128x256x56x56 fp32 nchw: 1.40x (does NOT meet the 1.5x CPU target)" in text
    line = next(x for x in text.splitlines() if "at 8x1024x14x14" in x)
    assert "meet" not in line and "set for the default grid" in line
    # The valid column, blank on these rows, is explained; the run's references and the pointer to traffic follow.
    assert "valid: the Triton kernels' outputs against the torch path's" in text
    assert "Same-machine references of this run: copy bandwidth 10.0 GB/s." in text
    assert "`bam-triton traffic` counts the bytes each provider moves" in text
    env.update(host_reference="a small module call", host_reference_us=4.25)
    text = summary_table([dict(row(8, 1024, 14, 1.2), provider="triton", valid=True)], env)
    assert "valid: " not in text  # nothing blank to explain
    assert "copy bandwidth 10.0 GB/s, host reference 4.2 us per call (a small module call)." in text


def test_cpu_timer_interleaves_its_rounds_and_pools_the_samples():
    """Each fn is timed once per round, in turn (A..A B..B A..A B..B A..A B..B: warm-up and timed calls), the repeat
    limits are totals over the rounds, and a fn that raises is reported and leaves the later rounds."""
    from bam_triton.bench.timing import cpu_timer_interleaved

    log = []

    def fn(name):
        def call():
            log.append(name)
            if name == "broken" and log.count(name) == 3:
                raise RuntimeError("third call fails")
        return call

    res = cpu_timer_interleaved({"a": fn("a"), "b": fn("b"), "broken": fn("broken")}, rounds=3, min_time=0,
                                min_reps=7, max_reps=7, flush_bytes=0)
    runs = [name for i, name in enumerate(log) if i == 0 or log[i - 1] != name]
    assert runs == ["a", "b", "broken", "a", "b", "a", "b"]
    for name in "ab":
        (med, p20, p80), reps, _ = res[name]
        assert reps == 7 and 0 <= p20 <= med <= p80
    assert isinstance(res["broken"], RuntimeError) and log.count("broken") == 3
    with pytest.raises(ValueError, match="rounds"):
        cpu_timer_interleaved({"a": fn("a")}, rounds=0)


_FAULTS_SCRIPT = """
import sys, torch
from bam_triton.bench.timing import cpu_timer, steady_cpu_allocator
if sys.argv[1] == "steady":
    print(steady_cpu_allocator(), file=sys.stderr)
def one_temporary():
    torch.empty(2**24).fill_(1.0)  # 64 MiB, above glibc's largest adaptive mmap threshold
print(cpu_timer(one_temporary, min_time=0.1, flush_bytes=0)[2])
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc mallopt")
def test_steady_cpu_allocator_stops_page_faults_of_temporaries():
    """The sweep's default CPU allocator state: once warm-up has settled, a timed call that allocates a 64 MiB
    temporary pays no page fault, where the system default pays one per 4 KiB page (16384) on every call."""
    import subprocess
    import sys

    def faults(mode):
        proc = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                              timeout=120, check=True)
        return int(proc.stdout.strip()), proc.stderr

    system, _ = faults("system")
    steady, said = faults("steady")
    assert said.startswith("steady"), said
    assert system >= 2**24 * 4 // 4096 // 2  # at least half the pages fault (huge pages would lower it)
    assert steady == 0


def test_sweep_records_the_cpu_allocator(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "bam_triton", "sweep", "--shapes", "2x16x8x8", "--ops", "apply-fwd",
                    "--providers", "authors-eager", "--out", str(tmp_path), "--min-time", "0.01", "--max-reps", "3",
                    "--copy-mib", "16"], capture_output=True, text=True, timeout=300, check=True)
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["environment"]["cpu_allocator"].startswith("steady" if sys.platform.startswith("linux") else "system")
    assert data["environment"]["cpu_timer_rounds"] == 3
    if sys.platform.startswith("linux"):  # page faults per timed call are counted (and, steady, none are paid)
        assert [r["page_faults"] for r in data["rows"]] == [0]


def test_sweep_with_compiled_provider(tmp_path):
    code = main(["sweep", "--shapes", "2x16x8x8", "--ops", "apply-fwd", "--providers", "authors-compiled",
                 "--out", str(tmp_path), "--min-time", "0.01", "--max-reps", "5", "--copy-mib", "16",
                 "--cpu-allocator", "system"])
    assert code == 0
    _, rows = _read_csv(tmp_path / "sweep.csv")
    assert [r["provider"] for r in rows] == ["authors-eager", "authors-compiled"]  # the baseline is always added
    assert float(rows[1]["max_abs_err"]) < 1e-5


@pytest.mark.parametrize("argv, option", [
    (["sweep", "--ops", "apply-fwd,softmax"], "--ops"),
    (["sweep", "--shapes", "8x256x56"], "--shapes"),
    (["sweep", "--shapes", "8x256xfoox56"], "--shapes"),
    (["sweep", "--dtype", "fp8"], "--dtype"),
    (["sweep", "--layout", "nhwc"], "--layout"),
    (["sweep", "--providers", "cudnn"], "--providers"),
    (["sweep", "--batch", "0"], "--batch"),
    (["sweep", "--rounds", "0"], "--rounds"),
    (["sweep", "--max-reps", "0"], "--max-reps"),
    (["sweep", "--min-time", "-1"], "--min-time"),
    (["sweep", "--flush-mib", "-1"], "--flush-mib"),
    (["traffic", "--shape", "8x256"], "--shape"),
])
def test_bad_arguments_name_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "invalid" in err


# ----------------------------------------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------------------------------------


def test_plot_writes_png_and_svg_without_interpreter_rows(quick_sweep, tmp_path):
    pytest.importorskip("matplotlib")
    from bam_triton.bench.plot import plottable, read_rows

    rows, mode = plottable(read_rows(quick_sweep / "sweep.csv"))
    assert mode == "cpu-timer" and rows
    assert all(r["timing_mode"] != "interpreter" and r["provider"] != "triton" for r in rows)
    assert main(["plot", str(quick_sweep / "sweep.csv"), "--out", str(tmp_path)]) == 0
    for op in ("pool", "apply-fwd", "bam-fwd"):
        for ext in ("png", "svg"):
            path = tmp_path / f"{op}_fp32_nchw.{ext}"
            assert path.exists() and path.stat().st_size > 1000
    svg = (tmp_path / "apply-fwd_fp32_nchw.svg").read_text()
    assert "torch-path" in svg and "authors-eager" in svg and ">triton<" not in svg


def test_plot_says_where_ours_is_not_faster(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from bam_triton.bench import plot

    rows = [dict(op="pool", N=2, C=32, H=7, W=7, dtype="fp32", layout="nchw", timing_mode="cpu-timer", provider=p,
                 median_ms=t, p20_ms=t, p80_ms=t, gbps=1.0, frac_copy_bw=0.1, speedup_vs_authors_eager=s)
            for p, t, s in (("authors-eager", 1.0, 1.0), ("torch-path", 2.0, 0.5), ("authors-compiled", 4.0, 0.25))]
    assert plot.not_faster(rows) == [("pool", "fp32", "nchw", "2x32x7x7", "torch-path", 0.5)]  # ours only
    path = tmp_path / "sweep.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert main(["plot", str(path)]) == 0
    assert "not faster than the authors' eager code: pool 2x32x7x7 fp32 nchw: torch-path 0.50x" in \
        capsys.readouterr().out
    assert "not faster than the authors' eager: torch-path 0.50x at 2x32x7x7" in \
        (tmp_path / "pool_fp32_nchw.svg").read_text()


# ----------------------------------------------------------------------------------------------------------------------
# traffic
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chw", RESNET50)
def test_traffic_forward_orientation(chw):
    # Authors' forward, in |F|: pool 1 + 1x1 conv read 1 + spatial-branch intermediates ~0.6-1.2 (C/16 channels)
    # + Mc*Ms write 1 + sigmoid 2 + (1 + .) 2 + att*x 3  ~= 11. Fused: pool 1 + conv read 1 + branch + apply 2 ~= 5.
    shape = (32,) + chw
    f = 32 * chw[0] * chw[1] * chw[2] * 2
    authors = provider_traffic("authors-eager", "bam-fwd", shape, torch.float16)
    fused = provider_traffic("triton", "bam-fwd", shape, torch.float16)
    assert 9 <= authors.total / f <= 13
    assert 4 <= fused.total / f <= 5.5
    # the apply step alone: 8|F| for the authors' four full-size ops, exactly 2|F| (+ small maps) fused
    assert provider_traffic("authors-eager", "apply-fwd", shape, torch.float16).total / f == pytest.approx(8, abs=0.02)
    assert provider_traffic("triton", "apply-fwd", shape, torch.float16).total / f == pytest.approx(2, abs=0.02)


def test_traffic_backward_counts_one_pass_over_g_and_x():
    shape = (8, 256, 56, 56)
    f = 8 * 256 * 56 * 56 * 4
    log = provider_traffic("triton", "apply-fwd-bwd", shape, torch.float32)
    names = [name for name, _, _ in log.ops]
    assert "triton:apply_fwd_kernel" in names
    assert "triton:apply_bwd_reduce_kernel" in names and "triton:apply_bwd_dx_kernel" not in names
    # forward 2|F|; the functional op's backward is one pass: reads g, x and writes dx (3|F|), plus the dmc partial
    # sums (fp32, one per 32 positions at most: 1/32 |F| written and read back)
    assert log.total / f == pytest.approx(5 + 2 / 32, abs=0.02)


def test_traffic_cli(capsys):
    assert main(["traffic", "--shape", "4x256x56x56", "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "authors-eager" in out and "triton-single-read" in out and "apply_bwd_dx_kernel" in out


def test_minimal_bytes():
    n, c, h, w = 2, 8, 4, 4
    f = n * c * h * w * 2
    maps = (n * c + n * h * w) * 2
    assert minimal_bytes("pool", n, c, h, w, 2) == f + n * c * 2
    assert minimal_bytes("apply-fwd", n, c, h, w, 2) == 2 * f + maps
    assert minimal_bytes("apply-bwd", n, c, h, w, 2) == 3 * f + 2 * maps
    with pytest.raises(ValueError, match="unknown op"):
        minimal_bytes("softmax", n, c, h, w, 2)


# ----------------------------------------------------------------------------------------------------------------------
# tune
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_tune_without_gpu_says_so(capsys):
    assert main(["tune", "--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# inspect: AOT compilation for sm_80 / sm_90, no GPU
# ----------------------------------------------------------------------------------------------------------------------

AOT_SHAPES = [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7)]
AOT_DTYPES = ["fp16", "bf16", "fp32"]
# Full-tensor accesses that must be 128-bit vectors wherever each kernel runs. The 2D-tile reductions are not listed:
# at H·W = 196 and 49 (NCHW) their rows are not provably aligned, and the launchers send those to the row-group
# kernels, which are.
_VECTOR_KERNELS = {"apply_fwd_kernel": (("x_ptr", "load"), ("out_ptr", "store")),
                   "apply_bwd_dx_kernel": (("g_ptr", "load"), ("dx_ptr", "store")),
                   "channel_pool_rows_kernel": (("x_ptr", "load"),),
                   "apply_bwd_reduce_rows_kernel": (("g_ptr", "load"), ("x_ptr", "load"), ("dx_ptr", "store")),
                   # CBAM's (bench/inspect.py names a kernel's CBAM variant with a [suffix])
                   "channel_pool_rows_kernel[max]": (("x_ptr", "load"),),
                   "channel_reduce_rows_kernel": (("x_ptr", "load"),),
                   "channel_reduce_rows_kernel[g]": (("g_ptr", "load"), ("x_ptr", "load")),
                   "hw_reduce_rows_kernel": (("g_ptr", "load"), ("x_ptr", "load")),
                   "apply_kernel": (("x_ptr", "load"), ("out_ptr", "store")),
                   "grad_x_kernel": (("g_ptr", "load"), ("extra_ptr", "load"), ("dx_ptr", "store"))}
# Row-group spill checks: K = 2 (fp16 14x14), 4 (fp32 7x7), 8 (fp16 7x7), and the longest group row (fp16 15x15:
# 8 x 225 = 1800 -> BLOCK_L = 2048).
_ROW_SPILL_CASES = (("fp16", (32, 1024, 14, 14)), ("fp32", (32, 2048, 7, 7)), ("fp16", (32, 2048, 7, 7)),
                    ("fp16", (32, 256, 15, 15)))


def _first_config_that_runs(kernel, kind, dt, shape, layout):
    return next((ci for ci in range(aot._n_configs(kind)) if aot.runs(kernel, kind, ci, dt, shape, layout)), None)


def _aot_jobs():
    # The single-read front end's kernels have their own AOT test, at every kept config (tests/test_kernel_front.py).
    names = {kernel: kind for kernel, kind in aot.kernel_names() if not kind.startswith("front")}
    jobs = []
    # Vector widths: at every ResNet-50 BAM shape, dtype and layout each kernel runs on (first config that runs, sm_90).
    for kernel in _VECTOR_KERNELS:
        for dt in AOT_DTYPES:
            for shape in AOT_SHAPES:
                for layout in aot.LAYOUTS:
                    ci = _first_config_that_runs(kernel, names[kernel], dt, shape, layout)
                    if ci is not None:
                        jobs.append(aot.make_job(kernel, names[kernel], ci, 90, dt, shape, layout))
    # Spills: every kernel and every config it runs with, for sm_80 and sm_90, at a large and a 7x7 map in both
    # layouts (the 2D-tile and elementwise kernels: the launchers send NCHW 7x7 to the row-group kernels, and the
    # pruners keep some tiles for one layout only) or at every group size (the row-group kernels, NCHW).
    for kernel, kind in names.items():
        cases = _ROW_SPILL_CASES if kind == "rows" else (("fp16", AOT_SHAPES[0]), ("fp32", AOT_SHAPES[3]))
        layouts = ("nchw",) if kind == "rows" else aot.LAYOUTS
        for ci in range(aot._n_configs(kind)):
            for arch in aot.ARCHS:
                for dt, shape in cases:
                    for layout in layouts:
                        if aot.runs(kernel, kind, ci, dt, shape, layout, arch):
                            jobs.append(aot.make_job(kernel, kind, ci, arch, dt, shape, layout))
    unique = {json.dumps(j, sort_keys=True): j for j in jobs}
    return list(unique.values())


@pytest.fixture(scope="session")
def aot_results():
    results = aot.run_jobs(_aot_jobs())
    errors = [r for r in results if "error" in r]
    assert not errors, errors[:2]
    return results


def test_aot_covers_every_kernel_and_config(aot_results):
    """Every config of every kernel is compiled for both architectures; each row-group config is one the autotuner
    keeps for at least one of the group rows checked (no dead configs)."""
    names = {kernel: kind for kernel, kind in aot.kernel_names() if not kind.startswith("front")}
    assert {"apply_fwd_kernel", "channel_pool_kernel", "channel_pool_rows_kernel",
            "apply_bwd_reduce_rows_kernel"} <= set(names)
    expected_by_kind = {}
    for kernel, kind in names.items():
        seen = {(r["config"], r["arch"]) for r in aot_results if r["kernel"] == kernel}
        # CBAM's pruners drop some configs of the shared lists for good (they spilled): those lists are held to having
        # every config used by some kernel, as the row-group kernels are.
        expected_by_kind.setdefault(kind, set()).update(seen)
        if kind != "rows" and kernel not in aot.CBAM_KERNELS:
            assert seen == {(ci, a) for ci in range(aot._n_configs(kind)) for a in aot.ARCHS}
    for kind, seen in expected_by_kind.items():
        assert seen == {(ci, a) for ci in range(aot._n_configs(kind)) for a in aot.ARCHS}, kind


def test_row_group_kernels_take_the_unaligned_resnet_maps():
    """The launchers' choice, as inspect reproduces it: NCHW 14x14 and 7x7 go to the row-group kernels in every
    dtype; 56x56 and 28x28 (H·W a multiple of 16) and channels_last stay on the 2D tiles."""
    for dt in AOT_DTYPES:
        for shape in AOT_SHAPES:
            for layout in aot.LAYOUTS:
                rows = _first_config_that_runs("apply_bwd_reduce_rows_kernel", "rows", dt, shape, layout) is not None
                assert rows == (layout == "nchw" and shape[2] in (14, 7)), (dt, shape, layout)


def test_aot_128_bit_vectors_in_vectorised_kernels(aot_results):
    checked = {}
    for r in aot_results:
        if r["kernel"] not in _VECTOR_KERNELS:
            continue
        for arg, kind in _VECTOR_KERNELS[r["kernel"]]:
            bits = aot.vector_bits(r, arg, kind)
            where = f"{r['kernel']} {arg} {kind} {r['dtype']} {r['shape']} {r['layout']} sm_{r['arch']} cfg{r['config']}"
            assert bits == [128], f"{where}: global {kind} widths {bits}, expected only 128-bit"
            # the whole per-thread slice moves in 128-bit vectors: elements/thread x itemsize / 16 instructions
            count = r["access"][arg][kind]["128"]
            assert count == r["elements_per_thread"] * {"fp32": 4, "fp16": 2, "bf16": 2}[r["dtype"]] // 16, where
            checked[r["kernel"]] = checked.get(r["kernel"], 0) + 1
    # At least: elementwise 3 dtypes x 4 shapes x 2 layouts x 2 args; row-group 3 dtypes x 2 maps (NCHW) x args.
    # (The spill jobs, every config on both architectures, are checked too.)
    least = {"apply_fwd_kernel": 48, "apply_bwd_dx_kernel": 48, "channel_pool_rows_kernel": 6,
             "apply_bwd_reduce_rows_kernel": 18, "apply_kernel": 48, "grad_x_kernel": 72, "hw_reduce_rows_kernel": 12,
             "channel_reduce_rows_kernel": 6, "channel_reduce_rows_kernel[g]": 12, "channel_pool_rows_kernel[max]": 6}
    assert all(checked.get(k, 0) >= v for k, v in least.items()), checked


def test_aot_no_spills(aot_results):
    for r in aot_results:
        assert r["ptxas_ok"], r.get("ptxas_log")
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (r["kernel"], r["meta"], r["arch"], r["dtype"])
        assert r.get("local", 0) == 0
        assert r["registers"] > 0


def test_inspect_cli_quick(tmp_path, capsys):
    assert main(["inspect", "--quick", "--arch", "90", "--dtype", "fp16", "--kernels", "apply_fwd_kernel",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    variants = len(aot.INSPECT_SHAPES) * len(aot.LAYOUTS)
    # The summary by default: one line per kernel over its variants.
    row = next(line for line in out.splitlines() if line.startswith("apply_fwd_kernel"))
    assert row.split()[1:2] == [str(variants)] and row.endswith("x:ld128 out:st128")
    assert f"{variants} variants: 0 errors" in out and "--table" in out
    data = json.loads((tmp_path / "inspect.json").read_text())
    assert len(data) == variants
    # --table: one line per variant.
    assert main(["inspect", "--quick", "--arch", "90", "--dtype", "fp16", "--kernels", "apply_fwd_kernel",
                 "--out", str(tmp_path), "--table"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("apply_fwd_kernel")]
    assert len(rows) == variants and all("x:ld128 out:st128" in line for line in rows)


@pytest.mark.parametrize("kernel", ["apply_fwd_kernel", "apply_bwd_dx_kernel"])
def test_aot_index_arithmetic_is_64_bit_only_where_needed(kernel):
    """32-bit index arithmetic at the ResNet-50 shapes; 64-bit once N·C·H·W passes 2**31 (H·W not a power of two,
    so the divisions by it cannot become shifts), still with 128-bit vectors."""
    small, big = aot.run_jobs([aot.make_job(kernel, "elementwise", 0, 90, "fp16", shape, "nchw")
                               for shape in ((32, 1024, 14, 14), (96, 1024, 147, 150))])
    assert small["int64_index_ops"] == 0
    assert big["int64_index_ops"] > 0
    arg = "x_ptr" if kernel == "apply_fwd_kernel" else "g_ptr"
    assert aot.vector_bits(big, arg, "load") == [128]


def test_every_kernel_looks_up_its_timer_only_when_it_times():
    """Every autotuned kernel is timed by ``driver_timer``, which asks the GPU driver for its timer only when a config
    is timed: Triton 3.3 asks at definition otherwise, and the kernels could not even be imported (for the interpreter
    or ``inspect``) on a machine without a GPU."""
    from bam_triton.kernels._common import driver_timer

    for job_name, _ in aot.kernel_names():
        name = job_name.partition("[")[0]  # a [suffix] names a variant of the same kernel
        module = next(m for m in ("apply", "apply_bwd", "pool", "front", "cbam")
                      if hasattr(importlib.import_module(f"bam_triton.kernels.{m}"), name))
        assert getattr(importlib.import_module(f"bam_triton.kernels.{module}"), name).do_bench is driver_timer, name


# ----------------------------------------------------------------------------------------------------------------------
# CUDA-side logic with CUDA mocked: which timers run, the order of the cases, the time budget, tune's ops
# ----------------------------------------------------------------------------------------------------------------------


class _FakeCase:
    """An OpCase stand-in on CPU tensors: ``make`` records what was asked and returns a fn tagged with its op."""

    made = []

    def __init__(self, op, shape, dtype, channels_last, device, combine="product", seed=0):
        self.op, self.shape = op, shape

    def make(self, provider):
        _FakeCase.made.append((self.op, provider))

        def fn():
            return torch.ones(self.shape[:2])

        fn.op = self.op
        return fn, (lambda out: out)


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA "available", the GPU timers replaced: ``do_bench`` always works, the CUDA-graph timer raises for
    apply-bwd as a real capture of its fn does (its backward kernels run on the forward's stream). Returns the list of
    (timer, op) calls."""
    from bam_triton.bench import configs, providers, sweep, timing

    calls = []

    def do_bench(fn):
        calls.append(("do_bench", fn.op))
        return (1.0, 0.9, 1.1), None

    def graph_bench(fn):
        calls.append(("cudagraph", fn.op))
        if fn.op == "apply-bwd":
            raise RuntimeError("operation not permitted when stream is capturing")
        return (0.5, 0.4, 0.6), None

    _FakeCase.made = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(providers, "OpCase", _FakeCase)
    monkeypatch.setattr(timing, "cuda_do_bench", do_bench)
    monkeypatch.setattr(timing, "cuda_graph_bench", graph_bench)
    monkeypatch.setattr(timing, "copy_bandwidth", lambda device, mib=256: dict(
        gbps=1000.0, clone_gbps=1000.0, copy_into_gbps=1000.0, method="clone"))
    monkeypatch.setattr(sweep, "_sync", lambda device: None)
    monkeypatch.setattr(sweep, "environment", lambda device: dict(
        device=str(device), gpu="Fake GPU", cpu="cpu", cpu_cores=1, torch=torch.__version__, triton=None,
        driver="0", sm="90"))
    monkeypatch.setattr(configs, "load_kernels", lambda: None)
    monkeypatch.setattr(configs, "enable_persistence", lambda: "fake")
    return calls


def test_cuda_sweep_times_apply_bwd_without_cudagraph_and_records_why(fake_cuda, tmp_path, capsys):
    """apply-bwd's fn is autograd.grad on a graph built outside the capture, so it is never CUDA-graph timed (it used
    to be, and every such row fell into failures); the other ops get both timings, nothing fails, and sweep.json and
    the printout say why apply-bwd has no cudagraph rows."""
    assert main(["sweep", "--shapes", "2x16x4x4", "--providers", "authors-eager,torch-path,triton",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["failures"] == []
    assert set(data["cudagraph_skipped_ops"]) == {"apply-bwd"}
    assert "stream" in data["cudagraph_skipped_ops"]["apply-bwd"]
    assert ("cudagraph", "apply-bwd") not in fake_cuda
    modes = {}
    for r in data["rows"]:
        modes.setdefault(r["op"], set()).add(r["timing_mode"])
    assert modes.pop("apply-bwd") == {"do_bench"}
    assert modes and all(m == {"do_bench", "cudagraph"} for m in modes.values()), modes
    from bam_triton.bench.sweep import DEFAULT_OPS

    assert len(data["rows"]) == 3 * (2 * (len(DEFAULT_OPS) - 1) + 1)
    assert "no cudagraph timing: apply-bwd" in capsys.readouterr().out


def test_cuda_sweep_runs_the_most_important_cases_first():
    """On CUDA: every case's non-compiled providers first (apply ops first), then authors-compiled on the apply ops,
    then triton-compiled on them, then the compiled providers of the other ops. On CPU the grid's order, all
    providers of a case together (they are timed in interleaved rounds)."""
    from bam_triton.bench.providers import PROVIDERS
    from bam_triton.bench.sweep import DEFAULT_OPS, plan

    shapes = [(32, 256, 56, 56), (32, 1024, 14, 14)]
    units = plan(torch.device("cuda"), shapes, ["fp16", "bf16"], ["nchw"], list(DEFAULT_OPS), list(PROVIDERS))
    assert len(units) == 2 * 2 * 7 * 3
    eager = ["authors-eager", "torch-path", "triton"]
    head = units[:28]
    # the single-read provider times the whole module only
    assert all(u[-1] == (eager + ["triton-single-read"] if u[3].startswith("bam") else eager) for u in head)
    assert [u[3] for u in head[:8]] == ["apply-fwd"] * 4 + ["apply-bwd"] * 4
    assert [(u[3], u[-1]) for u in units[28:36]] == [("apply-fwd", ["authors-compiled"])] * 4 + \
        [("apply-bwd", ["authors-compiled"])] * 4
    assert all(u[-1] == ["triton-compiled"] and u[3].startswith("apply") for u in units[36:44])
    assert all(u[3] in ("pool", "bam-fwd", "bam-fwd-bwd", "cbam-fwd", "cbam-fwd-bwd") for u in units[44:])
    assert sorted(map(repr, units)) == sorted(map(repr, plan(torch.device("cuda"), shapes, ["fp16", "bf16"],
                                                             ["nchw"], list(DEFAULT_OPS), list(PROVIDERS))))
    cpu = plan(torch.device("cpu"), shapes, ["fp32"], ["nchw"], ["pool", "bam-fwd"], ["authors-eager", "torch-path"])
    assert [(u[0], u[3], u[-1]) for u in cpu] == [(s, op, ["authors-eager", "torch-path"]) for s in shapes
                                                  for op in ("pool", "bam-fwd")]


def test_sweep_time_budget_starts_no_new_case_and_lists_the_rest(fake_cuda, tmp_path, monkeypatch, capsys):
    """Each case "takes" 10 s of a fake clock: with --time-budget 25 the first three run, the rest are listed as
    not run (time budget) in sweep.json and on stdout; the sweep still succeeds and says it finished."""
    import types

    from bam_triton.bench import sweep

    clock = [0.0]
    monkeypatch.setattr(sweep, "time", types.SimpleNamespace(time=lambda: clock[0], perf_counter=lambda: clock[0]))
    real_run_case = sweep._run_case

    def slow_case(*args, **kwargs):
        clock[0] += 10
        return real_run_case(*args, **kwargs)

    monkeypatch.setattr(sweep, "_run_case", slow_case)
    assert main(["sweep", "--shapes", "2x8x4x4,2x8x2x2", "--ops", "apply-fwd,pool", "--providers",
                 "authors-eager,triton", "--out", str(tmp_path), "--time-budget", "25"]) == 0
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["finished"] and data["pending"] == [] and data["time_budget_s"] == 25
    ran = [(r["op"], r["H"]) for r in data["rows"] if r["timing_mode"] == "do_bench" and r["provider"] == "triton"]
    assert ran == [("apply-fwd", 4), ("apply-fwd", 2), ("pool", 4)]
    assert data["not_run"] == [dict(op="pool", shape=[2, 8, 2, 2], dtype="fp16", layout="nchw",
                                    providers=["authors-eager", "triton"], reason="time budget")]
    out = capsys.readouterr().out
    assert "not run: time budget (25 s) reached: 1 case(s) left out" in out and "pool 2x8x2x2 fp16 nchw" in out
    _, csv_rows = _read_csv(tmp_path / "sweep.csv")
    assert len(csv_rows) == len(data["rows"])


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_sweep_time_budget_rejects_bad_values(value, capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--time-budget", value])
    err = capsys.readouterr().err
    assert "argument --time-budget" in err and "invalid" in err


def test_tune_runs_the_requested_ops_and_by_default_every_kernel(fake_cuda, capsys):
    """``--ops`` is honoured (it used to be ignored), and by default the ops cover every kernel: the training step
    (bam-fwd-bwd) launches the backward reduction without dx and the dx kernel, which the op-level apply-bwd
    does not."""
    assert main(["tune", "--shapes", "2x8x4x4", "--ops", "apply-bwd,pool"]) == 0
    assert _FakeCase.made == [("apply-bwd", "triton"), ("pool", "triton")]
    _FakeCase.made = []
    assert main(["tune", "--shapes", "2x16x4x4"]) == 0  # the module ops build BAM(C): C >= its reduction
    ops = [op for op, _ in _FakeCase.made]
    assert {"pool", "apply-fwd", "apply-bwd", "bam-fwd", "bam-fwd-bwd"} <= set(ops)
    assert {p for _, p in _FakeCase.made} == {"triton"}


def test_tune_refuses_shapes_its_ops_cannot_build(capsys):
    """The sweep's grid checks, before anything is tuned (it printed one traceback line per case and went on)."""
    assert main(["tune", "--shapes", "2x8x4x4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bam-triton tune: --shapes 2x8x4x4: C must be >= 16"), err


# ----------------------------------------------------------------------------------------------------------------------
# configs: Triton 3.2 / 3.3 have neither Autotuner.cache_results nor triton.knobs (both arrived in 3.4)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def triton_without_knobs(monkeypatch):
    """A stand-in ``triton`` 3.2 package: ``runtime.cache.default_cache_dir`` and autotuners without
    ``cache_results``, no ``knobs``. Returns the autotuners."""
    import types

    from bam_triton.bench import configs

    fake = types.ModuleType("triton")
    fake.__version__ = "3.2.0"
    runtime = types.ModuleType("triton.runtime")
    cache = types.ModuleType("triton.runtime.cache")
    cache.default_cache_dir = lambda: "/home/someone/.triton/cache"
    fake.runtime, runtime.cache = runtime, cache
    for name, mod in (("triton", fake), ("triton.runtime", runtime), ("triton.runtime.cache", cache)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "triton.knobs", raising=False)
    tuners = {"apply_fwd_kernel": types.SimpleNamespace(), "channel_pool_kernel": types.SimpleNamespace()}
    monkeypatch.setattr(configs, "autotuners", lambda: tuners)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return tuners


def test_persistence_without_triton_knobs(triton_without_knobs, monkeypatch):
    from bam_triton.bench import configs

    with pytest.raises(ImportError):
        from triton import knobs  # noqa: F401  (the stand-in is what an older Triton looks like)
    msg = configs.enable_persistence()
    assert msg == "triton 3.2.0: no on-disk autotune cache (needs triton >= 3.4); configs re-tuned per run"
    assert not any(hasattr(t, "cache_results") for t in triton_without_knobs.values())
    assert configs.cache_dir() == "/home/someone/.triton/cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", "/scratch/tc")
    assert configs.cache_dir() == "/scratch/tc"


def test_interpreter_detected_without_triton_knobs(triton_without_knobs, monkeypatch):
    from bam_triton.bench import configs

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert configs.enable_persistence() == "interpreter: nothing is tuned or cached"
    assert not any(hasattr(t, "cache_results") for t in triton_without_knobs.values())


def test_persistence_status_on_the_installed_triton(monkeypatch):
    """enable_persistence on the real Triton of this run (``make test-triton-compat`` runs it under every version from
    3.2): the interpreter's status under TRITON_INTERPRET=1, else the on-disk cache's."""
    from bam_triton.bench import configs

    configs.load_kernels()
    for tuner in configs.autotuners().values():  # put back as it was after the test (a GPU run would switch it on)
        if hasattr(tuner, "cache_results"):
            monkeypatch.setattr(tuner, "cache_results", tuner.cache_results)
    msg = configs.enable_persistence()
    if configs.interpreting():
        assert msg == "interpreter: nothing is tuned or cached"
    else:
        assert msg.startswith(("on-disk autotune cache on", "triton ")), msg
    assert configs.cache_dir()


@pytest.mark.slow_on_gpu
def test_sweep_network_ops_report_bams_and_cbams_overhead(tmp_path, capsys):
    """The whole-network ops time ResNet-50 without attention, with the authors' BAM and CBAM and with ours on one set
    of weights, and say what each attention adds; no GB/s (a network is not memory-bound in BAM's sense) and no kernel
    verdict. The CBAM rows compare with the CBAM rows."""
    code = main(["sweep", "--ops", "resnet50-fwd", "--network-batch", "2", "--min-time", "0.05", "--max-reps", "2",
                 "--rounds", "1", "--copy-mib", "16", "--flush-mib", "0", "--out", str(tmp_path)])
    assert code == 0
    _, rows = _read_csv(tmp_path / "sweep.csv")
    by_provider = {r["provider"]: r for r in rows if r["op"] == "resnet50-fwd"}
    assert set(by_provider) == {"no-bam", "authors-eager", "torch-path", "authors-eager-cbam", "torch-path-cbam"}
    assert all((r["N"], r["C"], r["H"], r["W"]) == ("2", "3", "224", "224") for r in by_provider.values())
    assert by_provider["no-bam"]["attention_overhead"] == ""
    for provider in ("authors-eager", "torch-path", "authors-eager-cbam", "torch-path-cbam"):
        r = by_provider[provider]
        overhead = float(r["median_ms"]) / float(by_provider["no-bam"]["median_ms"]) - 1
        assert float(r["attention_overhead"]) == pytest.approx(overhead, abs=1e-4)  # both from 6-digit CSV values
        assert r["gbps"] == "" and r["valid"] == ""
    ours, theirs = by_provider["torch-path-cbam"], by_provider["authors-eager-cbam"]
    assert float(ours["speedup_vs_authors_eager"]) == pytest.approx(
        float(theirs["median_ms"]) / float(ours["median_ms"]), rel=1e-4)
    assert float(ours["max_abs_err"]) < 1e-3  # the authors' CBAM network computes what ours does
    out = capsys.readouterr().out
    assert "resnet50-fwd batch 2 fp32 nchw (cpu-timer): BAM adds" in out and "with ours (torch-path)" in out
    assert "resnet50-fwd batch 2 fp32 nchw (cpu-timer): CBAM adds" in out
    assert "target, ours at most half of theirs: torch-path" in out
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert meta["grid"]["network_attentions"] == ["bam", "cbam"]


def test_sweep_plans_the_networks_of_the_chosen_attentions():
    from bam_triton.bench.sweep import plan

    cpu = torch.device("cpu")
    networks = [(2, 3, 224, 224)]
    (unit,) = plan(cpu, [], ["fp32"], ["nchw"], ["resnet50-train"], ["authors-eager", "torch-path"], networks)
    assert unit[-1] == ["no-bam", "authors-eager", "torch-path", "authors-eager-cbam", "torch-path-cbam"]
    (unit,) = plan(cpu, [], ["fp32"], ["nchw"], ["resnet50-train"], ["torch-path", "triton"], networks, ["cbam"])
    assert unit[-1] == ["no-bam", "torch-path-cbam", "triton-cbam"]


_VARIANT_FLAGS = {"COMBINE", "WRITE_DX", "HAS_DPOOL", "HAS_EXTRA"}  # inspect compiles one variant of each kernel


def _recorded_launches(shape, channels_last, single_read):
    """The launches of one BAM forward+backward on META tensors (fp16, train mode), as the launchers record them."""
    from bam_triton import BAM
    from bam_triton.kernels._common import record_launches

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    module = BAM(shape[1], backend="triton", single_read=single_read).to(device="meta", dtype=torch.float16)
    x = torch.empty(shape, device="meta", dtype=torch.float16).contiguous(memory_format=fmt).requires_grad_()
    with record_launches() as launches:
        out = module(x)
        out.backward(torch.empty_like(out))
    return launches


@pytest.mark.parametrize("single_read", [False, True], ids=["standard", "single-read"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14)],
                         ids=["256x56x56", "512x28x28", "1024x14x14"])
def test_inspect_and_traffic_see_what_the_launchers_launch(shape, layout, single_read):
    """At every ResNet-50 BAM shape and layout: every kernel a BAM training step launches is one that `inspect`
    compiles, with the same grid, scalars and constexprs (its variant flags aside), and `traffic` charges exactly
    these launches, in order."""
    from bam_triton.bench import traffic

    launches = _recorded_launches(shape, layout == "channels_last", single_read)
    assert len(launches) == 4  # pooling or front end, apply, reductions, dx (or the front end's backward)
    for plan, _ in launches:
        compiled = aot.launch_plan(plan.kernel_name, "fp16", shape, layout, arch=90)
        assert compiled is not None, f"inspect does not compile {plan.kernel_name} at {shape} {layout}"
        assert (compiled.grid, compiled.scalars) == (plan.grid, plan.scalars), plan.kernel_name
        assert {k: v for k, v in compiled.constexprs if k not in _VARIANT_FLAGS} == \
            {k: v for k, v in plan.constexprs if k not in _VARIANT_FLAGS}, plan.kernel_name
        assert compiled.kept_configs() == plan.kept_configs()
    provider = traffic.SINGLE_READ if single_read else "triton"
    log = traffic.provider_traffic(provider, "bam-fwd-bwd", shape, torch.float16, layout == "channels_last",
                                   combine="sum")
    charged = [(name, read, write) for name, read, write in log.ops if name.startswith("triton:")]
    assert charged == [(f"triton:{plan.kernel_name}", *traffic.launch_bytes(plan, sizes)) for plan, sizes in launches]
