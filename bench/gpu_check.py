"""``bam-triton gpu-check``: the whole GPU evidence in one command, into one folder (default ``gpu-results/``).

For a person with one CUDA GPU and a Python that already has a CUDA torch and triton: no downloads, no venv. In one
run, each phase in its own process, with progress printed:

1. tests: ``BAM_TRITON_TEST_DEVICE=cuda python -m pytest tests -m "not slow_on_gpu"`` with ``BAM_TRITON_AUTOTUNE=0``
   (one config per kernel: no tuning in the tests); counts and ``tests.log``;
2. ``bam-triton check --device cuda`` (``check.log``), then ``bam-triton overhead`` (the library's host time per
   call, kernels skipped and launched: ``overhead.json``, ``overhead.log``);
3. ``bam-triton sweep`` of the ResNet-50 BAM shapes at batch 32 in fp16 and bf16: pool, apply-fwd, apply-bwd,
   bam-fwd, bam-fwd-bwd, cbam-fwd, cbam-fwd-bwd, all providers, the autotuner's choices recorded (``sweep.csv``,
   ``sweep.json``, ``sweep.log``);
4. ``bam-triton inspect --arch <this GPU's sm>`` (80 or 90; skipped with a note on any other GPU) (``inspect.json``)
   and ``bam-triton plot`` of the sweep (``plots/``);

then ``SUMMARY.md`` (and ``summary.json``): each performance target of the README as met, not met or missing, from
this run's ``do_bench`` rows; the test counts; device, driver, torch and triton versions; what the budget left out.

Time budget. The full run is to end within 8 minutes on an H100-class GPU, compiles, warm-up and autotuning
included; ``--quick`` within 4. torch.compile and autotuning dominate and cannot be known in advance, so every phase
has a deadline, in seconds from the start (slack of an early phase passes to the later ones):

=========  ====  =====  ==================================================================================
phase      full  quick  enforced by
=========  ====  =====  ==================================================================================
tests       150     60  the subprocess is killed at the deadline (counts so far kept, "timed out")
check       180     80  killed at the deadline
overhead    220    105  killed at the deadline
sweep       390    190  ``--time-budget``: no new case after deadline - 60 s (quick: - 40 s), then killed at
                        the deadline; rows are written after every case, so a kill keeps them
inspect     440    220  killed at the deadline
plot        455    232  killed at the deadline
=========  ====  =====  ==================================================================================

A phase whose deadline has passed is not started. The sweep runs its most important cases first (every case's
non-compiled providers, then torch.compile of the authors' apply step, then the other compiled providers) and lists
what its budget left out as "not run: time budget". ``--quick``: fp16 only, no ``triton-compiled``, the authors'
compiled code kept (the apply step's target compares with it) and run last, and ``inspect --quick`` (first config
of each kernel).

``--dry-run``: the same pipeline on CPU in well under a minute: tiny shapes, the kernels through Triton's
interpreter (``sweep --interpret``), two fast test files, ``inspect`` of one kernel for sm_90; its SUMMARY.md says
that no verdict of a dry run is valid.

Exit status: 0 when every phase ran and passed (or was skipped with a note: no pytest, no matplotlib, a GPU other
than sm_80/sm_90), 1 when one failed, was stopped at its deadline or could not start before it, 2 without CUDA (or
without triton), before anything runs. The targets' verdicts are measurements: they do not change the exit status.
"""
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

# (phase, full deadline, quick deadline), seconds from the start.
DEADLINES = (("tests", 150, 60), ("check", 180, 80), ("overhead", 220, 105), ("sweep", 390, 190), ("inspect", 440, 220),
             ("plot", 455, 232))
# The sweep starts no new case this long before its deadline: the case in flight (a torch.compile) gets to finish.
SWEEP_MARGIN = {"full": 60, "quick": 40}
# Dry run (CPU): generous caps for a slow shared machine; it takes well under a minute.
DRY_DEADLINES = {"tests": 45, "check": 55, "overhead": 65, "sweep": 90, "inspect": 105, "plot": 115}
BUDGET = {"full": 480, "quick": 240}

