"""Triton kernels of bam-triton (installed as ``bam_triton.kernels``).

Importing this package imports triton and compiles nothing until a launch. Nothing here imports the module layer:
callers (``bam_triton.ops``) validate arguments and pick the backend before any launcher runs.

- :mod:`.pool`: channel pooling (mean over H, W).
- :mod:`.apply`: fused attention-apply forward.
- :mod:`.apply_bwd`: fused attention-apply backward: single pass (``apply_bwd``), or the reductions
  (``apply_bwd_reduce``) and dx with the pooling and conv gradients folded in (``apply_bwd_dx``).
- :mod:`.cbam`: CBAM's steps (``cbam_steps``): the channel max/mean of x·a, the apply step, and the backward's
  reductions and dx; its channel-gate pooling is :mod:`.pool`'s kernel with ``WITH_MAX``.
- :mod:`.front`: BAM's front end in one read of x (pooling and the spatial branch's 1x1 conv, ``front_fwd``) and its
  backward (dx with the conv and pooling gradients folded in, dW, db: ``front_bwd``); the opt-in single-read path.

Each launcher has a pure ``*_plan`` function (shape, dtype, layout, SM count -> :class:`LaunchPlan`: the kernel, its
grid, scalars, constexprs and buffers); the launch, ``bam-triton inspect`` and the tests all use it.
"""
from ._common import INTERPRETED, PINNED, LaunchPlan, memory_plan
from .apply import apply_fwd, apply_fwd_plan
from .apply_bwd import apply_bwd, apply_bwd_dx, apply_bwd_reduce, dx_plan, reduce_plan
from .front import front_bwd, front_bwd_plan, front_fwd, front_fwd_plan
from .pool import channel_pool_fwd, channel_pool_max_fwd, channel_pool_plan
from . import cbam as cbam_steps
from .cbam import apply_plan as cbam_apply_plan, channel_reduce_plan, grad_x_plan, hw_reduce_plan

__all__ = ["INTERPRETED", "PINNED", "LaunchPlan", "memory_plan", "apply_fwd", "apply_fwd_plan", "apply_bwd",
           "apply_bwd_dx", "apply_bwd_reduce", "dx_plan", "reduce_plan", "channel_pool_fwd", "channel_pool_max_fwd",
           "channel_pool_plan", "cbam_steps", "cbam_apply_plan", "channel_reduce_plan", "grad_x_plan", "hw_reduce_plan",
           "front_bwd", "front_bwd_plan", "front_fwd", "front_fwd_plan"]
