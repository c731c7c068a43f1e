"""The ``bam-triton`` command (also ``python -m bam_triton``)."""
import argparse
import os
import sys
import tempfile


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
    overhead = commands.add_parser("overhead", help="microseconds of bam_triton's own Python per call on the Triton "
                                                    "path (kernels skipped, so it runs anywhere)")
    cli_args.add_overhead_args(overhead)
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


# --attention of attention: the networks whose maps it draws.
_ATTENTION_KINDS = ("bam", "cbam")
# --combine of attention and export: BAM's ⊕, the authors' first (the default).
_COMBINES = ("product", "sum")
# attention's smallest --size: one pixel per map after the networks' 32x downsampling.
_MIN_ATTENTION_SIZE = 32


def _add_attention_command(commands):
    """``attention``: BAM's or CBAM's attention maps over images (``bam_triton.viz``, imported only when it runs)."""
    attention = commands.add_parser("attention", help="plot the attention maps of a ResNet+BAM or ResNet+CBAM over "
                                                      "synthetic images (random weights unless --checkpoint)")
    attention.add_argument("--arch", choices=["resnet18", "resnet34", "resnet50", "resnet101"], default="resnet18")
    attention.add_argument("--attention", choices=_ATTENTION_KINDS, default="bam",
                           help="the network's attention module: bam (after layer1..3, default) or cbam (in every "
                                "block; the figure shows the last block of each stage)")
    attention.add_argument("--combine", choices=_COMBINES, default="product",
                           help="BAM's ⊕: product (the authors' code and checkpoints, default) or sum (the paper); a "
                                "checkpoint saved by bam_triton says which it needs")
    attention.add_argument("--checkpoint", default=None, help="the authors' ResNet+BAM or ResNet+CBAM checkpoint "
                                                              "(*.pth.tar) or a state_dict; default: random "
                                                              "initialisation")
    attention.add_argument("--images", type=int, default=4, help="number of synthetic images (rows). Default 4")
    attention.add_argument("--out", default="attention.png",
                           help="output image; its extension picks the format (.png, .svg, .pdf, ...). Default "
                                "attention.png")
    attention.add_argument("--map", dest="kind", choices=["combined", "spatial"], default="combined",
                           help="combined: mean over channels of the attention applied (BAM: sigmoid(Mc*Ms), "
                                "CBAM: sigmoid(Mc)*sigmoid(Ms)); spatial: sigmoid(Ms)")
    attention.add_argument("--size", type=int, default=224,
                           help=f"image side in pixels (>= {_MIN_ATTENTION_SIZE}). Default 224")
    attention.add_argument("--scale", choices=["per-map", "fixed"], default="per-map",
                           help="colours over each map's own min..max (default) or over 0..1")
    attention.add_argument("--seed", type=int, default=0)


_EXPORT_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
# --attention of export: the models' attention= ("none" for None).
_EXPORT_ATTENTIONS = ("bam", "cbam", "none")
_ONNX_PIP = "pip install onnx onnxscript onnxruntime"


def _add_export_command(commands):
    """``export``: a BAM- or CBAM-ResNet to ONNX (standard ops only), checked with onnx.checker and, when onnxruntime
    is installed, run once against eager torch."""
    export = commands.add_parser("export", help="export a BAM- or CBAM-ResNet to ONNX (standard ops only), check it "
                                                "with onnx.checker and compare onnxruntime with eager torch")
    export.add_argument("model", choices=_EXPORT_ARCHS, help="the network")
    export.add_argument("out", help="the ONNX file to write, e.g. resnet50_bam.onnx")
    export.add_argument("--attention", choices=_EXPORT_ATTENTIONS, default="bam",
                        help="bam: BAM after layer1..3, combine='product' (default); cbam: CBAM in every block; none: "
                             "the plain network")
    export.add_argument("--combine", choices=_COMBINES, default="product",
                        help="BAM's ⊕: product (the authors' code and checkpoints, default) or sum (the paper)")
    export.add_argument("--input-size", type=int, default=224,
                        help="height and width of the input images; fixed in the ONNX graph. Default 224")
    export.add_argument("--batch", type=int, default=1,
                        help="batch size of the check run (the ONNX batch dimension is dynamic either way). Default 1")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset version (>= 17). Default 18")
    export.add_argument("--num-classes", type=int, default=1000, help="outputs of the classifier. Default 1000")
    export.add_argument("--checkpoint", default=None,
                        help="the authors' ResNet+BAM or ResNet+CBAM checkpoint (*.pth.tar, as --attention) or a "
                             "state_dict in that layout, loaded with bam_triton.models.load_official_checkpoint; "
                             "default: random initialisation")
    export.add_argument("--dynamo", action=argparse.BooleanOptionalAction, default=True,
                        help="--dynamo (default): torch.export-based exporter (needs onnxscript); --no-dynamo: the "
                             "TorchScript-based exporter, where the installed torch still has it")


