"""Triton kernels of bam-triton (installed as ``bam_triton.kernels``).

Importing this package imports triton and compiles nothing until a launch. Nothing here imports the module layer:
callers (``bam_triton.ops``) validate arguments and pick the backend before any launcher runs.

- :mod:`.pool`: channel pooling (mean over H, W).
- :mod:`.apply`: fused attention-apply forward.
"""
from ._common import INTERPRETED, memory_plan
from .apply import apply_fwd
from .pool import channel_pool_fwd

__all__ = ["INTERPRETED", "memory_plan", "apply_fwd", "channel_pool_fwd"]
