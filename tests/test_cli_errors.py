"""Every ``bam-triton`` command against every user mistake: a bad ``BAM_TRITON_*`` environment variable, a device that
is not there, a missing package the command needs, an output it cannot write; and ``plot`` against inputs that are
not a sweep's CSV. Each must end in one line on stderr and exit status 2, before any
work (nothing on stdout: no half report), never a traceback. The mistakes are refused up front (``cli._user_mistake``),
so every case runs in milliseconds."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bam_triton import _backend, cli

# Each command with arguments that would run it (to an output under OUT); the mistake must stop it first.
COMMANDS = {
    "check": ["check"],
    "sweep": ["sweep", "--quick", "--out", "OUT"],
    "plot": ["plot", "OUT/sweep.csv"],
    "traffic": ["traffic"],
    "inspect": ["inspect", "--quick", "--out", "OUT"],
    "overhead": ["overhead"],
    "tune": ["tune", "--quick"],
    "attention": ["attention", "--out", "OUT/attention.png"],
    "export": ["export", "resnet18", "OUT/r18.onnx"],
    "gpu-check": ["gpu-check", "--out", "OUT"],
}
ENV_MISTAKES = {_backend.ENV_VAR: "gpu", _backend.SINGLE_READ_ENV_VAR: "maybe", _backend.AUTOTUNE_ENV_VAR: "perhaps"}
# The device mistake: --device cuda where torch sees no GPU (gpu-check has no --device: it needs the GPU itself).
DEVICE_MISTAKES = {"check": ["--device", "cuda"], "sweep": ["--device", "cuda"], "overhead": ["--device", "cuda"],
                   "tune": ["--device", "cuda"], "gpu-check": []}
NO_DEVICE = {"plot": "reads a CSV", "traffic": "counts bytes on the META device",
             "inspect": "compiles ahead of time for sm_80/sm_90 without a GPU", "attention": "runs on the CPU",
             "export": "runs on the CPU"}
# The package each command cannot run without.
PACKAGE_MISTAKES = {"plot": "matplotlib", "attention": "matplotlib", "traffic": "triton", "inspect": "triton",
                    "overhead": "triton", "tune": "triton", "export": "onnx", "gpu-check": "triton"}
NO_PACKAGE = {"check": "triton is optional: it reports the torch path", "sweep": "triton is optional: it times the "
                                                                                  "torch providers"}


def _run(command, extra, tmp_path, capsys):
    argv = [str(tmp_path) + arg[3:] if arg.startswith("OUT") else arg for arg in COMMANDS[command] + extra]
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def _assert_one_line(status, out, err, command, *words):
    assert status == 2, (status, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: bam-triton {command}"), err
    assert all(word in lines[0] for word in words), lines[0]
    assert out == ""  # refused before any work: no half report


def test_every_command_meets_every_mistake():
    subparsers = next(a for a in cli._parser()._actions if a.dest == "command")
    assert set(COMMANDS) == set(subparsers.choices)
    assert set(DEVICE_MISTAKES) | set(NO_DEVICE) == set(COMMANDS) and not set(DEVICE_MISTAKES) & set(NO_DEVICE)
    assert set(PACKAGE_MISTAKES) | set(NO_PACKAGE) == set(COMMANDS) and not set(PACKAGE_MISTAKES) & set(NO_PACKAGE)


@pytest.mark.parametrize("variable", ENV_MISTAKES)
@pytest.mark.parametrize("command", COMMANDS)
def test_bad_environment_variable(command, variable, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(variable, ENV_MISTAKES[variable])
    _assert_one_line(*_run(command, [], tmp_path, capsys), command, variable, repr(ENV_MISTAKES[variable]))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("command", DEVICE_MISTAKES)
def test_device_not_there(command, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _assert_one_line(*_run(command, DEVICE_MISTAKES[command], tmp_path, capsys), command, "CUDA GPU")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("command", PACKAGE_MISTAKES)
def test_missing_package(command, monkeypatch, tmp_path, capsys):
    package = PACKAGE_MISTAKES[command]
    monkeypatch.setitem(sys.modules, package, None)  # importlib.util.find_spec gives None, import raises
    if package == "triton":
        monkeypatch.setattr(_backend, "_TRITON_INSTALLED", False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # gpu-check: the GPU is there, triton is not
    _assert_one_line(*_run(command, [], tmp_path, capsys), command, package)
    assert not os.listdir(tmp_path)


# Outputs where the OS refuses to create anything, even for root (for whom os.access says yes everywhere): /proc.
OS_REFUSALS = {
    "sweep": ["sweep", "--quick", "--out", "/proc/bam-triton-test/out"],
    "inspect": ["inspect", "--quick", "--out", "/proc/bam-triton-test/out"],
    "gpu-check": ["gpu-check", "--dry-run", "--out", "/proc/bam-triton-test"],
    "plot": ["plot", "OUT/sweep.csv", "--out", "/proc/bam-triton-test"],
    "attention": ["attention", "--out", "/proc/bam-triton-test.png"],
    "export": ["export", "resnet18", "/proc/bam-triton-test.onnx"],
    "traffic": ["traffic", "--json", "/proc/bam-triton-test.json"],
    "overhead": ["overhead", "--json", "/proc/bam-triton-test.json"],
}


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", OS_REFUSALS)
def test_output_the_os_refuses(command, tmp_path, capsys):
    """The output's place is asked of the OS (a file or directory created and removed again), so a path nothing can
    be created in is one line up front, not a traceback after the work."""
    assert set(OS_REFUSALS) == set(cli._OUTPUTS)
    if command in PACKAGE_MISTAKES and command != "export":
        package = PACKAGE_MISTAKES[command]
        if package == "triton" and not _backend.triton_installed() or package == "matplotlib" and not _has("matplotlib"):
            pytest.skip(f"{command} needs {package} before its output is checked")
    argv = [arg.replace("OUT", str(tmp_path)) for arg in OS_REFUSALS[command]]
    status = cli.main(argv)
    out, err = capsys.readouterr()
    _assert_one_line(status, out, err, command, "/proc/bam-triton-test", "cannot be written")
    assert not os.path.exists("/proc/bam-triton-test")


def test_a_closed_pipe_ends_quietly():
    """`bam-triton traffic | head -1` where head has gone before the report is written (here: a pipe whose reading
    end is closed from the start): the command stops with status 1, without a BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "bam_triton", "traffic", "--shape", "2x64x8x8"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr


