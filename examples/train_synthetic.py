"""Train the plain ResNet, a BAM-ResNet and a CBAM-ResNet of the same depth side by side on a synthetic 10-class
shape task, on the CPU.

The data are made here (no downloads): 32x32 RGB images, each with one shape whose class (disc, square, ring, plus,
X, triangle, horizontal bar, vertical bar, diamond, hollow square) is the label, drawn at a random position, size and
colour over a random smooth coloured background with pixel noise and a distractor blob. Colour carries no
information about the class; shape does.

Every model is ``bam_triton.models.resnet18(cifar=True, attention=...)`` at a reduced width (default 16: stages of
16, 32, 64, 128 channels) so a run takes minutes on two CPU cores: ``resnet18`` without attention, ``resnet18+bam``
with ``bam1..bam3`` and ``resnet18+cbam`` with a CBAM in each of the 8 blocks (both at reduction 4, so BAM's hidden
widths are 4, 8, 16 and CBAM's 4 to 32 rather than a quarter of that at the papers' r=16). ``--models`` picks a
subset. The same seed gives every model the same backbone initialisation (the backbone is initialised before the
attention modules are created) and the same batches in the same order; the data themselves are the same for every
seed.

Outputs in ``--out``: ``metrics.csv`` (one row per model and epoch, epoch 0 = before training), ``curves.png``
(loss and accuracy against epochs), ``attention.png`` and ``attention_cbam.png`` (the last trained BAM and CBAM
models' attention maps on test images; CBAM's: the last block of each stage).

    python examples/train_synthetic.py --epochs 8 --seeds 0 1 --out docs/results/training
"""
import argparse
import csv
import os
import time

import torch
import torch.nn.functional as F

from bam_triton import models
from bam_triton.cli import output_path_problem

# The models trained side by side: name suffix -> the networks' attention= ("none": the plain network).
ATTENTIONS = ("none", "bam", "cbam")
CLASS_NAMES = ("disc", "square", "ring", "plus", "x", "triangle", "hbar", "vbar", "diamond", "hollow_square")
NUM_CLASSES = len(CLASS_NAMES)


def _shape_masks(labels, dy, dx, radius):
    """(N, S, S) bool masks of each image's shape. ``dy``, ``dx``: (N, S, S) offsets from the shape's centre in
    pixels; ``radius``: (N, 1, 1) half-size in pixels; ``labels``: (N,) class indices."""
    ay, ax = dy.abs(), dx.abs()
    dist = torch.sqrt(dy ** 2 + dx ** 2)
    chebyshev = torch.maximum(ay, ax)
    thin = 0.3 * radius
    candidates = torch.stack([
        dist <= radius,                                                          # disc
        chebyshev <= 0.85 * radius,                                              # square
        (dist <= radius) & (dist >= 0.55 * radius),                              # ring
        ((ay <= thin) & (ax <= radius)) | ((ax <= thin) & (ay <= radius)),       # plus
        ((ay - ax).abs() <= thin) & (chebyshev <= radius),                       # x
        (dy.abs() <= radius) & (ax <= (dy + radius) / 2),                        # triangle, apex up
        (ay <= thin) & (ax <= radius),                                           # horizontal bar
        (ax <= thin) & (ay <= radius),                                           # vertical bar
        ay + ax <= radius,                                                       # diamond
        (chebyshev <= radius) & (chebyshev >= 0.6 * radius),                     # hollow square
    ], dim=1)                                                                    # (N, 10, S, S)
    return candidates[torch.arange(labels.numel()), labels]


def make_shapes(n, size=32, seed=0):
    """``(images, labels)``: (n, 3, size, size) float32 in [0, 1] and (n,) int64 in [0, 10). Deterministic in
    ``seed``; classes are balanced (each appears n // 10 or n // 10 + 1 times, shuffled)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    labels = labels[torch.randperm(n, generator=generator)]
    radius = torch.empty(n, 1, 1).uniform_(0.18 * size, 0.32 * size, generator=generator)
    centre = radius[:, None] + torch.rand(n, 2, 1, 1, generator=generator) * (size - 2 * radius[:, None])  # (n, 2, 1, 1)
    pixels = torch.arange(size, dtype=torch.float32) + 0.5
    dy = pixels.view(1, size, 1) - centre[:, 0]
    dx = pixels.view(1, 1, size) - centre[:, 1]
    mask = _shape_masks(labels, dy, dx, radius)
    background = F.interpolate(torch.rand(n, 3, 3, 3, generator=generator), size=(size, size), mode="bilinear",
                               align_corners=False)
    foreground = torch.rand(n, 3, 1, 1, generator=generator)
    images = torch.where(mask[:, None], foreground, background)
    # A distractor: a small soft blob of a random colour that may overlap the shape, carrying no label information.
    blob_centre = torch.rand(n, 2, 1, 1, generator=generator) * size
    blob = torch.exp(-((pixels.view(1, size, 1) - blob_centre[:, 0]) ** 2
                       + (pixels.view(1, 1, size) - blob_centre[:, 1]) ** 2) / (2 * (0.06 * size) ** 2))
    blob_colour = torch.rand(n, 3, 1, 1, generator=generator)
    images = images * (1 - blob[:, None]) + blob_colour * blob[:, None]
    images = images + 0.08 * torch.randn(images.shape, generator=generator)
    return images.clamp_(0, 1), labels


def model_name(attention):
    """``resnet18``, ``resnet18+bam`` or ``resnet18+cbam``."""
    return "resnet18" if attention == "none" else f"resnet18+{attention}"


def build_model(attention, width=16, reduction=4, seed=0):
    """``resnet18(cifar=True, num_classes=10, width=width)`` with ``attention`` (one of :data:`ATTENTIONS`; the
    attention modules at ``reduction``), initialised from ``seed``."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    torch.manual_seed(seed)
    if attention == "none":
        return models.resnet18(num_classes=NUM_CLASSES, cifar=True, width=width, attention=None)
    return models.resnet18(num_classes=NUM_CLASSES, cifar=True, width=width, attention=attention, reduction=reduction,
                           backend="torch")


