"""``bam-triton inspect``: compile every kernel ahead of time for sm_80 and sm_90 (no GPU needed) and read what the
hardware would run: the width of each global load and store (from the PTX), registers, spills and shared memory
(``ptxas -v`` on the PTX, with the ptxas Triton itself uses, and ``cuobjdump -res-usage`` on Triton's cubin), and a
short PTX instruction mix.

Each kernel is compiled with the specialisations real inputs get: pointer arguments 16-byte divisible, integer
arguments marked divisible by 16 when their real value is, and the constexprs (INNER/MID, ...) of the ResNet-50 BAM
shapes, including the 14x14 and 7x7 maps (H·W = 196, 49). Loads and stores are attributed to the kernel argument whose
pointer their address derives from, by following register definitions back to ``ld.param`` in the PTX.

Compilation needs Triton in compiled (not interpreter) mode, so it always runs in worker subprocesses started
without ``TRITON_INTERPRET`` (tests run under the interpreter; this works from there too).
"""
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

INSPECT_SHAPES = ((32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7))
ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
LAYOUTS = ("nchw", "channels_last")

# Pointer arguments that hold full (N, C, H, W) tensors of x's dtype; every other pointer is a small map.
_FULL_TENSORS = ("x_ptr", "out_ptr", "g_ptr", "dx_ptr", "dx_extra_ptr", "extra_ptr")
# Pointer arguments of int32 argmax maps that no launch plan allocates (CBAM's kernels receive them).
_INT32_POINTERS = ("argmax_c_ptr", "argmax_hw_ptr")


# ----------------------------------------------------------------------------------------------------------------------
# Jobs: what to compile
# ----------------------------------------------------------------------------------------------------------------------


# Every kernel and the autotune config list it is launched with (kernels/_common.py).
KERNELS = (
    ("apply_fwd_kernel", "elementwise"),
    ("channel_pool_kernel", "pool"),
    ("apply_bwd_reduce_kernel", "reduce2d"),
    ("apply_bwd_dx_kernel", "elementwise"),
    ("channel_pool_rows_kernel", "rows"),
    ("apply_bwd_reduce_rows_kernel", "rows"),
    ("front_fwd_kernel", "front_fwd"),
    ("front_bwd_kernel", "front_bwd"),
    # CBAM (kernels/cbam.py); "[max]" and "[g]" name the variants of a kernel that CBAM launches (WITH_MAX, WITH_G).
    ("channel_pool_kernel[max]", "pool"),
    ("channel_pool_rows_kernel[max]", "rows"),
    ("channel_reduce_kernel", "reduce2d"),
    ("channel_reduce_kernel[g]", "reduce2d"),
    ("channel_reduce_rows_kernel", "rows"),
    ("channel_reduce_rows_kernel[g]", "rows"),
    ("hw_reduce_kernel", "pool"),
    ("hw_reduce_rows_kernel", "rows"),
    ("apply_kernel", "elementwise"),
    ("grad_x_kernel", "elementwise"),
)
CBAM_KERNELS = tuple(name for name, _ in KERNELS[8:])
# CBAM also sits in ResNet-18/34's blocks: 64 channels at 56x56, and the 14x14 and 7x7 maps of the row-group kernels
# with fewer channels (K·H·W per group row is the same, the channel splits differ).
CBAM_EXTRA_SHAPES = ((32, 64, 56, 56), (32, 256, 14, 14), (32, 512, 7, 7))


# Kernels whose every full-tensor access is meant to be a 128-bit vector at every shape they run on (the 2D-tile
# kernels are too when H·W is a multiple of 16, and scalar otherwise, where the row-group kernels take over).
VECTOR_KERNELS = ("apply_fwd_kernel", "apply_bwd_dx_kernel", "channel_pool_rows_kernel", "apply_bwd_reduce_rows_kernel",
                  "channel_pool_rows_kernel[max]", "channel_reduce_rows_kernel", "channel_reduce_rows_kernel[g]",
                  "hw_reduce_rows_kernel", "apply_kernel", "grad_x_kernel")


KERNELS_KIND = dict(KERNELS)


def kernel_names():
    """The kernels to inspect, with their autotune config kind."""
    return list(KERNELS)


def make_job(kernel, kind, config_index, arch, dtype, shape, layout):
    return dict(kernel=kernel, kind=kind, config=config_index, arch=arch, dtype=dtype, shape=list(shape),
                layout=layout)


