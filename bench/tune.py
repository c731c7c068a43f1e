"""``bam-triton tune``: run every autotuned kernel once on each shape of the sweep grid so that its tuning result is
cached on disk (Triton's ``cache_results``, under ``TRITON_CACHE_DIR``) and later runs start tuned.

The default ops launch every kernel: ``pool`` and ``apply-fwd`` the forward kernels, ``apply-bwd`` the op-level
backward (the reduction that also writes dx), ``bam-fwd`` the module's forward, and ``bam-fwd-bwd`` a training step
of the ``BAM`` block, whose fused backward launches the reduction without dx and the separate dx kernel. ``--ops``
narrows that down.

Autotuning times configs on the GPU, so this needs CUDA. Without it the command says so and exits with status 2
(nothing was tuned; a script can tell that apart from success). Exit status 1 if some case failed.
"""
import sys

import torch

# The training path (bam-fwd-bwd) goes last: its kernels see the same shapes as the op-level ones before it.
TUNE_OPS = ("pool", "apply-fwd", "apply-bwd", "bam-fwd", "bam-fwd-bwd")


def run_tune(args):
    from . import configs
    from .providers import OpCase
    from .sweep import DTYPES, _flatten, grid, grid_problem

    device, shapes, dtypes, layouts, _ = grid(args)
    ops = _flatten(args.ops, TUNE_OPS)
    problem = grid_problem(args, shapes, ops)
    if problem:
        print(f"error: bam-triton tune: {problem}", file=sys.stderr)
        return 2
    if device.type != "cuda" or not torch.cuda.is_available():
        print("bam-triton tune needs a CUDA GPU: autotuning times each config on the device. Nothing was tuned "
              "(exit status 2). On CPU, `bam-triton inspect` compiles every config ahead of time instead.",
              file=sys.stderr)
        return 2
    configs.load_kernels()
    print(configs.enable_persistence())
    failed = 0
    for shape in shapes:
        for dt in dtypes:
            for layout in layouts:
                for op in ops:
                    try:
                        case = OpCase(op, shape, DTYPES[dt], layout == "channels_last", device, combine=args.combine)
                        fn, _ = case.make("triton")  # apply-bwd's make runs the forward (tunes apply-fwd too)
                        configs.reset_marks()
                        fn()
                        torch.cuda.synchronize()
                    except Exception as exc:
                        failed += 1
                        print(f"{op} {shape} {dt} {layout}: {type(exc).__name__}: {exc}", file=sys.stderr)
                        continue
                    chosen = configs.chosen_since_reset()
                    print(f"{op:<12}{'x'.join(map(str, shape)):<16}{dt:<6}{layout:<14}"
                          + "; ".join(f"{k}: {v}" for k, v in chosen.items()))
    return 1 if failed else 0
