"""The functional ops of BAM: ``channel_pool`` and ``bam_apply``.

This layer validates arguments (one place, before any kernel launch), picks the backend (``_backend.resolve``) and
wires autograd. The Triton path is registered as ``torch.library`` custom ops (``bam_triton::channel_pool``,
``bam_triton::apply``, ``bam_triton::apply_backward``) with fake implementations, so ``torch.compile`` sees them as
single graph nodes; in eager mode on plain tensors the same implementations run without the custom ops' dispatch
(``_eager_direct``). The torch path is plain torch, which ``torch.compile`` traces through.

Shapes: ``x`` (N, C, H, W) in NCHW or channels_last; ``mc`` (N, C) or (N, C, 1, 1); ``ms`` (N, H, W) or (N, 1, H, W).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from . import _backend, _cpu
from ._dtypes import SUPPORTED_DTYPES

COMBINES = ("sum", "product")

# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------


def check_combine(combine, name="combine"):
    if combine not in COMBINES:
        raise ValueError(f"{name} must be one of {COMBINES}, got {combine!r}")
    return combine


def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {t.dtype}")


def check_feature_map(x, name="x"):
    """``x`` must be a floating (N, C, H, W) tensor."""
    _check_tensor(x, name)
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")


def check_input_meets_parameters(x, weight, module):
    """``x`` must be on the device of a module's parameters (``weight`` one of them) and in their dtype (unless
    autocast converts); ``module`` names the module in the errors ("bam", "cbam")."""
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but this {module.upper()}'s parameters are on {weight.device}: move one "
                         f"to the other (e.g. {module}.to({str(x.device)!r}))")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x has dtype {x.dtype} but this {module.upper()}'s parameters are {weight.dtype}: convert "
                        f"one to the other (e.g. {module}.to({x.dtype})) or run under torch.autocast")


def _check_maps(x, mc, ms):
    _check_tensor(mc, "mc")
    _check_tensor(ms, "ms")
    n, c, h, w = x.shape
    if tuple(mc.shape) not in ((n, c), (n, c, 1, 1)):
        raise ValueError(f"mc must have shape (N, C) = {(n, c)} or (N, C, 1, 1) = {(n, c, 1, 1)} to match x of shape "
                         f"{tuple(x.shape)}, got {tuple(mc.shape)}")
    if tuple(ms.shape) not in ((n, h, w), (n, 1, h, w)):
        raise ValueError(f"ms must have shape (N, H, W) = {(n, h, w)} or (N, 1, H, W) = {(n, 1, h, w)} to match x of "
                         f"shape {tuple(x.shape)}, got {tuple(ms.shape)}")
    for name, t in (("mc", mc), ("ms", ms)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all inputs must be on one device")


def _check_kernel_limits(x):
    # The kernels index within one image in int32 and across images in int64.
    n, c, h, w = x.shape
    if c * h * w >= 2**31:
        raise ValueError(f"x has {c * h * w} elements per image (C·H·W); the Triton kernels support fewer than 2**31")


def _dense(x):
    """``x`` itself when it is dense NCHW or channels_last; otherwise one copy into the memory format it resembles
    (a sliced or permuted view costs this single documented copy)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    looks_channels_last = x.stride(1) < x.stride(2) and x.stride(1) < x.stride(3)
    return x.contiguous(memory_format=torch.channels_last if looks_channels_last else torch.contiguous_format)


def _memory_format(x):
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# ----------------------------------------------------------------------------------------------------------------------
# Torch path: the reference maths, written for speed on CPU (in place where nothing else can see the buffer)
# ----------------------------------------------------------------------------------------------------------------------


def _broadcast_maps(x, mc, ms):
    n, c, h, w = x.shape
    return mc.reshape(n, c, 1, 1), ms.reshape(n, 1, h, w)


