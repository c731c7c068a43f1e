"""The benchmark's providers: the authors' formulation (eager and compiled), our torch path, our Triton kernels (eager
and compiled), and, for each op, a callable that runs one iteration on tensors shared by every provider.

``authors-*`` follow the authors' public BAM code as it is written: the channel branch's output is unsqueezed and
``expand_as(x)``, the spatial branch's output ``expand_as(x)``, the two expanded maps are multiplied (or added), then
``1 + sigmoid(...)`` and ``att * x`` — each step a full (N, C, H, W) tensor. Pooling is ``F.avg_pool2d(x, (H, W))``
(their code passes ``H`` only, which is the same for the square maps benchmarked here and wrong for others).
"""

import torch
import torch.nn.functional as F
from torch import nn


PROVIDERS = ("authors-eager", "torch-path", "authors-compiled", "triton", "triton-compiled", "triton-single-read")
BASELINE = "authors-eager"
CUDA_ONLY = ("triton", "triton-compiled", "triton-single-read")
# BAM(single_read=True): the opt-in front end that reads x once for the pooling and the 1x1 reduction (the whole
# module's ops only: it has no op of its own).
SINGLE_READ = "triton-single-read"
SINGLE_READ_OPS = ("bam-fwd", "bam-fwd-bwd")
# Whole-network ops: the cost of BAM and of CBAM inside ResNet-50 (224x224), against the same network without attention
# ("no-bam", same backbone weights). Each of authors-eager, torch-path and triton times the network with BAM under its
# own name and with CBAM (a CBAM in every block) as "<provider>-cbam". torch.compile of a whole ResNet-50 takes minutes
# per case, so the compiled providers sit these out.
NETWORK_OPS = ("resnet50-fwd", "resnet50-train")
NO_BAM = "no-bam"
NETWORK_ATTENTIONS = ("bam", "cbam")
CBAM_SUFFIX = "-cbam"
_NETWORK_BASES = ("authors-eager", "torch-path", "triton")


def network_provider(provider, attention):
    """The whole-network ops' name for ``provider``'s network with ``attention``: ``torch-path``,
    ``torch-path-cbam``."""
    return provider if attention == "bam" else provider + CBAM_SUFFIX


def split_network_provider(name):
    """``(provider, attention)`` of a whole-network provider name; ``(NO_BAM, None)`` for the plain network."""
    if name == NO_BAM:
        return NO_BAM, None
    if name.endswith(CBAM_SUFFIX):
        return name[:-len(CBAM_SUFFIX)], "cbam"
    return name, "bam"


NETWORK_PROVIDERS = (NO_BAM,) + tuple(network_provider(p, a) for a in NETWORK_ATTENTIONS for p in _NETWORK_BASES)
NETWORK_IMAGE = (3, 224, 224)


# ----------------------------------------------------------------------------------------------------------------------
# The authors' formulation
# ----------------------------------------------------------------------------------------------------------------------


def authors_pool(x):
    return F.avg_pool2d(x, (x.shape[2], x.shape[3]))


def authors_apply(x, mc, ms, combine="product"):
    """``att = 1 + sigmoid(Mc ⊕ Ms)`` on expanded (N, C, H, W) views, then ``att * x``, as the authors write it."""
    n, c, h, w = x.shape
    mc_e = mc.view(n, c, 1, 1).expand_as(x)
    ms_e = ms.view(n, 1, h, w).expand_as(x)
    att = 1 + torch.sigmoid(mc_e * ms_e if combine == "product" else mc_e + ms_e)
    return att * x


class AuthorsBAM(nn.Module):
    """The authors' BAM forward around the weights of one of our :class:`bam_triton.BAM` modules (its parameters and
    buffers are shared, not copied): Flatten -> gate_c -> unsqueeze/expand; gate_s (their plain layer sequence, run
    in the input's memory format; every conv as ``F.conv2d`` on the layer's own parameters, as ``nn.Conv2d`` runs it,
    whatever CPU speed path our layer class has) -> expand; ``1 + sigmoid(·)``; ``att * x``."""

    def __init__(self, bam, combine="product"):
        super().__init__()
        self.gate_c = bam.channel_att.gate_c
        self.gate_s = bam.spatial_att.gate_s
        self.combine = combine

    def _spatial(self, x):
        for layer in self.gate_s:
            if isinstance(layer, nn.Conv2d):
                x = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
            else:
                x = layer(x)
        return x

    def forward(self, x):
        pooled = F.avg_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
        channel = self.gate_c(pooled.view(pooled.size(0), -1)).unsqueeze(2).unsqueeze(3).expand_as(x)
        spatial = self._spatial(x).expand_as(x)
        att = 1 + torch.sigmoid(channel * spatial if self.combine == "product" else channel + spatial)
        return att * x