def evaluate(model, images, labels, batch_size=500):
    """``(mean cross-entropy, accuracy)`` of ``model`` in eval mode on a whole set."""
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = model(images[start:start + batch_size])
            target = labels[start:start + batch_size]
            total_loss += F.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(1) == target).sum().item()
    return total_loss / len(labels), correct / len(labels)


def train(model, train_set, test_set, epochs, steps_per_epoch=None, batch_size=64, lr=0.1, seed=0, log=print):
    """SGD (momentum 0.9, Nesterov, weight decay 5e-4) with a cosine learning rate over all steps; no augmentation
    (the generator already varies position, size and colour).

    Returns ``(epoch_rows, step_losses)``: one dict per epoch (epoch 0 evaluated before training) with
    ``train_loss``/``train_acc`` (running means over that epoch's batches; for epoch 0 evaluated on the training
    set) and ``test_loss``/``test_acc``; and the training loss of every step.
    """
    train_images, train_labels = train_set
    batches_per_epoch = len(train_labels) // batch_size
    steps = batches_per_epoch if steps_per_epoch is None else min(steps_per_epoch, batches_per_epoch)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps))
    order_generator = torch.Generator().manual_seed(seed)  # the same batches, in the same order, for every model
    train_loss, train_acc = evaluate(model, train_images, train_labels)
    test_loss, test_acc = evaluate(model, *test_set)
    rows = [dict(epoch=0, step=0, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                 test_acc=test_acc, seconds=0.0)]
    step_losses = []
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_labels), generator=order_generator)
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps):
            index = order[step * batch_size:(step + 1) * batch_size]
            images, labels = train_images[index], train_labels[index]
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step_losses.append(loss.item())
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
        test_loss, test_acc = evaluate(model, *test_set)
        rows.append(dict(epoch=epoch, step=epoch * steps, train_loss=loss_sum / seen, train_acc=correct / seen,
                         test_loss=test_loss, test_acc=test_acc, seconds=time.perf_counter() - started))
        log(f"  epoch {epoch}: train loss {rows[-1]['train_loss']:.4f} acc {rows[-1]['train_acc']:.4f} | "
            f"test loss {test_loss:.4f} acc {test_acc:.4f} | {rows[-1]['seconds']:.0f}s")
    return rows, step_losses


