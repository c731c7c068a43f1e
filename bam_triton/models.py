"""ResNets with BAM or CBAM, as in the papers (Park et al., BMVC 2018; Woo et al., ECCV 2018) and the authors' public
code (``ResidualNet(network_type, depth, num_classes, att_type)``), without torchvision.

* :func:`resnet18`, :func:`resnet34`, :func:`resnet50`, :func:`resnet101` build torchvision-layout ResNets
  (``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``; blocks with ``conv1/bn1/conv2/bn2[/conv3/bn3]`` and
  ``downsample.0/.1``; stride on the 3x3 conv of the bottleneck, torchvision's "v1.5"). ``attention`` picks what the
  authors' ``att_type`` picks:

  - ``"bam"`` (the default): :class:`~bam_triton.BAM` modules ``bam1``, ``bam2``, ``bam3`` after ``layer1``,
    ``layer2``, ``layer3`` (none after ``layer4``);
  - ``"cbam"``: one :class:`~bam_triton.CBAM` in every residual block, ``layerK.I.cbam``, applied to the block's
    output after its last BatchNorm and before the residual addition;
  - ``None``: the plain network, whose state_dict is exactly torchvision's.

  With ``"bam"`` or ``"cbam"`` the state_dict is the authors' layout, so their checkpoints load with
  :func:`load_official_checkpoint`. The older ``bam=True`` / ``bam=False`` still work: ``bam=True`` is
  ``attention="bam"``, ``bam=False`` means "no BAM" (``attention=None``, or ``"cbam"`` when that is passed too);
  ``bam=True`` with ``attention="cbam"`` or ``None``, or ``bam=False`` with ``attention="bam"``, is a ValueError.
* :func:`add_bam` inserts BAM after the stages of an existing torchvision-style ResNet, :func:`add_cbam` CBAM into
  its every block (forward hooks; the backbone's state_dict keys do not change).

Default ``combine="product"``: the networks the BAM paper evaluates were trained with the authors' code, whose BAM
multiplies the two branches (``sigmoid(Mc * Ms)``), and their released checkpoints are only correct with it. Pass
``combine="sum"`` for the paper's eq. 2 (:class:`~bam_triton.BAM`'s own default). ``combine`` has no parameters: our
``state_dict()`` records it in its metadata, and loading into a BAM with the other one raises; the authors' files
record nothing, and :func:`load_official_checkpoint` warns when one goes into a BAM that is not ``"product"``.
"""
import inspect
import os
import pickle
import re
import warnings
from collections import OrderedDict

import torch
from torch import nn

from ._messages import first_line
from .cbam import CBAM
from .module import BAM

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101",
           "add_bam", "add_cbam", "load_official_checkpoint", "CheckpointMismatchError", "CheckpointReadError", "bam_modules",
           "cbam_modules", "resolve_attention", "ATTENTIONS"]

# The stages BAM follows, in the paper and the authors' code: one BAM at each place the feature map shrinks.
BAM_STAGES = ("layer1", "layer2", "layer3")
# The stages whose every block gets a CBAM (all of them, in the CBAM paper and the authors' code).
CBAM_STAGES = ("layer1", "layer2", "layer3", "layer4")
# What ``attention=`` takes, as the authors' ``att_type`` ('BAM', 'CBAM', or anything else for none).
ATTENTIONS = ("bam", "cbam", None)
_MODULES = {"bam": BAM, "cbam": CBAM}
_UNSET = object()  # "not passed", to tell bam=True (the old default) from an explicit bam=True


def resolve_attention(bam=_UNSET, attention=_UNSET):
    """The attention of a network from the builders' ``bam`` (the older argument) and ``attention``: ``"bam"``,
    ``"cbam"`` or None. Neither passed: ``"bam"`` (the builders' default since before ``attention`` existed).
    ``bam=True`` is ``attention="bam"``; ``bam=False`` is "no BAM": ``attention=None`` or ``"cbam"``."""
    if attention is not _UNSET and attention not in ATTENTIONS:
        raise ValueError(f"attention must be 'bam', 'cbam' or None (the authors' att_type), got {attention!r}")
    if bam is _UNSET:
        return "bam" if attention is _UNSET else attention
    bam = bool(bam)  # as before attention existed: any truthy value adds BAM
    if attention is _UNSET:
        return "bam" if bam else None
    if bam != (attention == "bam"):
        raise ValueError(f"bam={bam} contradicts attention={attention!r}: bam=True means attention='bam' and "
                         f"bam=False means no BAM (attention=None or 'cbam'); pass attention alone")
    return attention


