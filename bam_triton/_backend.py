"""Backend choice, in one place.

``"torch"`` runs the pure-torch path everywhere. ``"triton"`` runs the Triton kernels: on CUDA tensors as compiled GPU
code, on CPU tensors through Triton's interpreter, which only works when ``TRITON_INTERPRET=1`` was set before triton
was imported; on META tensors nothing runs (shapes only) and each launch is recorded (``kernels._common
.record_launches``, what ``bam-triton traffic`` counts). ``"auto"`` picks Triton for CUDA tensors when triton is installed, torch otherwise. The environment
variable ``BAM_TRITON_BACKEND`` sets the default for calls that pass ``backend=None`` (modules built without one).
"""
import importlib.util
import os

import torch
import torch.autograd.forward_ad as forward_ad

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "BAM_TRITON_BACKEND"


def check_backend(backend, name="backend"):
    """Validate a backend name (``None`` = the default); raise ``ValueError`` naming the argument."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS} (or None for the default), got {backend!r}")
    return backend


def default_backend():
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {value!r}")
    return value


SINGLE_READ_ENV_VAR = "BAM_TRITON_SINGLE_READ"
AUTOTUNE_ENV_VAR = "BAM_TRITON_AUTOTUNE"
_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def _env_flag(name, default):
    """``$name`` as a bool (unset or empty: ``default``); a value that is none of 1/true/on/yes, 0/false/off/no (any
    case) raises ``ValueError`` naming the variable and what it accepts."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in _ON + _OFF:
        raise ValueError(f"environment variable {name} must be one of {', '.join(_ON)} (on) or {', '.join(_OFF)} "
                         f"(off), got {os.environ[name]!r}")
    return value in _ON


def single_read_default():
    """``$BAM_TRITON_SINGLE_READ`` as a bool (unset: False): the default of ``BAM(single_read=None)``."""
    return _env_flag(SINGLE_READ_ENV_VAR, False)


def autotune_enabled():
    """``$BAM_TRITON_AUTOTUNE`` as a bool (unset: True). The kernels read it once, when they are imported
    (``kernels/_common.py``: ``PINNED``)."""
    return _env_flag(AUTOTUNE_ENV_VAR, True)


def check_environment():
    """Read every ``BAM_TRITON_*`` variable once, so that a bad value is refused (``ValueError`` naming it) before any
    work starts, not halfway through it: the ``bam-triton`` commands call this first."""
    default_backend()
    single_read_default()
    autotune_enabled()


def _find_triton():
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a finder that refuses triton, or a broken half-imported triton module
        return False


# Looked up once, at import (finding the package does not import it): a plain value, which torch.compile reads
# without tracing a cache wrapper.
_TRITON_INSTALLED = _find_triton()


def triton_installed():
    return _TRITON_INSTALLED


_KERNELS = []  # the kernel package once imported: an import statement per launch costs ~1 µs


def kernels():
    """Import the kernel package on first use: ``import bam_triton`` never imports triton."""
    if _KERNELS:
        return _KERNELS[0]
    try:
        from . import kernels as kernel_package
    except (ImportError, RuntimeError) as e:  # a broken triton install; Triton 3.2 on a machine without a GPU driver
        hint = ""
        if "active drivers" in str(e):
            hint = ("Triton 3.2 needs a GPU driver to define autotuned kernels, even for its interpreter (Triton 3.3 "
                    "and later do not); ")
        raise RuntimeError(f"the Triton kernels could not be imported ({type(e).__name__}: {e}); {hint}"
                           f"use backend='torch' or 'auto'") from e
    _KERNELS.append(kernel_package)
    return kernel_package


def triton_interpreted():
    """True when Triton kernels run under the CPU interpreter (imports triton)."""
    return kernels().INTERPRETED


def resolve(backend, device):
    """The backend that runs for tensors on ``device``: ``"torch"`` or ``"triton"`` (``backend`` None: the one
    ``$BAM_TRITON_BACKEND`` names, which the errors then name)."""
    return resolve_chosen(backend or default_backend(), device, from_env=not backend)


def resolve_chosen(chosen, device, from_env):
    """:func:`resolve` for a validated backend name ``chosen`` that ``$BAM_TRITON_BACKEND`` gave (``from_env``) or
    the caller did: the per-call path reads the variable once."""
    if chosen == "torch":
        return "torch"
    if chosen == "auto":
        return "triton" if device.type == "cuda" and triton_installed() else "torch"
    given, instead = ((f"{ENV_VAR}=triton (no backend= given)", f"unset {ENV_VAR} or set it to torch or auto")
                      if from_env else ("backend='triton'", "use backend='torch' or 'auto'"))
    if not triton_installed():
        raise RuntimeError(f"{given} needs the triton package (pip install triton, Linux only); {instead}")
    if device.type in ("cuda", "meta"):  # meta: a shape-only run; the launches are recorded, not run (traffic)
        return "triton"
    if device.type == "cpu":
        if not triton_interpreted():
            raise RuntimeError(f"{given} on CPU tensors runs the kernels through Triton's interpreter, which needs "
                               f"TRITON_INTERPRET=1 in the environment before triton is imported; {instead} for CPU "
                               f"tensors")
        return "triton"
    raise RuntimeError(f"{given} supports CUDA tensors (and CPU tensors under the interpreter), got a tensor on "
                       f"{device}")


# Looked up once: on the path of every call, where each lookup costs time when the caches are cold (after a large
# layer); the functions themselves read torch's current state.
_IS_TRACING = torch.jit.is_tracing  # not torch._C._is_tracing, which torch.compile cannot trace
_IS_EXPORTING = getattr(torch.compiler, "is_exporting", None) or (lambda: False)
_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None) or (lambda: False)


def plain_ops_needed():
    """True where BAM must be written as plain aten ops (``x * (1 + sigmoid(mc ⊕ ms))``, ``mean``) instead of the
    Triton custom ops or the torch path's in-place, chunked code: while ``torch.jit.trace`` or ``torch.export``
    records a graph (its consumers know standard ops only; ``torch.onnx.export`` records through one of the two: the
    TorchScript exporter traces, the dynamo exporter exports), under a ``torch.func`` transform (vmap, grad, jacrev,
    jvp), and inside a forward-mode AD ``dual_level``: there any tensor may be dual, the module's parameters too (the
    autograd Functions' forward-AD rules are not written). ``torch.compile`` is not among them: it keeps the custom
    ops, which it knows."""
    return bool(_IS_TRACING() or _IS_EXPORTING() or _TRANSFORMS_ACTIVE() or forward_ad._current_level >= 0)
