"""The ``bam-triton`` command (also ``python -m bam_triton``)."""
import argparse
import os
import sys


def _prefer_interpreter_on_cpu(device):
    """On a machine without CUDA, the Triton kernels can only run under the interpreter, which must be chosen before
    triton is imported: choose it here, at the start of the process, unless the user already decided."""
    if "triton" in sys.modules or "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if device == "cpu" or (device is None and not torch.cuda.is_available()):
        os.environ["TRITON_INTERPRET"] = "1"


def _add_bench_commands(commands):
    """The benchmarking commands (``bam_triton.bench``, imported only when one of them runs)."""
    from .bench import cli_args

    sweep = commands.add_parser("sweep", help="time every provider of BAM's ops on a grid of shapes (CSV + JSON)")
    cli_args.add_sweep_args(sweep)
    plot = commands.add_parser("plot", help="speedup and bandwidth charts (PNG + SVG) from a sweep CSV")
    cli_args.add_plot_args(plot)
    traffic = commands.add_parser("traffic", help="bytes each provider moves, as multiples of |F|")
    cli_args.add_traffic_args(traffic)
    inspect = commands.add_parser("inspect", help="compile the kernels ahead of time for sm_80/sm_90 and report "
                                                  "vector widths, registers, spills (no GPU needed)")
    cli_args.add_inspect_args(inspect)
    tune = commands.add_parser("tune", help="pre-tune the kernels' autotune configs on the sweep grid (CUDA only)")
    cli_args.add_tune_args(tune)
    gpu_check = commands.add_parser("gpu-check", help="the whole GPU evidence in one command: GPU tests, check, sweep, "
                                                      "inspect, plots and a SUMMARY.md of the targets")
    cli_args.add_gpu_check_args(gpu_check)


def _use_interpreter_now():
    """``--interpret``: Triton reads TRITON_INTERPRET when it is imported, so it must be set before that."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        print("error: --interpret needs TRITON_INTERPRET=1 before triton is imported, and triton is already "
              "imported; run `TRITON_INTERPRET=1 bam-triton sweep ...`", file=sys.stderr)
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def _add_attention_command(commands):
    """``attention``: BAM's attention maps over images (``bam_triton.viz``, imported only when it runs)."""
    attention = commands.add_parser("attention", help="plot BAM's attention maps of a ResNet+BAM over synthetic "
                                                      "images (random weights unless --checkpoint)")
    attention.add_argument("--arch", choices=["resnet18", "resnet34", "resnet50", "resnet101"], default="resnet18")
    attention.add_argument("--checkpoint", default=None, help="the authors' ResNet+BAM checkpoint (*.pth.tar) or a "
                                                              "state_dict; default: random initialisation")
    attention.add_argument("--images", type=int, default=4, help="number of synthetic images (rows). Default 4")
    attention.add_argument("--out", default="attention.png", help="output image. Default attention.png")
    attention.add_argument("--map", dest="kind", choices=["combined", "spatial"], default="combined",
                           help="combined: mean over channels of sigmoid(Mc*Ms); spatial: sigmoid(Ms)")
    attention.add_argument("--size", type=int, default=224, help="image side in pixels. Default 224")
    attention.add_argument("--scale", choices=["per-map", "fixed"], default="per-map",
                           help="colours over each map's own min..max (default) or over 0..1")
    attention.add_argument("--seed", type=int, default=0)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bam-triton", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="versions, device, runnable backends, and a kernel self-test")
    check.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    _add_bench_commands(commands)
    _add_attention_command(commands)
    args = parser.parse_args(argv)
    if args.command == "check":
        _prefer_interpreter_on_cpu(args.device)
        from .selftest import run_check

        return run_check(args.device)
    if args.command == "sweep" and args.interpret and not _use_interpreter_now():
        return 2
    if args.command in ("sweep", "plot", "traffic", "inspect", "tune", "gpu-check"):
        from .bench import cli_args

        return cli_args.run(args.command, args)
    if args.command == "attention":
        if args.images < 1:
            parser.error("--images must be >= 1")
        from .viz import attention_figure

        out, _ = attention_figure(args.arch, args.checkpoint, images=args.images, out=args.out, kind=args.kind,
                                  size=args.size, seed=args.seed, scale=args.scale)
        print(f"wrote {out}")
        return 0
    parser.error(f"unknown command {args.command!r}")
