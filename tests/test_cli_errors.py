"""Every ``bam-triton`` command against every user mistake: a bad ``BAM_TRITON_*`` environment variable, a device that
is not there, a missing package the command needs, an output it cannot write; and ``plot`` against inputs that are
not a sweep's CSV. Each must end in one line on stderr and exit status 2, before any
work (nothing on stdout: no half report), never a traceback. The mistakes are refused up front (``cli._user_mistake``),
so every case runs in milliseconds."""
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
@pytest.mark.parametrize("checkpoint", ["not-a-checkpoint", "other-keys"])
def test_checkpoint_that_cannot_be_used(command, checkpoint, tmp_path, capsys):
    """--checkpoint with a file torch.load cannot read, or one whose keys are not the model's: one line naming the
    file and what is wrong (counts, not 170 key lines), exit 2 (both were tracebacks or many lines)."""
    pytest.importorskip("matplotlib" if command == "attention" else "onnx")
    path = tmp_path / "model.pt"
    if checkpoint == "not-a-checkpoint":
        path.write_text("garbage")
    else:
        torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    output = str(tmp_path / ("a.png" if command == "attention" else "m.onnx"))
    argv = (["attention", "--out", output] if command == "attention" else ["export", "resnet18", output])
    status = cli.main(argv + ["--checkpoint", str(path)])
    out, err = capsys.readouterr()
    words = ["cannot be read"] if checkpoint == "not-a-checkpoint" else ["does not fit", "missing key", "fc.weight",
                                                                          "the checkpoint has no attention module"]
    _assert_one_line(status, out, err, command, str(path), *words)
    if checkpoint == "other-keys":  # the option to pass, in the command's own words where it has one
        assert ("pass --attention none" in err) == (command == "export") and "attention=" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
