"""What tests/test_compiled_launches.py runs in its compiled-mode child, once tests/recording_driver.py's stand-in GPU
is active: every case of :data:`CASES` on every input of :data:`INPUTS`, twice, then every chosen config forced; then
:func:`check` holds each recorded kernel launch against the launch plan it came from. The child makes two passes,
pinned (``BAM_TRITON_AUTOTUNE=0``) and autotuned, with :func:`reset` between them.

A module's launchers join the test with one line each in :data:`CASES`: ``(name, call)``, ``call(t)`` launching on
the :class:`Inputs` ``t`` as the module does (CPU tensors stand in for CUDA ones: Triton's binder and our launchers
see only their shapes, dtypes, strides and addresses, and nothing runs)."""
import sys

import torch
from triton.runtime.autotuner import Autotuner

import recording_driver as rec
from bam_triton import BAM, CBAM, _backend, kernels
from bam_triton.bench import inspect as aot
from bam_triton.kernels import _common


class Inputs:
    """Tensors for one case: ``x`` (N, C, H, W) of ``dtype`` in NCHW or channels_last, and the small maps."""

    def __init__(self, shape, dtype, channels_last):
        self.shape, self.dtype, self.channels_last = shape, dtype, channels_last
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.x = torch.zeros(shape, dtype=dtype).contiguous(memory_format=fmt)
        self.c = shape[1]

    def maps(self, dtype=torch.float32):
        n, c, h, w = self.shape
        return torch.zeros(n, c, dtype=dtype), torch.zeros(n, h * w, dtype=dtype)

    def __repr__(self):
        return f"{'x'.join(map(str, self.shape))} {self.dtype} {'channels_last' if self.channels_last else 'nchw'}"


def train_step(module, t):
    """BAM forward and backward on ``t.x``, as in training."""
    x = t.x.clone().requires_grad_()
    module.to(t.dtype).train()(x).float().sum().backward()


CASES = [
    ("BAM, standard path", lambda t: train_step(BAM(t.c, reduction=4, backend="triton", single_read=False), t)),
    ("BAM, single read", lambda t: train_step(BAM(t.c, reduction=4, backend="triton", single_read=True), t)),
    ("CBAM", lambda t: train_step(CBAM(t.c, reduction=4, backend="triton"), t)),
    ("apply, bf16 maps", lambda t: kernels.apply_fwd(t.x, *t.maps(torch.bfloat16), "product")),
    ("backward reductions only", lambda t: kernels.apply_bwd_reduce(t.x, t.x, *t.maps(), "sum")),
    ("dx with dpool and dx_extra", lambda t: kernels.apply_bwd_dx(t.x, t.x, *t.maps(), "sum", dpool=t.maps()[0],
                                                                  dx_extra=t.x)),
]

INPUTS = [Inputs(shape, dtype, cl) for shape, cl in (((2, 16, 8, 8), False), ((2, 16, 8, 8), True),
                                                     ((2, 16, 7, 7), False))
          for dtype in (torch.float32, torch.bfloat16)]

# Kernels the cases must reach at these inputs (BAM's; a new module's cases check their own launches).
KERNELS = {"channel_pool_kernel", "channel_pool_rows_kernel", "apply_fwd_kernel", "apply_bwd_reduce_kernel",
           "apply_bwd_reduce_rows_kernel", "apply_bwd_dx_kernel", "front_fwd_kernel", "front_bwd_kernel"}


class Call:
    """One call of :func:`_common.launch`: its plan, tensors, forced config, tuning state, returned meta and the
    kernel launches (timed ones first) it made."""

    def __init__(self, plan, tensors, config):
        self.plan, self.tensors, self.config = plan, tensors, config
        self.state = _common.tuning_state(tensors[0].device, [t.dtype for t in tensors])


CALLS = []
AUTOTUNER_RUNS = []


def reset():
    """Forget every plan and record, for a second pass in the same process (Triton's kernel cache stays)."""
    _common.forget_plans()
    for records in (CALLS, AUTOTUNER_RUNS, rec.LAUNCHES, rec.COMPILES, rec.TIMED):
        records.clear()


def _recording(launch):
    def recorded(plan, *tensors, config=None):
        call = Call(plan, tensors, config)
        first = len(rec.LAUNCHES)
        call.meta = launch(plan, *tensors, config=config)
        call.launches = rec.LAUNCHES[first:]
        CALLS.append(call)
        return call.meta

    return recorded


def record():
    """Route every module's ``launch`` through :class:`Call` records, count ``Autotuner.run`` calls, and let the
    modules take the Triton path on CPU tensors (they stand in for CUDA ones here)."""
    real = _common.launch
    recorded = _recording(real)
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("bam_triton") and getattr(module, "launch", None) is real:
            module.launch = recorded
    run = Autotuner.run

    def counted(self, *args, **kwargs):
        AUTOTUNER_RUNS.append(self.base_fn.__name__)
        return run(self, *args, **kwargs)

    Autotuner.run = counted
    _backend.triton_interpreted = lambda: True


