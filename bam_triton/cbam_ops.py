"""CBAM's memory-bound steps: functional ops, the two step sets (torch, Triton) and the fused training block.

For x (N, C, H, W), ``a = sigmoid(Σ_pool MLP(pool(x)))`` (N, C) and, unless ``no_spatial``,
``b = sigmoid(BN(conv7x7([max_c(x·a), mean_c(x·a)])))`` (N, 1, H, W), CBAM's output is ``x·a·b``. The steps:

    forward                                              reads of x    backward (g = d out)            passes
    pool:          avg, max (+ argmax) over H, W            1          grad_b: db = Σ_c g·x·a             2
    spatial_pool:  max (+ argmax), mean over C of x·a       1          (torch: conv/BN backward -> dmax_c, dmean_c)
    apply:         x·a·b                                    1 (+1 w)   grad_a: da = Σ_hw dy·x             2
                                                                       (torch: MLP backward -> davg, dmax)
                                                                       grad_x: dx = dy·a + davg/(H·W)
                                                                               + dmax at argmax_hw        2
    with dy = g·b + dmax_c at argmax_c (over C) + dmean_c / C, the gradient of x·a: never written, x·a never saved.

The Triton step set is ``kernels/cbam.py``; the torch step set below computes the same with torch ops (a few images
at a time on CPU, so a chunk's temporaries stay in cache). Autograd wiring (:func:`_fused_forward`): a junction hands
x to the three steps and runs last in the backward; the apply and channel-pool steps hand what they have over to the
next one (:class:`bam_triton._fused_block.GradHandoff`), so dx is written once. A backward that is itself recorded
(``create_graph=True``) uses differentiable torch formulas instead, and so do the custom ops under ``torch.compile``.
Ties in a max go to the first maximal element, as torch's CPU ``max`` does.
"""
from typing import Optional

import torch

from . import _backend, _cpu
from ._fused_block import GradHandoff
from .ops import _custom_op as _make_custom_op
from .ops import _PLAIN_TENSOR_TYPES, _check_tensor, _dense, _memory_format, check_feature_map, resolve_path

POOL_TYPES = ("avg", "max", "lp", "lse")


def check_pool_types(pool_types, name="pool_types"):
    """A tuple of CBAM pool type names (``avg``, ``max``, ``lp``, ``lse``); errors name the argument."""
    if isinstance(pool_types, str):
        raise TypeError(f"{name} must be a sequence of pool type names such as ('avg', 'max'), got the string "
                        f"{pool_types!r}")
    try:
        names = tuple(pool_types)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of pool type names, got {type(pool_types).__name__}") from None
    if not names:
        raise ValueError(f"{name} must name at least one pool type of {POOL_TYPES}")
    unknown = [p for p in names if p not in POOL_TYPES]
    if unknown:
        raise ValueError(f"{name} has unknown pool type(s) {unknown}; choose from {POOL_TYPES}")
    return names


# ----------------------------------------------------------------------------------------------------------------------
# Differentiable torch formulas: the plain path (export, torch.func), recorded backwards, the custom ops' backward
# ----------------------------------------------------------------------------------------------------------------------


def _acc(dtype):
    return torch.promote_types(dtype, torch.float32)


def _pool(x, kind):
    """One pool type over H, W as plain differentiable ops, (N, C) in x's dtype. ``lp`` is the authors'
    ``lp_pool2d(x, 2, (H, W))`` = (Σ x²)^½ and ``lse`` their log-sum-exp, summed in fp32 for half inputs."""
    if kind == "avg":
        return x.mean(dim=(2, 3), dtype=_acc(x.dtype)).to(x.dtype)
    if kind == "max":
        return x.amax(dim=(2, 3))
    if kind == "lp":
        return x.to(_acc(x.dtype)).pow(2).sum(dim=(2, 3)).sqrt().to(x.dtype)
    return torch.logsumexp(x.to(_acc(x.dtype)).flatten(2), dim=2).to(x.dtype)