def _torch_logits(x, mc, ms, combine, out=None):
    """``mc ⊕ ms`` broadcast to (N, C, H, W), written into ``out`` or else a fresh tensor in ``x``'s memory format."""
    mc4, ms4 = _broadcast_maps(x, mc, ms)
    if out is None:
        out = torch.empty_like(x, dtype=torch.promote_types(mc.dtype, ms.dtype), memory_format=_memory_format(x))
    return (torch.add if combine == "sum" else torch.mul)(mc4, ms4, out=out)


def _torch_apply_forward(x, mc, ms, combine):
    """``x·(1 + sigmoid(mc ⊕ ms))`` in ``x``'s dtype and memory format; ``mc`` is (N, C), ``ms`` (N, H·W)."""
    if _cpu.chunks_apply(x):
        return _cpu.apply_forward_in_chunks(x, mc, ms, combine, _torch_logits, _memory_format(x))
    att = _torch_logits(x, mc, ms, combine).sigmoid_()
    # x + x·s = x·(1 + s), written over the attention buffer when the dtypes allow
    return torch.addcmul(x, x, att, out=att if att.dtype == x.dtype else torch.empty_like(att, dtype=x.dtype))


def _torch_apply_backward(g, x, mc, ms, combine):
    """dx = g·(1+s); da = g·x·s·(1-s); dmc, dms = the sums of da (weighted by the other map for a product).
    About 14 passes over (N, C, H, W) memory; the weighted sums are batched matrix products, not temporaries."""
    n, c, h, w = x.shape
    s = _torch_logits(x, mc, ms, combine).sigmoid_()
    dx = torch.addcmul(g, g, s).to(x.dtype)
    # g·s·(1-s) first, then ·x: in s's dtype (fp32 for fp32 maps), g·x alone overflows fp16 once |g·x| > 65504 (a
    # loss-scaled gradient meeting an activation of 10 is enough) although da itself is at most |g·x| / 4.
    da = torch.ops.aten.sigmoid_backward(g, s).mul_(x)
    if combine == "sum":
        dmc, dms = da.sum(dim=(2, 3)), da.sum(dim=1)
    else:
        mc3, ms3 = mc.to(da.dtype).reshape(n, c, 1), ms.to(da.dtype).reshape(n, 1, h * w)
        if _memory_format(da) == torch.channels_last:
            da_rows = da.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view: (n, hw, c) is its memory order
            dmc, dms = torch.bmm(ms3, da_rows), torch.bmm(da_rows, mc3)
        else:
            da_rows = da.reshape(n, c, h * w)
            dmc, dms = torch.bmm(da_rows, ms3.transpose(1, 2)), torch.bmm(mc3.transpose(1, 2), da_rows)
    return dx, dmc.to(mc.dtype).reshape(mc.shape), dms.to(ms.dtype).reshape(ms.shape)


# From this many elements torch's CPU reductions run on every thread (at::internal::GRAIN_SIZE), as avg_pool2d always
# does: the size from which the torch path may use avg_pool2d without waking threads that sum would not.
_PARALLEL_NUMEL = 32768


_MV_DTYPES = (torch.float32, torch.float64)
_IS_COMPILING = torch.compiler.is_compiling


_MEAN_WEIGHTS = {}


def _mean_weights(count, dtype):
    """A (count,) vector of 1/count, made once per size and dtype (outside inference mode, so that any tensor may
    meet it) and never written; up to 256 of them are kept. What a dispatch mode hands back instead of a tensor (a
    fake tensor) is not kept."""
    weights = _MEAN_WEIGHTS.get((count, dtype))
    if weights is None:
        with torch.inference_mode(False):
            weights = torch.full((count,), 1.0 / count, dtype=dtype)
        if type(weights) is torch.Tensor and len(_MEAN_WEIGHTS) < 256:
            _MEAN_WEIGHTS[(count, dtype)] = weights
    return weights


