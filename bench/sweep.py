"""``bam-triton sweep``: time every provider of every op on one grid of shapes, dtypes and layouts, on the same tensors.

Output: ``sweep.csv`` (one row per shape x dtype x layout x op x provider x timing mode) and ``sweep.json`` (the
environment, the copy bandwidth, the chosen autotune configs, the skipped providers and the rows), a progress line on
stderr and a summary table on stdout. GB/s use the op's minimal bytes (:func:`bench.traffic.minimal_bytes`).

On CUDA the cases run most important first (:func:`plan`): every case's non-compiled providers, then
``torch.compile`` of the authors' apply step (the apply targets compare against it), then the other compiled ones,
which cost a compile each. ``--time-budget`` stops starting new cases after that many seconds and lists the ones left
out. The CSV and JSON are rewritten after every case, so a run stopped from outside keeps what it measured.

Without CUDA the Triton kernels cannot be timed: the CPU providers are measured, and ``--interpret`` also runs the
kernels through Triton's interpreter to validate them on every shape (rows with ``timing_mode="interpreter"``: their
times are the interpreter's and are never used for speedups or plots).
"""
import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

from bam_triton._dtypes import DTYPE_NAMES, within_tolerance
from bam_triton._messages import first_line

from .providers import (BASELINE, CUDA_ONLY, NETWORK_ATTENTIONS, NETWORK_IMAGE, NETWORK_OPS, NETWORK_PROVIDERS, NO_BAM,
                        PROVIDERS, SINGLE_READ, SINGLE_READ_OPS, network_provider, split_network_provider)
from .traffic import MINIMAL_BYTES_DOC, OPS, batch_problem, channels_problem, minimal_bytes

RESNET50_SHAPES = ((256, 56, 56), (512, 28, 28), (1024, 14, 14))
# CBAM sits in every residual block: ResNet-50's four stages' outputs (BAM's three and the last stage's).
RESNET50_CBAM_SHAPES = RESNET50_SHAPES + ((2048, 7, 7),)
DEFAULT_BATCHES = (32, 64, 128)
QUICK_SHAPES = ((2, 64, 16, 16), (2, 128, 8, 8), (2, 32, 7, 7))
DTYPES = {name: DTYPE_NAMES[name] for name in ("fp32", "fp16", "bf16")}  # the dtypes the sweep times
LAYOUTS = ("nchw", "channels_last")
DEFAULT_OPS = ("pool", "apply-fwd", "apply-bwd", "bam-fwd", "bam-fwd-bwd", "cbam-fwd", "cbam-fwd-bwd")
# Shapes whose x is at most this big also get CUDA-graph replay timings (launch overhead matters there).
CUDAGRAPH_MAX_BYTES = 16 * 2**20
# Ops whose timed fn cannot be captured in a CUDA graph: do_bench timings only (sweep.json: cudagraph_skipped_ops).
CUDAGRAPH_SKIPPED_OPS = {
    "apply-bwd": "its fn is torch.autograd.grad of a graph whose forward ran once, before and outside the capture; "
                 "autograd runs each backward kernel on the stream of its forward op, not on the capturing stream, "
                 "so the capture is invalid (bam-fwd-bwd times forward and backward together, capturable)",
    **{op: "a whole network: launch overhead is not what it measures" for op in NETWORK_OPS},
}
# On CUDA, the order in which the sweep runs ops (most important first; see plan).
OP_PRIORITY = ("apply-fwd", "apply-bwd", "pool", "bam-fwd", "bam-fwd-bwd", "cbam-fwd", "cbam-fwd-bwd")

COLUMNS = ["device", "provider", "op", "N", "C", "H", "W", "dtype", "layout", "combine", "median_ms", "p20_ms",
           "p80_ms", "reps", "gbps", "frac_copy_bw"] + [f"speedup_vs_{p.replace('-', '_')}" for p in PROVIDERS] + \
          ["attention_overhead", "timing_mode", "page_faults", "valid", "max_abs_err", "minimal_bytes", "config"]


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_shape(text):
    """``NxCxHxW`` -> (N, C, H, W) of positive ints."""
    parts = text.strip().lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 4 or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"invalid shape {text!r}: expected NxCxHxW with positive integers, "
                                         f"e.g. 8x256x56x56")
    return dims


