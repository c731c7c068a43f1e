"""Host overhead: microseconds of bam_triton's own Python per call on the Triton path (``bam-triton overhead``).

On a GPU a BAM kernel at batch 32 takes tens of microseconds, so the Python around it must cost less. This times
that Python on any machine:

- the kernels run nothing (``kernels._common.skip_kernels``): every launch does its host work (plan, config,
  arguments, device guard) and stops short of Triton's own launch call (``JITFunction.run``), which comes on top on a
  GPU, once per launch (``launches`` in the report);
- the module's two attention branches are replaced by stand-ins that pass their input through (views, no layers run),
  so what remains is BAM's own code: checks, backend choice, pooling and apply dispatch, autograd glue, buffers.
  The stand-ins alone are timed too and subtracted.

Torch ops the library itself calls (allocations, the partial-sum reductions, the gradient's layout check) count:
they are its overhead. On CPU the kernels load as interpreter kernels (the command selects Triton's interpreter) and
run nothing. On CUDA the report is made twice, the second time with the kernels launched: the difference is Triton's
own launch cost. Medians of ``--reps`` timed calls after a warm-up (which plans, and with the kernels launched also
tunes).
"""
import torch
from torch import nn

from .timing import median_call_us

# What is timed: every case runs on the Triton path; the module's branches are replaced by stand-ins.
CASES = ("BAM forward (eval, no grad)", "BAM forward+backward (train)", "channel_pool", "bam_apply forward",
         "bam_apply forward+backward")
# Issue 13's budget for the module's own host time on the standard Triton path, microseconds per call.
TARGETS_US = {CASES[0]: 30, CASES[1]: 100}


class _ChannelStandIn(nn.Module):
    """The channel branch's place in BAM: keeps the real layers (BAM reads their parameters' dtype), runs none."""

    def __init__(self, gate):
        super().__init__()
        self.gate_c = gate.gate_c

    def forward(self, pooled):
        return pooled


class _SpatialStandIn(nn.Module):
    """The spatial branch's place in BAM: keeps the real layers (the single-read path reads the 1x1 conv's
    parameters), runs none; its (N, 1, H, W) output is a view of its input's first channel."""

    def __init__(self, gate):
        super().__init__()
        self.gate_s = gate.gate_s

    def forward(self, x, reduced=None):
        return (x if reduced is None else reduced)[:, :1]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(shape=(8, 64, 14, 14), dtype=torch.float32, channels_last=False, combine="sum", single_read=False,
            device="cpu", reps=300, launch=False):
    """{case: {"total_us", "stand_ins_us", "own_us", "launches"}} for the CASES at ``shape``. ``launch``: run the
    kernels (CUDA only) instead of skipping them."""
    from bam_triton import BAM, bam_apply, channel_pool
    from bam_triton.kernels import _common

    from .traffic import module_reduction

    device = torch.device(device)
    if launch and device.type != "cuda":
        raise ValueError("launch=True needs a CUDA device: on CPU the kernels would run through the interpreter")
    n, c, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    xg = x.detach().clone().requires_grad_()
    g = torch.randn_like(x)
    mc = torch.randn(n, c, device=device, dtype=dtype)
    ms = torch.randn(n, h, w, device=device, dtype=dtype)
    mcg, msg = mc.clone().requires_grad_(), ms.clone().requires_grad_()

    def stand_in_bam(training):
        bam = BAM(c, reduction=min(module_reduction("bam"), c), combine=combine, backend="triton",
                  single_read=single_read, device=device, dtype=dtype).train(training)
        bam.channel_att, bam.spatial_att = _ChannelStandIn(bam.channel_att), _SpatialStandIn(bam.spatial_att)
        return bam

    bam_in_eval, bam_in_training = stand_in_bam(False), stand_in_bam(True)
    channel, spatial = bam_in_eval.channel_att, bam_in_eval.spatial_att
    pooled = torch.randn(n, c, device=device, dtype=dtype)

    def bam_eval():
        with torch.no_grad():
            bam_in_eval(x)

    def bam_train():
        bam_in_training(xg).backward(g)

    def stand_ins_eval():
        with torch.no_grad():
            channel(pooled), spatial(x)

    def stand_ins_train():
        p = pooled.detach().requires_grad_()
        mc_, ms_ = channel(p), spatial(xg)
        torch.autograd.backward([mc_, ms_], [torch.ones_like(mc_), torch.ones_like(ms_)])

    def apply_train():
        bam_apply(x, mcg, msg, combine=combine, backend="triton").backward(g)

    cases = {
        CASES[0]: (bam_eval, stand_ins_eval),
        CASES[1]: (bam_train, stand_ins_train),
        CASES[2]: (lambda: channel_pool(x, backend="triton"), None),
        CASES[3]: (lambda: bam_apply(x, mc, ms, combine=combine, backend="triton"), None),
        CASES[4]: (lambda: bam_apply(xg, mcg, msg, combine=combine, backend="triton").backward(g), None),
    }
    report = {}
    for name, (fn, stand_ins) in cases.items():
        with _common.skip_kernels():
            fn()  # the first call tunes and plans (with the kernels skipped, it plans only)
            with _common.record_launches() as launches:
                fn()

        # No synchronisation per call: at a small shape the GPU keeps up with the queue, so a call's time is the
        # host's (a sync would add its own round trip to every call).
        if launch:
            total = median_call_us(fn, reps)
        else:
            with _common.skip_kernels():
                total = median_call_us(fn, reps)
        baseline = median_call_us(stand_ins, reps) if stand_ins else 0.0
        _sync(device)
        report[name] = {"total_us": total, "stand_ins_us": baseline, "own_us": total - baseline,
                        "launches": len(launches)}
    return report