def _plain_spatial_pool(x1):
    return torch.cat((x1.amax(dim=1, keepdim=True), x1.mean(dim=1, keepdim=True)), dim=1)


def _plain_forward(x, channel_gate, spatial_gate, pool_types):
    """CBAM as the authors write it, in standard aten ops (what export, tracing and torch.func record)."""
    n, c = x.shape[:2]
    a = torch.sigmoid(channel_gate([_pool(x, kind) for kind in pool_types]))
    x1 = x * a.reshape(n, c, 1, 1)
    if spatial_gate is None:
        return x1.to(x.dtype)
    return (x1 * torch.sigmoid(spatial_gate(_plain_spatial_pool(x1)))).to(x.dtype)


def _route(values, index, size, dim):
    """A zero (N, size, L) or (N, L, size) tensor (``dim`` 1 or 2) with ``values`` (N, L) scattered to ``index``
    along ``dim``: the gradient of a max with its argmax (differentiable in ``values``)."""
    n, length = values.shape
    shape = (n, size, length) if dim == 1 else (n, length, size)
    return values.new_zeros(shape).scatter(dim, index.long().unsqueeze(dim), values.unsqueeze(dim))


def _pool_grad(shape, d_avg, d_max, argmax_hw):
    """dx of (avg, max) over H, W: d_avg / (H·W) everywhere, d_max at each channel's argmax (N, C, H, W)."""
    n, c, h, w = shape
    parts = []
    if d_avg is not None:
        parts.append((d_avg / (h * w)).reshape(n, c, 1, 1).expand(shape))
    if d_max is not None:
        parts.append(_route(d_max, argmax_hw, h * w, dim=2).reshape(shape))
    return sum(parts) if parts else None


def _spatial_pool_grads(ds, x, a, argmax_c):
    """(dx, da) of ``s = [max_c(x·a), mean_c(x·a)]`` for ``ds`` (N, 2, H, W)."""
    n, c, h, w = x.shape
    d_x1 = _route(ds[:, 0].reshape(n, h * w), argmax_c, c, dim=1) + ds[:, 1].reshape(n, 1, h * w) / c
    d_x1 = d_x1.reshape(n, c, h, w)
    return d_x1 * a.reshape(n, c, 1, 1), (d_x1 * x).sum(dim=(2, 3))


def _apply_grads(g, x, a, b):
    """(dx, da, db) of ``x·a·b`` (``b`` None: ``x·a``); da (N, C), db like b."""
    n, c, h, w = x.shape
    a4 = a.reshape(n, c, 1, 1)
    if b is None:
        return g * a4, (g * x).sum(dim=(2, 3)), None
    gb = g * b
    return gb * a4, (gb * x).sum(dim=(2, 3)), (g * x * a4).sum(dim=1, keepdim=True).reshape(b.shape)


# ----------------------------------------------------------------------------------------------------------------------
# The torch step set (same signatures as the Triton launchers of kernels/cbam.py)
# ----------------------------------------------------------------------------------------------------------------------