def parse_shapes(text):
    """Comma-separated ``NxCxHxW`` list."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of NxCxHxW shapes, e.g. 8x256x56x56,8x512x28x28")
    return [parse_shape(t) for t in items]


def _csv_choice(choices, what):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"invalid {what} {', '.join(bad) or repr(text)}: choose from "
                                             f"{', '.join(choices)} (comma-separated or repeated)")
        return items
    return parse


def _number(kind, minimum, above=False):
    """An argparse type: ``kind`` (int or float) of at least ``minimum`` (greater than it if ``above``)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > minimum if above else value >= minimum):
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {what} {'>' if above else '>='} "
                                             f"{minimum}")
        return value
    return parse


def _flatten(values, default):
    if not values:
        return list(default)
    out = []
    for v in values:
        for item in (v if isinstance(v, list) else [v]):
            if item not in out:
                out.append(item)
    return out


def add_grid_args(p):
    p.add_argument("--shapes", type=parse_shapes, action="append", metavar="NxCxHxW[,...]",
                   help="custom shapes, e.g. 8x256x56x56,8x512x28x28 (default: the ResNet-50 BAM placements "
                        "(256,56,56), (512,28,28), (1024,14,14) at batch sizes 32/64/128)")
    p.add_argument("--batch", type=_number(int, 1), action="append", metavar="N",
                   help="batch size(s) for the default ResNet-50 shapes (repeatable; default 32, 64, 128)")
    p.add_argument("--quick", action="store_true", help=f"tiny shapes for a CPU smoke run: {QUICK_SHAPES}")
    p.add_argument("--dtype", type=_csv_choice(tuple(DTYPES), "dtype"), action="append", metavar="DTYPE",
                   help="fp32, fp16, bf16 (comma-separated or repeated; default fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--layout", type=_csv_choice(LAYOUTS, "layout"), action="append", metavar="LAYOUT",
                   help="nchw, channels_last (default nchw)")
    p.add_argument("--ops", type=_csv_choice(OPS + NETWORK_OPS, "op"), action="append", metavar="OP",
                   help=f"any of {', '.join(OPS + NETWORK_OPS)} (default: {', '.join(DEFAULT_OPS)}); the resnet50 "
                        f"ops time a whole ResNet-50 at 224x224 without attention, with the authors' BAM and CBAM "
                        f"and with ours")
    p.add_argument("--network-batch", type=_number(int, 2), default=None, metavar="N",
                   help="batch size of the resnet50 ops (default 32 on CUDA, 8 on CPU)")
    p.add_argument("--combine", choices=("product", "sum"), default="product",
                   help="⊕ of the two branches (default product, as the authors' code)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")


def add_sweep_args(p):
    add_grid_args(p)
    p.add_argument("--providers", type=_csv_choice(PROVIDERS, "provider"), action="append", metavar="PROVIDER",
                   help=f"any of {', '.join(PROVIDERS)} (default: all that can run here)")
    p.add_argument("--attention", type=_csv_choice(NETWORK_ATTENTIONS, "attention"), action="append",
                   metavar="ATTENTION",
                   help="the resnet50 ops: time the networks with bam, cbam or both (default both; the providers "
                        "authors-eager, torch-path, triton run each, the CBAM networks as <provider>-cbam)")
    p.add_argument("--out", default="bench-results", metavar="DIR", help="output directory (default bench-results)")
    p.add_argument("--interpret", action="store_true",
                   help="without CUDA: also run the Triton kernels through Triton's interpreter and validate them "
                        "against the torch path on every shape (rows marked timing_mode=interpreter, never plotted)")
    p.add_argument("--min-time", type=_number(float, 0), default=0.5, metavar="S",
                   help="CPU timer: seconds of repeats (0.5)")
    p.add_argument("--max-reps", type=_number(int, 1), default=100, metavar="K",
                   help="CPU timer: at most this many repeats")
    p.add_argument("--rounds", type=_number(int, 1), default=3, metavar="K",
                   help="CPU timer: time the providers of each case in K interleaved rounds and pool the samples, so "
                        "that a drift in the machine's load (other processes) hits every provider alike (default 3)")
    p.add_argument("--copy-mib", type=_number(int, 1), default=256, metavar="MIB",
                   help="size of the clone that measures the copy bandwidth (default 256 MiB)")
    p.add_argument("--flush-mib", type=_number(int, 0), default=64, metavar="MIB",
                   help="CPU timer: overwrite this many MiB before each timed call so inputs come from DRAM, as "
                        "do_bench flushes the GPU's L2 (default 64, twice a 32 MiB L3; 0 = hot cache)")
    p.add_argument("--cpu-allocator", choices=("steady", "system"), default="steady",
                   help="CPU: 'steady' (default) keeps freed memory in glibc's heap so no timed call pays page faults "
                        "for fresh temporaries (as the CUDA caching allocator behaves); 'system' leaves malloc as it "
                        "is, where such faults come and go with the process's allocation history")
    p.add_argument("--no-cudagraph", action="store_true", help="CUDA: skip the CUDA-graph replay timings")
    p.add_argument("--time-budget", type=_number(float, 0, above=True), default=None, metavar="SECONDS",
                   help="start no new case after this many seconds from the sweep's start; the cases left out are "
                        "printed and listed in sweep.json (not_run). Default: no limit")