def _conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual: (N, inplanes, H, W) -> (N, planes, H/stride, W/stride). ``cbam``: None, or the
    block's CBAM (set by :class:`ResNet` or :func:`add_cbam`), applied after ``bn2``, before the residual addition."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.cbam = None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.cbam is not None:
            out = self.cbam(out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride, as torchvision) -> 1x1 with a residual:
    (N, inplanes, H, W) -> (N, 4 * planes, H/stride, W/stride). ``cbam`` as in :class:`BasicBlock`, after ``bn3``."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.cbam = None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.cbam is not None:
            out = self.cbam(out)
        return self.relu(out + identity)


def _init_weights(modules):
    """torchvision's ResNet init: convs kaiming-normal (fan_out, ReLU gain), BatchNorm weight 1 and bias 0; conv biases
    (only BAM's convs have one) 0, as the authors' network init sets them."""
    for module in modules:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _init_cbam(cbam):
    """The authors' init of a CBAM inside their ResNets (their loop over the network's state_dict keys): the 7x7 conv
    kaiming-normal (fan_out, gain √2, as their ``kaiming_normal(mode='fan_out')``), the spatial BatchNorm's weight
    **0** (their keys containing ``SpatialGate`` get 0, the other BatchNorms 1: the spatial gate starts at sigmoid(0)
    = 0.5 everywhere and learns from there), every bias 0; the MLP's weights keep torch's Linear defaults (their
    keys contain neither ``conv`` nor ``bn``)."""
    for module in cbam.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)


def _attention_kwargs(attention, kwargs):
    """``kwargs`` checked against what ``attention``'s module takes (errors name the options); ``combine`` defaults
    to ``"product"`` for BAM. With no attention the options are unused, as they always were with ``bam=False``."""
    if attention is None:
        return {}
    allowed = [name for name in inspect.signature(_MODULES[attention]).parameters
               if name not in ("channels", "device", "dtype")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"{', '.join(unknown)}: not an option of attention={attention!r}, whose modules take "
                        f"{', '.join(allowed)}")
    kwargs = dict(kwargs)
    if attention == "bam":
        kwargs.setdefault("combine", "product")
    return kwargs


def _last_bn_name(block):
    """The name of a ResNet block's last BatchNorm2d (``bn3`` of a Bottleneck, ``bn2`` of a BasicBlock), whose output
    CBAM takes, or None when ``block`` does not look like one (torchvision's attribute names)."""
    names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3") if hasattr(block, "bn3") else ("conv1", "bn1", "conv2",
                                                                                            "bn2")
    if not all(isinstance(getattr(block, name, None), nn.Module) for name in names):
        return None
    return names[-1] if isinstance(getattr(block, names[-1]), nn.BatchNorm2d) else None


