"""BAM's attention maps, captured with forward hooks and drawn over the input images (like the paper's figure).

What is shown: for each BAM, the attention ``A = sigmoid(Mc ⊕ Ms)`` that scales the features (``F' = F · (1 + A)``)
is a (C, H, W) volume per image. The figure shows its mean over channels, ``mean_c A`` (N, H, W) — the "combined"
map — because that is what the module actually applies, channel branch included. ``kind="spatial"`` shows
``sigmoid(Ms)`` (N, H, W), the spatial branch alone (what the authors' figure names the spatial attention); it is the
same for every channel. Each map is upsampled bilinearly to the image size and drawn with a colour map over the image.

The hooks sit on each BAM's ``spatial_att`` (output ``Ms``, (N, 1, H, W) logits) and ``channel_att`` (output ``Mc``,
(N, C) logits) submodules; :mod:`bam_triton.module` is not changed and nothing is captured once the recorder closes.

Matplotlib is imported only when plotting, with the Agg backend (no display needed).
"""
import torch
import torch.nn.functional as F

from .module import BAM

__all__ = ["AttentionRecorder", "attention_maps", "synthetic_images", "plot_attention", "attention_figure",
           "IMAGENET_MEAN", "IMAGENET_STD"]

KINDS = ("combined", "spatial")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AttentionRecorder:
    """Context manager recording every BAM's branch logits during forward passes of ``model``.

    After a forward pass inside the ``with`` block, ``recorder.logits[name]`` holds ``(mc, ms, combine)`` for each
    BAM (``name`` as in ``model.named_modules()``): ``mc`` (N, C) and ``ms`` (N, 1, H, W), detached fp32 copies on
    the CPU, from the most recent forward.

        >>> with AttentionRecorder(model) as recorder:
        ...     model(images)
        >>> maps = recorder.maps("combined")   # {name: (N, H, W)}
    """

    def __init__(self, model):
        self.model = model
        self.bams = [(name, module) for name, module in model.named_modules() if isinstance(module, BAM)]
        if not self.bams:
            raise ValueError("model contains no BAM module: nothing to record")
        self.logits = {}
        self._partial = {}
        self._handles = []

    def __enter__(self):
        for name, bam in self.bams:
            self._handles.append(bam.channel_att.register_forward_hook(self._hook(name, "mc")))
            self._handles.append(bam.spatial_att.register_forward_hook(self._hook(name, "ms")))
        return self

    def __exit__(self, *exc_info):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def _hook(self, name, which):
        combine = dict(self.bams)[name].combine

        def record(module, inputs, output):
            # Copy now: the module's caller may reuse or modify the buffer after the hook returns.
            self._partial.setdefault(name, {})[which] = output.detach().float().cpu().clone()
            parts = self._partial[name]
            if "mc" in parts and "ms" in parts:
                self.logits[name] = (parts.pop("mc"), parts.pop("ms"), combine)

        return record

    def maps(self, kind="combined"):
        """``{bam name: (N, H, W) tensor in [0, 1]}`` for the last forward pass; ``kind`` is ``"combined"``
        (``mean_c sigmoid(Mc ⊕ Ms)``) or ``"spatial"`` (``sigmoid(Ms)``)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not self.logits:
            raise RuntimeError("no attention recorded: run a forward pass of the model inside the `with` block")
        out = {}
        for name, (mc, ms, combine) in self.logits.items():
            if kind == "spatial":
                out[name] = torch.sigmoid(ms[:, 0])
                continue
            mc4 = mc[:, :, None, None]  # (N, C, 1, 1) against ms (N, 1, H, W)
            logits = mc4 + ms if combine == "sum" else mc4 * ms
            out[name] = torch.sigmoid(logits).mean(dim=1)
        return out


def attention_maps(model, images, kind="combined", normalize=None):
    """Run ``model`` in eval mode on ``images`` and return ``{bam name: (N, H, W) map in [0, 1]}``.

    Args:
        model: a network containing BAM modules.
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
    """Draw a grid: one row per image, the image then one column per BAM with its map over the image.

    Args:
        images: (N, 3, H, W) in [0, 1].
        maps: ``{bam name: (N, h, w)}`` in [0, 1] (any h, w; upsampled bilinearly to H, W).
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
        label = "mean over channels of sigmoid(Mc ⊕ Ms)" if kind == "combined" else "sigmoid(Ms)"
        colorbar = fig.colorbar(shown, ax=axes, shrink=0.6, pad=0.02,
                                label=label + (" (each panel: its min..max)" if scale == "per-map" else ""))
        if scale == "per-map":
            colorbar.set_ticks([low, max(high, low + 1e-6)], labels=["low", "high"])
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def attention_figure(arch="resnet18", checkpoint=None, images=4, out="attention.png", kind="combined", size=224,
                     seed=0, scale="per-map", backend="torch"):
    """The ``bam-triton attention`` command: build ``arch`` with BAM (``combine="product"``), load ``checkpoint``
    (the authors' format, see :func:`bam_triton.models.load_official_checkpoint`) or keep the random initialisation
    (said in the title), run it on ``images`` synthetic images of ``size``² and save the grid to ``out``.

    Returns ``(out, maps)`` with ``maps`` as from :func:`attention_maps`.
    """
    from . import models

    factories = {"resnet18": models.resnet18, "resnet34": models.resnet34, "resnet50": models.resnet50,
                 "resnet101": models.resnet101}
    if arch not in factories:
        raise ValueError(f"arch must be one of {sorted(factories)}, got {arch!r}")
    torch.manual_seed(seed)
    model = factories[arch](bam=True, combine="product", backend=backend)
    if checkpoint:
        info = models.load_official_checkpoint(model, checkpoint)
        epoch = f", epoch {info['epoch']}" if "epoch" in info else ""
        source = f"checkpoint {checkpoint}{epoch}"
    else:
        source = "RANDOMLY INITIALISED weights (no checkpoint): the maps show structure, not learned attention"
    pictures = synthetic_images(images, size=size, seed=seed)
    maps = attention_maps(model, pictures, kind=kind, normalize=(IMAGENET_MEAN, IMAGENET_STD))
    label = "mean_c sigmoid(Mc·Ms)" if kind == "combined" else "sigmoid(Ms)"
    title = f"BAM attention ({label}) of {arch}+BAM on synthetic images\n{source}"
    plot_attention(pictures, maps, out, title=title, kind=kind, scale=scale)
    return out, maps

