"""The autotuned kernels' chosen configs, and their persistence across runs.

Triton's ``Autotuner`` keeps ``.cache`` ({tuning key: Config}) and sets ``.best_config`` on every launch. Where the
installed Triton supports it (``cache_results``, Triton >= 3.4), tuning results are also written to Triton's cache
directory (``TRITON_CACHE_DIR``, default ``~/.triton/cache``) and reused by later processes: ``enable_persistence``
switches that on for our kernels (the interpreter never tunes and never caches). Triton 3.2 and 3.3 have neither
``cache_results`` nor ``triton.knobs`` (both 3.4): there each process re-tunes, and the interpreter and the cache
directory are read from the environment.
"""
import os
import sys


def autotuners():
    """{kernel name: Autotuner} of every loaded bam_triton kernel module (imports nothing)."""
    if "triton" not in sys.modules:
        return {}
    from triton.runtime.autotuner import Autotuner

    found = {}
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("bam_triton.kernels") or mod is None:
            continue
        for attr, obj in vars(mod).items():
            if isinstance(obj, Autotuner):
                found[attr] = obj
    return found


def load_kernels():
    """Import the kernel modules."""
    import importlib

    for name in ("pool", "apply", "apply_bwd", "front"):
        try:
            importlib.import_module(f"bam_triton.kernels.{name}")
        except ImportError:
            pass


def enable_persistence():
    """Ask each autotuner to cache its results on disk when this Triton can; returns a short status string."""
    import triton

    tuners = autotuners()
    if not tuners:
        return "no autotuned kernels loaded"
    if interpreting():
        return "interpreter: nothing is tuned or cached"
    if not all(hasattr(t, "cache_results") for t in tuners.values()):
        return f"triton {triton.__version__}: no on-disk autotune cache (needs triton >= 3.4); configs re-tuned per run"
    for t in tuners.values():
        t.cache_results = True
    return f"on-disk autotune cache on (triton {triton.__version__}, dir {cache_dir()})"


def _knobs():
    """``triton.knobs`` (Triton >= 3.4), or None."""
    try:
        from triton import knobs
    except ImportError:
        return None
    return knobs


def interpreting():
    """Whether triton runs its CPU interpreter: ``knobs.runtime.interpret``, else (Triton < 3.4) the environment
    variable triton itself reads at import."""
    knobs = _knobs()
    runtime = getattr(knobs, "runtime", None)
    if runtime is not None and hasattr(runtime, "interpret"):
        return bool(runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cache_dir():
    """Triton's cache directory: ``knobs.cache.dir``, else (Triton < 3.4) ``TRITON_CACHE_DIR`` or
    ``triton.runtime.cache.default_cache_dir()`` (``~/.triton/cache``), as its FileCacheManager picks it."""
    knobs = _knobs()
    found = getattr(getattr(knobs, "cache", None), "dir", None)
    if found:
        return found
    if os.environ.get("TRITON_CACHE_DIR", "").strip():
        return os.environ["TRITON_CACHE_DIR"].strip()
    try:
        from triton.runtime.cache import default_cache_dir

        return default_cache_dir()
    except ImportError:
        return os.path.join(os.path.expanduser("~"), ".triton", "cache")


def config_str(config):
    if config is None:
        return ""
    kw = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw},num_warps={config.num_warps},num_stages={config.num_stages}"


def reset_marks():
    for t in autotuners().values():
        t.best_config = None


def chosen_since_reset():
    """{kernel: config string} of each kernel launched since :func:`reset_marks`."""
    return {name: config_str(t.best_config) for name, t in sorted(autotuners().items())
            if getattr(t, "best_config", None) is not None}


def all_tuned():
    """{kernel: {tuning key: config string}} of everything tuned in this process."""
    return {name: {repr(key): config_str(cfg) for key, cfg in t.cache.items()}
            for name, t in sorted(autotuners().items())}