class TorchSteps:
    """CBAM's steps in torch ops. Maps are ``a`` (N, C) and ``b`` (N, H·W) (None: no spatial gate); argmax maps are
    int64 here. On CPU the forward steps run a few images at a time so their temporaries stay in cache."""

    @staticmethod
    def pool(x):
        """(avg, max, argmax over H·W), (N, C) each, avg and max in x's dtype."""
        n, c, h, w = x.shape
        avg = torch.empty(n, c, dtype=x.dtype, device=x.device)
        mx = torch.empty_like(avg)
        argmax = torch.empty(n, c, dtype=torch.long, device=x.device)
        for images in _cpu.image_chunks(x):
            chunk = x[images]
            avg[images] = chunk.sum(dim=(2, 3), dtype=_acc(x.dtype)) / (h * w)
            torch.max(chunk.flatten(2), dim=2, out=(mx[images], argmax[images]))
        return avg, mx, argmax

    @staticmethod
    def spatial_pool(x, a):
        """(s, argmax over C): s (N, 2, H, W) = [max over C, mean over C] of x·a, in x's dtype; argmax (N, H·W)."""
        n, c, h, w = x.shape
        s = torch.empty(n, 2, h, w, dtype=x.dtype, device=x.device)
        argmax = torch.empty(n, h, w, dtype=torch.long, device=x.device)
        a4 = a.reshape(n, c, 1, 1)
        chunks = _cpu.image_chunks(x)
        scratch = torch.empty_like(x[chunks[0]])
        for images in chunks:
            x1 = torch.mul(x[images], a4[images], out=scratch[:images.stop - images.start])
            torch.max(x1, dim=1, out=(s[images, 0], argmax[images]))
            s[images, 1] = x1.sum(dim=1, dtype=_acc(x.dtype)) / c
        return s, argmax.reshape(n, h * w)

    @staticmethod
    def apply(x, a, b):
        """``x·a·b`` (``b`` None: ``x·a``) in x's dtype and memory format."""
        n, c, h, w = x.shape
        a4 = a.reshape(n, c, 1, 1)
        out = torch.empty_like(x, memory_format=_memory_format(x))
        for images in _cpu.image_chunks(x):
            chunk = torch.mul(x[images], a4[images], out=out[images])
            if b is not None:
                chunk.mul_(b.reshape(n, 1, h, w)[images])
        return out

    @staticmethod
    def grad_b(g, x, a):
        """db (N, H·W) = Σ_c g·x·a, in fp32 (fp64 for fp64): per chunk g·x in one buffer, then a batched product."""
        n, c, h, w = x.shape
        acc = _acc(x.dtype)
        db = torch.empty(n, h * w, dtype=acc, device=x.device)
        chunks = _cpu.image_chunks(x)
        scratch = torch.empty_like(x[chunks[0]], dtype=acc)
        channels_last = _memory_format(x) == torch.channels_last
        for images in chunks:
            k = images.stop - images.start
            gx = torch.mul(g[images], x[images], out=scratch[:k])
            a3 = a[images].to(acc).reshape(k, c, 1)
            if channels_last:  # (k, hw, c) is gx's memory order: a view
                db[images] = torch.bmm(gx.permute(0, 2, 3, 1).reshape(k, h * w, c), a3).reshape(k, h * w)
            else:
                db[images] = torch.bmm(a3.transpose(1, 2), gx.reshape(k, c, h * w)).reshape(k, h * w)
        return db

    @staticmethod
    def _dy(g, b, argmax_c, dmax_c, dmean_c, out):
        """dy = g·b + dmax_c at argmax_c + dmean_c / C (the gradient of x·a) for one chunk of images, written into
        ``out``; ``g`` itself without the spatial gate."""
        k, c, h, w = g.shape
        if b is None:
            return out.copy_(g)
        dy = torch.mul(g, b.reshape(k, 1, h, w), out=out)
        dy.add_((dmean_c / c).reshape(k, 1, h, w))
        dy.flatten(2).scatter_add_(1, argmax_c.long().reshape(k, 1, h * w), dmax_c.to(dy.dtype).reshape(k, 1, h * w))
        return dy

    @staticmethod
    def grad_a(g, x, b, argmax_c, dmax_c, dmean_c):
        """da (N, C) = Σ_hw dy·x, in fp32 (fp64 for fp64)."""
        n, c, h, w = x.shape
        acc = _acc(x.dtype)
        da = torch.empty(n, c, dtype=acc, device=x.device)
        chunks = _cpu.image_chunks(x)
        scratch = torch.empty_like(x[chunks[0]], dtype=acc)
        for images in chunks:
            maps = (None,) * 4 if b is None else (b[images], argmax_c[images], dmax_c[images], dmean_c[images])
            dy = TorchSteps._dy(g[images], *maps, scratch[:images.stop - images.start])
            da[images] = dy.mul_(x[images]).sum(dim=(2, 3))
        return da

    @staticmethod
    def grad_x(g, a, b, argmax_c, dmax_c, dmean_c, d_avg, d_max, argmax_hw, extra):
        """dx = dy·a + d_avg / (H·W) + d_max at argmax_hw (+ extra), in g's dtype and memory format."""
        n, c, h, w = g.shape
        acc = _acc(g.dtype)
        dx = torch.empty_like(g, memory_format=_memory_format(g))
        chunks = _cpu.image_chunks(g)
        scratch = None if acc == g.dtype else torch.empty_like(g[chunks[0]], dtype=acc)
        for images in chunks:
            k = images.stop - images.start
            maps = (None,) * 4 if b is None else (b[images], argmax_c[images], dmax_c[images], dmean_c[images])
            d = TorchSteps._dy(g[images], *maps, dx[images] if scratch is None else scratch[:k])
            d.mul_(a[images].reshape(k, c, 1, 1))
            if d_avg is not None:
                d.add_((d_avg[images] / (h * w)).reshape(k, c, 1, 1))
            if d_max is not None:
                d.flatten(2).scatter_add_(2, argmax_hw[images].long().reshape(k, c, 1),
                                          d_max[images].to(d.dtype).reshape(k, c, 1))
            if extra is not None:
                d.add_(extra[images])
            if scratch is not None:
                dx[images] = d
        return dx