def format_report(report, title, reference_us=None):
    """The report as a table; with ``reference_us`` (:func:`timing.host_reference_us` of the same run) each case's own
    time also in multiples of the reference ("x ref")."""
    ref = f"{'x ref':>7}" if reference_us else ""
    lines = [title, f"{'microseconds per call (median)':<34}{'own':>8}{ref}{'total':>9}{'stand-ins':>11}{'launches':>10}"]
    for name, row in report.items():
        ratio = f"{row['own_us'] / reference_us:7.1f}" if reference_us else ""
        lines.append(f"{name:<34}{row['own_us']:8.1f}{ratio}{row['total_us']:9.1f}{row['stand_ins_us']:11.1f}"
                     f"{row['launches']:>10}")
    lines.append("own = total - stand-ins (the branches' pass-through stand-ins timed alone).")
    return "\n".join(lines)


def run_overhead(args):
    """``bam-triton overhead``: the report with the kernels skipped, and on CUDA also with them launched; each against
    the host reference (:data:`timing.HOST_REFERENCE`) timed in the same run, before and after the cases, so that a
    slower machine (reference and cases up alike) can be told from a regression (the cases up alone)."""
    import json
    import sys

    from bam_triton._dtypes import DTYPE_NAMES

    from .timing import HOST_REFERENCE, host_reference_us

    if args.reps < 1:
        print(f"error: bam-triton overhead: --reps must be >= 1, got {args.reps}", file=sys.stderr)
        return 2
    if args.shape[0] < 2:  # the BAM forward+backward case trains BAM (its own check refuses a batch of 1)
        print(f"error: bam-triton overhead: --shape {'x'.join(map(str, args.shape))}: N must be >= 2 (the "
              f"'{CASES[1]}' case trains BAM, whose channel branch's BatchNorm1d needs two samples), got "
              f"N={args.shape[0]}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPE_NAMES[args.dtype]
    before = host_reference_us(max(args.reps, 300))
    reports = {}
    for single_read in (False, True):
        for launch in (False, True) if device.type == "cuda" else (False,):
            title = (f"{'single-read' if single_read else 'standard'} Triton path, "
                     f"{'kernels launched' if launch else 'kernels skipped'}, {device.type}, "
                     f"{'x'.join(map(str, args.shape))} {args.dtype} {args.layout}")
            reports[title] = measure(tuple(args.shape), dtype, args.layout == "channels_last", args.combine,
                                     single_read, device, args.reps, launch)
    after = host_reference_us(max(args.reps, 300))
    reference = (before + after) / 2
    print(f"Same-machine reference, {HOST_REFERENCE}: {reference:.1f} us per call (median; {before:.1f} before the "
          f"cases, {after:.1f} after). 'x ref' = own / reference: on a slower machine both columns' microseconds grow "
          f"and 'x ref' stays; a regression raises 'x ref'.\n")
    for title, report in reports.items():
        print(format_report(report, title, reference) + "\n")
    if device.type != "cuda":
        print("Kernels skipped: on a GPU each launch adds Triton's own launch call (JITFunction.run) on top.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"reference": {"what": HOST_REFERENCE, "us_before": before, "us_after": after},
                       "reports": reports}, fh, indent=1)
    return 0