def run_cases():
    for name, case in CASES:
        for t in INPUTS:
            for _ in range(2):  # a plan's first launch chooses its config, the second launches it directly
                try:
                    case(t)
                except Exception as exc:
                    raise AssertionError(f"{name} on {t}: {type(exc).__name__}: {exc}") from exc
    chosen = {}
    for call in CALLS:
        if call.config is None:
            chosen.setdefault((id(call.plan), call.state), call)
    for call in chosen.values():  # forced to the config chosen: the same compiled kernel, nothing compiled
        meta, kwargs, grid, config = call.plan.tuned[call.state]
        _common.launch(call.plan, *call.tensors, config=(meta, config.num_warps))


def _padded(grid):
    return tuple(grid) + (1,) * (3 - len(grid))


def _config_of(launch, plan):
    meta_names = _common.all_configs(plan.kind)[0][0]
    return ({k: launch.kernel.constexprs[k] for k in meta_names}, launch.kernel.options["num_warps"])


def check_launch(launch, plan, tensors):
    """A kernel launch passes what ``plan`` says: its kernel, tensors, scalars and constexprs, the grid for the config
    it ran, the driver's stream, and the compile options of that config."""
    k = launch.kernel
    assert k.name == plan.kernel_name, (k.name, plan.kernel_name)
    meta, warps = _config_of(launch, plan)
    pointers = [name for name in k.runtime_names if name.endswith("_ptr")]
    assert len(pointers) == len(tensors) and all(launch.args[n] is t for n, t in zip(pointers, tensors)), k.name
    assert tuple(launch.args[n] for n in plan.scalar_names()) == plan.scalars, (k.name, launch.args, plan.scalars)
    for name, value in plan.constexprs:
        assert k.constexprs[name] == value, (k.name, name, k.constexprs[name], value)
    assert launch.grid == _padded(plan.grid_for(meta)), (k.name, launch.grid, plan.grid_for(meta))
    assert launch.stream == rec.STREAM
    assert (meta, warps) in plan.kept_configs(), (k.name, meta, warps)
    assert k.options["num_stages"] == _common.NUM_STAGES == aot.compile_options(warps)["num_stages"], k.options
    assert k.target == rec.RecordingDriver(k.target.arch).target


def check(pinned):
    """Everything the test asserts, for a run with (``pinned``) or without ``BAM_TRITON_AUTOTUNE=0``."""
    reached = {launch.kernel.name for launch in rec.LAUNCHES}
    assert KERNELS <= reached, sorted(KERNELS - reached)
    first = {}  # (plan, tuning state) -> the call that chose its config
    tuned = {}  # kernel name -> the configs its autotuner chose by timing
    for call in CALLS:
        assert call.launches, f"{call.plan.kernel_name}: launch ran no kernel"
        for launch in call.launches:
            check_launch(launch, call.plan, call.tensors)
        *timed, final = call.launches
        assert _config_of(final, call.plan)[0] == call.meta
        key = (id(call.plan), call.state)
        if key not in first and call.config is None:
            first[key] = call
            kept = call.plan.kept_configs()
            if pinned or len(kept) == 1:  # nothing to choose: nothing timed, on every Triton version
                assert not timed and _config_of(final, call.plan) == kept[0], (call.plan.kernel_name, timed)
            elif timed:  # the autotuner timed every kept config, in order, and took the fastest: the last
                assert [_config_of(launch, call.plan) for launch in timed] == kept, call.plan.kernel_name
                assert all(any(launch is t for t in rec.TIMED) for launch in timed)
                assert _config_of(final, call.plan) == kept[-1] != kept[0]
                tuned.setdefault(call.plan.kernel_name, []).append(kept[-1])
            else:  # another plan with the same autotuning key (and dtypes) was tuned first: its choice
                assert _config_of(final, call.plan) in tuned[call.plan.kernel_name], call.plan.kernel_name
            continue
        # later calls, and configs forced to the chosen one: one launch of the chosen config's compiled kernel
        assert not timed, call.plan.kernel_name
        assert final.kernel is first[key].launches[-1].kernel, call.plan.kernel_name
    assert len(rec.TIMED) == sum(len(c.launches) - 1 for c in CALLS)
    compiled = [(k.name, k.signature, repr(sorted(k.constexprs.items())), k.options["num_warps"]) for k in rec.COMPILES]
    assert len(compiled) == len(set(compiled)), "a kernel was compiled twice"
    if pinned:
        assert not AUTOTUNER_RUNS and not rec.TIMED, (AUTOTUNER_RUNS, len(rec.TIMED))
    else:
        assert AUTOTUNER_RUNS and rec.TIMED
    return len(CALLS), len(rec.LAUNCHES), len(rec.COMPILES), len(rec.TIMED)
