"""Memory traffic of BAM, in one place: the *minimal* bytes of each benchmarked op (the denominator of every GB/s in
the sweep), the bytes each provider actually moves (counted op by op), and the fused kernels' own load/store formulas.

Counting rules (``count_bytes``): every aten op is charged the storage bytes of its tensor inputs (reads) and outputs
(writes); views (``view``, ``expand``, ``unsqueeze``, ``permute``, ...) cost nothing, and an expanded input is charged
its real, un-expanded storage. In-place ops are charged a read and a write of their buffer. The eager providers run on
the META device, so the full ResNet-50 shapes cost no memory and no time. The Triton custom ops
(``bam_triton::channel_pool`` / ``apply`` / ``apply_backward``) are intercepted and charged their kernels' formulas
(``KERNEL_BYTES``), because a kernel's traffic is what it loads and stores, not what its signature shows: inside the
BAM block, for example, the backward reads ``g`` twice (a reduction pass over g and x, then the dx pass).

|F| is the size in bytes of the feature map ``x`` (N·C·H·W·itemsize).
"""
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .providers import SINGLE_READ

# ----------------------------------------------------------------------------------------------------------------------
# What the benchmarked modules need of a shape
# ----------------------------------------------------------------------------------------------------------------------


def module_reduction(module):
    """The reduction r of the ``module`` (``"bam"`` or ``"cbam"``) the benchmarks build: ``BAM(c)`` and ``CBAM(c)``
    (``providers.OpCase``, :func:`provider_traffic`) take the module's default, read here from its signature so that
    the number has one home (``bam_triton``). The module needs ``C >= r`` (hidden width ``C // r >= 1``)."""
    import inspect

    from bam_triton import BAM, CBAM

    return inspect.signature({"bam": BAM, "cbam": CBAM}[module]).parameters["reduction"].default


def batch_problem(shape, ops):
    """Why ``ops`` cannot train at ``shape`` (a clause for the caller to prefix with the option that gave the shape),
    or None: ``bam-fwd-bwd`` trains BAM, whose channel branch's BatchNorm1d needs N >= 2; ``cbam-fwd-bwd`` trains
    CBAM, whose spatial gate's BatchNorm2d needs N·H·W >= 2."""
    n, _, h, w = shape
    if "bam-fwd-bwd" in ops and n < 2:
        return (f"N must be >= 2 for bam-fwd-bwd (it trains BAM, whose channel branch's BatchNorm1d needs two samples "
                f"in training mode), got N={n}")
    if "cbam-fwd-bwd" in ops and n * h * w < 2:
        return (f"N·H·W must be >= 2 for cbam-fwd-bwd (it trains CBAM, whose spatial gate's BatchNorm2d needs two "
                f"values in training mode), got {n * h * w}")
    return None


def channels_problem(shape, ops):
    """Why ``ops`` cannot build their module at ``shape`` (a clause for the caller to prefix with the option that gave
    the shape), or None: the bam-* ops build ``BAM(C)``, the cbam-* ops ``CBAM(C)``, and each needs ``C >= r``
    (:func:`module_reduction`)."""
    c = shape[1]
    for module in ("bam", "cbam"):
        mine = [op for op in ops if op.split("-")[0] == module]
        r = module_reduction(module) if mine else None
        if mine and c < r:
            return (f"C must be >= {r} for {', '.join(mine)} ({module.upper()}(C) at its reduction r={r}: hidden width "
                    f"C // {r} >= 1), got C={c}")
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Minimal bytes per benchmarked op (the GB/s denominator)
# ----------------------------------------------------------------------------------------------------------------------

OPS = ("pool", "apply-fwd", "apply-bwd", "bam-fwd", "bam-fwd-bwd", "cbam-fwd", "cbam-fwd-bwd")