def plot_curves(results, steps_per_epoch, path, title):
    """Loss and accuracy against epochs; ``results``: {(model name, seed): (epoch_rows, step_losses)}. One colour per
    model, one line style per seed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.4))
    colours = {"resnet18": "tab:blue", "resnet18+bam": "tab:red", "resnet18+cbam": "tab:green"}
    seeds = sorted({seed for _, seed in results})
    markers = dict(zip(seeds, "osD^v<>"))
    window = max(1, steps_per_epoch // 10)
    for (name, seed), (rows, step_losses) in results.items():
        colour, marker = colours.get(name), markers[seed]
        epochs = [row["epoch"] for row in rows]
        smoothed = [sum(step_losses[max(0, i - window + 1):i + 1]) / len(step_losses[max(0, i - window + 1):i + 1])
                    for i in range(len(step_losses))]
        ax_loss.plot([(i + 1) / steps_per_epoch for i in range(len(step_losses))], smoothed, color=colour,
                     alpha=0.3, linewidth=0.8)
        ax_loss.plot(epochs, [row["test_loss"] for row in rows], marker=marker, color=colour,
                     label=f"{name} seed {seed}: test")
        ax_acc.plot(epochs[1:], [row["train_acc"] for row in rows[1:]], marker=marker, linestyle="--",
                    color=colour, alpha=0.45, markersize=4)
        ax_acc.plot(epochs, [row["test_acc"] for row in rows], marker=marker, color=colour,
                    label=f"{name} seed {seed}: test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log",
                title=f"loss (thin: training, per step, running mean of {window}; markers: test set)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1),
               title="accuracy (dashed: training, epoch mean; solid: test set)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.title.set_fontsize(9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_args(parser, args):
    """Refuse up front, in one line (``parser.error``: exit status 2), what would otherwise fail with a traceback or a
    wrong result after minutes of training."""
    def positive(option, value, minimum=1):
        if value < minimum:
            parser.error(f"{option} must be >= {minimum}, got {value}")

    if args.epochs < 0:
        parser.error(f"--epochs must be >= 0 (0: only the untrained models are evaluated), got {args.epochs}")
    if args.steps is not None:
        positive("--steps", args.steps)
    positive("--batch-size", args.batch_size)
    if "bam" in args.models and args.batch_size < 2:
        parser.error(f"--batch-size must be >= 2 to train the BAM model (BAM's channel branch's BatchNorm1d needs two "
                     f"samples in training mode), got {args.batch_size}")
    if args.train_size < args.batch_size:
        parser.error(f"--train-size must be >= --batch-size ({args.batch_size}): an epoch is train-size // batch-size "
                     f"full batches, got {args.train_size}")
    positive("--test-size", args.test_size)
    positive("--width", args.width)
    positive("--reduction", args.reduction)
    attention = [a for a in args.models if a != "none"]
    if attention and args.width // args.reduction < 1:
        modules = " and ".join(a.upper() for a in attention)
        parser.error(f"--reduction must be <= --width ({args.width}): the first stage's {modules} modules have "
                     f"--width channels and a hidden width of channels // reduction, which must be >= 1; got "
                     f"--reduction {args.reduction}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.threads is not None:
        positive("--threads", args.threads)
    problem = output_path_problem(args.out, "--out", "dir")
    if problem:
        parser.error(problem)
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # curves.png and the attention figures, after the training
        parser.error("needs matplotlib for curves.png and the attention figures: pip install matplotlib")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=None, help="at most this many steps per epoch (default: all)")
    parser.add_argument("--out", default="docs/results/training", help="output directory")
    parser.add_argument("--train-size", type=int, default=8000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="default 64; at least 2 with the BAM model (its channel branch's BatchNorm1d) and at most "
                             "--train-size")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--reduction", type=int, default=4,
                        help="BAM's and CBAM's r (hidden width = channels // r; at most --width). Default 4")
    parser.add_argument("--models", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS),
                        help="which networks to train: none (plain), bam, cbam. Default all three")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one set of models per seed; the data are the same for every seed")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)  # check_args asked the OS whether it may
    train_set = make_shapes(args.train_size, seed=0)
    test_set = make_shapes(args.test_size, seed=1_000_003)  # a disjoint draw
    steps = args.train_size // args.batch_size if args.steps is None else min(args.steps,
                                                                               args.train_size // args.batch_size)
    results, parameters, last_trained = {}, {}, {}
    for seed in args.seeds:
        for attention in args.models:
            name = model_name(attention)
            model = build_model(attention, width=args.width, reduction=args.reduction, seed=seed)
            parameters[name] = sum(p.numel() for p in model.parameters())
            print(f"{name} seed {seed}: {parameters[name]:,} parameters, {args.epochs} epochs x {steps} steps of "
                  f"{args.batch_size}")
            results[name, seed] = train(model, train_set, test_set, args.epochs, steps, args.batch_size, args.lr,
                                        seed)
            last_trained[attention] = model
    csv_path = os.path.join(args.out, "metrics.csv")
    with open(csv_path, "w", newline="") as handle:
        fields = ["model", "seed", "parameters", "epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc",
                  "seconds"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for (name, seed), (rows, _) in results.items():
            for row in rows:
                writer.writerow({"model": name, "seed": seed, "parameters": parameters[name],
                                 **{k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()}})
    plot_curves(results, steps, os.path.join(args.out, "curves.png"),
                f"Synthetic 10-class shapes, 32x32 ({args.train_size} train / {args.test_size} test images): "
                f"ResNet-18 (cifar stem, width {args.width}): {', '.join(model_name(a) for a in args.models)} "
                f"(r={args.reduction}), same data, same backbone init per seed")
    from bam_triton.viz import attention_maps, last_block_per_stage, plot_attention

    shown = slice(0, 6)
    names = ", ".join(CLASS_NAMES[i] for i in test_set[1][shown].tolist())
    written = [csv_path, "curves.png"]
    for attention, filename, label in (("bam", "attention.png", "mean_c sigmoid(Mc·Ms)"),
                                       ("cbam", "attention_cbam.png", "mean_c sigmoid(Mc)·sigmoid(Ms)")):
        if attention not in last_trained:
            continue
        maps = attention_maps(last_trained[attention], test_set[0][shown], kind="combined")
        if attention == "cbam":
            maps = last_block_per_stage(maps)
        plot_attention(test_set[0][shown], maps, os.path.join(args.out, filename), kind="combined",
                       title=f"Trained {model_name(attention)} (width {args.width}, {args.epochs} epochs, seed "
                             f"{args.seeds[-1]}): {label} on test images\nrows: {names}")
        written.append(filename)
    print(f"wrote {', '.join(written)}")
    for (name, seed), (rows, _) in results.items():
        last = rows[-1]
        print(f"{name:14s} seed {seed} final: train loss {last['train_loss']:.4f} acc {last['train_acc']:.4f} | "
              f"test loss {last['test_loss']:.4f} acc {last['test_acc']:.4f} | {last['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