def grid(args):
    if args.quick:
        shapes = list(QUICK_SHAPES)
    elif args.shapes:
        shapes = [s for group in args.shapes for s in group]
    else:
        shapes = [(n, c, h, w) for n in (args.batch or DEFAULT_BATCHES) for (c, h, w) in RESNET50_SHAPES]
    if args.shapes and args.quick:
        shapes = [s for group in args.shapes for s in group]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = _flatten(args.dtype, ["fp16"] if device.type == "cuda" else ["fp32"])
    layouts = _flatten(args.layout, ["nchw"])
    ops = _flatten(args.ops, DEFAULT_OPS)
    return device, shapes, dtypes, layouts, ops


def grid_problem(args, shapes, ops):
    """Why the grid cannot run (one line naming the option that gave the shapes), or None, checked before any work:
    the training ops need a batch their BatchNorm can train on (:func:`traffic.batch_problem`; the resnet50 ops' batch
    is ``--network-batch``, >= 2 by its type), the module ops a C their module's reduction allows
    (:func:`traffic.channels_problem`)."""
    for shape in shapes:
        problem = batch_problem(shape, ops) or channels_problem(shape, ops)
        if problem:
            where = (f"--shapes {'x'.join(map(str, shape))}" if args.shapes else
                     f"--quick shape {'x'.join(map(str, shape))}" if args.quick else f"--batch {shape[0]}")
            return f"{where}: {problem}"
    return None


def network_shapes(args, device):
    """The input shapes of the whole-network ops: (N, 3, 224, 224)."""
    n = getattr(args, "network_batch", None) or (32 if device.type == "cuda" else 8)
    return [(n,) + NETWORK_IMAGE]


# ----------------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------------


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["bam-triton"] + sys.argv[1:]) if sys.argv else "",
        "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "device": str(device), "cpu": _cpu_name(), "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "bam_triton": __import__("bam_triton").__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), sm=f"{props.major}{props.minor}",
                   sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except Exception:
            env["driver"] = None
    else:
        env.update(gpu=None, driver=None)
    return env


def device_label(env):
    return env["gpu"] if env.get("gpu") else f"CPU: {env['cpu']} ({env['cpu_cores']} cores)"


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


class Progress:
    def __init__(self, total, stream=sys.stderr):
        self.total, self.done, self.stream, self.t0 = total, 0, stream, time.time()
        self.tty = stream.isatty()

    def step(self, label):
        self.done += 1
        self.show(label)

    def show(self, label):
        """The bar at the current count with ``label`` (what is running now)."""
        width = 24
        fill = int(width * self.done / max(self.total, 1))
        line = (f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {time.time() - self.t0:6.0f}s  "
                f"{label}")
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def providers_for(device, requested, interpret):
    """(runnable providers, {skipped provider: reason})."""
    run, skipped = [], {}
    for p in requested:
        if p in CUDA_ONLY and device.type != "cuda":
            if p == "triton" and interpret:
                run.append(p)
            else:
                skipped[p] = ("needs a CUDA GPU (the Triton kernels compile for NVIDIA GPUs; on CPU, --interpret "
                              "validates them through the interpreter)" if p == "triton" else "needs a CUDA GPU")
            continue
        run.append(p)
    return run, skipped