class ResNet(nn.Module):
    """ResNet in torchvision's layout, with BAM after ``layer1``, ``layer2`` and ``layer3``, CBAM in every block, or no
    attention.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        num_classes: outputs of ``fc``. Default 1000.
        bam: the older way to choose: True is ``attention="bam"``, False "no BAM" (see :func:`resolve_attention`).
        cifar: 3x3 stride-1 stem conv and no max-pool (``maxpool`` is ``nn.Identity``), for 32x32 inputs: stage maps
            are 32², 16², 8², 4² instead of the ImageNet stem's 56², 28², 14², 7² at 224.
        width: channels of the stem and of ``layer1``'s 3x3 convs (64 in the standard networks); stage k uses
            ``width * 2**(k-1)``. A smaller width gives a cheap network for CPU experiments.
        zero_init_residual: zero the last BN weight of each residual branch (torchvision's option). Default False.
        attention: ``"bam"`` (``bam1``, ``bam2``, ``bam3`` after layer1..3; the default when neither this nor ``bam``
            is passed), ``"cbam"`` (``layerK.I.cbam`` in every block, after its last BatchNorm, before the residual
            addition) or None.
        **attention_kwargs: passed to every :class:`~bam_triton.BAM` (``reduction``, ``dilation``,
            ``num_dilated_convs``, ``combine``, ``backend``, ``single_read``; ``combine`` defaults to ``"product"``
            here, see the module docstring) or :class:`~bam_triton.CBAM` (``reduction``, ``pool_types``,
            ``no_spatial``, ``backend``); an option the chosen module does not take is a TypeError.

    Shape:
        - Input: (N, 3, H, W).
        - Output: (N, num_classes) logits.

    Initialisation as torchvision's: every conv (BAM's too) kaiming-normal with ``mode="fan_out"``, every BatchNorm
    weight 1 and bias 0; BAM's conv biases 0, as the authors' network init sets them; linear layers keep torch's
    defaults. CBAM as the authors' init leaves it (:func:`_init_cbam`: its spatial BatchNorm's weight 0). The backbone
    is initialised before the attention modules are created, so one seed gives the same backbone weights with BAM,
    with CBAM and without attention.
    """

    def __init__(self, block, layers, num_classes=1000, bam=_UNSET, cifar=False, width=64, zero_init_residual=False,
                 attention=_UNSET, **attention_kwargs):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give the number of blocks of 4 stages, got {layers!r}")
        attention = resolve_attention(bam, attention)
        attention_kwargs = _attention_kwargs(attention, attention_kwargs)
        self.cifar = cifar
        self.inplanes = width
        if cifar:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        # The CIFAR stem keeps full resolution; Identity has no state, so the key layout does not change.
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        # The backbone is initialised before the attention modules are built, so that for one torch seed the backbone
        # weights are the same with and without them (a fair comparison needs that).
        _init_weights(self.modules())
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)
                elif isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)
        # A flag rather than "is bam1 registered", so that add_bam (which registers bam1 and a hook) never applies
        # BAM twice on a network built without BAM.
        self.has_bam = attention == "bam"
        if attention == "bam":
            self.bam1 = BAM(width * block.expansion, **attention_kwargs)
            self.bam2 = BAM(width * 2 * block.expansion, **attention_kwargs)
            self.bam3 = BAM(width * 4 * block.expansion, **attention_kwargs)
            for bam_module in (self.bam1, self.bam2, self.bam3):
                _init_weights(bam_module.modules())
        elif attention == "cbam":
            for stage in CBAM_STAGES:
                for block_module in getattr(self, stage):
                    block_module.cbam = CBAM(getattr(block_module, _last_bn_name(block_module)).num_features,
                                             **attention_kwargs)
                    _init_cbam(block_module.cbam)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        stage = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        if self.has_bam:
            x = self.bam1(x)
        x = self.layer2(x)
        if self.has_bam:
            x = self.bam2(x)
        x = self.layer3(x)
        if self.has_bam:
            x = self.bam3(x)
        x = self.layer4(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(block, layers, num_classes, bam, cifar, attention, kwargs):
    return ResNet(block, layers, num_classes=num_classes, bam=bam, cifar=cifar, attention=attention, **kwargs)


def resnet18(num_classes=1000, bam=_UNSET, cifar=False, attention=_UNSET, **kwargs):
    """ResNet-18: 11,689,512 parameters; 11,712,503 with BAM (after layer1..3: channels 64, 128, 256); 11,779,392
    with CBAM (8, one per block: channels 64, 64, 128, 128, 256, 256, 512, 512), the authors'
    ``ResidualNet("ImageNet", 18, 1000, att_type)``.

    ``attention``: ``"bam"`` (default), ``"cbam"`` or None; ``bam``: the older True/False (see
    :func:`resolve_attention`). ``kwargs``: ``width``, ``zero_init_residual`` and the attention module's options: BAM's
    ``reduction``, ``dilation``, ``num_dilated_convs``, ``combine`` (default ``"product"``, the authors' code),
    ``backend``, ``single_read``; CBAM's ``reduction``, ``pool_types``, ``no_spatial``, ``backend``. See
    :class:`ResNet`."""
    return _resnet(BasicBlock, (2, 2, 2, 2), num_classes, bam, cifar, attention, kwargs)


def resnet34(num_classes=1000, bam=_UNSET, cifar=False, attention=_UNSET, **kwargs):
    """ResNet-34: 21,797,672 parameters; with CBAM (16) 21,960,468. BAM after layer1..3: channels 64, 128, 256. See
    :func:`resnet18` for the arguments."""
    return _resnet(BasicBlock, (3, 4, 6, 3), num_classes, bam, cifar, attention, kwargs)


def resnet50(num_classes=1000, bam=_UNSET, cifar=False, attention=_UNSET, **kwargs):
    """ResNet-50: 25,557,032 parameters; 25,915,099 with BAM (after layer1..3: channels 256, 512, 1024), the layout of
    the authors' released ResNet-50+BAM checkpoint; 28,089,624 with CBAM (16, channels 256 to 2048). See
    :func:`resnet18` for the arguments."""
    return _resnet(Bottleneck, (3, 4, 6, 3), num_classes, bam, cifar, attention, kwargs)


def resnet101(num_classes=1000, bam=_UNSET, cifar=False, attention=_UNSET, **kwargs):
    """ResNet-101: 44,549,160 parameters; with CBAM (33) 49,330,172. BAM after layer1..3: channels 256, 512, 1024.
    See :func:`resnet18` for the arguments."""
    return _resnet(Bottleneck, (3, 4, 23, 3), num_classes, bam, cifar, attention, kwargs)


def bam_modules(model):
    """``[(qualified name, BAM), ...]`` for every BAM inside ``model``, in registration order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, BAM)]


def cbam_modules(model):
    """``[(qualified name, CBAM), ...]`` for every CBAM inside ``model``, in registration order (``layer1.0.cbam``,
    ``layer1.1.cbam``, ...)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, CBAM)]


