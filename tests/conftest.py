"""Test-wide setup. The kernels are tested on CPU through Triton's interpreter, which triton chooses when it is
imported, so TRITON_INTERPRET is set here, before any test module imports triton."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
if "triton" in sys.modules and os.environ["TRITON_INTERPRET"] != "1":  # pragma: no cover - a misconfigured run
    raise RuntimeError("triton was imported before tests/conftest.py could select its interpreter")