# SMs of the GPUs the plans are made for: A100 (sm_80) and H100 SXM (sm_90).
SM_COUNTS = {80: 108, 90: 132}


def launch_plan(kernel, dtype, shape, layout, arch=90):
    """The launcher's plan for an input of ``shape``/``dtype``/``layout`` on a GPU of ``arch``, for the launcher that
    can run ``kernel`` (the backward reductions with dx stored, the dx kernels with every optional input; a
    ``[variant]`` suffix names CBAM's variant), or None when that launcher picks another kernel there."""
    from bam_triton import kernels
    from bam_triton._dtypes import DTYPE_NAMES

    torch_dtype = DTYPE_NAMES[dtype]
    channels_last, sms = layout == "channels_last", SM_COUNTS[arch]
    shape = tuple(shape)
    base, _, variant = kernel.partition("[")
    if base in ("channel_reduce_kernel", "channel_reduce_rows_kernel"):
        plan = kernels.channel_reduce_plan(shape, torch_dtype, channels_last, variant == "g]", sms)
    elif base in ("hw_reduce_kernel", "hw_reduce_rows_kernel"):
        plan = kernels.hw_reduce_plan(shape, torch_dtype, channels_last, True, sms)
    elif base == "apply_kernel":
        plan = kernels.cbam_apply_plan(shape, torch_dtype, channels_last, True)
    elif base == "grad_x_kernel":
        plan = kernels.grad_x_plan(shape, torch_dtype, channels_last, True, True, True, True)
    elif kernel == "apply_fwd_kernel":
        plan = kernels.apply_fwd_plan(shape, torch_dtype, channels_last, "sum")
    elif kernel.startswith("front"):  # the single-read front end, at BAM's default reduction (16)
        from .traffic import module_reduction

        hidden = max(1, shape[1] // module_reduction("bam"))
        plan = (kernels.front_fwd_plan(shape, torch_dtype, channels_last, hidden, sms) if kernel == "front_fwd_kernel"
                else kernels.front_bwd_plan(shape, torch_dtype, channels_last, hidden, "sum", True, sms))
    elif kernel == "apply_bwd_dx_kernel":
        plan = kernels.dx_plan(shape, torch_dtype, channels_last, "sum", True, True)
    elif kernel.startswith("channel_pool"):
        plan = kernels.channel_pool_plan(shape, torch_dtype, channels_last, sms, variant == "max]")
    else:
        plan = kernels.reduce_plan(shape, torch_dtype, channels_last, "sum", True, sms)
    return plan if plan.kernel_name == base else None


def runs(kernel, kind, config_index, dtype, shape, layout, arch=90):
    """Whether a real launch could run ``kernel`` with this config on this input: only where the launchers pick it
    (:func:`launch_plan`), and only the configs its autotuner's pruner keeps."""
    plan = launch_plan(kernel, dtype, shape, layout, arch)
    if plan is None:
        return False
    from bam_triton.kernels._common import all_configs

    return all_configs(kind)[config_index] in plan.kept_configs()


def all_jobs(kernels=None, archs=ARCHS, dtypes=DTYPES, shapes=INSPECT_SHAPES, layouts=LAYOUTS, first_config_only=False,
             n_configs=None):
    jobs = []
    for kernel, kind in kernel_names():
        if kernels and kernel not in kernels:
            continue
        count = 1 if first_config_only else (n_configs or {}).get(kind, _n_configs(kind))
        kernel_shapes = shapes + CBAM_EXTRA_SHAPES if kernel in CBAM_KERNELS and shapes is INSPECT_SHAPES else shapes
        for ci in range(count):
            for arch in archs:
                for dt in dtypes:
                    for shape in kernel_shapes:
                        for layout in layouts:
                            if runs(kernel, kind, ci, dt, shape, layout, arch):
                                jobs.append(make_job(kernel, kind, ci, arch, dt, shape, layout))
    return jobs


def _n_configs(kind):
    """How many autotune configs ``kind`` has (imports triton in this process; harmless, the workers compile)."""
    from bam_triton.kernels._common import all_configs

    return len(all_configs(kind))


# ----------------------------------------------------------------------------------------------------------------------
# Worker side: compile and read the PTX (imports triton, must not be interpreted)
# ----------------------------------------------------------------------------------------------------------------------


def _arguments(job, meta):
    """(kernel, signature, constexprs, divisible-argument indices) for one job: what the launcher's plan passes, with
    the specialisations a real launch gets (16-byte aligned pointers, ints marked 16-divisible when they are)."""
    plan = launch_plan(job["kernel"], job["dtype"], job["shape"], job["layout"], job["arch"])
    fn = getattr(plan.kernel, "fn", plan.kernel)  # Autotuner -> JITFunction
    import torch

    from bam_triton._dtypes import DTYPE_NAMES

    dt = job["dtype"]  # the names of DTYPE_NAMES are Triton's type names
    names = {dtype: name for name, dtype in DTYPE_NAMES.items()}
    names[torch.int32] = "i32"
    buffer_types = {f"{name}_ptr": names[dtype] for name, _, dtype in plan.buffers}
    buffer_types.update({name: "i32" for name in _INT32_POINTERS})
    scalars = dict(zip(plan.scalar_names(), plan.scalars))
    constexprs = dict(plan.constexprs, **meta)
    unspecialised = set(getattr(fn, "do_not_specialize", ()) or ())
    signature, divisible = {}, []
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            signature[name] = "constexpr"
            if name not in constexprs:
                constexprs[name] = p.default  # ACC and other defaults the plan leaves out
        elif name.endswith("_ptr"):
            signature[name] = "*" + buffer_types.get(name, dt)
            divisible.append(i)
        else:
            value = scalars[name]
            signature[name] = "i64" if value >= 2**31 else "i32"
            if value % 16 == 0 and name not in unspecialised and i not in unspecialised:
                divisible.append(i)
    return fn, signature, constexprs, divisible


def _stdlib_inspect():
    import inspect  # absolute import: the standard library's, not this module

    return inspect


# Triton's pipeliner feeds tl.dot operands with cp.async (global -> shared, 4-16 bytes per instruction): read as the
# ld.global of the same width, so that its global reads are attributed to their pointer argument like any load.
_CP_ASYNC = re.compile(r"cp\.async\.(?:ca|cg)\.shared\.global\s*\[[^\]]*\],\s*\[\s*(%\w+)[^\]]*\],\s*"
                       r"(0x[0-9a-fA-F]+|\d+)[^;]*;")
_CP_BITS = {16: ".v4.b32", 8: ".v2.b32", 4: ".b32", 2: ".b16"}


def cp_async_as_loads(ptx):
    return _CP_ASYNC.sub(lambda m: f"ld.global{_CP_BITS[int(m.group(2), 0)]} {{%cpx}}, [ {m.group(1)} + 0 ];", ptx)


_LDST = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global((?:\.[\w:]+)*)\s+(.*?);", re.M)
_PARAM = re.compile(r"ld\.param\.\w+\s+(%\w+),\s*\[\w+_param_(\d+)\]")
_INSTR = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w]*)((?:\.[\w:]+)*)\s+([^;]*);", re.M)
_REG = re.compile(r"%[a-z]+\d+")