# ----------------------------------------------------------------------------------------------------------------------
# add_bam: BAM after the stages of an existing network
# ----------------------------------------------------------------------------------------------------------------------


class _ApplyHook:
    """Forward hook: returns ``attention(output)`` in place of the hooked module's output (a stage's, for
    :func:`add_bam`; a block's last BatchNorm's, for :func:`add_cbam`).

    A small class rather than a closure so that ``copy.deepcopy(model)`` copies the reference along with the model
    (the copy's hook then calls the copy's module, not the original's) and ``torch.save(model)`` can pickle it.
    """

    def __init__(self, attention):
        self.attention = attention

    def __call__(self, module, inputs, output):
        return self.attention(output)


def _bam_name(stage_name):
    """``layerK`` -> ``bamK`` (the authors' names: add_bam on a torchvision ResNet gives their key layout);
    any other stage ``a.b`` -> ``bam_a_b``."""
    match = re.fullmatch(r"layer(\d+)", stage_name)
    return f"bam{match.group(1)}" if match else "bam_" + stage_name.replace(".", "_")


def _stage_output_channels(model, stages, example_input, default_input):
    """Run ``model`` once on ``example_input`` in eval mode and record dim 1 of each stage's output;
    ``default_input``: whether ``example_input`` is add_bam's default, not the caller's (for the error message)."""
    channels = {}
    handles = []
    for name, stage in stages.items():
        def record(module, inputs, output, name=name):
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                raise TypeError(f"add_bam: stage {name!r} must return an (N, C, H, W) tensor, got "
                                f"{type(output).__name__} of shape {tuple(getattr(output, 'shape', ()))}")
            channels[name] = output.shape[1]
        handles.append(stage.register_forward_hook(record))
    # Eval mode, so the dry run neither updates BN running statistics nor needs a batch > 1; each module's own flag
    # is restored afterwards (a model may deliberately keep some modules in eval mode).
    training_flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    except RuntimeError as error:  # torch's shape and dtype errors, deep inside the model
        given = (f"the default example_input, zeros{tuple(example_input.shape)}" if default_input else
                 f"example_input of shape {tuple(example_input.shape)}")
        raise ValueError(f"add_bam infers each stage's channels from one forward pass, and the model failed on "
                         f"{given}: {type(error).__name__}: {error}. Pass example_input=<a batch your model accepts>, "
                         f"e.g. torch.zeros(1, 1, 64, 64) for 1-channel images") from error
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training_flags.items():
            module.training = flag
    missing = [name for name in stages if name not in channels]
    if missing:
        raise RuntimeError(f"add_bam: stages {missing} did not run in the model's forward pass")
    return channels


