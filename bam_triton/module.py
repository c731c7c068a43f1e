"""``BAM``: the Bottleneck Attention Module (Park, Woo, Lee, Kweon, BMVC 2018) as an ``nn.Module``.

The submodule and parameter names are those of the authors' public code, so its checkpoints load with
``load_state_dict(..., strict=True)`` unchanged and ``state_dict()`` saves back in its layout (no key mapping needed).
``state_dict()`` also records ``combine`` in its metadata (not as a key), and loading into a BAM with the other
``combine`` raises (docs/design.md, "combine in checkpoints").
"""
import warnings
from typing import Optional

import torch
from torch import nn

from . import _backend, _cpu
from ._fused_block import block_forward, single_read_forward
from .ops import bam_apply_unchecked, check_combine, check_feature_map, check_input_meets_parameters, resolve_path


def reset_layers(module):
    """Re-initialise every layer below ``module`` with torch's defaults, BatchNorm running statistics included."""
    for layer in module.modules():
        if layer is not module and hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()


def check_traced(check, x):
    """``check(x)``, the TracerWarnings it raises under ``torch.jit.trace`` silenced: the checks read sizes, which are
    tensors while a trace records; for a valid input they are constants."""
    if not torch.jit.is_tracing():
        return check(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return check(x)


def _check_positive_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


class ChannelGate(nn.Module):
    """Channel branch after pooling: (N, C) pooled features -> (N, C) logits ``Mc``.

    Linear(C, C/r) -> BatchNorm1d -> ReLU -> Linear(C/r, C). The pooling itself runs in :class:`BAM` (a kernel).
    """

    def __init__(self, channels, hidden, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        # Names as in the authors' code, including its off-by-one (fc_0 is followed by bn_1).
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("gate_c_fc_0", nn.Linear(channels, hidden, **factory))
        self.gate_c.add_module("gate_c_bn_1", nn.BatchNorm1d(hidden, **factory))
        self.gate_c.add_module("gate_c_relu_1", nn.ReLU(inplace=True))
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(hidden, channels, **factory))

    def forward(self, pooled):
        return self.gate_c(pooled)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution with ``nn.Conv2d``'s parameters, state_dict and results, which on CPU NCHW input runs as one
    batched matrix product (``_cpu.pointwise_conv``)."""

    def __init__(self, in_channels, out_channels, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size=1, device=device, dtype=dtype)

    def forward(self, x):
        y = _cpu.pointwise_conv(x, self.weight, self.bias)
        return super().forward(x) if y is None else y


class SpatialGate(nn.Module):
    """Spatial branch: (N, C, H, W) -> (N, 1, H, W) logits ``Ms``.

    Conv1x1(C, C/r) -> BN -> ReLU -> [Conv3x3(C/r, C/r, dilation d, padding d) -> BN -> ReLU] x k -> Conv1x1(C/r, 1).
    """

    def __init__(self, channels, hidden, dilation, num_dilated_convs, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_s = nn.Sequential()
        self.gate_s.add_module("gate_s_conv_reduce0", PointwiseConv2d(channels, hidden, **factory))
        self.gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(hidden, **factory))
        self.gate_s.add_module("gate_s_relu_reduce0", nn.ReLU(inplace=True))
        for i in range(num_dilated_convs):
            self.gate_s.add_module(f"gate_s_conv_di_{i}", nn.Conv2d(hidden, hidden, kernel_size=3, padding=dilation,
                                                                    dilation=dilation, **factory))
            self.gate_s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(hidden, **factory))
            self.gate_s.add_module(f"gate_s_relu_di_{i}", nn.ReLU(inplace=True))
        self.gate_s.add_module("gate_s_conv_final", nn.Conv2d(hidden, 1, kernel_size=1, **factory))

    def forward(self, x, reduced=None):
        """``reduced``: the 1x1 reduction's output when computed elsewhere (BAM's single-read front end); the branch
        then starts after that conv (forward hooks on this module still see its logits)."""
        if reduced is not None:  # the layers after the 1x1 conv (a Sequential slice would build a module per call)
            return _cpu.spatial_branch(list(self.gate_s)[1:], reduced)
        return _cpu.spatial_branch(self.gate_s, x)


class BAM(nn.Module):
    r"""Bottleneck Attention Module: :math:`F' = F + F \cdot \sigma(M_c(F) \oplus M_s(F))`.

    ``Mc`` pools ``F`` over H, W and runs a C -> C/r -> C MLP; ``Ms`` runs a 1x1 conv C -> C/r, dilated 3x3 convs and
    a 1x1 conv to one channel. On CUDA tensors the pooling and the fused apply step run as Triton kernels (one read
    of ``F``, one write of ``F'``); the convolutions, linear layers and norms are torch's.

    Args:
        channels: C, the number of channels of the input.
        reduction: r; the hidden width is ``channels // reduction`` (as in the authors' code). Default 16.
        dilation: d, dilation and padding of the 3x3 convs. Default 4.
        num_dilated_convs: number of dilated 3x3 convs in the spatial branch. Default 2.
        combine: ``"sum"`` (the paper's eq. 2, default) or ``"product"`` (the authors' code; use it for their
            checkpoints, and the default of ``add_bam`` and the model builders). ``state_dict()`` records it (in
            its metadata, not as a key), and loading into a BAM with the other one raises.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"``, ``"triton"``, or ``None`` to follow
            ``$BAM_TRITON_BACKEND`` at each call.
        single_read: on the Triton path, compute the pooling and the spatial branch's 1x1 conv in one kernel from one
            read of x, and its backward (dx, the conv's weight gradients) in one pass (``kernels/front.py``).
            Opt-in until a GPU run shows it faster; ``None`` follows ``$BAM_TRITON_SINGLE_READ`` (unset: off). Eager
            mode only: under ``torch.compile`` the standard Triton path runs.
        device, dtype: where and in which dtype to create the parameters, as for ``torch.nn`` layers.

    Shape:
        - Input: (N, C, H, W), NCHW or channels_last, fp32/fp16/bf16/fp64.
        - Output: (N, C, H, W), same dtype and memory format.

    In training mode the channel branch's BatchNorm1d needs N >= 2; use ``eval()`` for single-sample inputs.

    Example::

        >>> bam = BAM(256)
        >>> y = bam(torch.randn(8, 256, 56, 56))
    """

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4, num_dilated_convs: int = 2,
                 combine: str = "sum", backend: Optional[str] = None, single_read: Optional[bool] = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        _check_positive_int(channels, "channels")
        _check_positive_int(reduction, "reduction")
        _check_positive_int(dilation, "dilation")
        _check_positive_int(num_dilated_convs, "num_dilated_convs", minimum=0)
        if channels // reduction < 1:
            raise ValueError(f"channels // reduction must be >= 1 (the hidden width), got channels={channels}, "
                             f"reduction={reduction}")
        self.channels = channels
        self.reduction = reduction
        self.hidden = channels // reduction
        self.dilation = dilation
        self.num_dilated_convs = num_dilated_convs
        self.combine = check_combine(combine)
        self.backend = _backend.check_backend(backend)
        if single_read is not None and not isinstance(single_read, bool):
            raise TypeError(f"single_read must be True, False or None, got {single_read!r}")
        self.single_read = single_read
        self.channel_att = ChannelGate(channels, self.hidden, device=device, dtype=dtype)
        self.spatial_att = SpatialGate(channels, self.hidden, dilation, num_dilated_convs, device=device, dtype=dtype)

    # help(BAM.__init__) and IDEs show the constructor's own docstring (nn.Module's "Initialize internal Module
    # state" otherwise): the class docstring, which documents the arguments, in one place.
    __init__.__doc__ = __doc__

    @property
    def combine(self) -> str:
        """BAM's ⊕: ``"sum"`` or ``"product"``. Assigning another value raises (any other string would otherwise
        compute one of the two without a word)."""
        return self._combine

    @combine.setter
    def combine(self, value):
        self._combine = check_combine(value)

    def reset_parameters(self):
        """Re-initialise every layer with torch's defaults. (The authors' code meant to zero the spatial branch's
        BatchNorm weights, but its test never matched a key, so their models train from these defaults too.)"""
        reset_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        empty = check_traced(self._check_input, x)
        if empty:
            return bam_apply_unchecked(x, x.new_zeros(x.shape[:2]), x.new_zeros(x.shape[0], *x.shape[2:]),
                                       self.combine, "torch")
        path = resolve_path(x, self.backend)
        if path == "triton" and self._single_read() and not torch.compiler.is_compiling():
            return single_read_forward(x, self.channel_att, self.spatial_att.gate_s.gate_s_conv_reduce0,
                                       self.spatial_att, self.combine)
        return block_forward(x, self.channel_att, self.spatial_att, self.combine, path)

    def _single_read(self):
        return _backend.single_read_default() if self.single_read is None else self.single_read

    def _check_input(self, x):
        """Validate ``x`` for this BAM (errors name the argument); returns whether it is empty."""
        check_feature_map(x)
        if x.shape[1] != self.channels:
            raise ValueError(f"x must have {self.channels} channels (dim 1) for this BAM, got shape {tuple(x.shape)}")
        check_input_meets_parameters(x, self.channel_att.gate_c.gate_c_fc_0.weight, "bam")
        if self.training and x.shape[0] == 1:
            raise ValueError("BAM got a batch of 1 in training mode: the channel branch's BatchNorm1d needs more than "
                             "one sample to compute batch statistics. Train with batch size >= 2, or call .eval() to "
                             "use the running statistics.")
        return bool(x.numel() == 0)

    # ``combine`` has no parameters, so the weights alone do not say which ⊕ they were trained with. It travels in
    # the state_dict's metadata (``state_dict._metadata[prefix]``, kept by torch.save and torch.load, also with
    # weights_only=True), never as a key: the authors' checkpoints (no such entry) still load strictly, and our
    # state_dict still loads strictly into their modules, which ignore metadata entries they do not know.

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:  # state_dict() created this module's entry just before
            metadata.setdefault(prefix[:-1], {})["combine"] = self.combine

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = local_metadata.get("combine")
        if saved is not None and saved != self.combine:  # load_state_dict raises with it, whatever ``strict``
            error_msgs.append(f"{prefix[:-1] or 'BAM'}: these weights were saved by a BAM with combine={saved!r} and "
                              f"this BAM has combine={self.combine!r}, which gives other outputs with them; build it "
                              f"with combine={saved!r} (or set .combine = {saved!r}) before loading")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __prepare_scriptable__(self):
        raise RuntimeError("bam_triton.BAM cannot be compiled by torch.jit.script (it chooses between Triton kernels "
                           "and torch code at run time); use torch.export.export, torch.jit.trace or "
                           "torch.onnx.export, which record BAM as standard aten ops")

    def extra_repr(self):
        return (f"channels={self.channels}, reduction={self.reduction}, dilation={self.dilation}, "
                f"num_dilated_convs={self.num_dilated_convs}, combine={self.combine!r}, backend={self.backend!r}"
                + (f", single_read={self.single_read}" if self.single_read is not None else ""))
