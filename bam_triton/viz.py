"""BAM's and CBAM's attention maps, captured with forward hooks and drawn over the input images (like the papers'
figures).

What is shown: each module's attention ``A`` that scales the features is a (C, H, W) volume per image: BAM's
``sigmoid(Mc ⊕ Ms)`` (``F' = F · (1 + A)``), CBAM's ``sigmoid(Mc) · sigmoid(Ms)`` (``F' = F · A``, its channel gate
then its spatial gate). The figure shows its mean over channels, ``mean_c A`` (N, H, W) — the "combined" map —
because that is what the module actually applies, channel attention included. ``kind="spatial"`` shows
``sigmoid(Ms)`` (N, H, W), the spatial attention alone (what the authors' figures name the spatial attention); it is
the same for every channel. CBAM's channel attention ``sigmoid(Mc)`` is one number per channel, with no spatial extent:
its combined map is ``mean_c sigmoid(Mc)`` times its spatial map, so the two differ per image by that factor (which
``scale="fixed"`` shows; the per-map colour scale hides it). Each map is upsampled bilinearly to the image size and
drawn with a colour map over the image.

The hooks sit on each BAM's ``channel_att`` (output ``Mc``, (N, C) logits) and ``spatial_att`` (output ``Ms``,
(N, 1, H, W) logits), on each CBAM's ``ChannelGate`` ((N, C) logits, the MLP's outputs summed over the pool types)
and ``SpatialGate`` ((N, 1, H, W) logits after its BatchNorm); the modules are not changed and nothing is captured once
the recorder closes.

Matplotlib is imported only when plotting, with the Agg backend (no display needed).
"""
import re

import torch
import torch.nn.functional as F

from .cbam import CBAM
from .module import BAM

__all__ = ["AttentionRecorder", "attention_maps", "last_block_per_stage", "synthetic_images", "plot_attention",
           "attention_figure", "IMAGENET_MEAN", "IMAGENET_STD"]

KINDS = ("combined", "spatial")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _gates(module):
    """``(channel branch, spatial branch, how they combine)`` of a BAM or a CBAM: ``how`` is BAM's ``combine``
    (``"sum"``, ``"product"``) or ``"cbam"``; the spatial branch is None for a CBAM built with ``no_spatial``."""
    if isinstance(module, BAM):
        return module.channel_att, module.spatial_att, module.combine
    return module.ChannelGate, getattr(module, "SpatialGate", None), "cbam"


