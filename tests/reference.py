"""The float64 reference of BAM's apply step, shared by the tests: ``x·(1 + sigmoid(mc ⊕ ms))`` and its gradients.

``mc`` is (N, C) or (N, C, 1, 1), ``ms`` (N, H, W) or (N, 1, H, W), of any float dtype; results are float64."""
import torch


def logits64(x, mc, ms, combine):
    n, c, h, w = x.shape
    a, b = mc.double().reshape(n, c, 1, 1), ms.double().reshape(n, 1, h, w)
    return a + b if combine == "sum" else a * b


def ref_apply(x, mc, ms, combine):
    return x.double() * (1 + torch.sigmoid(logits64(x, mc, ms, combine)))


def ref_grads(x, mc, ms, g, combine):
    """(dx, dmc, dms) in float64 by autograd through the forward formula."""
    leaves = [t.detach().double().requires_grad_() for t in (x, mc, ms)]
    out = ref_apply(*leaves, combine)
    return torch.autograd.grad(out, leaves, g.double())