def plan(device, shapes, dtypes, layouts, ops, providers, networks=(), attentions=NETWORK_ATTENTIONS):
    """The sweep's units of work, in the order they run: ``(shape, dtype, layout, op, [providers])``.

    On CPU one unit per case with all its providers, in grid order: they are timed together in interleaved rounds.
    On CUDA each provider is timed by itself, so the cases are split and run most important first: (0) the
    non-compiled providers of every case (apply-fwd, apply-bwd, pool, bam-fwd, bam-fwd-bwd), (1) authors-compiled on
    the apply ops (the apply step is to be no slower than torch.compile), (2) triton-compiled on the apply ops,
    (3) the compiled providers of the other ops. A ``torch.compile`` costs seconds per case, so a time budget cuts
    those first. The whole-network ops (``networks``: their input shapes) run after all others, with
    :data:`NETWORK_PROVIDERS` only: the plain network and, for each of ``attentions``, the networks of those of
    ``providers`` that run them."""
    cases = [(shape, dt, lay, op) for shape in shapes for dt in dtypes for lay in layouts for op in ops
             if op not in NETWORK_OPS]

    def runs(op, provider):  # the single-read provider times the whole module only
        return provider != SINGLE_READ or op in SINGLE_READ_OPS

    def network_runs(name):
        provider, attention = split_network_provider(name)
        return provider == NO_BAM or (provider in providers and attention in attentions)

    network_units = [(shape, dt, lay, op, [p for p in NETWORK_PROVIDERS if network_runs(p)])
                     for op in ops if op in NETWORK_OPS for shape in networks for dt in dtypes for lay in layouts]
    if device.type != "cuda":
        return [case + ([p for p in providers if runs(case[3], p)],) for case in cases] + network_units
    eager = [p for p in providers if not p.endswith("-compiled")]
    compiled = [p for p in providers if p.endswith("-compiled")]

    def tier(op, provider):
        if provider is None:
            return 0
        if op in ("apply-fwd", "apply-bwd"):
            return 1 if provider == "authors-compiled" else 2
        return 3

    keyed = []
    for index, case in enumerate(cases):
        op = case[3]
        rank = OP_PRIORITY.index(op) if op in OP_PRIORITY else len(OP_PRIORITY)
        if any(runs(op, p) for p in eager):
            keyed.append(((0, rank, 0, index), case + ([p for p in eager if runs(op, p)],)))
        for j, p in enumerate(compiled):
            keyed.append(((tier(op, p), rank, j, index), case + ([p],)))
    return [unit for _, unit in sorted(keyed, key=lambda item: item[0])] + network_units


def _unit_entry(unit, reason=None):
    shape, dt, lay, op, providers = unit
    entry = dict(op=op, shape=list(shape), dtype=dt, layout=lay, providers=list(providers))
    if reason:
        entry["reason"] = reason
    return entry


