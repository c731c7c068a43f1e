"""The functional ops of BAM: ``channel_pool`` and ``bam_apply``.

This layer validates arguments (one place, before any kernel launch), picks the backend (``_backend.resolve``) and
wires autograd. The Triton path is registered as ``torch.library`` custom ops (``bam_triton::channel_pool``,
``bam_triton::apply``, ``bam_triton::apply_backward``) with fake implementations, so ``torch.compile`` sees them as
single graph nodes; the torch path is plain torch, which ``torch.compile`` traces through.

Shapes: ``x`` (N, C, H, W) in NCHW or channels_last; ``mc`` (N, C) or (N, C, 1, 1); ``ms`` (N, H, W) or (N, 1, H, W).
"""
import torch

from . import _backend
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


def _torch_logits(x, mc, ms, combine):
    """``mc ⊕ ms`` broadcast to a fresh full-size tensor in ``x``'s memory format."""
    mc4, ms4 = _broadcast_maps(x, mc, ms)
    logits = torch.empty_like(x, dtype=torch.promote_types(mc.dtype, ms.dtype),
                             memory_format=_memory_format(x))
    (torch.add if combine == "sum" else torch.mul)(mc4, ms4, out=logits)
    return logits


def _torch_apply_forward(x, mc, ms, combine):
    att = _torch_logits(x, mc, ms, combine).sigmoid_()
    if att.dtype == x.dtype:
        return torch.addcmul(x, x, att, out=att)  # x + x·s = x·(1 + s), written over the attention buffer
    return torch.addcmul(x, x, att).to(x.dtype)


def _torch_apply_backward(g, x, mc, ms, combine):
    s = _torch_logits(x, mc, ms, combine).sigmoid_()
    dx = torch.addcmul(g, g, s).to(x.dtype)
    da = s.mul_(1 - s).mul_(g).mul_(x)  # s·(1-s)·g·x, reusing the buffer of s
    mc4, ms4 = _broadcast_maps(x, mc, ms)
    dmc = (da * ms4 if combine == "product" else da).sum(dim=(2, 3))
    dms = (da * mc4 if combine == "product" else da).sum(dim=1)
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
        dx, dmc, dms = _torch_apply_backward(g, x, mc, ms, ctx.combine)
        return dx, dmc, dms, None


# ----------------------------------------------------------------------------------------------------------------------
# Triton path: custom ops around the kernels (kernels are imported on first launch)
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("bam_triton::channel_pool", mutates_args=())
def _triton_channel_pool(x: torch.Tensor) -> torch.Tensor:
    kernels = _backend.kernels()
    return kernels.channel_pool_fwd(x, kernels.memory_plan(x).channels_last)


@_triton_channel_pool.register_fake
def _(x):
    return x.new_empty(x.shape[:2])


def _pool_setup_context(ctx, inputs, output):
    ctx.shape = inputs[0].shape


def _pool_backward(ctx, grad):
    n, c, h, w = ctx.shape
    # d mean / dx = 1/(H·W) everywhere: a broadcast view, never materialised here.
    return (grad / (h * w)).reshape(n, c, 1, 1).expand(n, c, h, w)


_triton_channel_pool.register_autograd(_pool_backward, setup_context=_pool_setup_context)


@torch.library.custom_op("bam_triton::apply", mutates_args=())
def _triton_apply(x: torch.Tensor, mc: torch.Tensor, ms: torch.Tensor, combine: str) -> torch.Tensor:
    return _backend.kernels().apply_fwd(x, mc, ms, combine)


@_triton_apply.register_fake
def _(x, mc, ms, combine):
    return torch.empty_like(x)


@torch.library.custom_op("bam_triton::apply_backward", mutates_args=())
def _triton_apply_backward(g: torch.Tensor, x: torch.Tensor, mc: torch.Tensor, ms: torch.Tensor,
                           combine: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dmc, dms = _backend.kernels().apply_bwd(g, x, mc, ms, combine)
    return dx, dmc.to(mc.dtype), dms.to(ms.dtype)


@_triton_apply_backward.register_fake
def _(g, x, mc, ms, combine):
    return torch.empty_like(x), torch.empty_like(mc), torch.empty_like(ms)


def _apply_setup_context(ctx, inputs, output):
    x, mc, ms, combine = inputs
    ctx.combine = combine
    ctx.save_for_backward(x, mc, ms)


def _apply_backward(ctx, g):
    x, mc, ms = ctx.saved_tensors
    # The kernels read g with x's strides: a gradient in another layout (or a broadcast view) is copied once.
    if g.stride() != x.stride():
        g = g.contiguous(memory_format=_memory_format(x))
    dx, dmc, dms = _triton_apply_backward(g, x, mc, ms, ctx.combine)
    return dx, dmc, dms, None


_triton_apply.register_autograd(_apply_backward, setup_context=_apply_setup_context)


# ----------------------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------------------


def channel_pool(x, *, backend=None):
    """Mean of ``x`` over H and W, accumulated in fp32.

    Args:
        x: (N, C, H, W) float tensor, NCHW or channels_last (other strides cost one copy).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, or ``None`` for ``$BAM_TRITON_BACKEND`` (default ``"auto"``).

    Returns:
        (N, C) tensor of ``x``'s dtype. H·W = 0 gives NaN (a mean of nothing), as ``torch.mean`` does.
    """
    check_feature_map(x)
    _backend.check_backend(backend)
    # Empty inputs take the torch path: nothing to launch, and torch's conventions for them apply.
    if _backend.resolve(backend, x.device) == "torch" or x.numel() == 0:
        return x.mean(dim=(2, 3))
    _check_kernel_limits(x)
    return _triton_channel_pool(_dense(x))


def bam_apply(x, mc, ms, *, combine="sum", backend=None):
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
    _backend.check_backend(backend)
    n, c, h, w = x.shape
    mc2, ms2 = mc.reshape(n, c), ms.reshape(n, h * w)
    if _backend.resolve(backend, x.device) == "torch" or x.numel() == 0:
        if torch.is_grad_enabled() and (x.requires_grad or mc.requires_grad or ms.requires_grad):
            return _TorchApply.apply(x, mc2, ms2, combine)
        return _torch_apply_forward(x, mc2, ms2, combine)
    _check_kernel_limits(x)
    return _triton_apply(_dense(x), mc2.contiguous(), ms2.contiguous(), combine)
