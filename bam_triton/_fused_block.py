"""BAM's whole block on the Triton path in training, with one fused write of dx.

Three gradients of x meet in BAM's backward: the apply step's g·(1+s), the pooling's dpool/(H·W) (a broadcast) and
the spatial branch's 1x1-conv input gradient dx_conv. Plain autograd writes the first (reading g and x), adds the
broadcast into it and adds dx_conv: with the conv's own write, 3 + 2 + 1 + 3 = 9 full passes over (N, C, H, W).
Here x goes through a junction, which also runs the pooling kernel, and whose backward runs last and writes dx once::

                 forward                                     backward (passes over (N, C, H, W))
    x ──> _Junction ──> pooled  ───────────────────> MLP ──> mc ─┐
                    ├──> x_conv  ──> spatial branch ──────> ms ──┤
                    └──> x_apply ───────────────────────────────> _ApplyIntoJunction ──> out

    1. _ApplyIntoJunction.backward   reads g, x -> dmc, dms; hands g, x, mc, ms over      2 passes
    2. the spatial branch's backward  writes dx_conv (torch)                               1 pass
    3. _Junction.backward             reads g, dx_conv; writes dx = g·(1+s) + dpool/(H·W)
                                      + dx_conv (kernels/apply_bwd.py, dx kernel)           3 passes

6 passes in all (s comes from the small maps, so step 3 needs no x). The reductions must finish before the branches'
backward can start and torch writes dx_conv, so g is read twice: the floor for this dependency order.

The hand-over lives only within one backward pass (see :class:`GradHandoff`). A backward recorded for a further
derivative (``create_graph=True``) takes differentiable torch ops instead, and the junction then adds its inputs.
"""
import torch

from . import _backend
from .ops import (_channel_pool_impl, _dense, _differentiable_apply_backward, _memory_format, bam_apply_unchecked,
                  channel_pool_unchecked)


class GradHandoff:
    """What a step's backward hands to a backward that runs later in the same backward pass (BAM's and CBAM's
    junctions): keyword values, read back as attributes (None until handed over). It is cleared when that pass ends
    (a callback queued on the autograd engine), so a pass that ran the handing step but not the receiving one
    (``autograd.grad`` of some parameters only) leaves nothing for a later pass to pick up."""

    def __init__(self):
        self.received = {}

    def __getattr__(self, name):  # only for names that are not attributes: the handed-over values
        if name == "received":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return self.received.get(name)

    def clear(self):
        self.received = {}

    def hand_over(self, **values):
        if not self.received:
            torch.autograd.Variable._execution_engine.queue_callback(self.clear)
        self.received.update(values)


class _Junction(torch.autograd.Function):
    """Forward: the channel means of x (the pooling kernel) and two aliases of x (for the spatial branch and the
    apply step). Backward: dx in one kernel from the handoff and the branch gradients, the means' gradient folded in
    as (N, C) values."""

    @staticmethod
    def forward(ctx, x, handoff, combine):
        ctx.handoff, ctx.combine, ctx.shape = handoff, combine, x.shape
        ctx.set_materialize_grads(False)  # the apply step sends None for x: never build a zero tensor for it
        return _channel_pool_impl(x), x.view_as(x), x.view_as(x)

    @staticmethod
    def backward(ctx, d_pooled, d_conv, d_apply):
        h = ctx.handoff
        if h.g is None:  # the apply step was not part of this backward: plain sum
            n, c, height, width = ctx.shape
            parts = [t for t in (d_conv, d_apply) if t is not None]
            if d_pooled is not None:
                parts.append((d_pooled / (height * width)).reshape(n, c, 1, 1).expand(ctx.shape))
            return (sum(parts) if parts else None), None, None
        rest = d_apply
        if d_conv is not None:
            rest = d_conv if rest is None else rest + d_conv
        if rest is not None and (rest.stride() != h.x.stride() or rest.dtype != h.x.dtype):
            rest = rest.contiguous(memory_format=_memory_format(h.x)).to(h.x.dtype)
        dpool = None if d_pooled is None else d_pooled.contiguous()
        dx = _backend.kernels().apply_bwd_dx(h.g, h.x, h.mc, h.ms, ctx.combine, dpool=dpool, dx_extra=rest)
        h.clear()
        return dx, None, None


class _ApplyIntoJunction(torch.autograd.Function):
    """The apply step inside the fused block: its backward computes only the reductions (dmc, dms) and hands g to
    the junction, which writes dx."""

    @staticmethod
    def forward(ctx, x, mc, ms, combine, handoff):
        ctx.combine, ctx.handoff = combine, handoff
        ctx.save_for_backward(x, mc, ms)
        return _backend.kernels().apply_fwd(x, mc, ms, combine)

    @staticmethod
    def backward(ctx, g):
        x, mc, ms = ctx.saved_tensors
        if torch.is_grad_enabled():  # a recorded backward: differentiable ops, dx returned here, not handed over
            dx, dmc, dms = _differentiable_apply_backward(g, x, mc, ms, ctx.combine)
            return dx, dmc, dms, None, None
        if g.stride() != x.stride():
            g = g.contiguous(memory_format=_memory_format(x))
        dmc, dms = _backend.kernels().apply_bwd_reduce(g, x, mc, ms, ctx.combine)
        ctx.handoff.hand_over(g=g, x=x, mc=mc, ms=ms)
        return None, dmc.to(mc.dtype), dms.to(ms.dtype), None, None