def run_sweep(args):
    from . import configs
    from .timing import HOST_REFERENCE, copy_bandwidth, host_reference_us, steady_cpu_allocator

    t_start = time.time()
    budget = getattr(args, "time_budget", None)
    device, shapes, dtypes, layouts, ops = grid(args)
    problem = grid_problem(args, shapes, ops)
    if problem:
        print(f"error: bam-triton sweep: {problem}", file=sys.stderr)
        return 2
    interpret = bool(args.interpret) and device.type == "cpu"
    requested = _flatten(args.providers, PROVIDERS)
    if BASELINE not in requested:
        requested.insert(0, BASELINE)  # speedups need the baseline
    providers, skipped = providers_for(device, requested, interpret)
    os.makedirs(args.out, exist_ok=True)
    env = environment(device)
    if device.type == "cuda":
        env["cpu_allocator"] = None
    else:
        env["cpu_allocator"] = steady_cpu_allocator() if args.cpu_allocator == "steady" else "system"
        env["cpu_timer_rounds"] = args.rounds
    if device.type != "cuda":
        print("No CUDA GPU here: the Triton kernels need one, so the triton and triton-compiled providers are not "
              "timed." + (" --interpret: the kernels run through Triton's interpreter to be validated on every "
                          "shape (interpreter times are not speed)." if interpret else
                          " (Pass --interpret to validate them through Triton's interpreter.)"))
    persistence = None
    if "triton" in providers or "triton-compiled" in providers:
        configs.load_kernels()
        persistence = configs.enable_persistence()
    copy = copy_bandwidth(device, mib=args.copy_mib)
    bw = copy["gbps"]
    env.update(host_reference=HOST_REFERENCE, host_reference_us=host_reference_us())
    print(f"device: {device_label(env)}; copy bandwidth ({copy['method']}, {args.copy_mib} MiB): {bw:.1f} GB/s "
          f"(clone: {copy['clone_gbps']:.1f} GB/s); host reference ({HOST_REFERENCE}): "
          f"{env['host_reference_us']:.1f} us per call")
    env.update(copy_bandwidth_gbps=bw, copy_bandwidth_method=copy["method"], clone_bandwidth_gbps=copy["clone_gbps"],
               copy_into_bandwidth_gbps=copy["copy_into_gbps"], copy_bandwidth_mib=args.copy_mib,
               autotune_persistence=persistence, cpu_cache_flush_mib=0 if device.type == "cuda" else args.flush_mib)

    attentions = _flatten(getattr(args, "attention", None), NETWORK_ATTENTIONS)
    units = plan(device, shapes, dtypes, layouts, ops, providers, network_shapes(args, device), attentions)
    progress = Progress(sum(len(unit[-1]) for unit in units))
    rows, failures, chosen, not_run = [], [], {}, []
    cudagraph_skipped = ({op: why for op, why in CUDAGRAPH_SKIPPED_OPS.items() if op in ops}
                         if device.type == "cuda" and not args.no_cudagraph else {})
    meta = {"environment": env, "grid": {"shapes": [list(s) for s in shapes], "dtypes": dtypes, "layouts": layouts,
                                         "ops": ops, "combine": args.combine, "network_attentions": attentions},
            "providers": providers, "skipped_providers": skipped, "cudagraph_skipped_ops": cudagraph_skipped,
            "time_budget_s": budget, "finished": False, "failures": failures, "not_run": not_run, "pending": [],
            "minimal_bytes": MINIMAL_BYTES_DOC, "chosen_configs": chosen, "all_tuned_configs": {}, "rows": rows}
    # finished stays False and pending lists what is left until the end: a run killed from outside says so.
    meta["pending"] = [_unit_entry(u) for u in units]
    _write_results(args.out, meta)
    for i, unit in enumerate(units):
        if budget is not None and time.time() - t_start >= budget:
            not_run.extend(_unit_entry(u, "time budget") for u in units[i:])
            break
        shape, dt, lay, op, unit_providers = unit
        rows.extend(_run_case(args, device, shape, dt, lay, op, unit_providers, bw, progress, failures, chosen))
        _add_speedups(rows)
        meta["pending"] = [_unit_entry(u) for u in units[i + 1:]]
        meta["all_tuned_configs"] = configs.all_tuned()
        meta["elapsed_s"] = round(time.time() - t_start, 1)
        csv_path, json_path = _write_results(args.out, meta)
    progress.close()
    meta.update(finished=True, pending=[], all_tuned_configs=configs.all_tuned(),
                elapsed_s=round(time.time() - t_start, 1))
    csv_path, json_path = _write_results(args.out, meta)
    if rows:
        print(summary_table(rows, env))
    for p, why in skipped.items():
        print(f"not run: {p}: {why}")
    for op, why in cudagraph_skipped.items():
        print(f"no cudagraph timing: {op}: {why}")
    if not_run:
        print(f"not run: time budget ({budget:g} s) reached: {len(not_run)} case(s) left out:")
        for entry in not_run:
            print(f"  {entry['op']} {'x'.join(map(str, entry['shape']))} {entry['dtype']} {entry['layout']}: "
                  f"{', '.join(entry['providers'])}")
    print(f"wrote {csv_path} and {json_path}")
    for fail in failures:  # one line each (sweep.json's failures keep the whole message as detail)
        print(f"failed: {fail['provider']} {fail['op']} {'x'.join(map(str, fail['shape']))} {fail['dtype']} "
              f"{fail['layout']}: {fail['error']}", file=sys.stderr)
    if not rows:
        print(f"error: bam-triton sweep: no timing at all: every provider of every case failed "
              f"({len(failures)} failure(s), listed above and in {json_path})" if failures else
              "error: bam-triton sweep: no timing at all: no case ran", file=sys.stderr)
        return 1
    if failures:
        print(f"{len(failures)} failure(s), listed above and in {json_path}; the timings that worked are in "
              f"{csv_path}", file=sys.stderr)
    bad = [r for r in rows if r.get("valid") is False]
    if bad:
        print(f"VALIDATION FAILED for {len(bad)} row(s): see the valid/max_abs_err columns", file=sys.stderr)
        return 1
    return 0