def _export_error(message):
    print(f"error: bam-triton export: {message}", file=sys.stderr)
    return 2


def _run_export(args):
    """``bam-triton export``: returns the exit status (0 written and checked, 1 onnxruntime disagrees with eager,
    2 a usage error or a missing package)."""
    import importlib.util
    import inspect
    import warnings

    if args.input_size < 33:
        # torch.export fixes a dimension it meets at size 1: the last stage's map must be at least 2x2 (stride 32).
        return _export_error(f"--input-size must be >= 33 (the last stage's feature map must be at least 2x2), got "
                             f"{args.input_size}")
    if args.batch < 1:
        return _export_error(f"--batch must be >= 1, got {args.batch}")
    if args.opset < 17:
        return _export_error(f"--opset must be >= 17, got {args.opset}")
    if args.num_classes < 1:
        return _export_error(f"--num-classes must be >= 1, got {args.num_classes}")
    needed = ["onnx"] + (["onnxscript"] if args.dynamo else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        return _export_error(f"needs the package(s) {', '.join(missing)}"
                             f"{' (the --dynamo exporter uses onnxscript)' if 'onnxscript' in missing else ''}: "
                             f"{_ONNX_PIP}")
    import torch

    parameters = inspect.signature(torch.onnx.export).parameters
    if args.dynamo and "dynamo" not in parameters:
        return _export_error(f"--dynamo needs torch >= 2.5 (this is torch {torch.__version__}); use --no-dynamo")
    if not args.dynamo and "dynamo" in parameters and not hasattr(torch.onnx, "utils"):
        return _export_error(f"--no-dynamo: torch {torch.__version__} no longer has the TorchScript-based ONNX "
                             f"exporter; use --dynamo")
    import onnx

    from ._messages import first_line

    newest = onnx.defs.onnx_opset_version()
    if args.opset > newest:
        return _export_error(f"--opset must be <= {newest} (the newest opset onnx {onnx.__version__} knows), got "
                             f"{args.opset}")
    from . import models

    attention = None if args.attention == "none" else args.attention
    options = {"combine": args.combine} if attention == "bam" else {}
    model = getattr(models, args.model)(num_classes=args.num_classes, attention=attention, **options)
    source = "random initialisation"
    if args.checkpoint is not None:
        try:
            models.load_official_checkpoint(model, args.checkpoint)
        except models.CheckpointReadError as error:
            return _export_error(f"--checkpoint {args.checkpoint!r}: {error}")
        except (RuntimeError, TypeError, ValueError) as error:  # CheckpointMismatchError, a malformed state_dict
            return _export_error(f"--checkpoint {args.checkpoint!r} does not fit {args.model} with --attention "
                                 f"{args.attention} and --num-classes {args.num_classes}: "
                                 f"{_checkpoint_summary(error, _EXPORT_ATTENTIONS)}")
        source = args.checkpoint
    model.eval()
    # torch.export fixes a dimension it meets at size 1, so the export traces with >= 2 images; the batch dimension of
    # the ONNX graph is dynamic, and the check runs at --batch.
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(max(args.batch, 2), 3, args.input_size, args.input_size, generator=generator)
    common = dict(input_names=["images"], output_names=["logits"], opset_version=args.opset)
    with torch.no_grad(), warnings.catch_warnings():
        # BAM's and CBAM's input checks (channel count, empty input) read sizes while a trace records: constants for
        # any valid input, so the tracer's "might not generalize" warning about them is noise here.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"bam_triton\.")
        exporter = "dynamo" if args.dynamo else "TorchScript"
        try:
            if args.dynamo:
                if "external_data" in parameters:  # one self-contained file (ResNet-101 is ~180 MB, far below 2 GB)
                    common["external_data"] = False
                torch.onnx.export(model, (example,), args.out, dynamo=True,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), **common)
            else:
                extra = {"dynamo": False} if "dynamo" in parameters else {}
                axes = {"images": {0: "batch"}, "logits": {0: "batch"}}
                torch.onnx.export(model, (example,), args.out, dynamic_axes=axes, **common, **extra)
        except Exception as error:  # e.g. an opset this exporter does not support
            return _export_error(f"the {exporter} exporter of torch {torch.__version__} failed at --opset {args.opset}: "
                                 f"{type(error).__name__}: {first_line(error)}")
    onnx_model = onnx.load(args.out)
    written = next((entry.version for entry in onnx_model.opset_import if entry.domain in ("", "ai.onnx")), None)
    if written != args.opset:  # the dynamo exporter keeps its own opset where it cannot convert to the one asked for
        os.remove(args.out)
        return _export_error(f"--opset {args.opset}: the {exporter} exporter of torch {torch.__version__} wrote opset "
                             f"{written} instead (file removed); ask for an opset it supports")
    onnx.checker.check_model(onnx_model, full_check=True)
    op_types = sorted({node.op_type for node in onnx_model.graph.node})
    domains = sorted({node.domain for node in onnx_model.graph.node if node.domain not in ("", "ai.onnx")})
    attention_words = f"{args.attention}, combine {args.combine}" if attention == "bam" else args.attention
    print(f"wrote {args.out}: {args.model}, attention {attention_words} ({source}), {args.input_size}x{args.input_size} input, dynamic batch, opset "
          f"{args.opset}, {exporter} exporter; onnx.checker passed")
    print(f"  ops: {', '.join(op_types)}" + (f"; non-standard domains: {', '.join(domains)}" if domains else ""))
    if importlib.util.find_spec("onnxruntime") is None:
        print(f"onnxruntime is not installed: the file was not run (to compare it with eager torch: {_ONNX_PIP})")
        return 0
    import onnxruntime

    session = onnxruntime.InferenceSession(args.out, providers=["CPUExecutionProvider"])
    images = torch.randn(args.batch, 3, args.input_size, args.input_size, generator=generator)
    with torch.no_grad():
        expected = model(images)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    # A whole network in fp32 by two runtimes (different conv algorithms, BN folded into the convs by the exporter):
    # differences of 1e-5 relative to the logits are rounding, 1e-3 would be a wrong graph.
    tolerance = 1e-4 * max(1.0, expected.abs().max().item())
    verdict = "OK" if diff <= tolerance else "MISMATCH"
    print(f"onnxruntime (CPUExecutionProvider) vs eager torch at batch {args.batch}: max |difference| = {diff:.3g} "
          f"({verdict}, tolerance {tolerance:.3g})")
    return 0 if verdict == "OK" else 1