def _authors_lse(x):
    """The authors' ``logsumexp_2d``: (N, C, 1) log-sum-exp over H·W, shifted by the max."""
    flat = x.reshape(x.size(0), x.size(1), -1)
    s, _ = torch.max(flat, dim=2, keepdim=True)
    return s + (flat - s).exp().sum(dim=2, keepdim=True).log()


class AuthorsCBAM(nn.Module):
    """The authors' CBAM forward (``MODELS/cbam.py``) around the weights of one of our :class:`bam_triton.CBAM`
    modules (shared, not copied): per pool type ``F.avg_pool2d`` / ``F.max_pool2d`` / ``F.lp_pool2d`` over (H, W) or
    their log-sum-exp, the shared MLP, ``sigmoid(sum).unsqueeze(2).unsqueeze(3).expand_as(x)``, ``x * scale``; then
    ``cat(torch.max(x_out, 1)[0], torch.mean(x_out, 1))``, the 7x7 conv and BatchNorm, ``x_out * sigmoid(·)``. The
    float64 reference of the tests runs it on a float64 copy."""

    def __init__(self, cbam):
        super().__init__()
        self.mlp = cbam.ChannelGate.mlp
        self.pool_types = cbam.pool_types
        self.spatial = None if cbam.no_spatial else cbam.SpatialGate.spatial

    def forward(self, x):
        size = (x.size(2), x.size(3))
        channel_att_sum = None
        for pool_type in self.pool_types:
            if pool_type == "avg":
                pooled = F.avg_pool2d(x, size, stride=size)
            elif pool_type == "max":
                pooled = F.max_pool2d(x, size, stride=size)
            elif pool_type == "lp":
                pooled = F.lp_pool2d(x, 2, size, stride=size)
            else:
                pooled = _authors_lse(x)
            raw = self.mlp(pooled)
            channel_att_sum = raw if channel_att_sum is None else channel_att_sum + raw
        x_out = x * torch.sigmoid(channel_att_sum).unsqueeze(2).unsqueeze(3).expand_as(x)
        if self.spatial is None:
            return x_out
        compress = torch.cat((torch.max(x_out, 1)[0].unsqueeze(1), torch.mean(x_out, 1).unsqueeze(1)), dim=1)
        conv = self.spatial.conv
        logits = self.spatial.bn(F.conv2d(compress, conv.weight, conv.bias, conv.stride, conv.padding))
        return x_out * torch.sigmoid(logits)


# ----------------------------------------------------------------------------------------------------------------------
# One op, all providers, same tensors
# ----------------------------------------------------------------------------------------------------------------------


def _compile(fn):
    import torch._dynamo

    torch._dynamo.reset()  # one graph per (shape, op): no recompilation limits, no stale guards
    return torch.compile(fn, dynamic=False)