SHAPES = ((32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14))
OPS = ("pool", "apply-fwd", "apply-bwd", "bam-fwd", "bam-fwd-bwd", "cbam-fwd", "cbam-fwd-bwd")
# BAM's and CBAM's cost inside ResNet-50 (the sweep runs these last: the budget cuts them first).
NETWORK_OPS = ("resnet50-fwd", "resnet50-train")
PROVIDERS_FULL = ("authors-eager", "torch-path", "authors-compiled", "triton", "triton-compiled", "triton-single-read")
PROVIDERS_QUICK = ("authors-eager", "torch-path", "authors-compiled", "triton", "triton-single-read")
DRY_SHAPES = ((2, 64, 16, 16), (2, 32, 7, 7))
# The dry run's ops: each module's training step covers its forward (and keeps the run under a minute).
DRY_OPS = ("pool", "apply-fwd", "apply-bwd", "bam-fwd-bwd", "cbam-fwd-bwd")
DRY_TESTS = ("tests/test_gpu_check.py", "tests/test_official_checkpoint.py")
INSPECT_ARCHS = (80, 90)

# The README's targets for a GPU run: (name, ops, column, threshold, how a value is shown). Judged on the triton
# provider's do_bench rows at every shape x dtype x layout of the sweep.
TARGETS = (
    ("apply step forward >= 90% of the copy bandwidth", ("apply-fwd",), "frac_copy_bw", 0.90, "pct"),
    ("apply step backward >= 90% of the copy bandwidth", ("apply-bwd",), "frac_copy_bw", 0.90, "pct"),
    ("pooling >= 85% of the copy bandwidth", ("pool",), "frac_copy_bw", 0.85, "pct"),
    ("apply step (fwd and bwd) no slower than torch.compile (authors-compiled)", ("apply-fwd", "apply-bwd"),
     "speedup_vs_authors_compiled", 1.0, "x"),
    ("whole BAM forward >= 2x the authors' eager code", ("bam-fwd",), "speedup_vs_authors_eager", 2.0, "x"),
    # CBAM's traffic bounds at equal bandwidth are 1.98x and 3.93x (bam-triton traffic): these ask for 3/4 and 2/3.
    ("whole CBAM forward >= 1.5x the authors' eager code", ("cbam-fwd",), "speedup_vs_authors_eager", 1.5, "x"),
    ("CBAM training step (forward+backward) >= 2.5x the authors' eager code", ("cbam-fwd-bwd",),
     "speedup_vs_authors_eager", 2.5, "x"),
)


# ----------------------------------------------------------------------------------------------------------------------
# Verdicts
# ----------------------------------------------------------------------------------------------------------------------


def _case_name(op, shape, dtype, layout):
    return f"{op} {'x'.join(map(str, shape))} {dtype}" + ("" if layout == "nchw" else f" {layout}")


def _show(value, kind):
    return f"{100 * value:.0f}%" if kind == "pct" else f"{value:.2f}x"


def verdicts(rows, shapes, dtypes, layouts=("nchw",), provider="triton", timing_mode="do_bench"):
    """Each target of :data:`TARGETS` judged on ``rows`` (sweep.json's): ``met`` when every expected case (its ops x
    ``shapes`` x ``dtypes`` x ``layouts``) has a value at or above the threshold, ``not met`` when any has one below
    it (or an invalid result), else ``missing`` (some case not measured). Returns a list of dicts: target, verdict,
    detail, threshold, values {case: value}, below, missing."""
    index = {}
    for r in rows:
        if r.get("provider") == provider and r.get("timing_mode") == timing_mode:
            key = (r["op"], (int(r["N"]), int(r["C"]), int(r["H"]), int(r["W"])), r["dtype"], r["layout"])
            index[key] = r
    out = []
    for name, ops, column, threshold, kind in TARGETS:
        values, below, missing = {}, [], []
        for op in ops:
            for shape in shapes:
                for dt in dtypes:
                    for lay in layouts:
                        case = _case_name(op, shape, dt, lay)
                        r = index.get((op, tuple(shape), dt, lay))
                        value = None if r is None else r.get(column)
                        if value in (None, ""):
                            missing.append(case)
                            continue
                        values[case] = value = float(value)
                        if value < threshold or r.get("valid") is False:
                            below.append(case)
        verdict = "not met" if below else ("missing" if missing else "met")
        parts = []
        if values:
            worst = min(values, key=values.get)
            parts.append(f"lowest {_show(values[worst], kind)} ({worst}) of {len(values)} measured")
        if below:
            parts.append("below: " + ", ".join(f"{c} {_show(values[c], kind)}" for c in below))
        if missing:
            parts.append("not measured: " + ", ".join(missing))
        out.append(dict(target=name, verdict=verdict, detail="; ".join(parts) or "no rows", threshold=threshold,
                        values=values, below=below, missing=missing))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------------------------------