# The optional packages a command cannot run without (export checks its own: they depend on --dynamo; gpu-check its
# own, with the GPU), and how to install each.
_COMMAND_NEEDS = {"plot": ("matplotlib",), "attention": ("matplotlib",), "traffic": ("triton",),
                  "inspect": ("triton",), "overhead": ("triton",), "tune": ("triton",)}
_INSTALL = {"matplotlib": "pip install matplotlib (the project's bench extra)",
            "triton": "pip install triton (Linux only; torch's CUDA wheels bring it)"}


# Where each command writes: (argument attribute, how the user spells it, "dir" that the command creates or "file"
# whose directory must exist).
_OUTPUTS = {"sweep": [("out", "--out", "dir")], "inspect": [("out", "--out", "dir")],
            "gpu-check": [("out", "--out", "dir")], "plot": [("out", "--out", "dir")],
            "attention": [("out", "--out", "file")], "export": [("out", "the output file", "file")],
            "traffic": [("json", "--json", "file")], "overhead": [("json", "--json", "file")]}


def _output_problem(args):
    """Why an output path of the command cannot be written (one line), or None (:func:`output_path_problem`)."""
    for attribute, spelled, kind in _OUTPUTS.get(args.command, ()):
        given = getattr(args, attribute, None)
        problem = None if given is None else output_path_problem(given, spelled, kind)
        if problem:
            return problem
    return None