def _width_bits(suffix):
    parts = suffix.strip(".").split(".")
    vec, bits = 1, None
    for p in parts:
        if re.fullmatch(r"v[248]", p):
            vec = int(p[1])
        m = re.fullmatch(r"[bfsu](8|16|32|64)", p)
        if m:
            bits = int(m.group(1))
    return vec * bits if bits else None


def analyse_ptx(ptx, arg_names):
    """Global loads/stores per pointer argument ({arg: {"load": {bits: count}, "store": {...}}}) and an opcode mix."""
    # Register -> set of param indices it derives from (union over all definitions).
    direct = {}
    for reg, idx in _PARAM.findall(ptx):
        direct.setdefault(reg, set()).add(int(idx))
    deps = {}
    mix = {}
    for m in _INSTR.finditer(ptx):
        op, suffix, operands = m.group(1), m.group(2), m.group(3)
        mix[op] = mix.get(op, 0) + 1
        if op in ("st", "bra", "ret", "bar") or op.startswith("ld") and ".global" in suffix:
            continue
        regs = _REG.findall(operands)
        if len(regs) >= 2:
            deps.setdefault(regs[0], set()).update(regs[1:])

    @functools.lru_cache(maxsize=None)
    def roots(reg):
        seen, stack, out = set(), [reg], set()
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            out |= direct.get(r, set())
            stack.extend(deps.get(r, ()))
        return frozenset(out)

    params = {}
    for kind, suffix, operands in _LDST.findall(ptx):
        bits = _width_bits(suffix)
        addr = re.search(r"\[\s*(%\w+)", operands)
        owners = sorted(roots(addr.group(1))) if addr else []
        names = [arg_names[i] if i < len(arg_names) else f"param_{i}" for i in owners]
        # Integer arguments (sizes, strides) feed offsets; the pointer arguments say which tensor is accessed.
        names = [n for n in names if n.endswith("_ptr") or n.startswith("param_")] or ["?"]
        key = "+".join(names)
        slot = params.setdefault(key, {"load": {}, "store": {}})
        d = slot["load" if kind == "ld" else "store"]
        d[bits] = d.get(bits, 0) + 1
    top = dict(sorted(mix.items(), key=lambda kv: -kv[1])[:12])
    return params, top


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def _ptxas_path(arch):
    """The ptxas Triton compiles with for ``arch``: ``get_ptxas(arch)`` gives a (path, version) pair on Triton 3.3 and
    a tool with a ``path`` from 3.6; 3.4 and 3.5 have ``get_ptxas()`` with no argument (one ptxas for every arch);
    Triton 3.2 only has ``_path_to_binary``, which gives the pair."""
    from triton.backends.nvidia import compiler

    if not hasattr(compiler, "get_ptxas"):
        tool = compiler._path_to_binary("ptxas")
    elif _stdlib_inspect().signature(compiler.get_ptxas).parameters:
        tool = compiler.get_ptxas(arch)
    else:
        tool = compiler.get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0]


