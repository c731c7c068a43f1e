"""Test-wide setup. ``BAM_TRITON_TEST_DEVICE`` (tests/devices.py) picks the device of this run: ``cpu`` (default), where
the kernels are tested through Triton's interpreter, or ``cuda``, where they run compiled on the current GPU. Triton
chooses between the two when it is imported, so TRITON_INTERPRET is set here, before any test module imports triton."""
import importlib.util
import os
import pathlib
import sys

import pytest
import torch  # does not import triton

from devices import DEVICE_VAR, ON_CUDA, TEST_DEVICE, run_problem

if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "triton" in sys.modules and os.environ["TRITON_INTERPRET"] != "1":  # pragma: no cover - a misconfigured run
        raise RuntimeError("triton was imported before tests/conftest.py could select its interpreter")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow_on_gpu: expensive in a GPU run (torch.compile, DDP, property tests, whole networks); a "
        "time-boxed run deselects them with -m 'not slow_on_gpu'")
    problem = run_problem()
    if problem:  # here rather than at import: pytest reports an exit from a hook as one line, not a traceback
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)
    if ON_CUDA:
        # cuDNN convolutions default to TF32 (10-bit mantissa): fp32 results would miss the fp32 tolerances on every
        # path alike. The tolerances are for IEEE fp32, as on CPU. The legacy flags set conv and RNN alike (torch
        # refuses to read back a mix of the legacy and the new API's settings).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def pytest_report_header(config):
    return f"{DEVICE_VAR}: {TEST_DEVICE} ({'compiled Triton kernels' if ON_CUDA else 'Triton interpreter'})"


@pytest.fixture
def device():
    """The device the tensors of device-parametrised tests live on: ``cpu`` or the current CUDA device."""
    return TEST_DEVICE


@pytest.fixture(autouse=True)
def _fresh_plans():
    """Launch plans are memoised and keep their tuned config: each test starts without them, so a test that swaps a
    kernel or a helper the plan functions call sees its swap (loaded only once a test has imported the kernels)."""
    common = sys.modules.get("bam_triton.kernels._common")
    if common is not None:
        common.forget_plans()
    yield


@pytest.fixture(scope="module")
def example():
    """``examples/train_synthetic.py`` imported as a module (the training example the model tests run)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("train_synthetic", root / "examples" / "train_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
