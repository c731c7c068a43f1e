"""Which device this test run uses, and skip markers for tests that only make sense on one of them.

``BAM_TRITON_TEST_DEVICE`` picks it: ``cpu`` (the default; the Triton kernels run through Triton's interpreter) or
``cuda`` (compiled kernels on the current GPU). One pytest process runs one device: Triton chooses interpreter or
compiled mode once, when it is imported (tests/conftest.py sets that up and refuses a run it cannot honour).

Tests take the ``device`` fixture (tests/conftest.py) or ``TEST_DEVICE``. Random inputs are drawn on CPU (seeded
``torch.Generator``s are CPU generators) and moved, so both runs see the same values."""
import os

import pytest
import torch

DEVICE_VAR = "BAM_TRITON_TEST_DEVICE"
DEVICES = ("cpu", "cuda")
DEVICE_NAME = os.environ.get(DEVICE_VAR, "cpu").strip().lower() or "cpu"
ON_CUDA = DEVICE_NAME == "cuda"
# The current CUDA device, with its index (tensors made on it compare equal to it). Without a GPU conftest ends the
# run before any test; the plain "cuda" here only keeps this module importable until then.
if ON_CUDA and torch.cuda.is_available():
    TEST_DEVICE = torch.device("cuda", torch.cuda.current_device())
else:
    TEST_DEVICE = torch.device("cuda" if ON_CUDA else "cpu")


def run_problem():
    """Why this run cannot go ahead as configured (a message for ``pytest.exit``), or None."""
    if DEVICE_NAME not in DEVICES:
        return f"{DEVICE_VAR} must be one of {DEVICES}, got {DEVICE_NAME!r}"
    if not ON_CUDA:
        return None
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        return (f"{DEVICE_VAR}=cuda tests the compiled kernels, but TRITON_INTERPRET="
                f"{os.environ['TRITON_INTERPRET']!r} would make Triton interpret them: unset TRITON_INTERPRET")
    if not torch.cuda.is_available():
        return (f"{DEVICE_VAR}=cuda needs a CUDA GPU, and torch.cuda.is_available() is False here (torch "
                f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); run with {DEVICE_VAR}=cpu (the "
                f"default) to test the kernels through Triton's interpreter")
    return None


def _checked(reason):
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("a device skip marker needs a reason saying why the test cannot run on the other device")
    return reason.strip()


def cpu_only(reason):
    """Skip in the CUDA run: the test checks something of the CPU run itself (the interpreter, CPU-only paths)."""
    return pytest.mark.skipif(ON_CUDA, reason=f"skipped in the CUDA run: {_checked(reason)}")


def cuda_only(reason):
    """Skip in the CPU run: the test needs a GPU."""
    return pytest.mark.skipif(not ON_CUDA, reason=f"needs CUDA ({DEVICE_VAR}=cuda on a GPU): {_checked(reason)}")


def run_compiled(code, **env):
    """Run ``code`` in a fresh Python with Triton in compiled mode (no TRITON_INTERPRET; kernels are defined, nothing
    launches) and ``env`` added; fail with its stderr if it fails."""
    import subprocess
    import sys

    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child_env.update(env)
    res = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