class TritonSteps:
    """CBAM's steps as the Triton launchers of ``kernels/cbam.py`` (imported on first use)."""

    def __getattr__(self, name):
        return getattr(_backend.kernels().cbam_steps, name)


_STEPS = {"torch": TorchSteps(), "triton": TritonSteps()}


# ----------------------------------------------------------------------------------------------------------------------
# The fused block: junction -> pool / spatial pool / apply, dx written once by the junction's backward
# ----------------------------------------------------------------------------------------------------------------------


def _flat_maps(x, a, b):
    n, c, h, w = x.shape
    return a.reshape(n, c).contiguous(), None if b is None else b.reshape(n, h * w).contiguous()


class _Junction(torch.autograd.Function):
    """Forward: avg and max over H, W (their argmax kept) and two aliases of x, for the spatial pool and the apply
    step. Backward (last): dx from what the other steps handed over, in one ``grad_x``."""

    @staticmethod
    def forward(ctx, x, steps, handoff):
        ctx.set_materialize_grads(False)
        ctx.steps, ctx.handoff, ctx.shape = steps, handoff, x.shape
        avg, mx, ctx.argmax_hw = steps.pool(x)
        return avg, mx, x.view_as(x), x.view_as(x)

    @staticmethod
    def backward(ctx, d_avg, d_max, d_spatial, d_apply):
        h = ctx.handoff
        extra = [t for t in (d_spatial, d_apply) if t is not None]
        if h.g is not None and not torch.is_grad_enabled():
            extra = sum(extra) if extra else None
            if extra is not None:
                extra = extra.to(h.g.dtype).contiguous(memory_format=_memory_format(h.g))
            dx = ctx.steps.grad_x(h.g, h.a, h.b, h.argmax_c, h.dmax_c, h.dmean_c,
                                  None if d_avg is None else d_avg.contiguous(),
                                  None if d_max is None else d_max.contiguous(), ctx.argmax_hw, extra)
            h.clear()
            return dx, None, None
        pool = _pool_grad(ctx.shape, d_avg, d_max, ctx.argmax_hw)
        parts = extra + ([] if pool is None else [pool])
        return (sum(parts) if parts else None), None, None


