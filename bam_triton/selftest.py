"""``bam-triton check``: what can run here, and a short self-test of every kernel against the torch path."""
import copy
import os
import platform
import subprocess
import sys

import torch

from . import _backend
from ._dtypes import within_tolerance
from .ops import bam_apply, channel_pool

# Small but awkward: H != W, H·W not a multiple of any block size, C not a multiple of a channel block.
_SHAPES = [(2, 3, 7, 5), (2, 70, 14, 14)]
_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def environment(device):
    lines = [f"bam-triton {__import__('bam_triton').__version__}, python {platform.python_version()}, "
             f"torch {torch.__version__}"]
    if _backend.triton_installed():
        import triton

        lines.append(f"triton {triton.__version__}" + (" (interpreter mode)" if _backend.triton_interpreted() else ""))
        lines += [f"  {line}" for line in triton_features()]
    else:
        lines.append("triton: not installed (the torch path runs everywhere)")
    if device.type == "cuda":
        lines.append(f"device: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    else:
        lines.append(f"device: cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return lines


def _version(text):
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def triton_features():
    """What the installed Triton has that changes what bam_triton runs, one line each (read from its API where it
    shows, from its version where only its behaviour does), so that a first report says what ran."""
    import inspect

    import numpy
    import triton
    from triton.runtime.autotuner import Autotuner

    from .kernels import _common

    version = _version(triton.__version__)
    lines = []
    if "cache_results" in inspect.signature(Autotuner.__init__).parameters:
        lines.append("on-disk autotune cache: yes (Triton >= 3.4): `bam-triton tune` saves configs for later runs")
    else:
        lines.append("on-disk autotune cache: no (Triton < 3.4): every process re-tunes each new shape")
    if version >= (3, 8):
        lines.append("single-config timing: skipped by Triton (>= 3.8); bam_triton also launches pinned and "
                     "single-config plans without the autotuner")
    else:
        lines.append("single-config timing: Triton < 3.8 would time one config (warm-up, repeats, 256 MiB flush); "
                     "bam_triton launches pinned and single-config plans without the autotuner instead")
    stages = inspect.signature(triton.Config.__init__).parameters["num_stages"].default
    lines.append(f"triton.Config's default num_stages: {stages}; bam_triton sets {_common.NUM_STAGES} on every config "
                 "(what runs is what `inspect` compiles)")
    if _common.INTERPRETED:
        lines.append("configs: the interpreter runs the first of each list, never timed")
    elif _common.PINNED:
        lines.append(f"configs: pinned by {_common.AUTOTUNE_ENV_VAR}=0 to the first kept config, never timed")
    else:
        lines.append("configs: tuned on each plan's first launch where the pruner keeps several "
                     f"({_common.AUTOTUNE_ENV_VAR}=0 pins them)")
    if _backend.triton_interpreted() and version < (3, 7) and _version(numpy.__version__) >= (2, 3):
        lines.append(f"interpreter: Triton < 3.7 needs numpy < 2.3, this is numpy {numpy.__version__}: kernels fail "
                     "under the interpreter")
    return lines


def runnable_backends(device):
    """{backend: reason} for the backends that can run on ``device`` here."""
    status = {"torch": "yes"}
    if not _backend.triton_installed():
        status["triton"] = "no: triton is not installed"
    elif device.type == "cuda":
        status["triton"] = "yes: compiled GPU kernels"
    elif _backend.triton_interpreted():
        status["triton"] = "yes: through Triton's interpreter (slow; for validation, not speed)"
    else:
        status["triton"] = "no on CPU tensors unless TRITON_INTERPRET=1 is set before triton is imported"
    return status


def kernel_self_test(device):
    """Run each kernel through the Triton backend and compare with the torch path. Returns [(name, ok, max_err)]."""
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape in _SHAPES:
        n, c, h, w = shape
        for dtype in _DTYPES:
            for channels_last in (False, True):
                x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                mc = torch.randn(n, c, generator=gen).to(device)
                ms = torch.randn(n, h, w, generator=gen).to(device)
                tag = f"{'x'.join(map(str, shape))} {str(dtype)[6:]} {'channels_last' if channels_last else 'nchw'}"
                ok, err = within_tolerance(channel_pool(x, backend="triton"), channel_pool(x.double(), backend="torch"))
                results.append((f"pool  {tag}", ok, err))
                for combine in ("sum", "product"):
                    xg = x.detach().requires_grad_()
                    out = bam_apply(xg, mc, ms, combine=combine, backend="triton")
                    ref = bam_apply(x.double(), mc.double(), ms.double(), combine=combine, backend="torch")
                    ok, err = within_tolerance(out, ref)
                    results.append((f"apply {combine:7s} {tag}", ok, err))
                    xr = x.double().requires_grad_()
                    g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
                    (out * g).sum().backward()
                    (bam_apply(xr, mc.double(), ms.double(), combine=combine, backend="torch") * g.double()).sum() \
                        .backward()
                    ok, err = within_tolerance(xg.grad, xr.grad)
                    results.append((f"apply-backward {combine:7s} {tag}", ok, err))
                results += _cbam_self_test(x, tag, gen)
    return results


def _cbam_self_test(x, tag, gen):
    """A CBAM training step through every CBAM kernel against the torch path in float64 on the same (rounded)
    weights: the output, and in fp32 dx (in half precision channels of x·a tie after rounding and a max's gradient
    may go to another of them, as right as the reference's)."""
    from .cbam import CBAM

    n, c, h, w = x.shape
    torch.manual_seed(0)
    cbam = CBAM(c, reduction=min(c, 16), backend="triton").to(device=x.device, dtype=x.dtype)
    reference = copy.deepcopy(cbam).double()
    reference.backend = "torch"
    g = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=x.dtype)
    xg, xr = x.detach().requires_grad_(), x.detach().double().requires_grad_()
    out, want = cbam(xg), reference(xr)
    (out * g).sum().backward()
    (want * g.double()).sum().backward()
    results = [(f"cbam {tag}", *within_tolerance(out, want))]
    if x.dtype == torch.float32:
        results.append((f"cbam-backward {tag}", *within_tolerance(xg.grad, xr.grad)))
    return results


def run_check(device_name=None):
    """Print the environment and self-test; return the process exit code (0 = pass)."""
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    for line in environment(device):
        print(line)
    status = runnable_backends(device)
    for name, text in status.items():
        print(f"backend {name:6s}: {text}")
    print(f"default backend: {_backend.default_backend()} (set BAM_TRITON_BACKEND to change it)")
    if not status["triton"].startswith("yes"):
        if _backend.triton_installed() and device.type == "cpu" and "TRITON_INTERPRET" not in os.environ:
            # triton was imported in compiled mode in this process: self-test in a fresh one under the interpreter.
            env = dict(os.environ, TRITON_INTERPRET="1")
            return subprocess.call([sys.executable, "-m", "bam_triton", "check", "--device", "cpu"], env=env)
        print("check: SKIPPED kernel self-test (no runnable Triton backend here); the torch path is available")
        return 0
    results = kernel_self_test(device)
    failed = [r for r in results if not r[1]]
    for name, ok, err in results:
        print(f"  {'ok  ' if ok else 'FAIL'} {name:55s} max|err| {err:.2e}")
    verdict = "PASS" if not failed else "FAIL"
    print(f"check: {verdict} ({len(results) - len(failed)}/{len(results)} kernel self-tests within tolerance "
          f"on {device.type}{' via the interpreter' if device.type == 'cpu' else ''})")
    return 0 if not failed else 1