def _ptxas_info(ptx, arch):
    ptxas = _ptxas_path(arch)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        res = _run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", out])
    log = res.stdout + res.stderr
    info = {"ptxas": os.path.basename(ptxas), "ptxas_ok": res.returncode == 0}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        info.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    m = re.search(r"Used (\d+) registers", log)
    if m:
        info["ptxas_registers"] = int(m.group(1))
    m = re.search(r"(\d+) bytes smem", log)
    info["ptxas_smem"] = int(m.group(1)) if m else 0
    if res.returncode != 0:
        info["ptxas_log"] = log[-500:]
    return info


def _cuobjdump_info(cubin):
    tool = os.path.join(os.path.dirname(_ptxas_path(90)), "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = _run([tool, "-res-usage", path])
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
    if not m:
        return {}
    return dict(registers=int(m.group(1)), cubin_stack=int(m.group(2)), cubin_shared=int(m.group(3)),
                local=int(m.group(4)))


# 64-bit integer index arithmetic: multiplies, divisions and remainders on s64/u64 (address formation itself is
# mul.wide.s32 + add.s64 in both cases, so it is not counted).
_INT64_INDEX = re.compile(r"\b(?:mul\.hi|mul\.lo|mad\.lo|mad\.hi|div|rem)\.[su]64\b")


def int64_index_ops(ptx):
    """How many 64-bit integer multiply/divide/remainder instructions the kernel's index arithmetic uses."""
    return len(_INT64_INDEX.findall(ptx))


def float_params(ptx):
    """{PTX type: count} of the kernel's floating-point parameters: a Python float argument compiles to an ``.f32``
    one, which would round fp64 values."""
    counts = {}
    for kind in re.findall(r"\.param\s+\.(f16|f32|f64)\s+\w+_param_\d+", ptx):
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def compile_options(num_warps):
    """The compile options of a config with ``num_warps``: those its launches compile with (``_common.make_config``;
    tests/test_compiled_launches.py checks that they agree)."""
    from bam_triton.kernels._common import NUM_STAGES

    return {"num_warps": num_warps, "num_stages": NUM_STAGES}


def compile_job(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bam_triton.kernels._common import all_configs

    meta, warps = all_configs(job["kind"])[job["config"]]
    fn, signature, constexprs, divisible = _arguments(job, meta)
    src = _ast_source(ASTSource, fn, signature, constexprs, divisible)
    compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=compile_options(warps))
    ptx = compiled.asm["ptx"]
    runtime_args = [p.name for p in fn.params if not p.is_constexpr]
    access, mix = analyse_ptx(cp_async_as_loads(ptx), runtime_args)
    out = dict(job, meta=meta, num_warps=warps, access=access, ptx_mix=mix, int64_index_ops=int64_index_ops(ptx),
               float_params=float_params(ptx), f64_divisions=len(re.findall(r"\bdiv\.\w+\.f64\b", ptx)),
               mma=len(re.findall(r"\bmma\.sync\.aligned", ptx)), wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
               tf32=len(re.findall(r"\.tf32\b", ptx)),
               shared=getattr(compiled.metadata, "shared", None),
               elements_per_thread=_elements_per_thread(dict(meta, **constexprs), warps))
    out.update(_ptxas_info(ptx, job["arch"]))
    if "cubin" in compiled.asm:
        out.update(_cuobjdump_info(compiled.asm["cubin"]))
    return out


def _ast_source(ast_source, fn, signature, constexprs, divisible):
    """The compiler's input for ``fn``. Triton 3.3 and later take every argument in the signature, the constexpr
    values by name and hints keyed by argument path; Triton 3.2 takes the runtime arguments only, the constexprs as
    ``constants`` and the hints as an ``AttrsDescriptor``."""
    if "constexprs" in _stdlib_inspect().signature(ast_source).parameters:
        return ast_source(fn=fn, signature=signature, constexprs=constexprs,
                          attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    from triton.backends.compiler import AttrsDescriptor

    runtime = {name: kind for name, kind in signature.items() if kind != "constexpr"}
    return ast_source(fn=fn, signature=runtime, constants=constexprs,
                      attrs=AttrsDescriptor.from_hints({i: 16 for i in divisible}))


def _elements_per_thread(meta, warps):
    block = meta.get("BLOCK") or meta.get("BLOCK_C", 1) * meta.get("BLOCK_HW", 1) * meta.get("BLOCK_R", 1) * \
        meta.get("BLOCK_L", 1)
    return block // (warps * 32)


def _worker():
    """Read a JSON list of jobs on stdin, write a JSON list of results on stdout."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    jobs = json.load(sys.stdin)
    results = []
    for job in jobs:
        try:
            results.append(compile_job(job))
        except Exception as exc:  # report, never hide: the caller counts errors
            results.append(dict(job, error=f"{type(exc).__name__}: {exc}"[:800]))
    json.dump(results, sys.stdout)


# ----------------------------------------------------------------------------------------------------------------------
# Driver side: subprocess workers (no TRITON_INTERPRET)
# ----------------------------------------------------------------------------------------------------------------------


def run_jobs(jobs, workers=None, progress=None):
    """Compile ``jobs`` in ``workers`` subprocesses started without TRITON_INTERPRET; returns results in job order."""
    if not jobs:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    chunks = [jobs[i::workers] for i in range(workers)]
    procs = []
    for chunk in chunks:
        p = subprocess.Popen([sys.executable, "-c", "from bam_triton.bench.inspect import _worker; _worker()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        p.stdin.write(json.dumps(chunk))
        p.stdin.close()
        procs.append(p)
    by_job = {}
    for chunk, p in zip(chunks, procs):
        out = p.stdout.read()
        err = p.stderr.read()
        p.wait()
        if p.returncode != 0:
            raise RuntimeError(f"inspect worker failed ({p.returncode}): {err[-2000:]}")
        for job, res in zip(chunk, json.loads(out)):
            by_job[json.dumps(job, sort_keys=True)] = res
    return [by_job[json.dumps(j, sort_keys=True)] for j in jobs]


def vector_bits(result, arg, kind):
    """Widths (bits) of the global ``kind`` ("load"/"store") instructions whose address comes from ``arg`` only."""
    slot = result.get("access", {}).get(arg, {})
    return sorted(int(b) for b in slot.get(kind, {}))


def full_tensor_args(result):
    # The reductions' out is (N, splits, C)
    small = ("out_ptr",) if result["kernel"].startswith(("channel_pool", "hw_reduce")) else ()
    return [a for a in result.get("access", {}) if a in _FULL_TENSORS and a not in small]


def _widths_text(arg, loads, stores):
    """``x:ld128st128``: the widths (bits) of a full-tensor argument's loads and stores."""
    return (f"{arg[:-4]}:" + ("ld" + "/".join(map(str, loads)) if loads else "")
            + ("st" + "/".join(map(str, stores)) if stores else ""))


def summarize_kernels(results):
    """One line per kernel over its compiled variants: how many, registers (fewest-most), how many spill, and every
    width its full-tensor loads and stores take; then the variants that failed to compile, one line each."""
    by_kernel = {}
    for r in results:
        by_kernel.setdefault(r["kernel"], []).append(r)
    lines = [f"{'kernel':<32}{'variants':>9}{'regs':>10}{'spilling':>9}{'errors':>7}  full-tensor loads/stores (bits)"]
    for kernel, rows in by_kernel.items():
        ok = [r for r in rows if "error" not in r]
        regs = [r.get("registers", r.get("ptxas_registers")) for r in ok]
        regs = [v for v in regs if isinstance(v, int)]
        spilling = sum(1 for r in ok if r.get("spill_stores", 0) or r.get("spill_loads", 0))
        widths = {}
        for r in ok:
            for a in full_tensor_args(r):
                loads, stores = widths.setdefault(a, (set(), set()))
                loads.update(vector_bits(r, a, "load"))
                stores.update(vector_bits(r, a, "store"))
        text = " ".join(_widths_text(a, sorted(ld), sorted(st)) for a, (ld, st) in widths.items())
        span = f"{min(regs)}-{max(regs)}" if regs else "?"
        lines.append(f"{kernel:<32}{len(rows):>9}{span:>10}{spilling:>9}{len(rows) - len(ok):>7}  {text}")
    errors = [r for r in results if "error" in r]
    if errors:
        lines += ["", summarize(errors)]
    return "\n".join(lines)


def summarize(results):
    """One line per result: kernel, config, arch, dtype, shape, layout, widths of full-tensor loads/stores, regs."""
    lines = [f"{'kernel':<24}{'config':<30}{'sm':>3} {'dtype':<5}{'shape':<16}{'layout':<14}"
             f"{'full-tensor loads/stores (bits)':<44}{'regs':>5}{'spill':>6}{'smem':>7}{'i64 ops':>8}"]
    for r in results:
        cfg = ",".join(f"{k}={v}" for k, v in r.get("meta", {}).items()) + f",w={r.get('num_warps')}"
        if "error" in r:
            lines.append(f"{r['kernel']:<24}{cfg:<30}{r['arch']:>3} {r['dtype']:<5}ERROR {r['error'][:120]}")
            continue
        acc = [_widths_text(a, vector_bits(r, a, "load"), vector_bits(r, a, "store")) for a in full_tensor_args(r)]
        spill = r.get("spill_stores", 0) + r.get("spill_loads", 0)
        lines.append(f"{r['kernel']:<24}{cfg:<30}{r['arch']:>3} {r['dtype']:<5}{'x'.join(map(str, r['shape'])):<16}"
                     f"{r['layout']:<14}{' '.join(acc):<44}{r.get('registers', r.get('ptxas_registers', '?')):>5}"
                     f"{spill:>6}{r.get('shared') or 0:>7}{r.get('int64_index_ops', '?'):>8}")
    return "\n".join(lines)


def kernels_problem(text):
    """Why ``--kernels`` names no kernel or one that :data:`KERNELS` does not have (one line), or None."""
    names = [k.strip() for k in text.split(",") if k.strip()]
    known = [name for name, _ in KERNELS]
    if not names:
        return f"--kernels {text!r}: no kernel named; choose from {', '.join(known)}"
    unknown = [name for name in names if name not in known]
    if unknown:
        return (f"--kernels: unknown kernel{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; choose "
                f"from {', '.join(known)}")
    return None


def run_inspect(args):
    archs = tuple(args.arch or ARCHS)
    dtypes = tuple(args.dtype or DTYPES)
    kernels = None
    if args.kernels is not None:
        problem = kernels_problem(args.kernels)
        if problem:
            print(f"error: bam-triton inspect: {problem}", file=sys.stderr)
            return 2
        kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    jobs = all_jobs(kernels, archs, dtypes, first_config_only=args.quick)
    print(f"compiling {len(jobs)} kernel variants for sm_{'/sm_'.join(map(str, archs))} "
          f"({os.cpu_count()} worker processes, no GPU needed)...", file=sys.stderr)
    results = run_jobs(jobs)
    print(summarize(results) if args.table else summarize_kernels(results))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "inspect.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    errors = [r for r in results if "error" in r]
    spills = [r for r in results if r.get("spill_stores", 0) or r.get("spill_loads", 0)]
    narrow = [r for r in results if r["kernel"] in VECTOR_KERNELS and "error" not in r
              and any(b != 128 for a in full_tensor_args(r) for k in ("load", "store") for b in vector_bits(r, a, k))]
    print(f"\n{len(results)} variants: {len(errors)} errors, {len(spills)} with spills, "
          f"{len(narrow)} variants of the vectorised kernels ({', '.join(VECTOR_KERNELS)}) with full-tensor "
          f"accesses narrower than 128 bits. Wrote {path}"
          + ("" if args.table else " (one line per variant: --table)"))
    return 1 if errors else 0
