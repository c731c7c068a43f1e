"""Timers: ``triton.testing.do_bench`` (and CUDA-graph replay) on CUDA, a warm-up-and-repeat wall-clock timer on CPU,
and the device's copy bandwidth (a large ``clone``), all returning milliseconds as (median, p20, p80); a per-call
median in microseconds for host costs, and the host reference that those are read against."""
import ctypes
import ctypes.util
import statistics
import sys
import time

import torch
from torch import nn

QUANTILES = (0.5, 0.2, 0.8)


def _quantile(sorted_values, q):
    """Linear-interpolation quantile of an already sorted list (numpy's default)."""
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms):
    s = sorted(times_ms)
    return tuple(_quantile(s, q) for q in QUANTILES)


_FLUSH = {}


def _flush_buffer(nbytes):
    buf = _FLUSH.get(nbytes)
    if buf is None:
        buf = _FLUSH[nbytes] = torch.empty(nbytes, dtype=torch.int8)
    return buf


def _minor_faults():
    """This process's minor page faults so far, or None where the resource module is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cpu_samples(fn, min_time, min_reps, max_reps, warmup_time, min_warmup, flush_bytes, max_settle_time):
    """Warm-up, then timed calls of ``fn``: (times in ms, minor page faults of each timed call)."""
    buf = _flush_buffer(flush_bytes) if flush_bytes else None
    start = time.perf_counter()
    done, faults = 0, None
    while (done < min_warmup or time.perf_counter() - start < warmup_time
           or (faults and time.perf_counter() - start < max_settle_time)):
        before = _minor_faults()
        fn()
        faults = None if before is None else _minor_faults() - before
        done += 1
    times, fault_counts = [], []
    spent = 0.0
    wall = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or spent < min_time):
        if buf is not None:
            buf.zero_()
        before = _minor_faults()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if before is not None:
            fault_counts.append(_minor_faults() - before)
        times.append(dt * 1e3)
        spent += dt
        if time.perf_counter() - wall > 20 * max(min_time, 0.05) and len(times) >= min_reps:
            break  # flushing dominates: enough samples
    return times, fault_counts


def _cpu_result(times, fault_counts):
    faults = sorted(fault_counts)[len(fault_counts) // 2] if fault_counts else None
    return summarize(times), len(times), faults


def cpu_timer(fn, min_time=0.5, min_reps=5, max_reps=200, warmup_time=0.1, min_warmup=2, flush_bytes=64 * 2**20,
              max_settle_time=3.0):
    """Time ``fn()`` on CPU: ``min_warmup`` calls (and at least ``warmup_time`` seconds) of warm-up, then timed calls
    until ``min_time`` seconds of them and ``min_reps`` calls have passed (at most ``max_reps``). Before each timed
    call a ``flush_bytes`` buffer is overwritten (outside the timed region) so the inputs come from DRAM, not from the
    last-level cache -- as ``triton.testing.do_bench`` flushes L2 on GPUs (0 disables).

    Warm-up also goes on (for at most ``max_settle_time`` seconds) until a call pays no page fault: with the steady
    allocator (:func:`steady_cpu_allocator`) freed blocks are reused once the heap stops growing, which takes a few
    calls. Returns ((median, p20, p80) in ms, number of timed calls, median minor page faults per timed call or None
    where they cannot be counted)."""
    return _cpu_result(*_cpu_samples(fn, min_time, min_reps, max_reps, warmup_time, min_warmup, flush_bytes,
                                     max_settle_time))


def cpu_timer_interleaved(fns, rounds=3, min_time=0.5, min_reps=5, max_reps=200, flush_bytes=64 * 2**20):
    """Time several callables (``{name: fn}``) in ``rounds`` interleaved rounds -- every fn once per round, each for
    its share of ``min_time``, ``min_reps`` and ``max_reps`` (which stay the totals) -- and pool each fn's samples. On
    a shared machine the load drifts over seconds: timed one after the other, two fns can meet different loads and
    their ratio moves with it, while interleaved rounds spread a drift over all of them. The first round warms up as
    :func:`cpu_timer` does; later rounds with one call, which also lets the heap settle after the other fns ran.

    Returns ``{name: ((median, p20, p80) in ms, timed calls, median page faults)}``, or ``{name: exception}`` for a
    fn that raised (it leaves the later rounds)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    samples = {name: ([], []) for name in fns}
    errors = {}
    for r in range(rounds):
        reps = [total // rounds + (r < total % rounds) for total in (min_reps, max_reps)]
        if reps[1] == 0:
            continue  # fewer repeats than rounds: this round has none left
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                times, faults = _cpu_samples(fn, min_time / rounds, *reps, warmup_time=0.1 if r == 0 else 0.0,
                                             min_warmup=2 if r == 0 else 1, flush_bytes=flush_bytes,
                                             max_settle_time=3.0)
            except Exception as exc:  # reported by the caller; the other fns go on
                errors[name] = exc
                continue
            samples[name][0].extend(times)
            samples[name][1].extend(faults)
    return {name: errors[name] if name in errors else _cpu_result(*samples[name]) for name in fns}


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def steady_cpu_allocator():
    """Put this process's CPU allocator in a steady state, as the CUDA caching allocator is on a GPU: glibc malloc
    serves every block from its heap (``M_MMAP_MAX = 0``) and never returns freed memory to the OS
    (``M_TRIM_THRESHOLD`` at its maximum). Without this, a full-size temporary above glibc's adaptive mmap threshold
    (up to 32 MiB) is a fresh mapping on every call and pays a page fault per 4 KiB page -- whether it does depends on
    the allocation history of the process, so one shape measured twice in one sweep can differ by 2x. Affects the
    whole process; meant for the sweep's own process. Returns a description for sweep.json (what was done, or why
    nothing was: not Linux/glibc)."""
    if not sys.platform.startswith("linux"):
        return f"system (steady needs glibc's mallopt; this is {sys.platform})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system (no glibc mallopt found)"
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return "steady (glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2**31-1)" if ok else "system (mallopt refused)"


def cuda_do_bench(fn):
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, quantiles=list(QUANTILES))
    return (med, p20, p80), None