def output_path_problem(given, spelled, kind):
    """Why the output ``given`` (an argument the user spells ``spelled``; ``kind`` "dir" that the command creates, or
    "file" whose directory must exist) cannot be written, as one line, or None: a directory argument that names a
    file, a file argument that names a directory or lies in a directory that does not exist, a place the OS refuses.
    Also for scripts beside the CLI (``examples/train_synthetic.py``)."""
    path = os.path.abspath(given)
    if kind == "dir":
        if os.path.exists(path) and not os.path.isdir(path):
            return f"{spelled} {given!r} is a file, not a directory"
        nearest = path
        while not os.path.exists(nearest):
            nearest = os.path.dirname(nearest)
    else:
        if os.path.isdir(path):
            return f"{spelled} {given!r} is a directory, not a file"
        nearest = os.path.dirname(path)
        if not os.path.isdir(nearest):
            return f"{spelled} {given!r}: no directory {nearest!r} (create it first)"
    if not os.path.isdir(nearest):
        return f"{spelled} {given!r}: {nearest!r} is a file, not a directory"
    refused = _write_refused(path, kind)
    if refused:
        return f"{spelled} {given!r} cannot be written: {refused}"
    return None


def _write_refused(path, kind):
    """Why the OS refuses to create ``path`` (``kind`` "dir", with its missing parents, or "file") or a file in it,
    or None; what it creates for the question is removed again. Asked of the OS, not of ``os.access``, which says
    yes to root everywhere, also where nothing can be created (/proc)."""
    created = []
    try:
        if kind == "dir":
            missing = []
            while not os.path.exists(path):
                missing.append(path)
                path = os.path.dirname(path)
            for directory in reversed(missing):
                os.mkdir(directory)
                created.append(directory)
            with tempfile.TemporaryFile(dir=missing[0] if missing else path):
                pass
        elif os.path.exists(path):
            open(path, "ab").close()  # an existing file: opened for writing, left unchanged
        else:
            open(path, "xb").close()
            created.append(path)
    except OSError as error:
        return error.strerror or str(error)
    finally:
        for made in reversed(created):
            (os.rmdir if os.path.isdir(made) else os.remove)(made)
    return None


def _checkpoint_problem(path):
    """Why ``--checkpoint`` ``path`` is no checkpoint file (one line), or None."""
    if os.path.isdir(path):
        return f"--checkpoint {path!r} is a directory, not a checkpoint file"
    if not os.path.isfile(path):
        return f"--checkpoint {path!r}: no such file"
    return None


def _attention_image_problem(out):
    """Why matplotlib cannot write the ``attention`` figure to ``out`` (one line), or None."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(out)[1].lstrip(".").lower()
    if extension not in formats:
        return (f"--out {out!r}: {'no' if not extension else f'the format {extension!r} is not an'} image format "
                f"matplotlib writes; end it in one of {', '.join('.' + name for name in sorted(formats))}")
    return None


def _argument_problem(args):
    """What is wrong with the values of the attention and export commands' own arguments (one line), or None."""
    if args.command not in ("attention", "export"):
        return None
    if args.command == "attention":
        if args.images < 1:
            return f"--images must be >= 1, got {args.images}"
        if args.size < _MIN_ATTENTION_SIZE:
            return (f"--size must be >= {_MIN_ATTENTION_SIZE} (the networks downsample 32x; each stage's map needs a "
                    f"pixel), got {args.size}")
        problem = _attention_image_problem(args.out)
        if problem:
            return problem
    if args.combine != "product" and args.attention != "bam":
        return f"--combine {args.combine} applies to BAM only (--attention {args.attention} has no ⊕)"
    return None if args.checkpoint is None else _checkpoint_problem(args.checkpoint)


