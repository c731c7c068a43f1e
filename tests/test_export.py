"""Deployment: BAM and the BAM-ResNets through torch.export, ONNX (both exporters, run in onnxruntime) and
torch.jit.trace, and ``bam-triton export``.

Where a graph is recorded (``torch.export``, ``torch.jit.trace``, ``torch.onnx.export``) bam_triton writes BAM as plain
aten ops (mean, sigmoid, mul, add) on every backend (``_backend.plain_ops_needed``), so exported graphs need no custom
op: their consumers (ONNX Runtime, TensorRT, ExecuTorch) know only standard ops. These tests hold the exported programs
to eager torch within ``bam_triton.TOLERANCES`` at shapes other than the traced ones, look into the graphs for the ops
they contain, and run the ONNX files in onnxruntime. Tensors are built on CPU (export is a CPU-side workflow), except
in the backend test, which exports on this run's device. onnx, onnxscript and onnxruntime are dev extras: the tests
that need them skip without them.
"""
import copy
import importlib.util
import inspect
import os
import warnings

import pytest
import torch

from bam_triton._dtypes import assert_close as check_close
from torch.export import Dim

from bam_triton import BAM
from bam_triton import cli
from bam_triton._backend import triton_installed
from bam_triton.models import resnet18

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
COMBINES = ("sum", "product")
# What BAM itself must become in ONNX: the pooling (a mean), the gate and the apply step.
BAM_ONNX_OPS = {"ReduceMean", "Sigmoid", "Mul", "Add"}
STANDARD_ONNX_DOMAINS = {"", "ai.onnx"}
# The small ResNet-18 of these tests: BAM after layer1..3 at 16, 32, 64 channels.
RESNET_KWARGS = dict(num_classes=10, width=16)
RESNET_SIZE = 64
ONNX_PIP = "pip install onnx onnxscript onnxruntime"


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------

def _randomize_norms(model, seed=0):
    """Random BatchNorm affine parameters and running statistics, so that eval mode (and ONNX exporters folding the
    norms into the convs) is tested on something other than the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                shape = module.running_mean.shape
                module.weight.copy_(0.5 + torch.rand(shape, generator=g))
                module.bias.copy_(0.2 * torch.randn(shape, generator=g))
                module.running_mean.copy_(0.2 * torch.randn(shape, generator=g))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=g))
    return model


def _bam(combine, training=False, **kwargs):
    torch.manual_seed(0)
    return _randomize_norms(BAM(64, combine=combine, **kwargs)).train(training)


def _resnet(training=False):
    torch.manual_seed(0)
    return _randomize_norms(resnet18(**RESNET_KWARGS)).train(training)


def _images(n, c, h, w, layout="nchw", seed=1, device="cpu"):
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))
    return x.to(device).contiguous(memory_format=LAYOUTS[layout])


def _assert_close(got, expected, what=""):
    """The package's check in ``expected``'s dtype, atol scaled by the outputs' size: an exported graph runs other
    kernels (ONNX Runtime's convolutions, a ResNet's logits summing thousands of terms) than eager torch."""
    got = torch.as_tensor(got)
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    check_close(got.to(expected.dtype), expected, expected.dtype, what=what, scale_atol=True)


def _bam_dynamic_shapes():
    # BAM alone has no size that must stay fixed: batch, height and width are all dynamic. (min 2: torch.export
    # specializes a dimension it meets at size 0 or 1.)
    return ({0: Dim("batch", min=2), 2: Dim("height", min=2), 3: Dim("width", min=2)},)


def _resnet_dynamic_shapes():
    # The ResNet's height and width are dynamic only from 33 pixels up: the stem and layer2..4 divide them by 32, and
    # torch.export specializes a dimension that is 1, so below 33 the last stage's map would be 1x1 and the export
    # would fix it (it refuses a range that includes it). The batch is dynamic from 2 (1 is specialized too).
    return ({0: Dim("batch", min=2), 2: Dim("height", min=33, max=1024), 3: Dim("width", min=33, max=1024)},)


def _call_targets(graph):
    return [node.target for node in graph.nodes if node.op == "call_function"]


def _assert_no_bam_triton_op(exported, decompose=True, required=("mean", "sigmoid", "mul", "add")):
    """Neither the exported program nor (``decompose``) its core-ATen decomposition (what ONNX and ExecuTorch consume)
    calls a ``bam_triton::`` op, and BAM's own steps are there as standard ops."""
    for program in (exported, exported.run_decompositions()) if decompose else (exported,):
        targets = _call_targets(program.graph)
        custom = [str(t) for t in targets if getattr(t, "namespace", None) == "bam_triton" or "bam_triton" in str(t)]
        assert not custom, f"bam_triton ops in the exported graph: {custom}"
    names = {getattr(t, "__name__", str(t)).split(".")[0] for t in _call_targets(exported.graph)}
    assert set(required) <= names, sorted(names)