class _SpatialPool(torch.autograd.Function):
    """Forward: ``[max_c(x·a), mean_c(x·a)]`` (N, 2, H, W). Backward: da for the spatial pool and the apply step
    together (``grad_a``, after the apply step handed g and b over); the junction gets its gradients."""

    @staticmethod
    def forward(ctx, x, a, steps, handoff):
        ctx.steps, ctx.handoff = steps, handoff
        s, ctx.argmax_c = steps.spatial_pool(x, a)
        ctx.save_for_backward(x, a)
        return s

    @staticmethod
    def backward(ctx, ds):
        x, a = ctx.saved_tensors
        h = ctx.handoff
        n, c, height, width = x.shape
        if h.g is not None and not torch.is_grad_enabled():
            dmax_c = ds[:, 0].reshape(n, height * width).contiguous()
            dmean_c = ds[:, 1].reshape(n, height * width).contiguous()
            da = ctx.steps.grad_a(h.g, x, h.b, ctx.argmax_c, dmax_c, dmean_c)
            h.hand_over(argmax_c=ctx.argmax_c, dmax_c=dmax_c, dmean_c=dmean_c)
            return None, da.to(a.dtype), None, None
        dx, da = _spatial_pool_grads(ds, x, a, ctx.argmax_c)
        return dx, da.to(a.dtype), None, None


class _Apply(torch.autograd.Function):
    """Forward: ``x·a·b``. Backward: db (``grad_b``), or with no spatial gate da; g goes to the next steps."""

    @staticmethod
    def forward(ctx, x, a, b, steps, handoff):
        ctx.steps, ctx.handoff = steps, handoff
        ctx.save_for_backward(x, a, b)
        return steps.apply(x, a, b)

    @staticmethod
    def backward(ctx, g):
        x, a, b = ctx.saved_tensors
        if torch.is_grad_enabled():  # a recorded backward: differentiable ops, nothing handed over
            n, c, h, w = x.shape
            dx, da, db = _apply_grads(g, x, a, None if b is None else b.reshape(n, 1, h, w))
            return dx, da, None if db is None else db.reshape(b.shape), None, None
        if g.stride() != x.stride():
            g = g.contiguous(memory_format=_memory_format(x))
        ctx.handoff.hand_over(g=g, a=a, b=b)
        if b is None:  # no spatial gate: da here, dx in the junction
            return None, ctx.steps.grad_a(g, x, None, None, None, None).to(a.dtype), None, None, None
        return None, None, ctx.steps.grad_b(g, x, a).to(b.dtype), None, None


def _needs_autograd(x, *modules):
    return torch.is_grad_enabled() and (x.requires_grad or any(
        p.requires_grad for m in modules if m is not None for p in m.parameters()))


def _fused_forward(x, channel_gate, spatial_gate, pool_types, steps):
    """CBAM on validated, dense ``x`` with the steps of ``steps``, the backward fused (see the module docstring)."""
    n, c, h, w = x.shape
    handoff = GradHandoff()
    avg, mx, x_spatial, x_apply = _Junction.apply(x, steps, handoff)
    pooled = {"avg": avg, "max": mx}
    a = torch.sigmoid(channel_gate([pooled[k] if k in pooled else _pool(x, k) for k in pool_types]))
    a = a.reshape(n, c).contiguous()
    if spatial_gate is None:
        return _Apply.apply(x_apply, a, None, steps, handoff)
    s = _SpatialPool.apply(x_spatial, a, steps, handoff)
    b = torch.sigmoid(spatial_gate(s)).reshape(n, h * w).contiguous()
    return _Apply.apply(x_apply, a, b, steps, handoff)


def _triton_inference(x, channel_gate, spatial_gate, pool_types):
    """CBAM's forward with no autograd on the Triton path: the three kernels, their argmax maps unused."""
    n, c, h, w = x.shape
    steps = _STEPS["triton"]
    avg, mx, _ = steps.pool(x)
    pooled = {"avg": avg, "max": mx}
    a = torch.sigmoid(channel_gate([pooled[k] if k in pooled else _pool(x, k) for k in pool_types]))
    a = a.reshape(n, c).contiguous()
    b = None
    if spatial_gate is not None:
        s, _ = steps.spatial_pool(x, a)
        b = torch.sigmoid(spatial_gate(s)).reshape(n, h * w).contiguous()
    return steps.apply(x, a, b)