def _torch_channel_pool(x):
    """Mean over H, W, accumulated in fp32 (fp64 for fp64) and rounded once to x's dtype, in the form that is fastest
    for the case (medians on this 2-core CPU, one thread, CPU time: docs/design.md, "CPU path"):

    - recorded for autograd: a sum divided by H·W. For fp32/fp64 the sum's backward is a broadcast view of the small
      gradient, where ``mean``'s divides that view into a full-size tensor (one more pass over (N, C, H, W) in
      training: 7 ms of 110 at 32x512x28x28 fp32). Half-precision inputs' backward casts the broadcast gradient back:
      a full-size tensor, as ``mean``'s.
    - otherwise, NCHW fp32/fp64 on CPU below ``_PARALLEL_NUMEL`` elements: x's rows times a vector of 1/(H·W), one
      MKL matrix-vector product on one thread (2x32x7x7: 3.5 µs with its views, against 5.0 for ``mean``, which is
      two aten ops; 38-56 against 59-64 µs in the sweep, whose flushed caches make every op's first steps count).
    - otherwise, channels_last on CPU from ``_PARALLEL_NUMEL`` elements: ``avg_pool2d``, whose channels_last kernel
      reads x in order and vectorises over C (32x1024x7x7 fp32: 97 µs, against 275 for the sum).
    - otherwise ``mean``: on CPU, torch's mean is that sum and division in C++, without two Python-level ops (2x32x7x7
      fp32 channels_last: 5.0 µs, against 7.0 for the sum and 4.4 for ``avg_pool2d``, which wakes every thread
      whatever the size).
    """
    if x.requires_grad and torch.is_grad_enabled():
        h, w = x.shape[2:]
        return x.sum(dim=(2, 3), dtype=torch.promote_types(x.dtype, torch.float32)).div_(h * w).to(x.dtype)
    if x.is_cpu:
        n, c, h, w = x.shape
        if x.numel() < _PARALLEL_NUMEL:
            if (h * w and x.dtype in _MV_DTYPES and type(x) in _PLAIN_TENSOR_TYPES and x.is_contiguous()
                    and not _IS_COMPILING()):
                return torch.mv(x.view(n * c, h * w), _mean_weights(h * w, x.dtype)).view(n, c)
        elif not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return F.avg_pool2d(x, (h, w)).view(n, c)  # accumulates in fp32 for fp16/bf16, rounds once
    if x.dtype in (torch.float32, torch.float64):
        return x.mean(dim=(2, 3))
    return x.mean(dim=(2, 3), dtype=torch.float32).to(x.dtype)


def _differentiable_apply_backward(g, x, mc, ms, combine):
    """(dx, dmc, dms) of the apply step from differentiable torch ops (no ``out=``, nothing in place), for a backward
    that is itself recorded (``create_graph=True``: gradient penalties, double backward). ``mc`` is (N, C), ``ms``
    (N, H·W); results have the dtypes and shapes of x, mc and ms."""
    n, c, h, w = x.shape
    mc4, ms4 = mc.reshape(n, c, 1, 1), ms.reshape(n, 1, h, w)
    s = torch.sigmoid(mc4 + ms4 if combine == "sum" else mc4 * ms4)
    dx = (g * (1 + s)).to(x.dtype)
    da = g * s * (1 - s) * x
    if combine == "sum":
        dmc, dms = da.sum(dim=(2, 3)), da.sum(dim=1)
    else:
        dmc, dms = (da * ms4).sum(dim=(2, 3)), (da * mc4).sum(dim=1)
    return dx, dmc.to(mc.dtype).reshape(mc.shape), dms.to(ms.dtype).reshape(ms.shape)


class _TorchApply(torch.autograd.Function):
    """Torch-path apply with a hand-written backward: saves ``x``, ``mc``, ``ms``, never the attention map."""

    @staticmethod
    def forward(ctx, x, mc, ms, combine):
        ctx.combine = combine
        ctx.save_for_backward(x, mc, ms)
        return _torch_apply_forward(x, mc, ms, combine)

    @staticmethod
    def backward(ctx, g):
        x, mc, ms = ctx.saved_tensors
        backward = _differentiable_apply_backward if torch.is_grad_enabled() else _torch_apply_backward
        dx, dmc, dms = backward(g, x, mc, ms, ctx.combine)
        return dx, dmc, dms, None