def _batchnorm_buffers(model):
    return {name: value for name, value in model.state_dict().items()
            if name.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _check_exported(model, example, dynamic_shapes, new_input, decompose=True, required=("mean", "sigmoid", "mul",
                                                                                      "add")):
    """Export a copy of ``model`` (eval or train, as it is), run the program at ``new_input`` and compare it with
    eager; in train mode the BatchNorm running statistics the program updates are compared too."""
    reference = copy.deepcopy(model)
    exported = torch.export.export(copy.deepcopy(model), (example,), dynamic_shapes=dynamic_shapes)
    _assert_no_bam_triton_op(exported, decompose, required)
    program = exported.module()
    before = {k: v.clone() for k, v in _batchnorm_buffers(program).items()}
    got = program(new_input)
    expected = reference(new_input)
    _assert_close(got, expected, "exported program vs eager")
    if model.training:
        after, eager_after = _batchnorm_buffers(program), _batchnorm_buffers(reference)
        assert after.keys() == eager_after.keys()
        changed = [k for k in after if k.endswith("running_mean") and not torch.equal(after[k], before[k])]
        assert changed, "the exported train-mode program updated no BatchNorm running statistics"
        for key, value in eager_after.items():
            if value.is_floating_point():
                _assert_close(after[key], value, f"buffer {key}")
            else:
                assert torch.equal(after[key], value), key
    return got


def _need(*names):
    for name in names:
        pytest.importorskip(name, reason=f"{name} is not installed (a dev extra: {ONNX_PIP})")


def _has_dynamo_switch():
    return "dynamo" in inspect.signature(torch.onnx.export).parameters  # torch >= 2.5


def _torchscript_onnx_exporter_missing():
    """Why ``torch.onnx.export(..., dynamo=False)`` is not available with this torch, or None."""
    if not _has_dynamo_switch():
        return None  # torch < 2.5: the TorchScript exporter is the only one
    if not hasattr(torch.onnx, "utils") or "dynamic_axes" not in inspect.signature(torch.onnx.export).parameters:
        return f"torch {torch.__version__} no longer has the TorchScript-based ONNX exporter (dynamo=False)"
    return None


def _onnx_export(model, example, path, dynamo, dynamic_shapes, input_axes, output_axes):
    """``dynamic_shapes`` for the dynamo exporter; ``input_axes``, ``output_axes`` ({dim: name}) for the TorchScript
    exporter's ``dynamic_axes``."""
    common = dict(input_names=["x"], output_names=["y"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation notes and BAM's input checks read while tracing
        if dynamo:
            torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=18, external_data=False,
                              dynamic_shapes=dynamic_shapes, **common)
        else:
            if _has_dynamo_switch():
                common["dynamo"] = False
            torch.onnx.export(model, (example,), str(path), opset_version=17,
                              dynamic_axes={"x": input_axes, "y": output_axes}, **common)


def _check_onnx_file(path, model, inputs, required=BAM_ONNX_OPS):
    """onnx.checker, standard ops only (``required`` among them: BAM's by default), and onnxruntime on CPU against
    eager at each input."""
    import onnx
    import onnxruntime

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    op_types = {node.op_type for node in proto.graph.node}
    domains = {node.domain for node in proto.graph.node} | {f.domain for f in proto.functions}
    assert required <= op_types, f"missing {sorted(required - op_types)} in {sorted(op_types)}"
    assert domains <= STANDARD_ONNX_DOMAINS, f"non-standard op domains {sorted(domains - STANDARD_ONNX_DOMAINS)}"
    assert {o.domain for o in proto.opset_import} <= STANDARD_ONNX_DOMAINS, \
        [(o.domain, o.version) for o in proto.opset_import]
    assert max(o.version for o in proto.opset_import if o.domain in STANDARD_ONNX_DOMAINS) >= 17
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in inputs:
        (got,) = session.run(None, {session.get_inputs()[0].name: x.contiguous().numpy()})
        with torch.no_grad():
            expected = model(x)
        _assert_close(torch.from_numpy(got), expected, f"onnxruntime vs eager at shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------------------------------
# torch.export
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("combine", COMBINES)
def test_torch_export_bam_dynamic_batch_and_size(combine, layout, training):
    model = _bam(combine, training)
    got = _check_exported(model, _images(4, 64, 16, 16, layout), _bam_dynamic_shapes(),
                          _images(3, 64, 12, 20, layout, seed=2))
    assert got.is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.slow_on_gpu
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_export_resnet18_dynamic_batch_and_size(training):
    model = _resnet(training)
    # BAM's core-ATen decomposition is checked in the BAM tests; the whole network's would add ~3 s per mode.
    _check_exported(model, _images(2, 3, RESNET_SIZE, RESNET_SIZE), _resnet_dynamic_shapes(),
                    _images(3, 3, 96, 80, seed=2), decompose=False)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_torch_export_standard_ops_on_every_backend(backend, device):
    """The exported graph is the same standard ops whichever backend the module asks for, on this run's device
    (compiled kernels in the CUDA run, the interpreter on CPU), and runs like eager, which does use the kernels."""
    if backend == "triton" and not triton_installed():
        pytest.skip("triton is not installed")
    model = _bam("sum", backend=backend).to(device).eval()
    example = _images(2, 64, 8, 8, device=device)
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch", min=2)},))
    _assert_no_bam_triton_op(exported)
    x = _images(3, 64, 8, 8, seed=2, device=device)
    _assert_close(exported.module()(x), model(x), f"exported program vs eager (backend={backend})")


# ----------------------------------------------------------------------------------------------------------------------
# ONNX, run in onnxruntime
# ----------------------------------------------------------------------------------------------------------------------

def _onnx_exporter_param():
    return pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])


def _skip_unless_exporter(dynamo):
    _need("onnx", "onnxruntime", *(["onnxscript"] if dynamo else []))
    if dynamo and not _has_dynamo_switch():
        pytest.skip(f"torch {torch.__version__} has no torch.export-based ONNX exporter (torch >= 2.5)")
    if not dynamo:
        reason = _torchscript_onnx_exporter_missing()
        if reason:
            pytest.skip(reason)


@_onnx_exporter_param()
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("combine", COMBINES)
def test_onnx_bam_runs_in_onnxruntime(combine, layout, dynamo, tmp_path):
    _skip_unless_exporter(dynamo)
    model = _bam(combine).eval()
    path = tmp_path / "bam.onnx"
    axes = {0: "batch", 2: "height", 3: "width"}
    _onnx_export(model, _images(4, 64, 16, 16, layout), path, dynamo, _bam_dynamic_shapes(), axes, axes)
    _check_onnx_file(path, model, [_images(3, 64, 16, 16, seed=2), _images(5, 64, 12, 20, seed=3)])


@pytest.mark.slow_on_gpu
@pytest.mark.parametrize("attention", ["bam", "cbam"])
@_onnx_exporter_param()
def test_onnx_resnet18_runs_in_onnxruntime(dynamo, attention, tmp_path):
    _skip_unless_exporter(dynamo)
    model = (_resnet() if attention == "bam" else _cbam_resnet()).eval()
    path = tmp_path / f"resnet18_{attention}.onnx"
    _onnx_export(model, _images(2, 3, RESNET_SIZE, RESNET_SIZE), path, dynamo, ({0: Dim("batch", min=1)},),
                 {0: "batch"}, {0: "batch"})
    _check_onnx_file(path, model, [_images(1, 3, RESNET_SIZE, RESNET_SIZE, seed=2),
                                   _images(3, 3, RESNET_SIZE, RESNET_SIZE, seed=3)],
                     BAM_ONNX_OPS | ({"ReduceMax"} if attention == "cbam" else set()))  # CBAM's max pools


# ----------------------------------------------------------------------------------------------------------------------
# TorchScript: trace yes, script no
# ----------------------------------------------------------------------------------------------------------------------

def _trace_checked(model, example):
    """``torch.jit.trace`` with its own check (check_trace=True, the default): a graph that differs between two runs
    raises; an output that differs from the Python function only warns, so that warning fails here."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, (example,), check_trace=True)
    failures = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)
                and ("does not match" in str(w.message) or "nondeterministic" in str(w.message))]
    assert not failures, failures[0][:2000]
    return traced


def _check_trace_of_64_channels(model, layout):
    """Trace ``model`` (64 input channels) at one size and run it at another: standard ops only, eager's numbers and
    memory format."""
    traced = _trace_checked(model, _images(4, 64, 16, 16, layout))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert not [k for k in kinds if k.startswith("bam_triton::")], sorted(kinds)
    x = _images(3, 64, 12, 20, layout, seed=2)
    got = traced(x)
    _assert_close(got, model(x), "traced vs eager")
    assert got.is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("combine", COMBINES)
def test_jit_trace_bam(combine, layout):
    _check_trace_of_64_channels(_bam(combine).eval(), layout)


@pytest.mark.slow_on_gpu
def test_jit_trace_resnet18():
    model = _resnet().eval()
    traced = _trace_checked(model, _images(2, 3, RESNET_SIZE, RESNET_SIZE))
    x = _images(3, 3, RESNET_SIZE, RESNET_SIZE, seed=2)
    _assert_close(traced(x), model(x), "traced ResNet-18 vs eager")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_jit_trace_bam_half_precision_passes_its_check(dtype):
    """The traced apply step rounds once, as eager does (addcmul), so the trace's own check passes in fp16/bf16."""
    torch.manual_seed(0)
    model = BAM(64, dtype=dtype).eval()
    _trace_checked(model, _images(4, 64, 16, 16).to(dtype))


def test_jit_trace_bam_without_tracer_warnings():
    """BAM's input checks read sizes, tensors while a trace records: they run with TracerWarning silenced."""
    model = _bam("sum").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(model, (_images(2, 64, 8, 8),))
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
            if issubclass(w.category, torch.jit.TracerWarning) and "bam_triton" in w.filename.replace(os.sep, "/")]
    assert not ours, ours