def _torch_inference(x, channel_gate, spatial_gate, pool_types):
    """CBAM's forward with no autograd on the torch path, in as few torch calls as it takes: in a network every call
    starts with caches that the layer before flushed, so a call costs ~20 µs, and a chunked loop of the whole module
    paid that per chunk (docs/design.md, CBAM). The pooling, the MLP and the spatial gate run once for the batch;
    only x·a and its pooling over C run a few images at a time (``_cpu.image_chunks``), so that x·a is pooled while it
    is still in cache. The product with b goes to a new tensor, not in place into x·a: the pooling over C splits x·a
    between the threads by position, not as the multiply wrote it, and writing in place then waits on the other
    core's copies (a network's CBAMs took 1.7x as long, in half of the processes measured)."""
    n, c, h, w = x.shape
    acc = _acc(x.dtype)
    pooled = {"avg": x.mean(dim=(2, 3), dtype=acc).to(x.dtype), "max": x.amax(dim=(2, 3))}
    a = torch.sigmoid(channel_gate([pooled[k] if k in pooled else _pool(x, k) for k in pool_types])).reshape(n, c, 1, 1)
    if spatial_gate is None:
        return torch.mul(x, a)
    x1 = torch.empty_like(x, memory_format=_memory_format(x))
    s = torch.empty(n, 2, h, w, dtype=x.dtype, device=x.device)
    mean_c = s[:, 1:] if acc == x.dtype else torch.empty(n, 1, h, w, dtype=acc, device=x.device)
    for images in _cpu.image_chunks(x):
        chunk = torch.mul(x[images], a[images], out=x1[images])
        torch.amax(chunk, dim=1, keepdim=True, out=s[images, :1])
        torch.mean(chunk, dim=1, keepdim=True, dtype=acc, out=mean_c[images])
    if acc != x.dtype:
        s[:, 1:] = mean_c
    return torch.mul(x1, torch.sigmoid(spatial_gate(s)))


def cbam_forward(x, channel_gate, spatial_gate, pool_types, backend):
    """CBAM on validated ``x``: ``channel_gate`` maps a list of (N, C) pooled features to (N, C) logits,
    ``spatial_gate`` (None: no spatial gate) maps (N, 2, H, W) to (N, 1, H, W) logits."""
    if x.numel() == 0:
        return x.clone()
    path = resolve_path(x, backend)
    if path == "plain" or (path == "torch" and torch.compiler.is_compiling()):
        return _plain_forward(x, channel_gate, spatial_gate, pool_types)
    if path == "triton" and (torch.compiler.is_compiling() or type(x) not in _PLAIN_TENSOR_TYPES):
        # Custom ops where the graph must see ops (torch.compile, fake and other tensor subclasses). Under a plain
        # TorchDispatchMode the steps below run as in eager mode (the mode sees the torch ops between launches).
        return _custom_op_forward(x, channel_gate, spatial_gate, pool_types)
    x = _dense(x)
    if _needs_autograd(x, channel_gate, spatial_gate):
        return _fused_forward(x, channel_gate, spatial_gate, pool_types, _STEPS[path])
    inference = _torch_inference if path == "torch" else _triton_inference
    return inference(x, channel_gate, spatial_gate, pool_types)


# ----------------------------------------------------------------------------------------------------------------------
# Custom ops (torch.compile, tensor subclasses, dispatch modes): the Triton steps, with differentiable backwards
# ----------------------------------------------------------------------------------------------------------------------