# ----------------------------------------------------------------------------------------------------------------------
# Triton path: custom ops around the kernels (kernels are imported on first launch)
# ----------------------------------------------------------------------------------------------------------------------


# The custom ops can be called directly (torch.ops.bam_triton.*) and may be handed other layouts than their Python
# callers pass (older inductors), so each normalises its own inputs to what the kernels index: x dense NCHW or
# channels_last, g in x's strides, the maps contiguous. Already right, that is a few stride checks; otherwise one copy.
# They are also tagged to receive the eager strides where this torch knows the tag.
_STRIDE_TAGS = {"tags": (torch.Tag.needs_fixed_stride_order,)} if hasattr(torch.Tag, "needs_fixed_stride_order") \
    else {}


def _kernel_inputs(op, x, mc, ms, g=None):
    """``x`` dense, ``mc`` (N, C) and ``ms`` (N, H·W) contiguous, ``g`` in x's strides; shapes checked with an error
    that names the op (a direct call with wrong shapes would otherwise read out of bounds)."""
    n, c, h, w = x.shape
    if mc.numel() != n * c or ms.numel() != n * h * w or (g is not None and g.shape != x.shape):
        raise ValueError(f"bam_triton::{op}: shapes do not match x {tuple(x.shape)}: mc {tuple(mc.shape)} (N·C "
                         f"values), ms {tuple(ms.shape)} (N·H·W values)"
                         + ("" if g is None else f", g {tuple(g.shape)} (x's shape)"))
    x = _dense(x)
    if g is not None and g.stride() != x.stride():
        g = g.contiguous(memory_format=_memory_format(x))
    return x, mc.reshape(n, c).contiguous(), ms.reshape(n, h * w).contiguous(), g


def _custom_op(name, impl, fake):
    """``impl`` as the custom op ``bam_triton::name``, with ``fake`` for torch.compile's fake tensors. On META tensors
    the real ``impl`` runs: its launcher records the launch it would make, executing nothing (shape-only runs,
    ``bam-triton traffic``); torch without ``register_kernel``, or that refuses a meta kernel beside the fake one
    (torch 2.11 does, 2.13 does not), gives dispatched META calls the fake results instead. Eager calls on META
    tensors never dispatch the op (``_eager_direct``), so they record their launches on every torch."""
    op = torch.library.custom_op(f"bam_triton::{name}", impl, mutates_args=(), **_STRIDE_TAGS)
    op.register_fake(fake)
    if hasattr(op, "register_kernel"):
        try:
            op.register_kernel("meta", impl)
        except RuntimeError:  # "already a kernel registered ... for Meta": the fake one
            pass
    return op


def _channel_pool_impl(x: torch.Tensor) -> torch.Tensor:
    kernels = _backend.kernels()
    x = _dense(x)
    return kernels.channel_pool_fwd(x, kernels.memory_plan(x).channels_last)


_triton_channel_pool = _custom_op("channel_pool", _channel_pool_impl, lambda x: x.new_empty(x.shape[:2]))


def _pool_setup_context(ctx, inputs, output):
    ctx.shape = inputs[0].shape


def _pool_backward(ctx, grad):
    n, c, h, w = ctx.shape
    # d mean / dx = 1/(H·W) everywhere: a broadcast view, never materialised here.
    return (grad / (h * w)).reshape(n, c, 1, 1).expand(n, c, h, w)


_triton_channel_pool.register_autograd(_pool_backward, setup_context=_pool_setup_context)


def _apply_impl(x: torch.Tensor, mc: torch.Tensor, ms: torch.Tensor, combine: str) -> torch.Tensor:
    x, mc, ms, _ = _kernel_inputs("apply", x, mc, ms)
    return _backend.kernels().apply_fwd(x, mc, ms, check_combine(combine))


_triton_apply = _custom_op("apply", _apply_impl, lambda x, mc, ms, combine: torch.empty_like(x))