def add_bam(model, stages=BAM_STAGES, example_input=None, **bam_kwargs):
    """Insert a BAM after each of ``stages`` of an existing ResNet-style network, in place; returns ``model``.

    Each BAM is registered as a child of ``model`` (named ``bamK`` for a stage ``layerK``, else ``bam_<stage>``) and
    applied by a forward hook on its stage that replaces the stage's output ``F`` with ``BAM(F)``. Why hooks rather
    than wrapping each stage in ``nn.Sequential(stage, BAM)``: the backbone's state_dict keys stay unchanged
    (pretrained backbone weights still load), and on a torchvision ResNet the new keys are exactly the authors'
    ``bam1.*``, ``bam2.*``, ``bam3.*``, so :func:`load_official_checkpoint` loads their ResNet+BAM checkpoints into it.
    BAM parameters are ordinary parameters of ``model`` (optimisers, ``.to()``, DDP see them). Caveat: the hooks
    live outside ``forward``, so ``print(model)`` lists the BAMs at the end rather than in place, and tools that
    ignore hooks (``torch.fx.symbolic_trace``, ``torch.jit.script``) do not see them.

    Channel counts are inferred by a dry run: ``model(example_input)`` in eval mode under ``no_grad`` with hooks
    recording each stage's output channels (default input ``zeros(1, 3, 64, 64)`` on the model's device and dtype).

    Args:
        model: an ``nn.Module`` whose submodules named in ``stages`` each return an (N, C, H, W) tensor.
        stages: qualified submodule names (``model.get_submodule(name)``). Default ``("layer1", "layer2", "layer3")``.
        example_input: input for the dry run, when (1, 3, 64, 64) does not fit the model (e.g. ``zeros(1, 1, 64,
            64)`` for 1-channel images).
        **bam_kwargs: for each :class:`~bam_triton.BAM` (``reduction``, ``dilation``, ``combine``, ``backend``, ...);
            ``combine`` defaults to ``"product"`` here (the authors' code, which their checkpoints need), where
            ``BAM`` itself defaults to ``"sum"`` (the paper); pass ``combine="sum"`` for the paper's eq. 2.

    Raises:
        ValueError: a stage is named twice, is not a submodule of ``model`` or already has a BAM from an earlier call;
            the dry run fails on ``example_input``.
    """
    if isinstance(stages, str):
        stages = (stages,)
    if len(set(stages)) != len(stages):
        raise ValueError(f"add_bam: stages must be distinct, got {stages!r}")
    bam_kwargs.setdefault("combine", "product")
    stage_modules = {}
    for name in stages:
        try:
            stage_modules[name] = model.get_submodule(name)
        except AttributeError as error:
            children = ", ".join(child for child, _ in model.named_children())
            raise ValueError(f"add_bam: stages names submodules of model (as model.get_submodule does), and model has "
                             f"no {name!r} ({error}); its top-level submodules: {children or 'none'}") from error
    for name in stages:
        bam_name = _bam_name(name)
        if hasattr(model, bam_name):
            raise ValueError(f"add_bam: model already has an attribute {bam_name!r}; is there a BAM after {name!r} "
                             f"already?")
    default_input = example_input is None
    if default_input:
        reference = next(iter(model.parameters()), None)
        example_input = torch.zeros(1, 3, 64, 64, device=None if reference is None else reference.device,
                                    dtype=None if reference is None else reference.dtype)
    channels = _stage_output_channels(model, stage_modules, example_input, default_input)
    reference = next(iter(model.parameters()), None)
    for name, stage in stage_modules.items():
        bam = BAM(channels[name], **bam_kwargs)
        if reference is not None:
            bam.to(device=reference.device, dtype=reference.dtype)
        bam.train(stage.training)
        model.add_module(_bam_name(name), bam)
        stage.register_forward_hook(_ApplyHook(bam))
    return model


# ----------------------------------------------------------------------------------------------------------------------
# add_cbam: CBAM into every block of an existing network
# ----------------------------------------------------------------------------------------------------------------------


def _residual_blocks(model, stages):
    """``[(qualified name, block, name of its last BatchNorm), ...]`` of the blocks of ``stages``; a ValueError, naming
    the stage or block and what add_cbam needs, for anything that is not a torchvision-style ResNet stage of blocks."""
    blocks = []
    for stage_name in stages:
        try:
            stage = model.get_submodule(stage_name)
        except AttributeError:
            raise ValueError(f"add_cbam: the model has no submodule {stage_name!r}. CBAM goes into the residual blocks "
                             f"of a torchvision-style ResNet (stages layer1..layer4, nn.Sequential of BasicBlock or "
                             f"Bottleneck blocks); name your stages with stages=...") from None
        if not isinstance(stage, nn.Sequential) or len(stage) == 0:
            raise ValueError(f"add_cbam: {stage_name!r} is a {type(stage).__name__}, not a non-empty nn.Sequential of "
                             f"residual blocks (as a torchvision ResNet's layer1..layer4)")
        for index, block in enumerate(stage):
            name = f"{stage_name}.{index}"
            bn_name = _last_bn_name(block)
            if bn_name is None:
                raise ValueError(f"add_cbam: {name} ({type(block).__name__}) is not a BasicBlock or Bottleneck: CBAM "
                                 f"goes after a block's last BatchNorm2d (bn2 of a BasicBlock with conv1, bn1, conv2; "
                                 f"bn3 of a Bottleneck with conv1..3, bn1..3), before the residual addition")
            if getattr(block, "cbam", None) is not None:
                raise ValueError(f"add_cbam: {name} already has an attribute 'cbam' ({type(block.cbam).__name__}); "
                                 f"is there a CBAM in it already?")
            blocks.append((name, block, bn_name))
    return blocks