def _custom_op(name, impl, fake, backward, setup_context):
    """BAM's custom op maker (the fake results, and the real ``impl`` on META tensors where torch allows a meta kernel
    beside them: torch 2.11 refuses one) with a differentiable backward."""
    op = _make_custom_op(name, impl, fake)
    op.register_autograd(backward, setup_context=setup_context)
    return op


def _pool_impl(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    avg, mx, argmax = _STEPS["triton"].pool(_dense(x))
    return avg, mx, argmax


def _pool_fake(x):
    n, c = x.shape[:2]
    return x.new_empty(n, c), x.new_empty(n, c), x.new_empty(n, c, dtype=torch.int32)


def _pool_setup(ctx, inputs, output):
    ctx.shape = inputs[0].shape
    ctx.save_for_backward(output[2])


def _pool_backward(ctx, d_avg, d_max, _):
    (argmax,) = ctx.saved_tensors
    return _pool_grad(ctx.shape, d_avg, d_max, argmax)


_triton_pool = _custom_op("cbam_pool", _pool_impl, _pool_fake, _pool_backward, _pool_setup)


def _spatial_pool_impl(x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, c = x.shape[:2]
    s, argmax = _STEPS["triton"].spatial_pool(_dense(x), a.reshape(n, c).contiguous())
    return s, argmax


def _spatial_pool_fake(x, a):
    n, c, h, w = x.shape
    return x.new_empty(n, 2, h, w), x.new_empty(n, h * w, dtype=torch.int32)


def _spatial_pool_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _spatial_pool_backward(ctx, ds, _):
    x, a, argmax = ctx.saved_tensors
    dx, da = _spatial_pool_grads(ds, x, a, argmax)
    return dx, da.to(a.dtype).reshape(a.shape)


_triton_spatial_pool = _custom_op("cbam_spatial_pool", _spatial_pool_impl, _spatial_pool_fake,
                                  _spatial_pool_backward, _spatial_pool_setup)


def _apply_impl(x: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    x = _dense(x)
    a2, b2 = _flat_maps(x, a, b)
    return _STEPS["triton"].apply(x, a2, b2)


def _apply_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _apply_backward(ctx, g):
    x, a, b = ctx.saved_tensors
    n, c, h, w = x.shape
    dx, da, db = _apply_grads(g, x, a, None if b is None else b.reshape(n, 1, h, w))
    return dx, da.to(a.dtype).reshape(a.shape), None if db is None else db.to(b.dtype).reshape(b.shape)


_triton_apply = _custom_op("cbam_apply", _apply_impl, lambda x, a, b: torch.empty_like(x), _apply_backward,
                           _apply_setup)


def _custom_op_forward(x, channel_gate, spatial_gate, pool_types):
    n, c, h, w = x.shape
    avg, mx, _ = _triton_pool(x)
    pooled = {"avg": avg, "max": mx}
    a = torch.sigmoid(channel_gate([pooled[k] if k in pooled else _pool(x, k) for k in pool_types]))
    if spatial_gate is None:
        return _triton_apply(x, a, None)
    s, _ = _triton_spatial_pool(x, a)
    return _triton_apply(x, a, torch.sigmoid(spatial_gate(s)))


# ----------------------------------------------------------------------------------------------------------------------
# Public functional ops
# ----------------------------------------------------------------------------------------------------------------------


def _check_channel_map(x, a, name="a"):
    _check_tensor(a, name)
    n, c = x.shape[:2]
    if tuple(a.shape) not in ((n, c), (n, c, 1, 1)):
        raise ValueError(f"{name} must have shape (N, C) = {(n, c)} or (N, C, 1, 1) = {(n, c, 1, 1)} to match x of "
                         f"shape {tuple(x.shape)}, got {tuple(a.shape)}")
    if a.device != x.device:
        raise ValueError(f"{name} is on {a.device} but x is on {x.device}: all inputs must be on one device")


def _check_spatial_map(x, b, name="b"):
    _check_tensor(b, name)
    n, _, h, w = x.shape
    if tuple(b.shape) not in ((n, h, w), (n, 1, h, w)):
        raise ValueError(f"{name} must have shape (N, H, W) = {(n, h, w)} or (N, 1, H, W) = {(n, 1, h, w)} to match "
                         f"x of shape {tuple(x.shape)}, got {tuple(b.shape)}")
    if b.device != x.device:
        raise ValueError(f"{name} is on {b.device} but x is on {x.device}: all inputs must be on one device")


def cbam_channel_pool(x: torch.Tensor, *, backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CBAM's channel-gate pooling: the mean and the max of ``x`` over H and W, from one read of ``x`` on the Triton
    path (the mean accumulated in fp32).

    Args:
        x: (N, C, H, W) float tensor, NCHW or channels_last (other strides cost one copy), H·W > 0.
        backend: ``"auto"``, ``"torch"``, ``"triton"``, or ``None`` for ``$BAM_TRITON_BACKEND``.

    Returns:
        ``(avg, max)``, each (N, C) in ``x``'s dtype. The max's gradient goes to the first maximal position.
    """
    check_feature_map(x)
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"x must have H·W > 0 to be pooled (a max of nothing), got shape {tuple(x.shape)}")
    path = resolve_path(x, backend)
    if path == "plain":
        return _pool(x, "avg"), _pool(x, "max")
    if path == "torch":
        return _pool(x, "avg"), x.flatten(2).max(dim=2).values
    avg, mx, _ = _triton_pool(x)
    return avg, mx


def cbam_spatial_pool(x: torch.Tensor, a: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """CBAM's spatial-gate pooling: ``[max over C, mean over C]`` of ``x·a``, without writing ``x·a`` on the Triton
    path.

    Args:
        x: (N, C, H, W) float tensor, NCHW or channels_last, C > 0.
        a: the channel attention (after its sigmoid), (N, C) or (N, C, 1, 1).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, or ``None`` for ``$BAM_TRITON_BACKEND``.

    Returns:
        (N, 2, H, W) in ``x``'s dtype: channel 0 the max, channel 1 the mean. The max's gradient goes to the first
        maximal channel.
    """
    check_feature_map(x)
    _check_channel_map(x, a)
    if x.shape[1] == 0:
        raise ValueError(f"x must have C > 0 to be pooled over channels, got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    path = resolve_path(x, backend)
    x1 = None if path == "triton" else (x * a.reshape(n, c, 1, 1)).to(x.dtype)
    if path == "plain":
        return _plain_spatial_pool(x1)
    if path == "torch":
        return torch.cat((x1.max(dim=1, keepdim=True).values, x1.mean(dim=1, keepdim=True)), dim=1)
    return _triton_spatial_pool(x, a)[0]


def cbam_apply(x: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor] = None, *,
               backend: Optional[str] = None) -> torch.Tensor:
    """CBAM's apply step: ``x·a·b`` (``b`` None: ``x·a``), one read of ``x`` and one write on the Triton path.

    Args:
        x: (N, C, H, W) float tensor, NCHW or channels_last (other strides cost one copy).
        a: the channel attention, (N, C) or (N, C, 1, 1); any supported float dtype.
        b: the spatial attention, (N, H, W) or (N, 1, H, W), or None.
        backend: ``"auto"``, ``"torch"``, ``"triton"``, or ``None`` for ``$BAM_TRITON_BACKEND``.

    Returns:
        Tensor of ``x``'s shape, dtype and memory format. Inputs are never modified.
    """
    check_feature_map(x)
    _check_channel_map(x, a)
    if b is not None:
        _check_spatial_map(x, b)
    path = resolve_path(x, backend)
    if path == "triton":
        return _triton_apply(x, a, b)
    n, c, h, w = x.shape
    out = x * a.reshape(n, c, 1, 1)
    if b is not None:
        out = out * b.reshape(n, 1, h, w)
    return out.to(x.dtype)