MINIMAL_BYTES_DOC = {
    "pool": "read x once; write the (N, C) means",
    "apply-fwd": "read x once, write out once, read mc (N, C) and ms (N, H·W)",
    "apply-bwd": "read g and x once, write dx once, read mc/ms, write dmc/dms",
    "bam-fwd": "read x twice (pool + 1x1 conv in one pass; the apply pass needs the global pool first), write out once, "
               "plus the small maps",
    "bam-fwd-bwd": "forward 3|F|; backward 4|F| (a pass reading g and x for the global reductions dx depends on, "
                   "then a pass reading g and writing dx), plus the small maps",
    "cbam-fwd": "read x three times (the pooling over H, W; the max and mean over C of x·a, which need a; the apply "
                "step, which needs b), write out once, plus the small maps",
    "cbam-fwd-bwd": "forward 4|F|; backward 6|F| (g and x for db, which the conv's backward needs; g and x for da, "
                    "which the MLP's backward needs; g read and dx written), plus the small maps",
}


def minimal_bytes(op, n, c, h, w, itemsize, map_itemsize=None):
    """Bytes an ideal implementation of ``op`` must move at this shape (ignores weights and the tiny hidden maps)."""
    map_itemsize = itemsize if map_itemsize is None else map_itemsize
    f = n * c * h * w * itemsize
    maps = (n * c + n * h * w) * map_itemsize
    if op == "pool":
        return f + n * c * itemsize
    if op == "apply-fwd":
        return 2 * f + maps
    if op == "apply-bwd":
        return 3 * f + 2 * maps
    if op == "bam-fwd":
        return 3 * f + maps
    if op == "bam-fwd-bwd":
        return 7 * f + 3 * maps
    if op == "cbam-fwd":
        return 4 * f + maps
    if op == "cbam-fwd-bwd":
        return 10 * f + 3 * maps
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


# ----------------------------------------------------------------------------------------------------------------------
# Counting aten traffic
# ----------------------------------------------------------------------------------------------------------------------


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _tensors(t)
    elif isinstance(tree, dict):
        for t in tree.values():
            yield from _tensors(t)


def _storage_bytes(t):
    try:
        return t.untyped_storage().nbytes()
    except Exception:  # pragma: no cover - tensors without storage (sparse, ...)
        return t.numel() * t.element_size()


@dataclass
class TrafficLog:
    read: int = 0
    write: int = 0
    ops: list = field(default_factory=list)  # (name, read, write)

    @property
    def total(self):
        return self.read + self.write

    def add(self, name, read, write):
        self.read += read
        self.write += write
        self.ops.append((name, read, write))


class CountBytes(TorchDispatchMode):
    """Charge each aten op its tensor inputs' and outputs' storage bytes; views are free. The bam_triton custom ops
    run uncharged: on META tensors they run their launchers, and every Triton launch recorded in ``launches`` (the
    launchers' plans and arguments) is charged by :func:`launch_bytes`, in the order things ran."""

    def __init__(self, log, launches=()):
        super().__init__()
        self.log, self.launches, self.charged = log, launches, 0

    def charge_launches(self):
        for plan, args in self.launches[self.charged:]:
            self.log.add(f"triton:{plan.kernel_name}", *launch_bytes(plan, args))
        self.charged = len(self.launches)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.charge_launches()
        name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        if getattr(func, "namespace", None) == "bam_triton":
            out = func(*args, **kwargs)
            self.charge_launches()
            return out
        out = func(*args, **kwargs)
        if getattr(func, "is_view", False) or name in ("detach", "alias", "lift_fresh"):
            return out
        # An ``out=`` argument is written, not read.
        ins = list(_tensors(args)) + list(_tensors({k: v for k, v in kwargs.items() if k != "out"}))
        outs = list(_tensors(out))
        # Distinct storages only (an in-place op reads and writes its buffer: both are charged).
        read = sum(_storage_bytes(t) for t in _unique(ins))
        write = sum(_storage_bytes(t) for t in _unique(outs))
        if name in ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"):
            read = write = 0  # allocation moves no data
        self.log.add(name, read, write)
        return out