def add_cbam(model, stages=CBAM_STAGES, **cbam_kwargs):
    """Put a CBAM into every residual block of an existing torchvision-style ResNet, in place; returns ``model``.

    Where the authors' CBAM-ResNets have it: on the block's residual branch after its last BatchNorm (``bn2`` of a
    BasicBlock, ``bn3`` of a Bottleneck), before the residual addition. Each CBAM is registered as the block's child
    ``cbam`` (so on a torchvision ResNet the new keys are exactly the authors' ``layerK.I.cbam.*`` and
    :func:`load_official_checkpoint` loads their ResNet+CBAM checkpoints into it) and applied by a forward hook on
    that BatchNorm, which replaces its output ``F`` with ``CBAM(F)``; the backbone's state_dict keys do not change.
    The blocks of :class:`ResNet` apply their ``cbam`` themselves (no hook). Channel counts come from each block's last
    BatchNorm (``num_features``), so no dry run is needed; each CBAM takes that BatchNorm's device and dtype and the
    block's train/eval mode, and the authors' initialisation (its spatial BatchNorm's weight 0, see
    :class:`ResNet`). Caveat for hooked blocks (as for :func:`add_bam`): ``print(model)`` lists each ``cbam`` at the
    end of its block, and tools that ignore hooks (``torch.fx.symbolic_trace``, ``torch.jit.script``) do not see it.

    Args:
        model: an ``nn.Module`` whose submodules named in ``stages`` are ``nn.Sequential`` stages of BasicBlock /
            Bottleneck blocks (torchvision's attribute names ``conv1``, ``bn1``, ``conv2``, ``bn2`` [, ``conv3``,
            ``bn3``]).
        stages: qualified submodule names. Default ``("layer1", "layer2", "layer3", "layer4")``: every block.
        **cbam_kwargs: for each :class:`~bam_triton.CBAM` (``reduction``, ``pool_types``, ``no_spatial``,
            ``backend``).

    Raises:
        ValueError: a stage is missing, named twice or not a stage of residual blocks, or a block already has a
            ``cbam``; nothing is changed then.
    """
    if isinstance(stages, str):
        stages = (stages,)
    if len(set(stages)) != len(stages):
        raise ValueError(f"add_cbam: stages must be distinct, got {stages!r}")
    cbam_kwargs = _attention_kwargs("cbam", cbam_kwargs)
    blocks = _residual_blocks(model, stages)
    # Every CBAM is built before any is attached, so that a bad option leaves the model unchanged.
    cbams = [CBAM(getattr(block, bn_name).num_features, **cbam_kwargs) for _, block, bn_name in blocks]
    for (_, block, bn_name), cbam in zip(blocks, cbams):
        bn = getattr(block, bn_name)
        reference = next(iter(bn.buffers()), None) if bn.weight is None else bn.weight
        _init_cbam(cbam)
        if reference is not None:
            cbam.to(device=reference.device, dtype=reference.dtype)
        cbam.train(block.training)
        block.cbam = cbam
        if not isinstance(block, (BasicBlock, Bottleneck)):
            bn.register_forward_hook(_ApplyHook(cbam))
    return model


# ----------------------------------------------------------------------------------------------------------------------
# The authors' checkpoints
# ----------------------------------------------------------------------------------------------------------------------