def block_forward(x, channel_branch, spatial_branch, combine, path):
    """``bam_apply(x, channel_branch(channel_pool(x)), spatial_branch(x))`` on validated arguments (``path`` from
    ``ops.resolve_path``). When the Triton path runs eagerly with autograd on, the backward writes dx in one fused
    pass; under ``torch.compile`` the ops stay separate custom ops and inductor plans the gradient sums itself.
    ``channel_branch`` maps (N, C) pooled features to (N, C) logits; ``spatial_branch`` maps ``x`` to (N, 1, H, W)."""
    fused = (path == "triton" and torch.is_grad_enabled() and x.requires_grad
             and not torch.compiler.is_compiling())
    if not fused:
        mc = channel_branch(channel_pool_unchecked(x, path))
        return bam_apply_unchecked(x, mc, spatial_branch(x), combine, path)
    x = _dense(x)  # the launchers below are called directly: they index dense NCHW or channels_last memory
    n, c, h, w = x.shape
    handoff = GradHandoff()
    pooled, x_conv, x_apply = _Junction.apply(x, handoff, combine)
    mc = channel_branch(pooled)
    ms = spatial_branch(x_conv)
    return _ApplyIntoJunction.apply(x_apply, mc.reshape(n, c).contiguous(), ms.reshape(n, h * w).contiguous(),
                                    combine, handoff)


# ----------------------------------------------------------------------------------------------------------------------
# Single read of x (opt-in: BAM(single_read=True) or BAM_TRITON_SINGLE_READ=1)
# ----------------------------------------------------------------------------------------------------------------------
# The front-end kernel (kernels/front.py) computes the channel means and the spatial branch's 1x1 reduction y from one
# read of x, so the forward reads x twice (front end, apply) instead of three times. In training its backward writes
#   dx = g·(1+s) + dpool/(H·W) + W_rᵀ·dy   and accumulates dW_r, db_r
# in one pass that reads g, x and dy (C/r channels), after the apply step's reductions (2 passes): torch never writes
# a full-size gradient of x.


class _FrontJunction(torch.autograd.Function):
    """Forward: (x for the apply step, pooled, y) from the front-end kernel. Backward: dx, dW_r, db_r in one kernel
    from the hand-over and the branches' gradients (dpool, dy); differentiable torch ops where the apply step handed
    nothing over (it was not in this pass, or the backward is recorded)."""

    @staticmethod
    def forward(ctx, x, weight, bias, handoff, combine):
        ctx.handoff, ctx.combine, ctx.has_bias = handoff, combine, bias is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)
        pooled, y = _backend.kernels().front_fwd(x, weight, bias)
        return x.view_as(x), pooled, y

    @staticmethod
    def backward(ctx, d_apply, d_pooled, d_y):
        x, weight = ctx.saved_tensors
        h = ctx.handoff
        if h.g is not None and not torch.is_grad_enabled():
            kernels = _backend.kernels()
            if d_y is None:  # the spatial branch is not in this pass
                dx = kernels.apply_bwd_dx(h.g, x, h.mc, h.ms, ctx.combine,
                                          dpool=None if d_pooled is None else d_pooled.contiguous())
                h.clear()
                return dx, None, None, None, None
            dx, dw, db = kernels.front_bwd(h.g, x, h.mc, h.ms, ctx.combine,
                                           None if d_pooled is None else d_pooled.contiguous(), d_y, weight)
            h.clear()
            return dx, dw, db if ctx.has_bias else None, None, None
        n, c, height, width = x.shape
        dx = d_apply
        if d_pooled is not None:
            d_mean = (d_pooled / (height * width)).reshape(n, c, 1, 1).expand(n, c, height, width)
            dx = d_mean if dx is None else dx + d_mean
        dw = db = None
        if d_y is not None:
            w2 = weight.reshape(weight.shape[0], -1).to(d_y.dtype)
            d_conv = torch.einsum("nrhw,rc->nchw", d_y, w2).to(x.dtype)
            dx = d_conv if dx is None else dx + d_conv
            dw = torch.einsum("nrhw,nchw->rc", d_y, x.to(d_y.dtype)).reshape(weight.shape).to(weight.dtype)
            db = d_y.sum(dim=(0, 2, 3)).to(weight.dtype) if ctx.has_bias else None
        return dx, dw, db, None, None


def single_read_forward(x, channel_branch, reduce_conv, spatial_branch, combine):
    """BAM's forward on the Triton path with one read of x before the apply step: the front-end kernel gives the
    channel means and ``reduce_conv``'s output y; ``channel_branch`` maps the means to (N, C) logits,
    ``spatial_branch(x, reduced=y)`` (the branch after its 1x1 conv) maps y to (N, 1, H, W) logits. Validated
    arguments, eager mode."""
    x = _dense(x)
    n, c, h, w = x.shape
    params = weight, bias = reduce_conv.weight, reduce_conv.bias
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        kernels = _backend.kernels()
        pooled, y = kernels.front_fwd(x, *params)
        mc, ms = channel_branch(pooled), spatial_branch(x, reduced=y)
        return kernels.apply_fwd(x, mc.reshape(n, c).contiguous(), ms.reshape(n, h * w).contiguous(), combine)
    handoff = GradHandoff()
    x_apply, pooled, y = _FrontJunction.apply(x, *params, handoff, combine)
    mc, ms = channel_branch(pooled), spatial_branch(x_apply, reduced=y)
    return _ApplyIntoJunction.apply(x_apply, mc.reshape(n, c).contiguous(), ms.reshape(n, h * w).contiguous(),
                                    combine, handoff)
