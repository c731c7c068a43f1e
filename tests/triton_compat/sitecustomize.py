"""Loaded at interpreter start-up (via PYTHONPATH) by `make test-triton-compat`, which runs the kernel tests under
older Tritons on this GPU-less machine. Triton 3.2 has two bugs that only show without a GPU driver, both fixed in 3.3;
this works around them so that 3.2 can check our kernels here. It changes nothing under other versions, and nothing
that runs on a GPU.

1. ``triton.autotune`` drops its ``do_bench`` argument, so the Autotuner asks the (missing) GPU driver for a timer
   when a kernel is defined: give it one that refuses to time (the interpreter runs one pinned config, never timed).
2. Its interpreter rejects the warp-specialisation fields the autotuner passes with every config: let it skip them.
"""
import triton

if triton.__version__.startswith("3.2."):
    import triton.runtime.autotuner as _autotuner
    import triton.runtime.interpreter as _interpreter

    def _no_timer(kernel_call, quantiles):
        raise RuntimeError("tests/triton_compat: configs cannot be timed without a GPU")

    _autotuner_init = _autotuner.Autotuner.__init__

    def _init_with_timer(self, *args, **kwargs):
        if kwargs.get("do_bench") is None:
            kwargs["do_bench"] = _no_timer
        _autotuner_init(self, *args, **kwargs)

    _autotuner.Autotuner.__init__ = _init_with_timer
    _interpreter.RESERVED_KWS = [*_interpreter.RESERVED_KWS, "num_buffers_warp_spec", "num_consumer_groups",
                                 "reg_dec_producer", "reg_inc_consumer"]