class CheckpointReadError(ValueError):
    """A file given to :func:`load_official_checkpoint` is not one ``torch.load`` reads, or holds no state_dict; the
    message names it."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's state_dict does not match the model. Attributes ``missing``, ``unexpected`` (key lists) and
    ``shape_mismatches`` (``[(key, checkpoint shape, model shape), ...]``), ``hint`` (what to change, if known: lines
    that the message ends with), ``checkpoint_attention`` (the attention kinds the checkpoint holds, e.g. ``["cbam"]``
    or ``[]``, where they are not the model's; else None), so that a command line can say which option to pass, and
    ``combine_mismatches`` (``[(BAM name, the checkpoint's combine, the model's), ...]``: BAMs whose weights our
    state_dict recorded with the other ``combine``)."""

    def __init__(self, missing, unexpected, shape_mismatches, source, hint=(), checkpoint_attention=None,
                 combine_mismatches=()):
        self.missing, self.unexpected, self.shape_mismatches = missing, unexpected, shape_mismatches
        self.hint = [line.strip() for line in hint]
        self.checkpoint_attention = checkpoint_attention
        self.combine_mismatches = list(combine_mismatches)
        lines = [f"checkpoint {source} does not match the model:"]
        if missing:
            lines.append(f"  {len(missing)} missing key(s) (in the model, not in the checkpoint):")
            lines += [f"    {key}" for key in missing]
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s) (in the checkpoint, not in the model):")
            lines += [f"    {key}" for key in unexpected]
        if shape_mismatches:
            lines.append(f"  {len(shape_mismatches)} shape mismatch(es):")
            lines += [f"    {key}: checkpoint {tuple(ckpt)} vs model {tuple(ours)}"
                      for key, ckpt, ours in shape_mismatches]
        if combine_mismatches:
            saved = sorted({theirs for _, theirs, _ in combine_mismatches})
            lines.append(f"  {len(combine_mismatches)} BAM(s) saved with combine={' / '.join(map(repr, saved))}, which "
                         f"the model's BAMs do not use (other outputs with these weights):")
            lines += [f"    {name or 'BAM'}: checkpoint combine={theirs!r}, model combine={ours!r}"
                      for name, theirs, ours in combine_mismatches]
            if len(saved) == 1:
                lines.append(f"  build the model with combine={saved[0]!r}")
        lines += hint
        if missing or unexpected or shape_mismatches:
            lines.append("  (is the architecture right: depth, num_classes, cifar, width, attention, its reduction?)")
        super().__init__("\n".join(lines))


# The keys of each attention module in the authors' ResNets: bamK.* after a stage, layerK.I.cbam.* in a block.
_ATTENTION_KEYS = {"bam": re.compile(r"^bam\d+\."), "cbam": re.compile(r"(^|\.)cbam\.")}


def attention_kinds(keys):
    """The attention modules (``"bam"``, ``"cbam"``) whose keys occur among state_dict ``keys``."""
    return [kind for kind, pattern in _ATTENTION_KEYS.items() if any(pattern.search(key) for key in keys)]


def describe_attention(kinds):
    """``kinds`` (from :func:`attention_kinds`) in words: "BAM", "BAM and CBAM", "no attention module"."""
    return " and ".join(kind.upper() for kind in kinds) or "no attention module"


def _attention_hint(in_checkpoint, in_model):
    """Lines for the mismatch report when the checkpoint's attention modules are not the model's: which
    ``attention=`` the checkpoint needs."""
    if in_checkpoint == in_model:
        return []
    line = f"  the checkpoint has {describe_attention(in_checkpoint)}, the model {describe_attention(in_model)}"
    if len(in_checkpoint) <= 1:
        line += f": build the model with attention={in_checkpoint[0] if in_checkpoint else None!r}"
    return [line]