def _write_results(out, meta):
    """Write sweep.csv and sweep.json (rows so far, speedups included); returns their paths."""
    csv_path, json_path = os.path.join(out, "sweep.csv"), os.path.join(out, "sweep.json")
    # Each file is written aside and moved into place: a run stopped mid-write leaves the previous version whole.
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in meta["rows"]:
            writer.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    os.replace(csv_path + ".tmp", csv_path)
    with open(json_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1, default=str)
    os.replace(json_path + ".tmp", json_path)
    return csv_path, json_path


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _run_case(args, device, shape, dt, lay, op, providers, copy_bw, progress, failures, chosen):
    from . import configs
    from .providers import OpCase
    from .timing import cpu_timer_interleaved, cuda_do_bench, cuda_graph_bench

    dtype = DTYPES[dt]
    n, c, h, w = shape
    case = OpCase(op, shape, dtype, lay == "channels_last", device, combine=args.combine)
    # GB/s mean something for BAM's own ops only: a whole network's time is mostly its convolutions.
    nbytes = None if op in NETWORK_OPS else minimal_bytes(op, n, c, h, w, dtype.itemsize)
    label = f"{op} {'x'.join(map(str, shape))} {dt} {lay}"
    # The reference of every comparison: the torch path (of the same attention, for the whole-network ops), computed
    # even when not timed.
    refs = {}
    for attention in {_attention_of(op, p) for p in providers} - {None}:
        reference = network_provider("torch-path", attention) if op in NETWORK_OPS else "torch-path"
        if reference not in providers:
            try:
                fn, result = case.make(reference)
                refs[attention] = result(fn()).detach().clone()
            except Exception:
                pass
    outputs, modes, configs_of, cpu_fns = {}, {}, {}, {}
    for provider in providers:
        progress.step(f"{label} {provider}")
        base, attention = split_network_provider(provider) if op in NETWORK_OPS else (provider, "bam")
        interp = device.type == "cpu" and base in CUDA_ONLY
        if interp and op in NETWORK_OPS:
            continue  # a ResNet-50 through the interpreter validates nothing the BAM ops don't, in hours
        try:
            fn, result = case.make(provider)
            configs.reset_marks()
            out = fn()  # first call: compiles / autotunes
            _sync(device)
            cfg = configs.chosen_since_reset()
            if cfg:
                chosen.setdefault(provider, {})[f"{label}"] = cfg
            got = result(out)
            if base == "torch-path":
                refs[attention] = got.detach().clone()
            modes[provider] = []
            if interp:
                t0 = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t0) * 1e3
                modes[provider].append(("interpreter", (ms, ms, ms), 1, None))
            elif device.type == "cuda":
                modes[provider].append(("do_bench",) + cuda_do_bench(fn) + (None,))
                if (not args.no_cudagraph and op not in CUDAGRAPH_SKIPPED_OPS
                        and n * c * h * w * dtype.itemsize <= CUDAGRAPH_MAX_BYTES):
                    try:
                        modes[provider].append(("cudagraph",) + cuda_graph_bench(fn) + (None,))
                    except Exception as exc:  # graph capture of a compiled fn can fail: report, keep going
                        failures.append(_failure(provider, op, shape, dt, lay, exc, "cudagraph: "))
            else:
                cpu_fns[provider] = fn  # timed below, all providers together
        except Exception as exc:
            failures.append(_failure(provider, op, shape, dt, lay, exc))
            continue
        configs_of[provider] = cfg
        outputs[provider] = got
        del out, fn
    if cpu_fns:
        rounds = f"{args.rounds} interleaved round{'s' if args.rounds > 1 else ''}"
        progress.show(f"{label}: timing {', '.join(cpu_fns)} in {rounds}")
        timed = cpu_timer_interleaved(cpu_fns, rounds=args.rounds, min_time=args.min_time, max_reps=args.max_reps,
                                      flush_bytes=args.flush_mib * 2**20)
        for provider, res in timed.items():
            if isinstance(res, Exception):
                failures.append(_failure(provider, op, shape, dt, lay, res))
                del modes[provider]
            else:
                modes[provider].append(("cpu-timer",) + res)
    rows = []
    for provider in providers:
        for mode, (med, p20, p80), reps, faults in modes.get(provider, ()):
            row = dict(device=str(device), provider=provider, op=op, N=n, C=c, H=h, W=w, dtype=dt, layout=lay,
                       combine=args.combine, median_ms=med, p20_ms=p20, p80_ms=p80, reps=reps, timing_mode=mode,
                       page_faults=faults,
                       minimal_bytes=nbytes, config="; ".join(f"{k}: {v}" for k, v in configs_of[provider].items()))
            if mode != "interpreter" and nbytes is not None:
                row["gbps"] = nbytes / (med * 1e-3) / 1e9
                row["frac_copy_bw"] = row["gbps"] / copy_bw
            rows.append(row)
    # Validation against the torch path on the same tensors: our kernels (compiled or interpreted) must be within
    # bam_triton.TOLERANCES (valid column); the authors' formulations' differences are reported (max_abs_err) only.
    for r in rows:
        got, ref = outputs.get(r["provider"]), refs.get(_attention_of(op, r["provider"]))
        if got is None or ref is None:
            continue
        ok, err = within_tolerance(got, ref, dtype)
        r["max_abs_err"] = err
        if r["provider"] in CUDA_ONLY and op not in NETWORK_OPS:  # a network's logits: reported, not judged
            r["valid"] = ok
    return rows


