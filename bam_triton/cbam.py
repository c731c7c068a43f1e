"""``CBAM``: the Convolutional Block Attention Module (Woo, Park, Lee, Kweon, ECCV 2018) as an ``nn.Module``.

The submodule and parameter names are those of the authors' public code (``ChannelGate.mlp.{1,3}``,
``SpatialGate.spatial.{conv,bn}``), so its checkpoints load with ``load_state_dict(..., strict=True)`` unchanged and
``state_dict()`` saves back in its layout. The memory-bound steps (pooling, the channel max/mean of ``x·a``, the
apply step and their backward) are :mod:`bam_triton.cbam_ops`; the MLP, the 7x7 conv and its BatchNorm are torch's.
"""
from typing import Optional, Sequence

import torch
from torch import nn

from . import _backend, _cpu
from .cbam_ops import cbam_forward, check_pool_types
from .module import _check_positive_int, check_traced, reset_layers
from .ops import check_feature_map, check_input_meets_parameters

# The spatial gate's 7x7 conv (2 -> 1 channels, padding 3) and its BatchNorm's settings, as in the authors' code.
SPATIAL_KERNEL_SIZE = 7
SPATIAL_BN_EPS = 1e-5
SPATIAL_BN_MOMENTUM = 0.01


class ChannelGate(nn.Module):
    """Channel gate after pooling: a list of (N, C) pooled features -> (N, C) logits, the shared MLP's outputs summed.

    ``mlp`` is the authors' ``Sequential(Flatten, Linear(C, C/r), ReLU, Linear(C/r, C))``; the pooling itself runs in
    :class:`CBAM` (a kernel on the Triton path)."""

    def __init__(self, channels, hidden, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, hidden, **factory), nn.ReLU(),
                                 nn.Linear(hidden, channels, **factory))

    def forward(self, pooled):
        """``pooled``: a sequence of (N, C) tensors, one per pool type; returns the sum of the MLP of each, computed
        as one batched MLP over all of them."""
        n = pooled[0].shape[0]
        return self.mlp(torch.cat(list(pooled))).view(len(pooled), n, -1).sum(dim=0)


