"""Triton kernels of bam-triton (installed as ``bam_triton.kernels``).

Importing this package imports triton and compiles nothing until a launch. Nothing here imports the module layer:
callers (``bam_triton.ops``) validate arguments and pick the backend before any launcher runs.

- :mod:`.pool`: channel pooling (mean over H, W).
- :mod:`.apply`: fused attention-apply forward.
- :mod:`.apply_bwd`: fused attention-apply backward: single pass (``apply_bwd``), or the reductions
  (``apply_bwd_reduce``) and dx with the pooling and conv gradients folded in (``apply_bwd_dx``).
"""
from ._common import INTERPRETED, memory_plan
from .apply import apply_fwd
from .apply_bwd import apply_bwd, apply_bwd_dx, apply_bwd_reduce
from .pool import channel_pool_fwd

__all__ = ["INTERPRETED", "memory_plan", "apply_fwd", "apply_bwd", "apply_bwd_dx", "apply_bwd_reduce",
           "channel_pool_fwd"]