def _extract_state_dict(checkpoint):
    """The state_dict inside the authors' training checkpoint, or the checkpoint itself when it is one."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"checkpoint must be a dict (a training checkpoint or a state_dict), got "
                        f"{type(checkpoint).__name__}")
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        return checkpoint["state_dict"]
    not_tensors = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"checkpoint has no 'state_dict' entry and is not a state_dict itself (non-tensor entries: "
                         f"{not_tensors[:5]})")
    return checkpoint


def _strip_module(key):
    """A key (or metadata prefix) of a DataParallel/DDP state_dict without its ``module`` level."""
    return "" if key == "module" else key[len("module."):] if key.startswith("module.") else key


def load_official_checkpoint(model, path_or_dict, weights_only=True):
    """Load the authors' ResNet+BAM or ResNet+CBAM checkpoint (or any state_dict in that layout) into ``model``,
    strictly.

    Accepts what their ImageNet training script saves with ``torch.save`` (``{'epoch', 'arch', 'state_dict',
    'best_prec1', 'optimizer'}``, state_dict keys prefixed ``module.`` by DataParallel; the released file is named
    ``*.pth.tar`` but is a plain ``torch.save`` file), a bare state_dict, with or without ``module.``, as a path or
    an already loaded dict. ``module.`` is stripped; ``model`` may itself be wrapped in DataParallel/DDP. Missing
    ``num_batches_tracked`` buffers (files from PyTorch < 0.4.1) are filled with 0; nothing else is forgiven. A
    state_dict saved by bam_triton records each BAM's ``combine``, and BAMs of ``model`` with another one raise.

    Args:
        model: e.g. ``resnet50()`` for their ResNet-50+BAM (default ``combine="product"``, the one their
            checkpoints need), ``resnet50(attention="cbam")`` for their ResNet-50+CBAM.
        path_or_dict: a file path or the loaded checkpoint.
        weights_only: passed to ``torch.load``. The authors' files hold tensors, numbers and strings only, so the safe
            default loads them; pass False only for a file you trust that needs it.

    Returns:
        The checkpoint's other entries (``epoch``, ``arch``, ``best_prec1``; without ``state_dict`` and
        ``optimizer``); ``{}`` for a bare state_dict.

    Raises:
        CheckpointMismatchError: keys or shapes differ; the message lists every missing and unexpected key and every
            shape mismatch, and says which ``attention=`` the checkpoint needs when its attention modules (``bamK.*``,
            ``layerK.I.cbam.*``) are not the model's; or BAMs of ``model`` use another ``combine`` than the one the
            checkpoint recorded (``combine_mismatches``).
        CheckpointReadError: (a ``ValueError``) the file is not one ``torch.load`` reads (not a checkpoint,
            truncated, or holding objects that ``weights_only=True`` refuses), or what it holds is no state_dict (a
            list, a dict of other things); the message names the file.
    """
    if isinstance(path_or_dict, (str, os.PathLike)):
        source = os.fspath(path_or_dict)
        try:
            checkpoint = torch.load(source, map_location="cpu", weights_only=weights_only)
        except Exception as error:  # not a file torch.load reads: its unpickler fails in many ways on other bytes
            if isinstance(error, pickle.UnpicklingError):  # torch's own message assumes a real pickle
                why = (f"not a torch checkpoint, or one holding objects that weights_only={weights_only} refuses "
                       f"(weights_only=False loads those: only for files you trust)")
            else:
                why = f"{type(error).__name__}: {first_line(error)}"
            raise CheckpointReadError(f"load_official_checkpoint: {source!r} cannot be read: {why}") from error
        try:
            state_dict = _extract_state_dict(checkpoint)
        except (TypeError, ValueError) as error:  # torch.load read it, but it holds no state_dict
            raise CheckpointReadError(f"load_official_checkpoint: {source!r} holds no state_dict: {error}") from error
    else:
        source = "(dict)"
        checkpoint = path_or_dict
        state_dict = _extract_state_dict(checkpoint)
    metadata = getattr(state_dict, "_metadata", {})  # our own files record each BAM's combine there (BAM's docstring)
    state_dict = OrderedDict(((_strip_module(key), value) for key, value in state_dict.items()))
    state_dict._metadata = OrderedDict((_strip_module(key), value) for key, value in metadata.items())
    checkpoint_keys = list(state_dict)
    target = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
    expected = target.state_dict()
    for key, value in expected.items():
        if key.endswith(".num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros_like(value)
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    shape_mismatches = [(key, state_dict[key].shape, expected[key].shape) for key in expected
                        if key in state_dict and isinstance(state_dict[key], torch.Tensor)
                        and state_dict[key].shape != expected[key].shape]
    if missing or unexpected or shape_mismatches:
        in_checkpoint, in_model = attention_kinds(checkpoint_keys), attention_kinds(expected)
        raise CheckpointMismatchError(missing, unexpected, shape_mismatches, source,
                                      _attention_hint(in_checkpoint, in_model),
                                      None if in_checkpoint == in_model else in_checkpoint)
    combine_mismatches = [(name, saved, bam.combine) for name, bam in bam_modules(target)
                          for saved in [state_dict._metadata.get(name, {}).get("combine")]
                          if saved is not None and saved != bam.combine]
    if combine_mismatches:  # our own files record each BAM's combine (BAM's docstring); the authors' record none
        raise CheckpointMismatchError([], [], [], source, combine_mismatches=combine_mismatches)
    not_product = [name for name, bam in bam_modules(target)
                   if bam.combine != "product" and "combine" not in state_dict._metadata.get(name, {})]
    if not_product:
        warnings.warn(f"BAM modules {not_product} use combine='sum'; the authors' checkpoints were trained with "
                      f"combine='product' and give wrong outputs otherwise", stacklevel=2)
    target.load_state_dict(state_dict, strict=True)
    if "state_dict" not in checkpoint:
        return {}
    return {key: value for key, value in checkpoint.items() if key not in ("state_dict", "optimizer")}
