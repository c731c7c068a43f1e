"""The one table of supported floating dtypes, their names, and the tolerances the kernels are held to, with the one
check of them (:func:`assert_close`: the tests, ``bam-triton check`` and the sweep's validation).

Tolerances compare a result against a float64 reference: ``|got - ref| <= atol + rtol * |ref|``. The kernels compute
in fp32 (fp64 for fp64 inputs), so the error is the rounding of the stored result plus, for reduced-precision inputs,
that of the inputs' own rounding in the reference's view of them (the reference uses the same rounded inputs).
"""
import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# dtype -> (atol, rtol)
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}

DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def assert_close(actual, expected, dtype=None, *, what="tensor", scale_atol=False, atol=None, rtol=None):
    """``|actual - expected| <= atol + rtol·|expected|`` elementwise (``torch.testing.assert_close``), compared in
    float64, with the tolerances of ``dtype`` (default: ``actual``'s) from :data:`TOLERANCES` unless ``atol`` and
    ``rtol`` are given. ``scale_atol`` scales atol by 1 + max|expected|, for sums of many terms whose rounding grows
    with them. NaN anywhere fails; shapes must match. Raises ``AssertionError`` naming ``what``."""
    if atol is None or rtol is None:
        atol, rtol = TOLERANCES[dtype or actual.dtype]
    expected = expected.detach().double()
    if scale_atol and expected.numel():
        atol *= 1 + expected.abs().max().item()
    torch.testing.assert_close(actual.detach().double(), expected, atol=atol, rtol=rtol, check_device=False,
                               msg=lambda message: f"{what}: {message}")


def within_tolerance(actual, expected, dtype=None):
    """(whether :func:`assert_close` passes, max |actual - expected|): for reports that go on after a failure."""
    error = (actual.detach().double() - expected.detach().double().to(actual.device)).abs()
    max_error = error.max().item() if error.numel() else 0.0
    try:
        assert_close(actual, expected, dtype)
    except AssertionError:
        return False, max_error
    return True, max_error