class Run:
    """One gpu-check run: the clock, the console and the phase records."""

    def __init__(self, out, mode):
        self.out, self.mode, self.t0 = out, mode, time.time()
        self.phases = []
        self.lock = threading.Lock()

    def elapsed(self):
        return time.time() - self.t0

    def say(self, msg):
        with self.lock:
            print(f"[gpu-check {self.elapsed():4.0f}s] {msg}", flush=True)

    def deadline(self, phase):
        if self.mode == "dry":
            return DRY_DEADLINES[phase]
        full, quick = next((f, q) for name, f, q in DEADLINES if name == phase)
        return quick if self.mode == "quick" else full

    def record(self, phase, status, seconds=0.0, log=None, note=""):
        self.phases.append(dict(phase=phase, status=status, seconds=round(seconds, 1), deadline_s=self.deadline(phase),
                                log=log, note=note))
        self.say(f"{phase}: {status}" + (f" ({note})" if note else "") + (f" in {seconds:.0f} s" if seconds else ""))


def _child_env(extra=None, dry=False):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not dry:
        env.pop("TRITON_INTERPRET", None)  # a leftover from CPU work would run every kernel through the interpreter
    env.update(extra or {})
    return env


def _kill(proc):
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)  # the phase's own session: its worker processes too
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


def run_phase(run, phase, cmd, env=None, echo=None, cwd=None):
    """Run ``cmd`` until it ends or the phase's deadline, its output into ``<phase>.log`` and, line by line, to
    ``echo``. Returns (exit status or None if killed, seconds); None without starting when the deadline has passed."""
    remaining = run.deadline(phase) - run.elapsed()
    if remaining < 3:
        run.record(phase, "not run: time budget", note=f"its deadline, {run.deadline(phase)} s, had passed")
        return None
    log_path = os.path.join(run.out, f"{phase}.log")
    start = time.time()
    run.say(f"{phase}: {shlex.join(cmd)} (deadline {run.deadline(phase)} s)")
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env, cwd=cwd, start_new_session=os.name == "posix")

        def pump():
            for line in proc.stdout:
                if log.closed:  # a leftover holding the pipe after the phase was given up
                    break
                log.write(line)
                log.flush()
                if echo is not None:
                    echo(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            _kill(proc)  # not reaped yet, so its process group is certainly this phase's
            proc.wait()
            code = None
        reader.join(timeout=10)
    return code, time.time() - start


def _finish(run, phase, result, note=""):
    """Record a phase from run_phase's result."""
    if result is None:
        return
    code, seconds = result
    log = f"{phase}.log"
    if code is None:
        run.record(phase, "timed out", seconds, log, note or f"stopped at its deadline, {run.deadline(phase)} s")
    else:
        run.record(phase, "ok" if code == 0 else f"failed (exit status {code})", seconds, log, note)


# pytest -v: "path::test[params] STATUS (reason)   [ 12%]".
_STATUS = re.compile(r"::.* (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b[^\[]*\[\s*\d+%\]\s*$")
_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)\b")


class TestCounter:
    """Counts pytest -v's result lines as they come; the final summary line, when there is one, wins."""

    KEYS = ("passed", "failed", "errors", "skipped", "deselected", "xfailed", "xpassed")

    def __init__(self, run):
        self.run, self.counts, self.final, self.last = run, dict.fromkeys(self.KEYS, 0), None, time.time()

    def __call__(self, line):
        m = _STATUS.search(line)
        if m:
            key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
                   "XFAIL": "xfailed", "XPASS": "xpassed"}[m.group(1)]
            self.counts[key] += 1
            if key in ("failed", "errors"):
                self.run.say(f"tests: {line.strip()}")
        elif line.startswith("=") and (" passed" in line or " failed" in line or " error" in line
                                       or " deselected" in line or "no tests ran" in line):
            self.final = dict.fromkeys(self.KEYS, 0)
            for n, what in _SUMMARY.findall(line):
                self.final["errors" if what.startswith("error") else what] = int(n)
        if time.time() - self.last > 15:
            self.last = time.time()
            self.run.say(f"tests: {self.text(self.counts)} so far")

    def result(self):
        return dict(self.final or self.counts, complete=self.final is not None)

    @staticmethod
    def text(counts):
        return ", ".join(f"{counts[k]} {k}" for k in TestCounter.KEYS if counts.get(k)) or "none"