def cuda_graph_bench(fn):
    import triton.testing

    # The capture runs on a side stream: warm it there first (lazy allocations, cuBLAS/cuDNN handles).
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    med, p20, p80 = triton.testing.do_bench_cudagraph(fn, quantiles=list(QUANTILES))
    return (med, p20, p80), None


def copy_bandwidth(device, mib=256, min_time=0.5):
    """Copy bandwidth of ``device`` in GB/s (read + write counted), the reference of the sweep's "fraction of copy
    bandwidth", from a ``mib`` MiB copy. Returns {"gbps", "clone_gbps", "copy_into_gbps", "method"}.

    CUDA: ``clone`` (the caching allocator hands back the same block, so it is a pure device copy). CPU: a ``clone``
    also pays the OS's first-touch page faults on freshly mapped memory (about 4x slower here), so the reference is
    ``dst.copy_(src)`` into a preallocated tensor -- the same bytes moved; the clone's figure is recorded too."""
    device = torch.device(device)
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    out = {}
    for name, fn in (("clone_gbps", lambda: src.clone()), ("copy_into_gbps", lambda: dst.copy_(src))):
        if device.type == "cuda":
            (med, _, _), _ = cuda_do_bench(fn)
        else:
            (med, _, _), _, _ = cpu_timer(fn, min_time=min_time, min_reps=5, max_reps=50, flush_bytes=0)
        out[name] = 2 * n * 4 / (med * 1e-3) / 1e9
    out["method"] = "clone" if device.type == "cuda" else "copy_ into a preallocated tensor"
    out["gbps"] = out["clone_gbps"] if device.type == "cuda" else out["copy_into_gbps"]
    return out


def median_call_us(fn, reps, warmup=20):
    """Median microseconds of one call of ``fn`` over ``reps`` calls timed one by one, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


# The same-machine yardstick of host costs (Python and torch's dispatcher, no bam_triton code): a slower CPU or Python
# build moves it and the library's host figures alike, a regression moves only the latter.
HOST_REFERENCE = "nn.Linear(16, 16) forward of a (2, 16) fp32 CPU tensor under no_grad"


def host_reference_us(reps=1000):
    """Median microseconds per call of :data:`HOST_REFERENCE` on this machine, now."""
    layer, x = nn.Linear(16, 16), torch.randn(2, 16)

    def call():
        with torch.no_grad():
            layer(x)

    return median_call_us(call, reps)