def _failure(provider, op, shape, dt, lay, exc, prefix=""):
    """sweep.json's entry of a failed provider run: ``error`` is one line (the exception's type and the first line of
    its message: torch.compile's run to dozens of lines), ``detail`` the whole message where it has more."""
    message, first = str(exc).strip(), first_line(exc)
    entry = dict(provider=provider, op=op, shape=shape, dtype=dt, layout=lay,
                 error=f"{prefix}{type(exc).__name__}" + (f": {first}"[:300] if first else ""))
    if message != first:
        entry["detail"] = f"{prefix}{type(exc).__name__}: {message}"[:4000]
    return entry


def _attention_of(op, provider):
    """The attention a provider's row times: ``"bam"`` for BAM's own ops, the network's (None: no attention) for the
    whole-network ops."""
    return split_network_provider(provider)[1] if op in NETWORK_OPS else "bam"


def _add_speedups(rows):
    """speedup_vs_<p> = time(p) / time(row), within one (case, timing mode); interpreter rows get none. A CBAM
    network's row compares with the CBAM networks (speedup_vs_authors_eager: the authors' CBAM network's time over
    this one's); attention_overhead = time(row) / time(no-bam) - 1, what the attention adds to the network."""
    groups = {}
    for r in rows:
        key = (r["op"], r["N"], r["C"], r["H"], r["W"], r["dtype"], r["layout"], r["timing_mode"])
        groups.setdefault(key, {})[r["provider"]] = r
    for key, by_p in groups.items():
        if key[-1] == "interpreter":
            continue
        for r in by_p.values():
            attention = _attention_of(r["op"], r["provider"]) or "bam"
            for p in PROVIDERS:
                base = by_p.get(network_provider(p, attention) if r["op"] in NETWORK_OPS else p)
                if base is not None:
                    r[f"speedup_vs_{p.replace('-', '_')}"] = base["median_ms"] / r["median_ms"]
            if NO_BAM in by_p and r["provider"] != NO_BAM:  # what the attention adds to the network's time
                r["attention_overhead"] = r["median_ms"] / by_p[NO_BAM]["median_ms"] - 1


def summary_table(rows, env):
    lines = [f"\nSummary ({device_label(env)}; copy bandwidth {env['copy_bandwidth_gbps']:.1f} GB/s; "
             f"speedup = authors-eager time / provider time)"]
    hdr = (f"{'op':<16}{'shape':<18}{'dtype':<6}{'layout':<14}{'provider':<18}{'mode':<12}{'median ms':>11}"
           f"{'p20-p80 ms':>21}{'GB/s':>8}{'%copy':>7}{'speedup':>9}  valid")
    lines += [hdr, "-" * len(hdr)]
    for r in rows:
        sp = r.get("speedup_vs_authors_eager")
        shape = "x".join(str(r[k]) for k in "NCHW")
        spread = f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
        gbps = f"{r['gbps']:.1f}" if r.get("gbps") else "-"
        frac = f"{100 * r['frac_copy_bw']:.0f}%" if r.get("frac_copy_bw") else "-"
        speed = f"{sp:.2f}x" if sp else "-"
        valid = "" if r.get("valid") is None else ("ok" if r["valid"] else "FAIL")
        lines.append(f"{r['op']:<16}{shape:<18}{r['dtype']:<6}{r['layout']:<14}{r['provider']:<18}"
                     f"{r['timing_mode']:<12}{r['median_ms']:>11.3f}{spread:>21}{gbps:>8}{frac:>7}{speed:>9}  {valid}")
    lines += cpu_target_lines(rows)
    lines += network_overhead_lines(rows)
    lines.append("")
    if any(r.get("valid") is None for r in rows):
        lines.append("valid: the Triton kernels' outputs against the torch path's within bam_triton.TOLERANCES (ok or "
                     "FAIL); blank where nothing is judged: the torch path is the reference, the authors' formulations "
                     "are compared in sweep.csv's max_abs_err only, and a whole network's logits are not judged.")
    reference = env.get("host_reference_us")
    lines.append(f"Same-machine references of this run: copy bandwidth {env['copy_bandwidth_gbps']:.1f} GB/s"
                 + (f", host reference {reference:.1f} us per call ({env['host_reference']})" if reference else "")
                 + ". A slower machine lowers the first and raises the second, and every time with them; the "
                   "speedups and %copy compare providers within the run, so a change in them at similar references "
                   "is the code's.")
    lines.append("Why the speedups are what they are: `bam-triton traffic` counts the bytes each provider moves at one "
                 "shape (multiples of |F|, the feature map's size), and its bound at equal bandwidth.")
    return "\n".join(lines)