def test_a_checkpoint_that_is_not_there(tmp_path, capsys):
    for command in ("attention", "export"):
        _assert_one_line(*_run(command, ["--checkpoint", "OUT/missing.pth.tar"], tmp_path, capsys), command,
                         "missing.pth.tar", "no such file")


def test_a_real_process_ends_in_one_line():
    """The issue's case: `check` printed half its report, then the traceback of the ValueError."""
    proc = subprocess.run([sys.executable, "-m", "bam_triton", "check"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, BAM_TRITON_BACKEND="gpu"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: bam-triton check: environment variable BAM_TRITON_BACKEND must be one of ('auto', 'torch', 'triton'), "
        "got 'gpu'"]


@pytest.mark.parametrize("given", ["dir-without-csv", "missing-file", "other-csv", "binary", "text-in-sizes"])
def test_plot_refuses_what_is_not_a_sweep_csv(given, tmp_path, capsys):
    """`bam-triton plot` on a directory without a sweep.csv, a missing file, a CSV of other columns, a binary file or
    a sweep CSV with text where a size goes: one line naming the path, exit 2, nothing written."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "results.csv"
    header = "device,provider,op,N,C,H,W,dtype,layout,median_ms,timing_mode\n"
    if given == "dir-without-csv":
        path = tmp_path
    elif given == "other-csv":
        path.write_text("a,b\n1,2\n")
    elif given == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif given == "text-in-sizes":
        path.write_text(header + "cpu,torch-path,pool,two,64,7,7,fp32,nchw,0.1,cpu-timer\n")
    status = cli.main(["plot", str(path)])
    out, err = capsys.readouterr()
    _assert_one_line(status, out, err, "plot", str(path))
    assert sorted(os.listdir(tmp_path)) == ([] if given in ("dir-without-csv", "missing-file") else ["results.csv"])


def test_plot_takes_a_sweep_directory(tmp_path, capsys):
    """`bam-triton plot DIR` plots DIR/sweep.csv, as `sweep --out DIR` wrote it."""
    pytest.importorskip("matplotlib")
    (tmp_path / "sweep.csv").write_text(
        "device,provider,op,N,C,H,W,dtype,layout,median_ms,p20_ms,p80_ms,gbps,frac_copy_bw,speedup_vs_authors_eager,"
        "timing_mode\n"
        "cpu,authors-eager,pool,2,64,7,7,fp32,nchw,0.02,0.02,0.02,1.0,0.1,1.0,cpu-timer\n"
        "cpu,torch-path,pool,2,64,7,7,fp32,nchw,0.01,0.01,0.01,2.0,0.2,2.0,cpu-timer\n")
    assert cli.main(["plot", str(tmp_path)]) == 0
    out, _ = capsys.readouterr()
    assert "wrote" in out and any(name.endswith(".png") for name in os.listdir(tmp_path))


# An output each command cannot write: a file where a directory goes, a directory where a file goes, a file in a
# directory that does not exist. FILE is an existing file, MISSING a directory that does not exist (under tmp_path).
OUTPUT_MISTAKES = {
    "sweep": (["sweep", "--quick", "--out", "FILE"], "is a file, not a directory"),
    "inspect": (["inspect", "--quick", "--out", "FILE/sub"], "is a file, not a directory"),
    "gpu-check": (["gpu-check", "--dry-run", "--out", "FILE"], "is a file, not a directory"),
    "plot": (["plot", "OUT/sweep.csv", "--out", "FILE"], "is a file, not a directory"),
    "attention": (["attention", "--out", "MISSING/attention.png"], "no directory"),
    "export": (["export", "resnet18", "OUT"], "is a directory, not a file"),
    "traffic": (["traffic", "--json", "MISSING/traffic.json"], "no directory"),
    "overhead": (["overhead", "--json", "MISSING/overhead.json"], "no directory"),
}


def test_output_mistakes_cover_every_command_that_writes():
    assert set(OUTPUT_MISTAKES) == set(cli._OUTPUTS)


@pytest.mark.parametrize("command", OUTPUT_MISTAKES)
def test_output_that_cannot_be_written(command, tmp_path, capsys):
    """Refused up front, in one line naming the argument and the path, before any work: nothing new on disk."""
    if command in PACKAGE_MISTAKES and command != "export":
        package = PACKAGE_MISTAKES[command]
        if package == "triton" and not _backend.triton_installed() or package == "matplotlib" and not _has("matplotlib"):
            pytest.skip(f"{command} needs {package} before its output is checked")
    (tmp_path / "file").write_text("not a directory")
    argv, words = OUTPUT_MISTAKES[command]
    argv = [arg.replace("FILE", str(tmp_path / "file")).replace("MISSING", str(tmp_path / "missing"))
            .replace("OUT", str(tmp_path)) for arg in argv]
    status = cli.main(argv)
    out, err = capsys.readouterr()
    _assert_one_line(status, out, err, command, words)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def _has(package):
    import importlib.util

    return importlib.util.find_spec(package) is not None


@pytest.mark.parametrize("command", ["attention", "export"])
@pytest.mark.parametrize("checkpoint", ["not-a-checkpoint", "no-state-dict", "other-keys"])
def test_checkpoint_that_cannot_be_used(command, checkpoint, tmp_path, capsys):
    """--checkpoint with a file torch.load cannot read, or one whose keys are not the model's: one line naming the
    file and what is wrong (counts, not 170 key lines), exit 2 (both were tracebacks or many lines)."""
    pytest.importorskip("matplotlib" if command == "attention" else "onnx")
    path = tmp_path / "model.pt"
    if checkpoint == "not-a-checkpoint":
        path.write_text("garbage")
    elif checkpoint == "no-state-dict":
        torch.save([torch.zeros(3)], path)
    else:
        torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    output = str(tmp_path / ("a.png" if command == "attention" else "m.onnx"))
    argv = (["attention", "--out", output] if command == "attention" else ["export", "resnet18", output])
    status = cli.main(argv + ["--checkpoint", str(path)])
    out, err = capsys.readouterr()
    words = {"not-a-checkpoint": ["cannot be read"], "no-state-dict": ["holds no state_dict"],
             "other-keys": ["does not fit", "missing key", "fc.weight", "the checkpoint has no attention module"]}[
        checkpoint]
    _assert_one_line(status, out, err, command, str(path), *words)
    if checkpoint == "other-keys":  # the option to pass, in the command's own words where it has one
        assert ("pass --attention none" in err) == (command == "export") and "attention=" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


# ----------------------------------------------------------------------------------------------------------------------
# bench commands and the training example: careless inputs
# ----------------------------------------------------------------------------------------------------------------------


def _bam_reduction():
    from bam_triton.bench.traffic import module_reduction

    return module_reduction("bam")


def _needs_triton(command):
    if not _backend.triton_installed():
        pytest.skip(f"{command} needs triton before its arguments are checked")


@pytest.mark.parametrize("argv, words", [
    (["--shapes", "1x64x8x8", "--ops", "bam-fwd-bwd"], ["--shapes 1x64x8x8", "N must be >= 2", "bam-fwd-bwd"]),
    (["--batch", "1", "--ops", "pool,bam-fwd-bwd"], ["--batch 1", "N must be >= 2", "bam-fwd-bwd"]),
    (["--shapes", "1x64x1x1", "--ops", "cbam-fwd-bwd"], ["--shapes 1x64x1x1", "N·H·W must be >= 2"]),
    (["--shapes", "2x64x8x8,2xCx8x8", "--ops", "bam-fwd"], ["--shapes 2xCx8x8", "C must be >= R", "bam-fwd"]),
    (["--shapes", "2xCx8x8", "--ops", "apply-fwd,cbam-fwd,cbam-fwd-bwd"], ["C must be >= R", "cbam-fwd, cbam-fwd-bwd"]),
])
def test_sweep_refuses_shapes_its_ops_cannot_run(argv, words, tmp_path, capsys):
    """A training op at batch 1 (BatchNorm in training mode) or a module op with fewer channels than the module's
    reduction: one line naming the option and the shape, exit 2, before any work (a traceback or a sweep of nothing
    but failures, exit 0, before)."""
    r = _bam_reduction()
    argv = [arg.replace("xCx", f"x{r // 2}x") for arg in argv]
    words = [word.replace("xC", f"x{r // 2}").replace(">= R", f">= {r}") for word in words]
    status = cli.main(["sweep", "--out", str(tmp_path / "out")] + argv)
    out, err = capsys.readouterr()
    _assert_one_line(status, out, err, "sweep", *words)
    assert not os.listdir(tmp_path)


def test_sweep_lets_through_what_can_train():
    """CBAM trains at batch 1 when H·W > 1 (its BatchNorm2d normalises over N·H·W); pool and apply need nothing."""
    import argparse

    from bam_triton.bench.sweep import grid_problem

    args = argparse.Namespace(shapes=[[(1, 16, 4, 4)]], quick=False)
    assert grid_problem(args, [(1, 16, 4, 4)], ["cbam-fwd-bwd", "cbam-fwd", "bam-fwd"]) is None
    assert grid_problem(args, [(1, 1, 1, 1)], ["pool", "apply-fwd", "apply-bwd", "resnet50-train"]) is None


@pytest.mark.parametrize("failing", ["every provider", "one provider"])
def test_sweep_failures_are_one_line_each_on_stderr(failing, monkeypatch, tmp_path, capsys):
    """A provider that fails (torch.compile's errors run to dozens of lines): one line on stderr with the exception's
    type and first line, the whole message in sweep.json; exit 1 when nothing at all was timed (it was 0), 0 with a
    note on stderr when the other providers were."""
    from bam_triton.bench import providers

    class FailingCase(providers.OpCase):
        def make(self, provider):
            if failing == "every provider" or provider == "torch-path":
                raise RuntimeError("RuntimeError when making fake tensor call\n\n  Explanation: Dynamo failed\n  ...")
            return super().make(provider)

    monkeypatch.setattr(providers, "OpCase", FailingCase)
    status = cli.main(["sweep", "--shapes", "2x16x4x4", "--ops", "pool", "--providers", "authors-eager,torch-path",
                       "--device", "cpu", "--min-time", "0.001", "--max-reps", "2", "--rounds", "1", "--copy-mib", "1",
                       "--flush-mib", "0", "--cpu-allocator", "system", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "failed" not in out and "Explanation" not in out + err and "Traceback" not in err
    failed = [line for line in err.splitlines() if line.startswith("failed: ")]
    expected = ["authors-eager", "torch-path"] if failing == "every provider" else ["torch-path"]
    assert failed == [f"failed: {p} pool 2x16x4x4 fp32 nchw: RuntimeError: RuntimeError when making fake tensor call"
                      for p in expected]
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert [f["provider"] for f in data["failures"]] == expected
    assert all("Explanation: Dynamo failed" in f["detail"] for f in data["failures"])
    if failing == "every provider":
        assert status == 1 and data["rows"] == []
        assert err.strip().splitlines()[-1].startswith("error: bam-triton sweep: no timing at all")
    else:
        assert status == 0 and [r["provider"] for r in data["rows"]] == ["authors-eager"]
        assert "1 failure(s)" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("command, shape, words", [
    ("traffic", "2xCx8x8", ["C must be >= R"]),
    ("traffic", "1x64x8x8", ["N must be >= 2"]),
    ("overhead", "1x64x8x8", ["N must be >= 2"]),
])
def test_traffic_and_overhead_refuse_a_shape_they_cannot_build(command, shape, words, capsys):
    """Tracebacks before (channels // reduction, BatchNorm at batch 1): one line naming --shape, exit 2."""
    _needs_triton(command)
    r = _bam_reduction()
    shape = shape.replace("C", str(r // 2))
    argv = [command, "--shape", shape] + (["--reps", "2"] if command == "overhead" else [])
    status = cli.main(argv)
    out, err = capsys.readouterr()
    _assert_one_line(status, out, err, command, f"--shape {shape}",
                     *[word.replace("R", str(r)) for word in words])


def test_traffic_takes_the_smallest_shape_it_can_build(capsys):
    _needs_triton("traffic")
    assert cli.main(["traffic", "--shape", f"2x{_bam_reduction()}x1x1"]) == 0
    assert "authors-eager" in capsys.readouterr().out


@pytest.mark.parametrize("kernels, unknown", [("pool_kernel", "'pool_kernel'"),
                                              ("channel_pool_kernel,nope", "'nope'"), (",", "no kernel named")])
def test_inspect_refuses_an_unknown_kernel(kernels, unknown, tmp_path, capsys):
    """`--kernels pool_kernel` compiled "0 variants" and exited 0; an unknown name beside a known one was dropped."""
    _needs_triton("inspect")
    status = cli.main(["inspect", "--quick", "--arch", "90", "--kernels", kernels, "--out", str(tmp_path / "insp")])
    out, err = capsys.readouterr()
    _assert_one_line(status, out, err, "inspect", "--kernels", unknown, "choose from", "channel_pool_kernel,",
                     "apply_fwd_kernel")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("mode, words", [("foo", ["no timed rows of that mode"]),
                                         ("do_bench", ["no timed rows of that mode"]),
                                         ("interpreter", ["never plotted"])])
def test_plot_names_the_timing_modes_the_csv_has(mode, words, tmp_path, capsys):
    """A --timing-mode the CSV has no rows of said "nothing to plot: no timed (non-interpreter) rows in the CSV"."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "sweep.csv"
    path.write_text(
        "device,provider,op,N,C,H,W,dtype,layout,median_ms,p20_ms,p80_ms,gbps,frac_copy_bw,speedup_vs_authors_eager,"
        "timing_mode\n"
        "cpu,authors-eager,pool,2,64,7,7,fp32,nchw,0.02,0.02,0.02,1.0,0.1,1.0,cpu-timer\n"
        "cpu,torch-path,pool,2,64,7,7,fp32,nchw,0.01,0.01,0.01,2.0,0.2,2.0,cpu-timer\n"
        "cpu,triton,pool,2,64,7,7,fp32,nchw,9.0,9.0,9.0,,,,interpreter\n")
    status = cli.main(["plot", str(path), "--timing-mode", mode])
    out, err = capsys.readouterr()
    _assert_one_line(status, out, err, "plot", f"--timing-mode {mode!r}", "its modes: cpu-timer", *words)
    assert os.listdir(tmp_path) == ["sweep.csv"]


# A tiny run of examples/train_synthetic.py: each mistake must stop it before any data is made or a model trained.
TINY_TRAINING = ["--epochs", "1", "--steps", "1", "--train-size", "32", "--test-size", "16", "--batch-size", "16",
                 "--width", "8"]


class _Started(Exception):
    """Raised where the example starts its work (making the data)."""


@pytest.mark.parametrize("argv, option", [
    (["--batch-size", "0"], "--batch-size"),            # ZeroDivisionError
    (["--batch-size", "1"], "--batch-size"),            # BAM's batch-1 ValueError, after the plain network trained
    (["--train-size", "8"], "--train-size"),            # fewer images than a batch: ZeroDivisionError
    (["--steps", "0"], "--steps"),                      # ZeroDivisionError
    (["--epochs", "-1"], "--epochs"),                   # silently 0 epochs
    (["--test-size", "0"], "--test-size"),              # ZeroDivisionError
    (["--reduction", "1000"], "--reduction"),           # ValueError, after the plain network trained
    (["--reduction", "0"], "--reduction"),
    (["--width", "0"], "--width"),
    (["--lr", "-0.1"], "--lr"),
    (["--threads", "-1"], "--threads"),
    (["--out", "FILE"], "--out"),                       # FileExistsError
    (["--out", "FILE/sub"], "--out"),
])
def test_training_example_refuses_careless_arguments(example, argv, option, monkeypatch, tmp_path, capsys):
    """One `error:` line naming the option (argparse's, after its usage line), exit 2, before any work."""
    def started(*args, **kwargs):
        raise _Started

    monkeypatch.setattr(example, "make_shapes", started)
    (tmp_path / "file").write_text("not a directory")
    out_dir = str(tmp_path / "out")
    argv = [arg.replace("FILE", str(tmp_path / "file")) for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        example.main(TINY_TRAINING + ["--out", out_dir] + argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and option in errors[0] and err.strip().splitlines()[-1] == errors[0], err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_training_example_trains_cbam_alone_at_batch_1(example, monkeypatch, tmp_path):
    """Only BAM needs two samples per batch: --batch-size 1 without it passes the checks and starts."""
    def started(*args, **kwargs):
        raise _Started

    monkeypatch.setattr(example, "make_shapes", started)
    with pytest.raises(_Started):
        example.main(TINY_TRAINING + ["--batch-size", "1", "--models", "none", "cbam", "--out", str(tmp_path / "o")])