def _unique(tensors):
    seen, out = set(), []
    for t in tensors:
        key = (t.device.type, _storage_key(t))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _storage_key(t):
    try:
        return t.untyped_storage()._cdata
    except Exception:  # pragma: no cover
        return id(t)


def launch_bytes(plan, sizes):
    """(read, write) bytes of one recorded launch: every pointer argument the plan reads or writes, once, at the size
    of the tensor the launcher passed (partial-sum buffers as allocated: for the first config the pruner keeps)."""
    read = write = 0
    for name, nbytes in sizes.items():
        if not name.endswith("_ptr") or name in plan.unused:
            continue
        if name in plan.writes:
            write += nbytes
        else:
            read += nbytes
    return read, write


def count_bytes(fn):
    """Run ``fn()`` (on META tensors) under :class:`CountBytes`, with the Triton launches it makes recorded
    (``kernels._common.record_launches``) and charged from their plans; returns the :class:`TrafficLog`."""
    from bam_triton.kernels._common import record_launches

    log = TrafficLog()
    with record_launches() as launches:
        counter = CountBytes(log, launches)
        with counter:
            fn()
        counter.charge_launches()
    return log


# ----------------------------------------------------------------------------------------------------------------------
# Providers, on meta
# ----------------------------------------------------------------------------------------------------------------------

# The sweep's provider names (``bench/providers.py``); the last is BAM(single_read=True): the whole module's ops only.
TRAFFIC_PROVIDERS = ("authors-eager", "torch-path", "triton", SINGLE_READ)