# The project's CPU targets: the torch path's module forward >= 1.5x the authors' eager code. BAM's is set for the
# default grid (ResNet-50's BAM shapes at batch 32/64/128); CBAM's for ResNet-50's CBAM shapes at any batch.
CPU_TARGETS = {
    "bam-fwd": (lambda r: r["N"] in DEFAULT_BATCHES and (r["C"], r["H"], r["W"]) in RESNET50_SHAPES,
                "the default grid: the ResNet-50 shapes at batch 32/64/128"),
    "cbam-fwd": (lambda r: (r["C"], r["H"], r["W"]) in RESNET50_CBAM_SHAPES,
                 "ResNet-50's CBAM shapes: 256x56x56, 512x28x28, 1024x14x14, 2048x7x7"),
}


def cpu_target_lines(rows):
    """A verdict on the 1.5x CPU target per timed module forward of the torch path (others: no verdict)."""
    lines = []
    for r in rows:
        target = CPU_TARGETS.get(r["op"])
        sp = r.get("speedup_vs_authors_eager")
        if not target or r["provider"] != "torch-path" or r["timing_mode"] != "cpu-timer" or not sp:
            continue
        applies, where = target
        verdict = f"{'meets' if sp >= 1.5 else 'does NOT meet'} the 1.5x CPU target" if applies(r) else \
            f"the 1.5x CPU target is set for {where}"
        lines.append(f"{r['op']} torch-path vs authors-eager at {r['N']}x{r['C']}x{r['H']}x{r['W']} {r['dtype']} "
                     f"{r['layout']}: {sp:.2f}x ({verdict})")
    return [""] + lines if lines else []


def _overhead_range(row, plain):
    """What the p20..p80 spreads of a network's and the plain network's times allow its overhead to be:
    ``(p20 / plain p80 - 1, p80 / plain p20 - 1)``, or None without them."""
    try:
        return row["p20_ms"] / plain["p80_ms"] - 1, row["p80_ms"] / plain["p20_ms"] - 1
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def network_overhead_lines(rows):
    """Per whole-network case and timing mode, for BAM and for CBAM: 'BAM adds X % with the authors' code, Y % with
    ours', each with the range its p20..p80 spreads allow; CBAM's line says whether ours adds at most half of what
    the authors' adds (the project's target)."""
    cases = {}
    for r in rows:
        if r["op"] in NETWORK_OPS:
            key = (r["op"], r["N"], r["dtype"], r["layout"], r["timing_mode"])
            cases.setdefault(key, {})[r["provider"]] = r
    lines = []
    for (op, n, dt, lay, mode), by_provider in cases.items():
        plain = by_provider.get(NO_BAM)
        for attention in NETWORK_ATTENTIONS:
            overhead = {}
            for provider in ("authors-eager", "torch-path", "triton"):
                r = by_provider.get(network_provider(provider, attention))
                if r is not None and r.get("attention_overhead") is not None:
                    overhead[provider] = (r["attention_overhead"], _overhead_range(r, plain) if plain else None)
            if not overhead:
                continue

            def shown(provider):
                value, spread = overhead[provider]
                return f"{100 * value:.1f} %" + (f" (p20-p80: {100 * spread[0]:.1f} to {100 * spread[1]:.1f} %)"
                                                  if spread else "")

            ours = ", ".join(f"{shown(p)} with ours ({p})" for p in ("torch-path", "triton") if p in overhead)
            authors = f"{shown('authors-eager')} with the authors' code" if "authors-eager" in overhead \
                else "the authors' code not timed"
            line = (f"{op} batch {n} {dt} {lay} ({mode}): {attention.upper()} adds {authors}; "
                    f"{ours or 'ours not timed'} (over the same ResNet-50 without attention)")
            if attention == "cbam" and "authors-eager" in overhead:
                theirs = overhead["authors-eager"][0]
                verdicts = [f"{p} {'meets' if overhead[p][0] <= theirs / 2 else 'does NOT meet'}"
                            for p in ("torch-path", "triton") if p in overhead]
                if verdicts:
                    line += f"; target, ours at most half of theirs: {', '.join(verdicts)}"
            lines.append(line)
    return ([""] + lines) if lines else []
