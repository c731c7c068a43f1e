"""The one table of supported floating dtypes and the tolerances the kernels are held to (tests and ``check``).

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