def _meta_inputs(shape, dtype, channels_last=False, grad=False):
    n, c, h, w = shape
    x = torch.empty(shape, device="meta", dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mc = torch.empty(n, c, device="meta", dtype=dtype)
    ms = torch.empty(n, h, w, device="meta", dtype=dtype)
    if grad:
        for t in (x, mc, ms):
            t.requires_grad_()
    return x, mc, ms


def provider_traffic(provider, op, shape, dtype=torch.float16, channels_last=False, combine="product"):
    """Bytes ``provider`` moves for ``op`` ("apply-fwd", "apply-fwd-bwd", "bam-fwd", "bam-fwd-bwd", "pool") at
    ``shape``: a :class:`TrafficLog` (forward and backward together for the *-bwd ops)."""
    from bam_triton import BAM, CBAM, bam_apply, channel_pool

    from .providers import AuthorsBAM, AuthorsCBAM, authors_apply, authors_pool

    n, c, h, w = shape
    backward = op.endswith("bwd")
    if provider == "authors-eager":
        backend = None
    elif provider == "torch-path":
        backend = "torch"
    elif provider in ("triton", SINGLE_READ):
        backend = "triton"
    else:
        raise ValueError(f"unknown provider {provider!r}; expected one of {TRAFFIC_PROVIDERS}")

    if op.startswith(("bam", "cbam")):
        if op.startswith("cbam"):
            if provider == SINGLE_READ:
                raise ValueError(f"{SINGLE_READ} is BAM's: CBAM has no single-read front end")
            module = CBAM(c, backend=backend or "torch").to(device="meta", dtype=dtype)
            module = AuthorsCBAM(module) if provider == "authors-eager" else module
        else:
            module = BAM(c, combine=combine, backend=backend or "torch",
                         single_read=provider == SINGLE_READ).to(device="meta", dtype=dtype)
            module = AuthorsBAM(module, combine=combine) if provider == "authors-eager" else module
        module.train(backward)
        x, _, _ = _meta_inputs(shape, dtype, channels_last, grad=backward)

        def run():
            y = module(x)
            if backward:
                y.backward(torch.empty_like(y))
    elif op == "pool":
        x, _, _ = _meta_inputs(shape, dtype, channels_last)

        def run():
            authors_pool(x) if provider == "authors-eager" else channel_pool(x, backend=backend)
    elif op in ("apply-fwd", "apply-bwd", "apply-fwd-bwd"):
        x, mc, ms = _meta_inputs(shape, dtype, channels_last, grad=backward)

        def run():
            if provider == "authors-eager":
                y = authors_apply(x, mc, ms, combine)
            else:
                y = bam_apply(x, mc, ms, combine=combine, backend=backend)
            if backward:
                y.backward(torch.empty_like(y))
    else:
        raise ValueError(f"unknown op {op!r}")
    return count_bytes(run)


def traffic_report(shape, dtype=torch.float16, channels_last=False, combine="product"):
    """{(op, provider): {"bytes", "x_F", "ops"}} for the module and the apply step, forward and forward+backward."""
    n, c, h, w = shape
    f = n * c * h * w * torch.empty((), dtype=dtype).element_size()
    report = {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "F_bytes": f, "rows": []}
    for op in ("pool", "apply-fwd", "apply-fwd-bwd", "bam-fwd", "bam-fwd-bwd", "cbam-fwd", "cbam-fwd-bwd"):
        base = None
        for provider in TRAFFIC_PROVIDERS:
            if provider == SINGLE_READ and not op.startswith("bam"):
                continue
            log = provider_traffic(provider, op, shape, dtype, channels_last, combine)
            base = log.total if base is None else base
            report["rows"].append({
                "op": op, "provider": provider, "read_bytes": log.read, "write_bytes": log.write,
                "bytes": log.total, "x_F": log.total / f, "speedup_bound_vs_authors": base / log.total,
                "n_aten_ops": len(log.ops),
                "full_passes": sum(1 for _, r, wr in log.ops if r + wr >= f),
                "ops": log.ops,
            })
    return report


def fused_backward_passes(report, module="bam"):
    """The Triton kernels of the fused block's backward and their passes over (N, C, H, W) memory, from the recorded
    launches of the report's bam-fwd-bwd (cbam-fwd-bwd) row: the launches after the forward's apply kernel."""
    row = next(r for r in report["rows"] if r["op"] == f"{module}-fwd-bwd" and r["provider"] == "triton")
    kernels = [(name[len("triton:"):], read + write) for name, read, write in row["ops"] if name.startswith("triton:")]
    apply_kernel = "apply_fwd_kernel" if module == "bam" else "apply_kernel"
    first = next(i for i, (name, _) in enumerate(kernels) if name == apply_kernel) + 1
    return [(name, moved / report["F_bytes"]) for name, moved in kernels[first:]]


def format_report(report):
    f = report["F_bytes"]
    lines = [f"Traffic at shape {'x'.join(map(str, report['shape']))} {report['dtype']}: |F| = {f / 2**20:.2f} MiB",
             f"{'op':<14}{'provider':<20}{'read MiB':>10}{'write MiB':>10}{'total':>10}{'x |F|':>8}"
             f"{'bound vs authors':>18}{'aten ops':>10}{'passes>=|F|':>12}"]
    for r in report["rows"]:
        lines.append(f"{r['op']:<14}{r['provider']:<20}{r['read_bytes'] / 2**20:>10.1f}{r['write_bytes'] / 2**20:>10.1f}"
                     f"{r['bytes'] / 2**20:>10.1f}{r['x_F']:>8.2f}{r['speedup_bound_vs_authors']:>17.2f}x"
                     f"{r['n_aten_ops']:>10}{r['full_passes']:>12}")
    lines.append("bound vs authors = authors-eager bytes / provider bytes: the speedup at equal bandwidth.")
    return "\n".join(lines)


def run_traffic(args):
    """``bam-triton traffic``: the table, the orientation numbers and the fused backward's passes."""
    import json
    import sys

    from bam_triton._dtypes import DTYPE_NAMES

    # Every report trains BAM and CBAM (the forward+backward rows) and builds them at their default reduction.
    modules = ("bam-fwd", "bam-fwd-bwd", "cbam-fwd", "cbam-fwd-bwd")
    problem = batch_problem(args.shape, modules) or channels_problem(args.shape, modules)
    if problem:
        print(f"error: bam-triton traffic: --shape {'x'.join(map(str, args.shape))}: {problem}", file=sys.stderr)
        return 2
    dtype = DTYPE_NAMES[args.dtype]
    report = traffic_report(tuple(args.shape), dtype, args.layout == "channels_last", args.combine)
    print(format_report(report))
    rows = {(r["op"], r["provider"]): r for r in report["rows"]}
    print("\nForward of the whole module: authors-eager {:.2f} |F|, torch-path {:.2f} |F|, triton {:.2f} |F| "
          "-> triton bound {:.2f}x vs the authors at equal bandwidth.".format(
              rows["bam-fwd", "authors-eager"]["x_F"], rows["bam-fwd", "torch-path"]["x_F"],
              rows["bam-fwd", "triton"]["x_F"], rows["bam-fwd", "triton"]["speedup_bound_vs_authors"]))
    print("Forward+backward: authors-eager {:.2f} |F|, torch-path {:.2f} |F|, triton {:.2f} |F| -> bound {:.2f}x.".format(
        rows["bam-fwd-bwd", "authors-eager"]["x_F"], rows["bam-fwd-bwd", "torch-path"]["x_F"],
        rows["bam-fwd-bwd", "triton"]["x_F"], rows["bam-fwd-bwd", "triton"]["speedup_bound_vs_authors"]))
    print("Single read of x (BAM(single_read=True), opt-in): forward {:.3f} |F| (bound {:.2f}x), forward+backward "
          "{:.3f} |F| (bound {:.2f}x).".format(
              rows["bam-fwd", SINGLE_READ]["x_F"], rows["bam-fwd", SINGLE_READ][
                  "speedup_bound_vs_authors"], rows["bam-fwd-bwd", SINGLE_READ]["x_F"],
              rows["bam-fwd-bwd", SINGLE_READ]["speedup_bound_vs_authors"]))
    f = report["F_bytes"]
    print("\nTriton path's fused backward, full passes over (N, C, H, W) memory (one pass = |F| read or written), from "
          "the launches recorded:")
    passes = fused_backward_passes(report)
    for name, moved in passes:
        print(f"  {name:<32}{moved:5.2f} passes")
    print(f"  {'total':<32}{sum(moved for _, moved in passes):5.2f} passes (+ 1 for the spatial branch's 1x1-conv "
          f"input gradient dx_conv, written by torch)")
    print("\nCBAM, forward: authors-eager {:.2f} |F|, torch-path {:.2f} |F|, triton {:.2f} |F| (bound {:.2f}x); "
          "forward+backward: authors-eager {:.2f} |F|, torch-path {:.2f} |F|, triton {:.2f} |F| (bound {:.2f}x)."
          .format(*(rows["cbam-fwd", p]["x_F"] for p in ("authors-eager", "torch-path", "triton")),
                  rows["cbam-fwd", "triton"]["speedup_bound_vs_authors"],
                  *(rows["cbam-fwd-bwd", p]["x_F"] for p in ("authors-eager", "torch-path", "triton")),
                  rows["cbam-fwd-bwd", "triton"]["speedup_bound_vs_authors"]))
    print("CBAM's Triton backward, full passes:")
    passes = fused_backward_passes(report, "cbam")
    for name, moved in passes:
        print(f"  {name:<32}{moved:5.2f} passes")
    print(f"  {'total':<32}{sum(moved for _, moved in passes):5.2f} passes")
    if args.ops_detail:
        for r in report["rows"]:
            print(f"\n{r['op']} / {r['provider']}:")
            for name, rd, wr in r["ops"]:
                print(f"  {name:<32}{rd / f:7.3f} |F| read {wr / f:7.3f} |F| written")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    return 0