@pytest.mark.parametrize("make", [lambda: BAM(32), lambda: resnet18(**RESNET_KWARGS)], ids=["BAM", "resnet18"])
def test_jit_script_refused_with_a_clear_error(make):
    with pytest.raises(RuntimeError, match=r"bam_triton(.|\n)*torch\.export"):
        torch.jit.script(make())


# ----------------------------------------------------------------------------------------------------------------------
# bam-triton export
# ----------------------------------------------------------------------------------------------------------------------

def _run_cli(capsys, *argv):
    status = cli.main(["export", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.slow_on_gpu
@_onnx_exporter_param()
def test_cli_export_writes_a_checked_file(dynamo, tmp_path, capsys):
    _skip_unless_exporter(dynamo)
    out = tmp_path / "resnet18_bam.onnx"
    status, stdout, stderr = _run_cli(capsys, "resnet18", out, "--input-size", RESNET_SIZE, "--batch", 3,
                                      "--opset", 17 if not dynamo else 18, "--dynamo" if dynamo else "--no-dynamo")
    assert status == 0, stdout + stderr
    assert out.is_file()
    assert "onnx.checker passed" in stdout
    assert "vs eager torch at batch 3: max |difference| = " in stdout and "(OK," in stdout, stdout
    import onnx

    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "the batch dimension is not dynamic"
    assert {o.version for o in proto.opset_import if o.domain in STANDARD_ONNX_DOMAINS} == {17 if not dynamo else 18}


def _check_exported_resnet(path, model):
    """The ONNX file at ``path`` gives ``model``'s logits in onnxruntime for two ResNet-sized images."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _images(2, 3, RESNET_SIZE, RESNET_SIZE, seed=4)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow_on_gpu
def test_cli_export_loads_the_checkpoint(tmp_path, capsys):
    """An authors'-format checkpoint (``module.`` keys inside ``state_dict``) is what the ONNX file computes."""
    _need("onnx", "onnxruntime")
    reason = _torchscript_onnx_exporter_missing()
    dynamo_flag = "--no-dynamo" if reason is None else "--dynamo"
    if reason is not None:
        _need("onnxscript")
    torch.manual_seed(5)
    model = _randomize_norms(resnet18(num_classes=7), seed=5).eval()
    checkpoint = tmp_path / "RESNET18_BAM.pth.tar"
    state_dict = {f"module.{k}": v for k, v in model.state_dict().items()}  # as DataParallel saved it
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": state_dict}, checkpoint)
    out = tmp_path / "resnet18_bam.onnx"
    status, stdout, stderr = _run_cli(capsys, "resnet18", out, "--input-size", RESNET_SIZE, "--num-classes", 7,
                                      "--checkpoint", checkpoint, dynamo_flag)
    assert status == 0, stdout + stderr
    assert str(checkpoint) in stdout
    _check_exported_resnet(out, model)


@pytest.mark.parametrize("argv, needle", [
    (["--opset", "16"], "--opset"),
    (["--input-size", "32"], "--input-size"),
    (["--batch", "0"], "--batch"),
    (["--num-classes", "0"], "--num-classes"),
    (["--checkpoint", "no-such-file.pth.tar"], "--checkpoint"),
    (["--checkpoint", "."], "is a directory, not a checkpoint file"),
    (["--attention", "cbam", "--combine", "sum"], "--combine sum applies to BAM only"),
    (["--opset", "1000"], "--opset must be <= "),
])
def test_cli_export_bad_option(argv, needle, tmp_path, capsys):
    if argv[0] == "--opset" and argv[1] == "1000":
        _need("onnx")  # the upper bound is the installed onnx's newest opset
    out = tmp_path / "m.onnx"
    status, stdout, stderr = _run_cli(capsys, "resnet18", out, *argv)
    assert status == 2 and needle in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


@pytest.mark.slow_on_gpu
def test_cli_export_never_reports_an_opset_it_did_not_write(tmp_path, capsys, monkeypatch):
    """The dynamo exporter keeps its own opset (and logs a traceback) where it cannot convert to the one asked for:
    the command checks the file and refuses it, naming --opset, instead of reporting success. (An onnx that claims
    to know opset 40 stands in for an exporter behind the installed onnx.)"""
    _need("onnx", "onnxscript")
    import onnx

    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: 40)
    out = tmp_path / "m.onnx"
    status, stdout, stderr = _run_cli(capsys, "resnet18", out, "--input-size", RESNET_SIZE, "--opset", 40)
    assert status == 2 and "--opset 40: the dynamo exporter" in stderr and "wrote opset" in stderr, stdout + stderr
    assert "wrote " not in stdout and not out.exists()


def test_cli_export_exporter_failure_is_one_line(tmp_path, capsys):
    """Above its own maximum (below onnx's) the TorchScript exporter fails or writes another opset: either way one
    line naming --opset, not a traceback or a success."""
    _need("onnx")
    reason = _torchscript_onnx_exporter_missing()
    if reason is not None or not _has_dynamo_switch():
        pytest.skip(reason or "torch < 2.5: no --no-dynamo switch")
    import onnx

    opset = onnx.defs.onnx_opset_version()  # above the TorchScript exporter's maximum (20 in torch 2.13)
    out = tmp_path / "m.onnx"
    status, _, stderr = _run_cli(capsys, "resnet18", out, "--input-size", RESNET_SIZE, "--opset", opset, "--no-dynamo")
    assert status == 2 and "the TorchScript exporter of torch" in stderr and f"--opset {opset}" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_cli_export_checkpoint_of_the_other_combine(tmp_path, capsys):
    """A checkpoint our code saved from combine='sum' BAMs: one line that says to pass --combine sum (the default
    builds the authors' product), and with it the checkpoint loads."""
    _need("onnx", "onnxscript")
    checkpoint = tmp_path / "sum.pth"
    torch.save(resnet18(combine="sum").state_dict(), checkpoint)
    out = tmp_path / "m.onnx"
    status, _, stderr = _run_cli(capsys, "resnet18", out, "--checkpoint", checkpoint, "--input-size", RESNET_SIZE)
    assert status == 2 and "3 BAM(s) saved with combine='sum' (bam1, bam2, bam3): pass --combine sum" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and not out.exists()


def test_cli_export_checkpoint_that_does_not_fit(tmp_path, capsys):
    _need("onnx", "onnxscript")  # the packages are checked first
    checkpoint = tmp_path / "other.pth"
    torch.save(resnet18(num_classes=7).state_dict(), checkpoint)
    status, _, stderr = _run_cli(capsys, "resnet18", tmp_path / "m.onnx", "--checkpoint", checkpoint)
    assert status == 2 and "--checkpoint" in stderr and "--num-classes 1000" in stderr and "fc.weight" in stderr, \
        stderr


def test_cli_export_unknown_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "vgg16", str(tmp_path / "m.onnx")])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def _hide_packages(monkeypatch, *names):
    """importlib.util.find_spec answers None for ``names``, as where they are not installed."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in names else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("hidden, flag", [(("onnx",), "--dynamo"), (("onnxscript",), "--dynamo"),
                                          (("onnx",), "--no-dynamo")])
def test_cli_export_missing_package(hidden, flag, monkeypatch, tmp_path, capsys):
    _hide_packages(monkeypatch, *hidden)
    out = tmp_path / "m.onnx"
    status, _, stderr = _run_cli(capsys, "resnet18", out, flag)
    assert status == 2 and hidden[0] in stderr and ONNX_PIP in stderr, stderr
    assert not out.exists()


@pytest.mark.slow_on_gpu
def test_cli_export_without_onnxruntime_writes_and_says_so(monkeypatch, tmp_path, capsys):
    _need("onnx")
    reason = _torchscript_onnx_exporter_missing()
    if reason is not None:
        _need("onnxscript")
    _hide_packages(monkeypatch, "onnxruntime")
    out = tmp_path / "m.onnx"
    status, stdout, stderr = _run_cli(capsys, "resnet18", out, "--input-size", RESNET_SIZE, "--num-classes", 10,
                                      "--no-dynamo" if reason is None else "--dynamo")
    assert status == 0, stdout + stderr
    assert out.is_file() and "onnx.checker passed" in stdout
    assert "onnxruntime is not installed" in stdout and ONNX_PIP in stdout, stdout


def test_cli_export_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    text = capsys.readouterr().out
    for option in ("--input-size", "--batch", "--opset", "--checkpoint", "--dynamo", "--no-dynamo", "--num-classes",
                   "--attention"):
        assert option in text, option


@pytest.mark.slow_on_gpu
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("arch", ["resnet34", "resnet50", "resnet101"])
def test_torch_export_every_bam_resnet(arch, training):
    """Every network of bam_triton.models exports with a dynamic batch and runs like eager (ResNet-18 is checked in
    full above; these at a narrow width to stay quick, in float64: eager's CPU speed paths and the exported plain ops
    round differently, and 100 layers of batch-3 BatchNorm in training amplify fp32 rounding past fp32 tolerances)."""
    import bam_triton.models as models

    torch.manual_seed(0)
    model = _randomize_norms(getattr(models, arch)(num_classes=10, width=16, reduction=4)).double().train(training)
    _check_exported(model, _images(2, 3, RESNET_SIZE, RESNET_SIZE).double(), ({0: Dim("batch", min=2)},),
                    _images(3, 3, RESNET_SIZE, RESNET_SIZE, seed=2).double(), decompose=False)


# ----------------------------------------------------------------------------------------------------------------------
# CBAM-ResNets (a CBAM in every block): torch.export, ONNX in onnxruntime, bam-triton export --attention cbam
# ----------------------------------------------------------------------------------------------------------------------

def _cbam_resnet(num_classes=10, seed=0):
    """A CBAM-ResNet-18 at width 16 (CBAM reduction 4), every BatchNorm random: the spatial gates' too, which the
    authors' init leaves at weight 0 (a constant gate would test little)."""
    torch.manual_seed(seed)
    return _randomize_norms(resnet18(num_classes=num_classes, width=16, attention="cbam", reduction=4), seed=seed)


