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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bam-triton", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="versions, device, runnable backends, and a kernel self-test")
    check.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    if args.command == "check":
        _prefer_interpreter_on_cpu(args.device)
        from .selftest import run_check

        return run_check(args.device)
    parser.error(f"unknown command {args.command!r}")