class OpCase:
    """Inputs of one (op, shape, dtype, layout) and a factory of per-provider callables on them.

    ``make(provider)`` returns ``(fn, result)``: ``fn()`` runs one iteration, ``result(out)`` maps its return value to
    the tensor compared against the torch path.
    """

    def __init__(self, op, shape, dtype, channels_last, device, combine="product", seed=0):
        from bam_triton import BAM

        self.op, self.shape, self.dtype, self.device, self.combine = op, shape, dtype, device, combine
        if op in NETWORK_OPS:
            self._init_networks(shape, dtype, channels_last, device, combine, seed)
            return
        n, c, h, w = shape
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.x = x
        self.mc = torch.randn(n, c, generator=gen).to(device=device, dtype=dtype)
        self.ms = torch.randn(n, h, w, generator=gen).to(device=device, dtype=dtype)
        self.g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        if channels_last:
            self.g = self.g.contiguous(memory_format=torch.channels_last)
        if op.startswith("cbam"):
            from bam_triton import CBAM

            torch.manual_seed(seed)
            base = CBAM(c, backend="torch").to(device=device, dtype=dtype)
            triton_mod = CBAM(c, backend="triton").to(device=device, dtype=dtype)
            triton_mod.load_state_dict(base.state_dict())
            self.modules = {"torch": base, "triton": triton_mod, "authors": AuthorsCBAM(base)}
            for m in self.modules.values():
                m.train(op == "cbam-fwd-bwd")
        if op.startswith("bam"):
            torch.manual_seed(seed)
            base = BAM(c, combine=combine, backend="torch").to(device=device, dtype=dtype)
            if channels_last:
                base = base.to(memory_format=torch.channels_last)
            self.modules = {"torch": base}
            triton_mod = BAM(c, combine=combine, backend="triton").to(device=device, dtype=dtype)
            triton_mod.load_state_dict(base.state_dict())
            self.modules["triton"] = triton_mod
            single_read = BAM(c, combine=combine, backend="triton", single_read=True).to(device=device, dtype=dtype)
            single_read.load_state_dict(base.state_dict())
            self.modules[SINGLE_READ] = single_read
            self.modules["authors"] = AuthorsBAM(base, combine=combine)
            train = op == "bam-fwd-bwd"
            for m in self.modules.values():
                m.train(train)

    def _init_networks(self, shape, dtype, channels_last, device, combine, seed):
        """The input; the networks are built on first use (:meth:`_network`)."""
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=self.fmt)
        self.train = self.op == "resnet50-train"
        self.seed = seed
        self.networks = {}

    def _network(self, provider, attention):
        """ResNet-50 without attention (``provider`` NO_BAM), or with ``attention``'s modules run by ``provider``, on
        one set of weights: one seed gives the same backbone with and without attention (``bam_triton.models``); the
        authors' and the Triton variants are copies of the torch-path network (``AuthorsBAM`` / ``AuthorsCBAM`` share
        the attention weights of the copy they replace)."""
        import copy

        from bam_triton.models import CBAM_STAGES, bam_modules, cbam_modules, resnet50

        key = (provider, attention)
        if key in self.networks:
            return self.networks[key]
        if provider in (NO_BAM, "torch-path"):
            torch.manual_seed(self.seed)
            options = {} if attention is None else {"backend": "torch"}
            if attention == "bam":
                options["combine"] = self.combine
            network = resnet50(attention=attention, **options).to(device=self.device, dtype=self.dtype,
                                                                   memory_format=self.fmt).train(self.train)
        else:
            network = copy.deepcopy(self._network("torch-path", attention))
            if provider == "triton":
                for _, module in bam_modules(network) + cbam_modules(network):
                    module.backend = "triton"
            elif attention == "bam":
                for name, module in bam_modules(network):
                    setattr(network, name, AuthorsBAM(module, combine=self.combine))
            else:
                for block in (block for stage in CBAM_STAGES for block in getattr(network, stage)):
                    block.cbam = AuthorsCBAM(block.cbam)
        self.networks[key] = network
        return network

    def _make_network(self, provider):
        if provider not in NETWORK_PROVIDERS:
            raise ValueError(f"{provider} does not run the whole-network ops (providers: {', '.join(NETWORK_PROVIDERS)})")
        network, x = self._network(*split_network_provider(provider)), self.x
        if not self.train:
            def forward():
                with torch.no_grad():
                    return network(x)

            return forward, (lambda out: out)
        params = [p for p in network.parameters() if p.requires_grad]

        def training_step():  # forward and backward of every parameter (the optimizer's step is BAM-independent)
            out = network(x)
            return torch.autograd.grad(out, params, torch.ones_like(out))

        return training_step, (lambda grads: grads[0])

    # -- per op ------------------------------------------------------------------------------------------------------

    def make(self, provider):
        from bam_triton import bam_apply, channel_pool

        op, combine = self.op, self.combine
        if op in NETWORK_OPS:
            return self._make_network(provider)
        if provider == SINGLE_READ and op not in SINGLE_READ_OPS:
            raise ValueError(f"{SINGLE_READ} times the whole module only ({', '.join(SINGLE_READ_OPS)}), not {op}")
        compiled = provider.endswith("-compiled")
        backend = "triton" if provider.startswith("triton") else "torch"
        if op == "pool":
            f = authors_pool if provider.startswith("authors") else (lambda x: channel_pool(x, backend=backend))
            f = _compile(f) if compiled else f
            x = self.x
            return (lambda: f(x)), (lambda out: out.reshape(out.shape[0], -1))
        if op in ("apply-fwd", "apply-bwd"):
            if provider.startswith("authors"):
                f = lambda x, mc, ms: authors_apply(x, mc, ms, combine)  # noqa: E731
            else:
                f = lambda x, mc, ms: bam_apply(x, mc, ms, combine=combine, backend=backend)  # noqa: E731
            f = _compile(f) if compiled else f
            if op == "apply-fwd":
                x, mc, ms = self.x, self.mc, self.ms
                return (lambda: f(x, mc, ms)), (lambda out: out)
            x, mc, ms = (t.detach().requires_grad_() for t in (self.x, self.mc, self.ms))
            out = f(x, mc, ms)
            g = self.g
            return (lambda: torch.autograd.grad(out, (x, mc, ms), g, retain_graph=True)), (lambda grads: grads[0])
        if op in ("bam-fwd", "bam-fwd-bwd", "cbam-fwd", "cbam-fwd-bwd"):
            module = self.modules[SINGLE_READ if provider == SINGLE_READ else
                                  "authors" if provider.startswith("authors") else backend]
            m = _compile(module) if compiled else module
            if op.endswith("-fwd"):
                x = self.x

                def fwd():
                    with torch.no_grad():
                        return m(x)

                return fwd, (lambda out: out)
            x = self.x.detach().requires_grad_()
            params = [p for p in module.parameters() if p.requires_grad]
            g = self.g

            def fwd_bwd():
                out = m(x)
                return torch.autograd.grad(out, [x] + params, g)

            return fwd_bwd, (lambda grads: grads[0])
        raise ValueError(f"unknown op {op!r}")