@pytest.mark.slow_on_gpu
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_export_cbam_resnet18_dynamic_batch(training):
    model = _cbam_resnet().double().train(training)
    _check_exported(model, _images(2, 3, RESNET_SIZE, RESNET_SIZE).double(), ({0: Dim("batch", min=2)},),
                    _images(3, 3, RESNET_SIZE, RESNET_SIZE, seed=2).double(), decompose=False)


@pytest.mark.slow_on_gpu
def test_cli_export_cbam_loads_the_authors_checkpoint(tmp_path, capsys):
    """``--attention cbam`` with an authors'-format CBAM checkpoint: the ONNX file computes what eager torch does with
    it; the default ``--attention bam`` refuses the file and says which attention it needs."""
    _need("onnx", "onnxruntime", "onnxscript")
    # Full width: the CLI builds its networks with CBAM's default reduction 16.
    torch.manual_seed(5)
    model = _randomize_norms(resnet18(num_classes=7, attention="cbam"), seed=5).eval()
    checkpoint = tmp_path / "RESNET18_CBAM.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               checkpoint)
    out = tmp_path / "resnet18_cbam.onnx"
    status, _, stderr = _run_cli(capsys, "resnet18", out, "--num-classes", 7, "--checkpoint", checkpoint)
    assert status == 2 and "--attention bam" in stderr and "the checkpoint has CBAM: pass --attention cbam" in stderr, stderr
    status, stdout, stderr = _run_cli(capsys, "resnet18", out, "--attention", "cbam", "--input-size", RESNET_SIZE,
                                      "--num-classes", 7, "--checkpoint", checkpoint, "--batch", 2)
    assert status == 0, stdout + stderr
    assert "attention cbam" in stdout and "(OK," in stdout, stdout
    _check_exported_resnet(out, model)
