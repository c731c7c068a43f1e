"""``bam-triton tune``: run every autotuned kernel once on each shape of the sweep grid so that its tuning result is
cached on disk (Triton's ``cache_results``, under ``TRITON_CACHE_DIR``) and later runs start tuned.

Autotuning times configs on the GPU, so this needs CUDA. Without it the command says so and exits with status 2
(nothing was tuned; a script can tell that apart from success).
"""
import sys

import torch


def run_tune(args):
    from . import configs
    from .providers import OpCase
    from .sweep import DTYPES, grid

    device, shapes, dtypes, layouts, _ = grid(args)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("bam-triton tune needs a CUDA GPU: autotuning times each config on the device. Nothing was tuned "
              "(exit status 2). On CPU, `bam-triton inspect` compiles every config ahead of time instead.",
              file=sys.stderr)
        return 2
    configs.load_kernels()
    print(configs.enable_persistence())
    ops = ("pool", "apply-fwd", "apply-bwd")
    for shape in shapes:
        for dt in dtypes:
            for layout in layouts:
                for op in ops:
                    case = OpCase(op, shape, DTYPES[dt], layout == "channels_last", device, combine=args.combine)
                    try:
                        fn, _ = case.make("triton")
                        configs.reset_marks()
                        fn()
                        torch.cuda.synchronize()
                    except Exception as exc:
                        print(f"{op} {shape} {dt} {layout}: {type(exc).__name__}: {exc}", file=sys.stderr)
                        continue
                    chosen = configs.chosen_since_reset()
                    print(f"{op:<10}{'x'.join(map(str, shape)):<16}{dt:<6}{layout:<14}"
                          + "; ".join(f"{k}: {v}" for k, v in chosen.items()))
    return 0