class AttentionRecorder:
    """Context manager recording every BAM's and CBAM's branch logits during forward passes of ``model``.

    After a forward pass inside the ``with`` block, ``recorder.logits[name]`` holds ``(mc, ms, how)`` for each
    module (``name`` as in ``model.named_modules()``): ``mc`` (N, C) and ``ms`` (N, 1, H, W), detached fp32 copies on
    the CPU, from the most recent forward; ``how`` is a BAM's ``combine`` or ``"cbam"``.

        >>> with AttentionRecorder(model) as recorder:
        ...     model(images)
        >>> maps = recorder.maps("combined")   # {name: (N, H, W)}
    """

    def __init__(self, model):
        self.model = model
        self.modules = [(name, module) for name, module in model.named_modules() if isinstance(module, (BAM, CBAM))]
        if not self.modules:
            raise ValueError("model contains no BAM or CBAM module: nothing to record")
        flat = [name for name, module in self.modules if _gates(module)[1] is None]
        if flat:
            raise ValueError(f"CBAM modules {flat} have no spatial gate (no_spatial=True): their attention has no "
                             f"spatial map to record")
        self.logits = {}
        self._partial = {}
        self._handles = []

    def __enter__(self):
        for name, module in self.modules:
            channel, spatial, _ = _gates(module)
            self._handles.append(channel.register_forward_hook(self._hook(name, "mc")))
            self._handles.append(spatial.register_forward_hook(self._hook(name, "ms")))
        return self

    def __exit__(self, *exc_info):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def _hook(self, name, which):
        how = _gates(dict(self.modules)[name])[2]

        def record(module, inputs, output):
            # Copy now: the module's caller may reuse or modify the buffer after the hook returns.
            self._partial.setdefault(name, {})[which] = output.detach().float().cpu().clone()
            parts = self._partial[name]
            if "mc" in parts and "ms" in parts:
                self.logits[name] = (parts.pop("mc"), parts.pop("ms"), how)

        return record

    def maps(self, kind="combined"):
        """``{module name: (N, H, W) tensor in [0, 1]}`` for the last forward pass; ``kind`` is ``"combined"``
        (``mean_c`` of the attention applied: BAM's ``sigmoid(Mc ⊕ Ms)``, CBAM's ``sigmoid(Mc)·sigmoid(Ms)``) or
        ``"spatial"`` (``sigmoid(Ms)``)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not self.logits:
            raise RuntimeError("no attention recorded: run a forward pass of the model inside the `with` block")
        out = {}
        for name, (mc, ms, how) in self.logits.items():
            if kind == "spatial":
                out[name] = torch.sigmoid(ms[:, 0])
            elif how == "cbam":  # separable: the mean over channels of a_c · b is mean_c(a) · b
                out[name] = torch.sigmoid(mc).mean(dim=1)[:, None, None] * torch.sigmoid(ms[:, 0])
            else:
                mc4 = mc[:, :, None, None]  # (N, C, 1, 1) against ms (N, 1, H, W)
                logits = mc4 + ms if how == "sum" else mc4 * ms
                out[name] = torch.sigmoid(logits).mean(dim=1)
        return out


def last_block_per_stage(maps):
    """The maps of the CBAM in the last block of each stage (``layerK.I.cbam`` with the largest I per K), in stage
    order: a CBAM-ResNet has one per block (16 in ResNet-50), too many columns for one figure. Other names are kept."""
    last = {}
    for name in maps:
        match = re.fullmatch(r"(.*layer\d+)\.(\d+)\.cbam", name)
        stage, index = (match.group(1), int(match.group(2))) if match else (name, 0)
        if stage not in last or index > last[stage][0]:
            last[stage] = (index, name)
    return {name: maps[name] for _, name in last.values()}


def attention_maps(model, images, kind="combined", normalize=None):
    """Run ``model`` in eval mode on ``images`` and return ``{module name: (N, H, W) map in [0, 1]}``.

    Args:
        model: a network containing BAM or CBAM modules.
        images: (N, 3, H, W) in [0, 1] (what is displayed).
        kind: ``"combined"`` or ``"spatial"`` (see the module docstring).
        normalize: ``(mean, std)`` per channel applied before the model (e.g. ImageNet's), or None.
    """
    x = images
    if normalize is not None:
        mean, std = (torch.tensor(v, dtype=images.dtype).view(1, -1, 1, 1) for v in normalize)
        x = (images - mean) / std
    reference = next(iter(model.parameters()))
    was_training = model.training
    model.eval()
    try:
        with AttentionRecorder(model) as recorder, torch.no_grad():
            model(x.to(device=reference.device, dtype=reference.dtype))
    finally:
        model.train(was_training)
    return recorder.maps(kind)


def synthetic_images(n, size=224, seed=0):
    """(n, 3, size, size) images in [0, 1]: coloured discs, squares and bars on a smooth noisy background, so that
    attention has objects to find. Deterministic for a given ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    coords = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    # A low-frequency background: coarse noise upsampled, in muted colours.
    background = F.interpolate(torch.rand(n, 3, 4, 4, generator=generator), size=(size, size), mode="bicubic",
                               align_corners=False).clamp(0, 1) * 0.5 + 0.25
    images = background.clone()
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            cy, cx = (torch.rand(2, generator=generator) * 0.6 + 0.2).tolist()
            radius = float(torch.rand(1, generator=generator) * 0.12 + 0.08)
            shape = int(torch.randint(0, 3, (1,), generator=generator))
            if shape == 0:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
            elif shape == 1:
                mask = ((yy - cy).abs() <= radius) & ((xx - cx).abs() <= radius)
            else:
                mask = ((yy - cy).abs() <= radius * 0.3) & ((xx - cx).abs() <= radius * 1.5)
            colour = torch.rand(3, 1, 1, generator=generator)
            images[i] = torch.where(mask, colour, images[i])
    images += 0.03 * torch.randn(images.shape, generator=generator)
    return images.clamp_(0, 1)


def plot_attention(images, maps, out_path, title=None, kind="combined", scale="per-map", alpha=0.5, cmap="jet"):
    """Draw a grid: one row per image, the image then one column per attention module with its map over the image.

    Args:
        images: (N, 3, H, W) in [0, 1].
        maps: ``{module name: (N, h, w)}`` in [0, 1] (any h, w; upsampled bilinearly to H, W).
        out_path: the PNG (or any format matplotlib writes) to save.
        title: figure title.
        kind: label for the colour bar ("combined" or "spatial").
        scale: ``"per-map"`` stretches the colours of each panel over that map's own min..max (printed under the
            panel), which shows where a map is high even when its values span a narrow range, as the channel-averaged
            map of an untrained network does; ``"fixed"`` maps 0..1 to the colour bar in every panel.

    Returns:
        ``out_path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if scale not in ("per-map", "fixed"):
        raise ValueError(f"scale must be 'per-map' or 'fixed', got {scale!r}")
    n, _, height, width = images.shape
    names = list(maps)
    cols = 1 + len(names)
    fig, axes = plt.subplots(n, cols, figsize=(2.3 * cols + 0.6, 2.3 * n + (0.6 if title else 0.2)), squeeze=False)
    shown = None
    for row in range(n):
        image = images[row].permute(1, 2, 0).clamp(0, 1).numpy()
        axes[row, 0].imshow(image)
        if row == 0:
            axes[row, 0].set_title("input", fontsize=9)
        for col, name in enumerate(names, start=1):
            attention = maps[name][row]
            upsampled = F.interpolate(attention[None, None], size=(height, width), mode="bilinear",
                                      align_corners=False)[0, 0].clamp(0, 1).numpy()
            low, high = (float(attention.min()), float(attention.max())) if scale == "per-map" else (0.0, 1.0)
            axes[row, col].imshow(image)
            shown = axes[row, col].imshow(upsampled, cmap=cmap, alpha=alpha, vmin=low, vmax=max(high, low + 1e-6))
            if scale == "per-map":
                axes[row, col].set_xlabel(f"range {low:.3f}..{high:.3f}", fontsize=7)
            if row == 0:
                h, w = attention.shape
                axes[row, col].set_title(f"{name} ({h}x{w})", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if shown is not None:
        label = "mean over channels of the attention" if kind == "combined" else "sigmoid(Ms)"
        colorbar = fig.colorbar(shown, ax=axes, shrink=0.6, pad=0.02,
                                label=label + (" (each panel: its min..max)" if scale == "per-map" else ""))
        if scale == "per-map":
            colorbar.set_ticks([low, max(high, low + 1e-6)], labels=["low", "high"])
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def attention_figure(arch="resnet18", checkpoint=None, images=4, out="attention.png", kind="combined", size=224,
                     seed=0, scale="per-map", backend="torch", attention="bam", combine="product"):
    """The ``bam-triton attention`` command: build ``arch`` with ``attention`` (``"bam"`` with ``combine``, by default
    the authors' ``"product"``, or ``"cbam"``), load ``checkpoint`` (the authors' format, see :func:`bam_triton.models.load_official_checkpoint`) or
    keep the random initialisation (said in the title), run it on ``images`` synthetic images of ``size``² and save
    the grid to ``out``: one column per BAM, or per stage for CBAM (its last block's, :func:`last_block_per_stage`).

    Returns ``(out, maps)`` with ``maps`` as from :func:`attention_maps` (every module's).
    """
    from . import models

    factories = {"resnet18": models.resnet18, "resnet34": models.resnet34, "resnet50": models.resnet50,
                 "resnet101": models.resnet101}
    if arch not in factories:
        raise ValueError(f"arch must be one of {sorted(factories)}, got {arch!r}")
    if attention not in ("bam", "cbam"):
        raise ValueError(f"attention must be 'bam' or 'cbam', got {attention!r}")
    if attention == "cbam" and combine != "product":
        raise ValueError(f"combine={combine!r} applies to BAM only (CBAM has no combine); leave it at 'product'")
    torch.manual_seed(seed)
    options = {"combine": combine} if attention == "bam" else {}
    model = factories[arch](attention=attention, backend=backend, **options)
    if checkpoint:
        info = models.load_official_checkpoint(model, checkpoint)
        epoch = f", epoch {info['epoch']}" if "epoch" in info else ""
        source = f"checkpoint {checkpoint}{epoch}"
    else:
        source = "RANDOMLY INITIALISED weights (no checkpoint): the maps show structure, not learned attention"
    pictures = synthetic_images(images, size=size, seed=seed)
    maps = attention_maps(model, pictures, kind=kind, normalize=(IMAGENET_MEAN, IMAGENET_STD))
    shown, where = (maps, "") if attention == "bam" else (last_block_per_stage(maps), ", last block of each stage")
    label = {("bam", "combined"): f"mean_c sigmoid(Mc{'·' if combine == 'product' else '+'}Ms)",
             ("cbam", "combined"): "mean_c sigmoid(Mc)·sigmoid(Ms)"}.get((attention, kind), "sigmoid(Ms)")
    title = f"{attention.upper()} attention ({label}{where}) of {arch}+{attention.upper()} on synthetic images\n{source}"
    plot_attention(pictures, shown, out, title=title, kind=kind, scale=scale)
    return out, maps