def _checkpoint_summary(error, attention_choices):
    """One line for a checkpoint that does not fit (``CheckpointMismatchError``: counts and, where its attention
    modules are not the model's, the ``--attention`` it needs among ``attention_choices``) or cannot be read
    (``CheckpointReadError``: its message); ``load_official_checkpoint`` gives the full lists."""
    from .models import CheckpointMismatchError, describe_attention

    if not isinstance(error, CheckpointMismatchError):
        return " ".join(str(error).split())
    hint = []
    if error.combine_mismatches:
        saved = sorted({theirs for _, theirs, _ in error.combine_mismatches})
        names = [name for name, _, _ in error.combine_mismatches]
        hint = [f"{len(names)} BAM(s) saved with combine={' / '.join(map(repr, saved))} ({', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''})" + (f": pass --combine {saved[0]}" if len(saved) == 1 else "")]
    if error.checkpoint_attention is not None:
        found = error.checkpoint_attention
        needed = found[0] if len(found) == 1 else "none" if not found else None
        hint += [f"the checkpoint has {describe_attention(found)}"
                + (f": pass --attention {needed}" if needed in attention_choices else "")]

    def some(keys):
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    parts = [f"{len(keys)} {what} ({some(keys)})" for what, keys in (
        ("missing key(s)", error.missing), ("unexpected key(s)", error.unexpected),
        ("shape mismatch(es)", [key for key, _, _ in error.shape_mismatches])) if keys]
    return "; ".join(parts + hint) + " (bam_triton.models.load_official_checkpoint lists them all)"


def _user_mistake(args):
    """The mistakes every command refuses before it starts, as one line (``None`` when there is none): a bad
    ``BAM_TRITON_*`` environment variable, ``--device cuda`` without a CUDA GPU, a missing package the command needs,
    an output path that cannot be written. Checked first, so that no command prints half a report and then a
    traceback."""
    import importlib.util

    import torch

    from . import _backend

    try:
        _backend.check_environment()
    except ValueError as error:
        return str(error)
    if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
        return f"--device cuda needs a CUDA GPU, and torch {torch.__version__} sees none"
    for package in _COMMAND_NEEDS.get(args.command, ()):
        found = _backend.triton_installed() if package == "triton" else importlib.util.find_spec(package) is not None
        if not found:
            return f"needs the {package} package, which is not installed: {_INSTALL[package]}"
    return _argument_problem(args) or _output_problem(args)


def _parser():
    parser = argparse.ArgumentParser(prog="bam-triton", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="versions, device, runnable backends, and a kernel self-test")
    check.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    _add_bench_commands(commands)
    _add_attention_command(commands)
    _add_export_command(commands)
    return parser


def main(argv=None):
    try:
        return _main(argv)
    except BrokenPipeError:  # stdout closed early (`bam-triton traffic | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would raise again
        return 1


def _main(argv):
    parser = _parser()
    args = parser.parse_args(argv)
    mistake = _user_mistake(args)
    if mistake:
        print(f"error: bam-triton {args.command}: {mistake}", file=sys.stderr)
        return 2
    if args.command == "check":
        _prefer_interpreter_on_cpu(args.device)
        from .selftest import run_check

        return run_check(args.device)
    if args.command == "sweep" and args.interpret and not _use_interpreter_now():
        return 2
    if args.command == "overhead":
        _prefer_interpreter_on_cpu(args.device)  # the kernels load as interpreter kernels there (and run nothing)
    if args.command in ("sweep", "plot", "traffic", "overhead", "inspect", "tune", "gpu-check"):
        from .bench import cli_args

        return cli_args.run(args.command, args)
    if args.command == "attention":
        from .models import CheckpointMismatchError, CheckpointReadError
        from .viz import attention_figure

        try:
            out, _ = attention_figure(args.arch, args.checkpoint, images=args.images, out=args.out, kind=args.kind,
                                      size=args.size, seed=args.seed, scale=args.scale, attention=args.attention,
                                      combine=args.combine)
        except (CheckpointReadError, CheckpointMismatchError) as error:
            print(f"error: bam-triton attention: --checkpoint {args.checkpoint!r} does not fit --arch {args.arch} "
                  f"--attention {args.attention}: {_checkpoint_summary(error, _ATTENTION_KINDS)}" if isinstance(
                      error, CheckpointMismatchError) else
                  f"error: bam-triton attention: --checkpoint {args.checkpoint!r}: {error}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
        return 0
    if args.command == "export":
        return _run_export(args)
    parser.error(f"unknown command {args.command!r}")