def _repo_root():
    """The checkout this package was installed from (editable installs), or the working directory."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (here, os.getcwd()):
        if os.path.exists(os.path.join(root, "tests", "conftest.py")):
            return root
    return None


def phase_tests(run, dry):
    root = _repo_root()
    if root is None:
        run.record("tests", "skipped", note="no tests/ here: run from the repository checkout")
        return None
    if importlib.util.find_spec("pytest") is None:
        run.record("tests", "skipped", note=f"pytest is not installed in {sys.executable}")
        return None
    files = list(DRY_TESTS) if dry else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "not slow_on_gpu", *files]
    env = _child_env({"BAM_TRITON_TEST_DEVICE": "cpu" if dry else "cuda", "BAM_TRITON_AUTOTUNE": "0"}, dry)
    counter = TestCounter(run)
    result = run_phase(run, "tests", cmd, env=env, echo=counter, cwd=root)
    if result is None:
        return None
    counts = counter.result()
    note = TestCounter.text(counts)
    if result[0] is None:
        note = f"stopped at its deadline, {run.deadline('tests')} s, after {note}"
    elif result[0] != 0 and not (counts["failed"] or counts["errors"]):
        note += "; pytest itself failed: see tests.log"
    _finish(run, "tests", result, note)
    return counts


def _sweep_echo(run):
    keep = ("device:", "No CUDA", "not run", "no cudagraph", "failed:", "VALIDATION", "error", "wrote")

    def echo(line):
        if line.startswith("[") and "/" in line.split("]")[0] or line.startswith(keep):
            run.say(f"sweep: {line.strip()}")
    return echo


def phase_sweep(run, mode):
    dry = mode == "dry"
    ops = DRY_OPS if dry else OPS + NETWORK_OPS
    cmd = [sys.executable, "-m", "bam_triton", "sweep", "--out", run.out, "--ops", ",".join(ops)]
    if dry:
        cmd += ["--device", "cpu", "--interpret", "--shapes", ",".join("x".join(map(str, s)) for s in DRY_SHAPES),
                "--dtype", "fp32", "--providers", "authors-eager,torch-path,triton", "--min-time", "0.01",
                "--max-reps", "5", "--rounds", "1", "--copy-mib", "16", "--flush-mib", "0"]
        soft_end = run.deadline("sweep") - 30
    else:
        cmd += ["--device", "cuda", "--batch", "32", "--dtype", "fp16" if mode == "quick" else "fp16,bf16",
                "--providers", ",".join(PROVIDERS_QUICK if mode == "quick" else PROVIDERS_FULL)]
        soft_end = run.deadline("sweep") - SWEEP_MARGIN[mode]
    cmd += ["--time-budget", f"{max(soft_end - run.elapsed(), 1):.0f}"]
    _finish(run, "sweep", run_phase(run, "sweep", cmd, env=_child_env(dry=dry), echo=_sweep_echo(run)))


def phase_check(run, dry):
    cmd = [sys.executable, "-m", "bam_triton", "check", "--device", "cpu" if dry else "cuda"]

    def echo(line):
        if not re.match(r"\s+ok\s", line):  # one line per passing self-test: only in check.log
            run.say(f"check: {line.strip()}")

    _finish(run, "check", run_phase(run, "check", cmd, env=_child_env(dry=dry), echo=echo))


def phase_overhead(run, dry):
    cmd = [sys.executable, "-m", "bam_triton", "overhead", "--device", "cpu" if dry else "cuda",
           "--json", os.path.join(run.out, "overhead.json")] + (["--reps", "20"] if dry else [])
    # Pinned configs: the host's time does not depend on the config, and tuning would only spend the budget.
    env = _child_env({"BAM_TRITON_AUTOTUNE": "0"}, dry)
    _finish(run, "overhead", run_phase(run, "overhead", cmd, env=env))


def overhead_lines(out):
    """The library's host time per call on the standard Triton path (``bam-triton overhead``), against the targets."""
    try:
        with open(os.path.join(out, "overhead.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return []
    from .overhead import CASES, TARGETS_US

    reference = results["reference"]
    lines = ["", "## Host overhead (bam-triton overhead)", "",
             "bam_triton's own Python per call, the attention branches replaced by pass-through stand-ins, median "
             "microseconds. Targets: " + ", ".join(f"{case} <= {us} us" for case, us in TARGETS_US.items()) + ". "
             f"Same-machine reference, {reference['what']}: {reference['us_before']:.1f} us before the cases, "
             f"{reference['us_after']:.1f} after.", "",
             "| path | " + " | ".join(CASES[:2]) + " |", "|---|---|---|"]
    for title, report in results["reports"].items():
        cells = []
        for case in CASES[:2]:
            own = report[case]["own_us"]
            target = TARGETS_US.get(case)
            mark = "" if target is None or "standard" not in title else (" (met)" if own <= target else " (**not met**)")
            cells.append(f"{own:.1f}{mark}")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return lines


def phase_inspect(run, mode, sm):
    if mode == "dry":
        arch, extra = 90, ["--quick", "--dtype", "fp16", "--kernels", "apply_fwd_kernel"]
        note = "dry run: sm_90 as a stand-in, one kernel"
    elif sm in INSPECT_ARCHS:
        arch, extra, note = sm, (["--quick"] if mode == "quick" else []), ""
    else:
        run.record("inspect", "skipped", note=f"this GPU is sm_{sm}; inspect compiles for sm_80 and sm_90 only")
        return
    cmd = [sys.executable, "-m", "bam_triton", "inspect", "--arch", str(arch), "--out", run.out, *extra]

    def echo(line):
        if line.startswith("compiling") or " variants: " in line:
            run.say(f"inspect: {line.strip()}")

    _finish(run, "inspect", run_phase(run, "inspect", cmd, env=_child_env(dry=mode == "dry"), echo=echo), note)


def phase_plot(run):
    csv_path = os.path.join(run.out, "sweep.csv")
    if not os.path.exists(csv_path):
        run.record("plot", "skipped", note="no sweep.csv")
        return
    if importlib.util.find_spec("matplotlib") is None:
        run.record("plot", "skipped", note=f"matplotlib is not installed in {sys.executable}")
        return
    cmd = [sys.executable, "-m", "bam_triton", "plot", csv_path, "--out", os.path.join(run.out, "plots")]
    _finish(run, "plot", run_phase(run, "plot", cmd, env=_child_env(dry=run.mode == "dry")))


# ----------------------------------------------------------------------------------------------------------------------
# Device and SUMMARY.md
# ----------------------------------------------------------------------------------------------------------------------


def _version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def device_info(dry):
    """Device, driver and versions, from this process (CUDA is initialised here only on a GPU run)."""
    import platform

    import torch

    info = dict(torch=torch.__version__, cuda=torch.version.cuda, triton=_version("triton"),
                bam_triton=__import__("bam_triton").__version__, python=platform.python_version())
    if dry:
        info.update(device=f"CPU ({platform.machine()}, {os.cpu_count()} cores)", sm=None, driver=None)
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), sm=props.major * 10 + props.minor,
                memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        info["driver"] = out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def _load_sweep(out):
    try:
        with open(os.path.join(out, "sweep.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def single_read_lines(rows, timing_mode="do_bench"):
    """Which BAM path is faster at each measured case: the standard Triton path or the opt-in single read of x
    (``BAM(single_read=True)``, still off by default until this table says it should be on)."""
    pairs = {}
    for r in rows:
        if r.get("timing_mode") == timing_mode and r["provider"] in ("triton", "triton-single-read") \
                and r["op"] in ("bam-fwd", "bam-fwd-bwd"):
            key = (r["op"], (r["N"], r["C"], r["H"], r["W"]), r["dtype"], r["layout"])
            pairs.setdefault(key, {})[r["provider"]] = float(r["median_ms"])
    lines = []
    for (op, shape, dt, lay), times in pairs.items():
        if len(times) == 2:
            std, one = times["triton"], times["triton-single-read"]
            faster = "single read" if one < std else "standard"
            lines.append(f"| {_case_name(op, shape, dt, lay)} | {std:.3f} | {one:.3f} | {faster} ({std / one:.2f}x) |")
    if not lines:
        return []
    return ["", "## Single read of x (opt-in) vs the standard Triton path", "",
            "| case | standard ms | single read ms | faster |", "|---|---|---|---|"] + lines


def network_lines(rows):
    """BAM's and CBAM's cost inside ResNet-50, from the sweep's whole-network rows."""
    from .sweep import network_overhead_lines

    lines = [line for line in network_overhead_lines(rows) if line]
    return ["", "## BAM and CBAM inside ResNet-50 (224x224)", ""] + [f"- {line}" for line in lines] if lines else []


def write_summary(run, info, tests, argv):
    """SUMMARY.md and summary.json from this run's files; returns the verdicts."""
    dry = run.mode == "dry"
    sweep = _load_sweep(run.out)
    rows = sweep["rows"] if sweep else []
    shapes = DRY_SHAPES if dry else SHAPES
    dtypes = ["fp32"] if dry else (["fp16"] if run.mode == "quick" else ["fp16", "bf16"])
    judged = verdicts(rows, shapes, dtypes)
    env = (sweep or {}).get("environment", {})
    lines = ["# bam-triton GPU check", ""]
    if dry:
        lines += ["**DRY RUN on CPU: no verdict below is valid.** Tiny shapes, the Triton kernels through the "
                  "interpreter (their rows are validation, not timings), two test files. It checks that the pipeline "
                  "runs, nothing about a GPU.", ""]
    kind = {"full": "full run", "quick": "quick run (--quick)", "dry": "dry run (--dry-run)"}[run.mode]
    lines += [f"- Command: `{' '.join(argv)}` ({kind}; budget {BUDGET.get(run.mode, 60)} s)",
              f"- Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; total {run.elapsed():.0f} s",
              f"- Device: {info.get('device')}" + (f", sm_{info['sm']}" if info.get("sm") else "")
              + (f", {info['memory_gib']} GiB, {info['sm_count']} SMs" if info.get("memory_gib") else ""),
              f"- Driver: {info.get('driver') or '-'}; CUDA (torch build): {info.get('cuda') or '-'}",
              f"- torch {info.get('torch')}, triton {info.get('triton') or 'not installed'}, "
              f"bam-triton {info.get('bam_triton')}, Python {info.get('python')}"]
    if env.get("copy_bandwidth_gbps"):
        lines.append(f"- Copy bandwidth ({env.get('copy_bandwidth_method')}, {env.get('copy_bandwidth_mib')} MiB): "
                     f"{env['copy_bandwidth_gbps']:.0f} GB/s")
    lines += ["", "## Targets (README), from this run's sweep", "",
              "Judged on the `triton` provider's `do_bench` rows at every shape and dtype of the sweep: "
              + ", ".join("x".join(map(str, s)) for s in shapes) + f" in {'/'.join(dtypes)}, NCHW. `frac_copy_bw` "
              "is the fraction of the copy bandwidth measured in the same run; `speedup_vs_*` the other provider's "
              "time over ours. *missing*: some case was not measured (see below).", "",
              "| target | verdict | details |", "|---|---|---|"]
    for v in judged:
        shown = {"met": "met", "not met": "**NOT met**", "missing": "missing"}[v["verdict"]]
        lines.append(f"| {v['target']} | {shown} | {v['detail']} |")
    lines += single_read_lines(rows) + network_lines(rows) + overhead_lines(run.out)
    lines += ["", "## Tests", ""]
    if tests:
        scope = " and ".join(DRY_TESTS) if dry else "tests/"
        lines.append(f"{TestCounter.text(tests)} ({scope}, `-m \"not slow_on_gpu\"`, BAM_TRITON_AUTOTUNE=0"
                     + ("" if tests.get("complete") else "; **incomplete: stopped at its deadline**") + "). Log: "
                     "`tests.log`.")
    else:
        lines.append("Not run (see the phases).")
    lines += ["", "## Phases", "", "| phase | status | seconds | deadline (s from start) | log | note |",
              "|---|---|---|---|---|---|"]
    for p in run.phases:
        lines.append(f"| {p['phase']} | {p['status']} | {p['seconds']:.0f} | {p['deadline_s']} | "
                     f"{p['log'] or '-'} | {p['note']} |")
    left = []
    if sweep:
        for entry in sweep.get("not_run", []) + sweep.get("pending", []):
            left.append(f"- sweep {_case_name(entry['op'], entry['shape'], entry['dtype'], entry['layout'])}: "
                        f"{', '.join(entry['providers'])}")
        if sweep.get("pending"):
            left.append("  (the sweep was stopped at its deadline during the case before these)")
    left += [f"- phase {p['phase']}" for p in run.phases if p["status"] == "not run: time budget"]
    if left:
        lines += ["", "## Not run: time budget", ""] + left
    if sweep:
        skipped = dict(sweep.get("skipped_providers", {}), **{f"cudagraph timing of {op}": why for op, why in
                                                              sweep.get("cudagraph_skipped_ops", {}).items()})
        if skipped:
            lines += ["", "## Not measured by design", ""] + [f"- {k}: {v}" for k, v in skipped.items()]
        if sweep.get("failures"):
            lines += ["", "## Sweep failures", ""] + [
                f"- {f['provider']} {f['op']} {f['shape']} {f['dtype']} {f['layout']}: {f['error']}"
                for f in sweep["failures"]]
    lines += ["", "## Files", "", "`sweep.csv`, `sweep.json` (rows, chosen autotune configs), `plots/`, "
              "`inspect.json`, `overhead.json`, and one log per phase (`tests.log`, `check.log`, `overhead.log`, "
              "`sweep.log`, `inspect.log`, `plot.log`); `summary.json` holds this page's data.", ""]
    with open(os.path.join(run.out, "SUMMARY.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(run.out, "summary.json"), "w") as f:
        json.dump(dict(mode=run.mode, dry_run=dry, device=info, tests=tests, phases=run.phases, verdicts=judged,
                       total_s=round(run.elapsed(), 1)), f, indent=1)
    return judged


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------

# Files a run writes: removed first so that nothing of an earlier run is taken for this one's.
_OUTPUTS = ("SUMMARY.md", "summary.json", "sweep.csv", "sweep.json", "inspect.json", "overhead.json", "tests.log",
            "check.log", "overhead.log", "sweep.log", "inspect.log", "plot.log")


def _clear(out):
    import shutil

    for name in _OUTPUTS:
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)
    shutil.rmtree(os.path.join(out, "plots"), ignore_errors=True)


def no_gpu_reason():
    """Why a GPU run cannot start here, or None."""
    import torch

    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"bam-triton gpu-check needs a CUDA GPU, and torch {torch.__version__} ({build}) sees none. "
                f"Nothing was run. `bam-triton gpu-check --dry-run` (make gpu-check-dry) runs the same pipeline on "
                f"CPU.")
    if importlib.util.find_spec("triton") is None:
        return (f"bam-triton gpu-check needs triton (the kernels), which is not installed in {sys.executable}; "
                f"torch's CUDA wheels for Linux bring it. Nothing was run.")
    return None


def run_gpu_check(args):
    mode = "dry" if args.dry_run else ("quick" if args.quick else "full")
    if mode != "dry":
        reason = no_gpu_reason()
        if reason:
            print(f"error: {reason}", file=sys.stderr)
            return 2
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    _clear(out)
    run = Run(out, mode)
    try:
        info = device_info(mode == "dry")
    except Exception as exc:  # a driver that torch sees but cannot open
        print(f"error: cannot open the GPU: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    run.say(f"{mode} run into {out}; device {info['device']}"
            + (f" (sm_{info['sm']}, driver {info['driver']})" if info.get("sm") else "")
            + f"; torch {info['torch']}, triton {info['triton']}; budget "
            + (f"{BUDGET[mode]} s" if mode != "dry" else "about a minute"))
    tests = phase_tests(run, mode == "dry")
    phase_check(run, mode == "dry")
    phase_overhead(run, mode == "dry")
    phase_sweep(run, mode)
    phase_inspect(run, mode, info.get("sm"))
    phase_plot(run)
    argv = ["bam-triton", "gpu-check"] + (["--quick"] if args.quick else []) + (["--dry-run"] if args.dry_run else []) \
        + ["--out", args.out]
    judged = write_summary(run, info, tests, argv)
    for v in judged:
        run.say(f"target: {v['target']}: {v['verdict'].upper() if v['verdict'] == 'not met' else v['verdict']}"
                + (" (dry run: not valid)" if mode == "dry" else ""))
    failed = [p["phase"] for p in run.phases if p["status"] not in ("ok", "skipped")]
    run.say(f"wrote {os.path.join(out, 'SUMMARY.md')}" + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
