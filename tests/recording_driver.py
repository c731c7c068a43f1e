"""A stand-in GPU for Triton in compiled mode, for tests/test_compiled_launches.py's child process: an active driver
with one device, a fixed stream, an sm_80 or sm_90 target and a timer, and a compile step that returns a kernel which
records each launch instead of running it. Everything between our launchers and the GPU is Triton's own:
``Autotuner.run``, ``JITFunction.run``, its binder and its kernel cache.

The same on Triton 3.2 to 3.9 (read in their sources): ``driver.set_active``; ``JITFunction`` asks the active driver
for the device, the stream and the target and calls ``triton.compiler.compile`` (looked up when its binder is made);
a compiled kernel is launched as ``kernel.run(grid_0, grid_1, grid_2, stream, function, packed_metadata,
launch_metadata, enter_hook, exit_hook, *arguments)``, the arguments without the constexprs on 3.2 and with them
from 3.3. The autotuner's timer is the driver's benchmarker (Triton 3.2 asks for it when a kernel is defined, so
:func:`install` runs before the kernels are imported)."""
from dataclasses import dataclass

import triton
import triton.compiler
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

STREAM = 0x5EED
COMPILES = []  # RecordingKernel, one per compile
LAUNCHES = []  # Launch, in order
TIMED = []  # the Launch each timing ran


@dataclass(eq=False)
class Launch:
    kernel: "RecordingKernel"
    grid: tuple
    stream: int
    args: dict  # runtime argument name -> value


class RecordingKernel:
    """What the stand-in compile returns: the source's kernel name and constexprs and the compile options; ``run``
    records a :class:`Launch`."""

    function = None
    packed_metadata = None

    def __init__(self, src, target, options):
        fn = src.fn
        params = fn.params
        self.name = fn.__name__
        self.target = target
        self.options = dict(options)
        self.runtime_names = [p.name for p in params if not p.is_constexpr]
        self.all_names = [p.name for p in params]
        # Triton 3.2 keys its constants by name (and adds ints equal to 1 to them), 3.3 and later by argument path.
        constexpr_names = {p.name for p in params if p.is_constexpr}
        named = {(k if isinstance(k, str) else fn.arg_names[k[0]]): v for k, v in src.constants.items()}
        self.constexprs = {k: v for k, v in named.items() if k in constexpr_names}
        self.signature = repr(sorted(src.signature.items())) + repr(getattr(src, "attrs", None))

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook,
            *args):
        names = self.all_names if len(args) == len(self.all_names) else self.runtime_names
        assert len(args) == len(names), (self.name, len(args), names)
        runtime = {name: value for name, value in zip(names, args) if name in self.runtime_names}
        LAUNCHES.append(Launch(self, (grid_0, grid_1, grid_2), stream, runtime))


def recording_compile(src, target=None, options=None, **kwargs):
    kernel = RecordingKernel(src, target, options or {})
    COMPILES.append(kernel)
    return kernel


class RecordingDriver:
    """One device (0), a fixed stream, target ``sm_<arch>``. Its timer runs the config once (recorded in TIMED) and
    reports each timing faster than the one before, so the autotuner picks the last config it times, never the first
    of several."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return STREAM

    def get_current_target(self):
        return self.target

    def get_benchmarker(self):
        return self.time

    def time(self, kernel_call, quantiles=None, **kwargs):
        before = len(LAUNCHES)
        kernel_call()
        assert len(LAUNCHES) == before + 1, "a timed call launched more or less than one kernel"
        TIMED.append(LAUNCHES[-1])
        ms = 1000.0 - len(TIMED)
        return [ms, ms, ms] if quantiles else ms


def install(arch):
    """Make the recording driver Triton's active driver and the recording compile its compiler (before the kernels
    are imported)."""
    driver.set_active(RecordingDriver(arch))
    triton.compiler.compile = recording_compile