class BasicConv(nn.Module):
    """The authors' ``BasicConv`` as CBAM's spatial gate uses it: Conv2d (no bias) -> BatchNorm2d, no ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=False,
                              **factory)
        self.bn = nn.BatchNorm2d(out_channels, eps=SPATIAL_BN_EPS, momentum=SPATIAL_BN_MOMENTUM, **factory)

    def forward(self, x):
        return self.bn(self.conv(x))


class SpatialGate(nn.Module):
    """Spatial gate after the channel pooling: (N, 2, H, W) ``[max over C, mean over C]`` of ``x·a`` -> (N, 1, H, W)
    logits. The pooling over channels runs in :class:`CBAM` (a kernel on the Triton path)."""

    def __init__(self, device=None, dtype=None):
        super().__init__()
        self.spatial = BasicConv(2, 1, SPATIAL_KERNEL_SIZE, device=device, dtype=dtype)

    def forward(self, pooled):
        # On CPU the 7x7 conv runs on channels_last input (oneDNN's forward and backward of a 2-channel conv are
        # 1.3-3x faster so: docs/design.md, "CPU path"); the (N, 1, H, W) output is the same memory either way.
        return _cpu.spatial_branch((self.spatial.conv, self.spatial.bn), pooled)


class CBAM(nn.Module):
    r"""Convolutional Block Attention Module: :math:`x_1 = x \cdot \sigma(M_c(x))`, :math:`x' = x_1 \cdot
    \sigma(M_s(x_1))`.

    ``Mc`` pools ``x`` over H, W with each pool type and sums a shared C -> C/r -> C MLP (ReLU) over them; ``Ms`` takes
    the max and the mean over C of ``x1`` (max first), a 7x7 conv to one channel and a BatchNorm2d. On CUDA tensors
    the pooling, the channel max/mean of ``x·a`` and the apply step run as Triton kernels that read ``x`` three times
    and write the output once, never writing ``x1``; their backward reads ``g`` and ``x`` twice and writes ``dx``
    once. The MLP, the conv and the norm are torch's.

    Args:
        channels: C, the number of channels of the input.
        reduction: r; the hidden width is ``channels // reduction`` (as in the authors' code). Default 16.
        pool_types: any of ``"avg"``, ``"max"``, ``"lp"`` (L2 pooling, ``lp_pool2d`` with p = 2), ``"lse"``
            (log-sum-exp), in the order their MLP outputs are summed. Default ``("avg", "max")``. ``avg`` and ``max``
            come from one Triton kernel; ``lp`` and ``lse`` always run as torch ops (an extra read of ``x`` each).
        no_spatial: skip the spatial gate (``x' = x1``). Default False.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"``, ``"triton"``, or ``None`` to follow
            ``$BAM_TRITON_BACKEND`` at each call.
        device, dtype: where and in which dtype to create the parameters, as for ``torch.nn`` layers.

    Shape:
        - Input: (N, C, H, W), NCHW or channels_last, fp32/fp16/bf16/fp64.
        - Output: (N, C, H, W), same dtype and memory format.

    Ties in a max send the gradient to the first maximal element (the lowest h·W + w over H, W; the lowest channel over
    C), as torch's CPU ``max`` does. In training mode the spatial gate's BatchNorm2d needs more than one value
    (N·H·W > 1).

    Example::

        >>> cbam = CBAM(256)
        >>> y = cbam(torch.randn(8, 256, 56, 56))
    """

    def __init__(self, channels: int, reduction: int = 16, pool_types: Sequence[str] = ("avg", "max"),
                 no_spatial: bool = False, backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        _check_positive_int(channels, "channels")
        _check_positive_int(reduction, "reduction")
        if channels // reduction < 1:
            raise ValueError(f"channels // reduction must be >= 1 (the hidden width), got channels={channels}, "
                             f"reduction={reduction}")
        if not isinstance(no_spatial, bool):
            raise TypeError(f"no_spatial must be True or False, got {no_spatial!r}")
        self.channels = channels
        self.reduction = reduction
        self.hidden = channels // reduction
        self.pool_types = check_pool_types(pool_types)
        self.no_spatial = no_spatial
        self.backend = _backend.check_backend(backend)
        self.ChannelGate = ChannelGate(channels, self.hidden, device=device, dtype=dtype)
        if not no_spatial:
            self.SpatialGate = SpatialGate(device=device, dtype=dtype)

    def reset_parameters(self):
        """Re-initialise every layer with torch's defaults (what the authors' CBAM module has on its own; their ResNets
        then re-initialise it: ``bam_triton.models``)."""
        reset_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_traced(self._check_input, x)
        spatial = None if self.no_spatial else self.SpatialGate
        return cbam_forward(x, self.ChannelGate, spatial, self.pool_types, self.backend)

    def _check_input(self, x):
        """Validate ``x`` for this CBAM (errors name the argument)."""
        check_feature_map(x)
        if x.shape[1] != self.channels:
            raise ValueError(f"x must have {self.channels} channels (dim 1) for this CBAM, got shape "
                             f"{tuple(x.shape)}")
        check_input_meets_parameters(x, self.ChannelGate.mlp[1].weight, "cbam")
        n, _, h, w = x.shape
        if self.training and not self.no_spatial and n * h * w == 1:
            raise ValueError("CBAM got a single value per channel (N·H·W = 1) in training mode: the spatial gate's "
                             "BatchNorm2d needs more than one to compute batch statistics. Train with a larger batch "
                             "or feature map, or call .eval() to use the running statistics.")

    def __prepare_scriptable__(self):
        raise RuntimeError("bam_triton.CBAM cannot be compiled by torch.jit.script (it chooses between Triton kernels "
                           "and torch code at run time); use torch.export.export, torch.jit.trace or "
                           "torch.onnx.export, which record CBAM as standard aten ops")

    def extra_repr(self):
        return (f"channels={self.channels}, reduction={self.reduction}, pool_types={self.pool_types!r}, "
                f"no_spatial={self.no_spatial}, backend={self.backend!r}")
