"""Arguments and entry points of the benchmarking subcommands (``bam-triton sweep|plot|traffic|overhead|inspect|tune``
and ``gpu-check``).

Importing this module imports torch but never triton: ``--interpret`` must be able to choose Triton's interpreter
after the arguments are parsed.
"""
import argparse

from .sweep import add_grid_args, add_sweep_args, parse_shape  # noqa: F401  (re-exported for the CLI)


def add_plot_args(p):
    p.add_argument("csv", metavar="RESULTS.csv", help="a CSV written by `bam-triton sweep`, or the directory it wrote "
                                                     "(its sweep.csv)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: the CSV's directory)")
    p.add_argument("--timing-mode", default=None, metavar="MODE",
                   help="which timings to plot (default: do_bench on CUDA, cpu-timer on CPU; interpreter rows are "
                        "never plotted)")


def _dtype_name(text):
    from bam_triton._dtypes import DTYPE_NAMES as DTYPES

    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"invalid dtype {text!r}: choose from {', '.join(DTYPES)}")
    return text


def _add_case_args(p, shape, why, dtype, combine):
    """--shape, --dtype, --layout, --combine of the commands that study one case (traffic, overhead)."""
    p.add_argument("--shape", type=parse_shape, default=shape, metavar="NxCxHxW",
                   help=f"default {'x'.join(map(str, shape))} ({why})")
    p.add_argument("--dtype", type=_dtype_name, default=dtype, help=f"fp32, fp16, bf16 (default {dtype})")
    p.add_argument("--layout", choices=("nchw", "channels_last"), default="nchw")
    p.add_argument("--combine", choices=("product", "sum"), default=combine,
                   help=f"⊕ of the two branches (default {combine}: " + (
                       "the authors' code, as the sweep)" if combine == "product" else "BAM's own default)"))


def add_traffic_args(p):
    _add_case_args(p, (32, 256, 56, 56), "ResNet-50's first BAM", dtype="fp16", combine="product")
    p.add_argument("--ops-detail", action="store_true", help="also list every aten op of each provider")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")


def add_inspect_args(p):
    p.add_argument("--arch", action="append", type=int, choices=(80, 90), metavar="SM",
                   help="80 and/or 90 (default both)")
    p.add_argument("--dtype", action="append", choices=("fp32", "fp16", "bf16"), metavar="DTYPE",
                   help="default fp32, fp16, bf16")
    p.add_argument("--kernels", default=None, metavar="NAMES",
                   help="comma-separated kernel names (default: every kernel found)")
    p.add_argument("--out", default="bench-results", metavar="DIR", help="where inspect.json goes")
    p.add_argument("--quick", action="store_true", help="first config of each kernel only")
    p.add_argument("--table", action="store_true",
                   help="one line per compiled variant (config, arch, dtype, shape, layout) instead of the summary "
                        "of one line per kernel")


def add_overhead_args(p):
    _add_case_args(p, (8, 64, 14, 14), "small: on a GPU the host, not the kernels, must be the bottleneck",
                   dtype="fp32", combine="sum")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--reps", type=int, default=300, help="timed calls per case (default 300)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")


def add_tune_args(p):
    add_grid_args(p)


def add_gpu_check_args(p):
    p.add_argument("--quick", action="store_true",
                   help="within 4 minutes instead of 8: fp16 only, no triton-compiled, inspect of the first configs")
    p.add_argument("--dry-run", action="store_true",
                   help="the same pipeline on CPU in under a minute (tiny shapes, the kernels through the "
                        "interpreter, two test files); no verdict is valid")
    p.add_argument("--out", default="gpu-results", metavar="DIR", help="output directory (default gpu-results)")


def run(command, args):
    if command == "sweep":
        from .sweep import run_sweep

        return run_sweep(args)
    if command == "plot":
        from .plot import run_plot

        return run_plot(args)
    if command == "traffic":
        from .traffic import run_traffic

        return run_traffic(args)
    if command == "overhead":
        from .overhead import run_overhead

        return run_overhead(args)
    if command == "inspect":
        from .inspect import run_inspect

        return run_inspect(args)
    if command == "tune":
        from .tune import run_tune

        return run_tune(args)
    if command == "gpu-check":
        from .gpu_check import run_gpu_check

        return run_gpu_check(args)
    raise ValueError(command)