def _apply_backward_impl(g: torch.Tensor, x: torch.Tensor, mc: torch.Tensor, ms: torch.Tensor,
                         combine: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shapes = mc.shape, ms.shape
    x, mc, ms, g = _kernel_inputs("apply_backward", x, mc, ms, g)
    dx, dmc, dms = _backend.kernels().apply_bwd(g, x, mc, ms, check_combine(combine))
    return dx, dmc.to(mc.dtype).reshape(shapes[0]), dms.to(ms.dtype).reshape(shapes[1])


_triton_apply_backward = _custom_op(
    "apply_backward", _apply_backward_impl,
    lambda g, x, mc, ms, combine: (torch.empty_like(x), torch.empty_like(mc), torch.empty_like(ms)))


def _apply_setup_context(ctx, inputs, output):
    x, mc, ms, combine = inputs
    ctx.combine = combine
    ctx.save_for_backward(x, mc, ms)


def _apply_backward(ctx, g):
    x, mc, ms = ctx.saved_tensors
    if torch.is_grad_enabled():  # a recorded backward (create_graph=True): the kernels are not differentiable
        dx, dmc, dms = _differentiable_apply_backward(g, x, mc, ms, ctx.combine)
        return dx, dmc, dms, None
    # The kernels read g with x's strides: a gradient in another layout (or a broadcast view) is copied once.
    if g.stride() != x.stride():
        g = g.contiguous(memory_format=_memory_format(x))
    backward = _apply_backward_impl if _eager_direct(g, x, mc, ms) else _triton_apply_backward
    dx, dmc, dms = backward(g, x, mc, ms, ctx.combine)
    return dx, dmc, dms, None


_triton_apply.register_autograd(_apply_backward, setup_context=_apply_setup_context)


# In eager mode the Triton path calls the launchers itself: a custom op's Python dispatch and autograd wrapper cost
# ~20 µs a call, more than the host work of the launch. The custom ops run wherever something must see them as ops:
# under torch.compile, for fake, functional or other tensor subclasses, and under a TorchDispatchMode.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _eager_direct(*tensors):
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and all(type(t) in _PLAIN_TENSOR_TYPES for t in tensors))


class _EagerPool(torch.autograd.Function):
    """The ``channel_pool`` custom op's forward and backward, called directly (eager mode, plain tensors). Old-style
    (``forward`` takes ctx): with ``setup_context``, every ``apply`` binds the forward's signature, ~15 µs."""

    @staticmethod
    def forward(ctx, x):
        _pool_setup_context(ctx, (x,), None)
        return _channel_pool_impl(x)

    backward = staticmethod(_pool_backward)


class _EagerApply(torch.autograd.Function):
    """The ``apply`` custom op's forward and backward, called directly (eager mode, plain tensors)."""

    @staticmethod
    def forward(ctx, x, mc, ms, combine):
        _apply_setup_context(ctx, (x, mc, ms, combine), None)
        return _apply_impl(x, mc, ms, combine)

    backward = staticmethod(_apply_backward)


def _run_triton_pool(x):
    """The Triton pooling: the launcher itself in eager mode (through an autograd Function when x needs a gradient),
    the custom op otherwise."""
    if not _eager_direct(x):
        return _triton_channel_pool(x)
    if x.requires_grad and torch.is_grad_enabled():
        return _EagerPool.apply(x)
    return _channel_pool_impl(x)


def _run_triton_apply(x, mc, ms, combine):
    if not _eager_direct(x, mc, ms):
        return _triton_apply(x, mc, ms, combine)
    if torch.is_grad_enabled() and (x.requires_grad or mc.requires_grad or ms.requires_grad):
        return _EagerApply.apply(x, mc, ms, combine)
    return _apply_impl(x, mc, ms, combine)


# ----------------------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------------------


