"""Deployment of CBAM: torch.export (dynamic batch, height and width; eval and train), ONNX through both exporters run
in onnxruntime, and torch.jit.trace. As for BAM (tests/test_export.py, whose helpers these tests use), a recorded
graph holds CBAM as standard aten ops on every backend: pooling (mean, amax), the MLP, the 7x7 conv, sigmoid, mul."""
import pytest
import torch
from torch.export import Dim

from bam_triton import CBAM
from bam_triton._backend import triton_installed
from test_export import (LAYOUTS, _assert_close, _assert_no_bam_triton_op, _check_exported, _check_onnx_file,
                         _check_trace_of_64_channels, _images, _onnx_export, _randomize_norms, _skip_unless_exporter)

# What CBAM must become: the pooling over H, W and over C, the gates' sigmoids, the apply step's products.
CBAM_ATEN_OPS = ("mean", "amax", "sigmoid", "mul")
CBAM_ONNX_OPS = {"ReduceMean", "ReduceMax", "Sigmoid", "Mul", "Conv"}
POOL_TYPE_SETS = [("avg", "max"), ("avg", "max", "lp", "lse")]


def _cbam(training=False, pool_types=("avg", "max"), **kwargs):
    torch.manual_seed(0)
    return _randomize_norms(CBAM(64, pool_types=pool_types, **kwargs)).train(training)


def _dynamic_shapes():
    return ({0: Dim("batch", min=2), 2: Dim("height", min=2), 3: Dim("width", min=2)},)


@pytest.mark.parametrize("pool_types", POOL_TYPE_SETS, ids=["-".join(p) for p in POOL_TYPE_SETS])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_export_cbam_dynamic_batch_and_size(layout, training, pool_types):
    model = _cbam(training, pool_types)
    got = _check_exported(model, _images(4, 64, 16, 16, layout), _dynamic_shapes(),
                          _images(3, 64, 12, 20, layout, seed=2), required=CBAM_ATEN_OPS)
    assert got.is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_export_standard_ops_on_every_backend(backend, device):
    if backend == "triton" and not triton_installed():
        pytest.skip("triton is not installed")
    model = _cbam(backend=backend).to(device).eval()
    exported = torch.export.export(model, (_images(2, 64, 8, 8, device=device),),
                                   dynamic_shapes=({0: Dim("batch", min=2)},))
    _assert_no_bam_triton_op(exported, required=CBAM_ATEN_OPS)
    x = _images(3, 64, 8, 8, seed=2, device=device)
    _assert_close(exported.module()(x), model(x), f"exported program vs eager (backend={backend})")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("no_spatial", [False, True], ids=["spatial", "no_spatial"])
def test_onnx_cbam_runs_in_onnxruntime(no_spatial, dynamo, tmp_path):
    _skip_unless_exporter(dynamo)
    model = _cbam(no_spatial=no_spatial).eval()
    path = tmp_path / "cbam.onnx"
    axes = {0: "batch", 2: "height", 3: "width"}
    _onnx_export(model, _images(4, 64, 16, 16), path, dynamo, _dynamic_shapes(), axes, axes)
    required = CBAM_ONNX_OPS - ({"Conv"} if no_spatial else set())
    _check_onnx_file(path, model, [_images(3, 64, 16, 16, seed=2), _images(5, 64, 12, 20, seed=3)], required)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_jit_trace_cbam(layout):
    _check_trace_of_64_channels(_cbam().eval(), layout)