def channel_pool(x: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Mean of ``x`` over H and W, accumulated in fp32.

    Args:
        x: (N, C, H, W) float tensor, NCHW or channels_last (other strides cost one copy).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, or ``None`` for ``$BAM_TRITON_BACKEND`` (default ``"auto"``).

    Returns:
        (N, C) tensor of ``x``'s dtype. H·W = 0 gives NaN (a mean of nothing), as ``torch.mean`` does.
    """
    check_feature_map(x)
    return channel_pool_unchecked(x, resolve_path(x, backend))


def bam_apply(x: torch.Tensor, mc: torch.Tensor, ms: torch.Tensor, *, combine: str = "sum",
              backend: Optional[str] = None) -> torch.Tensor:
    """BAM's attention-apply: ``x * (1 + sigmoid(mc ⊕ ms))``, in one pass over ``x`` on the Triton path.

    Args:
        x: (N, C, H, W) float tensor, NCHW or channels_last (other strides cost one copy).
        mc: channel attention logits, (N, C) or (N, C, 1, 1); fp32 or any supported float dtype.
        ms: spatial attention logits, (N, H, W) or (N, 1, H, W); fp32 or any supported float dtype.
        combine: ``"sum"`` (the paper, eq. 2) or ``"product"`` (the authors' code) for ``⊕``.
        backend: ``"auto"``, ``"torch"``, ``"triton"``, or ``None`` for ``$BAM_TRITON_BACKEND``.

    Returns:
        Tensor of ``x``'s shape, dtype and memory format. Inputs are never modified.
    """
    check_feature_map(x)
    _check_maps(x, mc, ms)
    check_combine(combine)
    return bam_apply_unchecked(x, mc, ms, combine, resolve_path(x, backend))


# ----------------------------------------------------------------------------------------------------------------------
# Unchecked internals: the public ops and the module validate their arguments once, then call these
# ----------------------------------------------------------------------------------------------------------------------


def resolve_path(x, backend):
    """Validate ``backend`` and return the path that runs for ``x``: ``"torch"``, ``"triton"``, or ``"plain"``
    (standard aten ops, where a graph is recorded for export, a ``torch.func`` transform runs or forward-mode AD is
    on: ``_backend.plain_ops_needed``). Empty inputs take the torch path (nothing to launch; torch's conventions for
    them apply), and the Triton path checks the kernels' size limit here, before any launch."""
    backend = _backend.check_backend(backend)
    chosen = backend or _backend.default_backend()
    path = "torch" if chosen == "torch" else _backend.resolve_chosen(chosen, x.device, from_env=backend is None)
    if _backend.plain_ops_needed():
        return "plain"
    if path == "triton" and x.numel() == 0:
        return "torch"
    if path == "triton":
        _check_kernel_limits(x)
    return path


def channel_pool_unchecked(x, path):
    if path == "plain":
        return x.mean(dim=(2, 3), dtype=torch.promote_types(x.dtype, torch.float32)).to(x.dtype)
    return _torch_channel_pool(x) if path == "torch" else _run_triton_pool(x)


def bam_apply_unchecked(x, mc, ms, combine, path):
    """``bam_apply`` on validated arguments; ``mc`` (N, C) or (N, C, 1, 1), ``ms`` (N, H, W) or (N, 1, H, W)."""
    n, c, h, w = x.shape
    if path == "plain":
        # x + x·s in fp32 (fp64 for fp64), rounded once to x's dtype as on the other paths, with the ops every graph
        # consumer knows (mul, add; ONNX Mul, Add). x first: the output takes its memory format.
        mc4, ms4 = mc.reshape(n, c, 1, 1), ms.reshape(n, 1, h, w)
        s = torch.sigmoid(mc4 + ms4 if combine == "sum" else mc4 * ms4)
        x_acc = x.to(torch.promote_types(torch.promote_types(x.dtype, s.dtype), torch.float32))
        return (x_acc + x_acc * s).to(x.dtype)
    mc2, ms2 = mc.reshape(n, c), ms.reshape(n, h * w)
    if path == "torch":
        if torch.is_grad_enabled() and (x.requires_grad or mc.requires_grad or ms.requires_grad):
            return _TorchApply.apply(x, mc2, ms2, combine)
        return _torch_apply_forward(x, mc2, ms2, combine)
    return _run_triton_apply(x, mc2, ms2, combine)
