"""The launch path in compiled mode on every Triton version CI tests (``make test-triton-compat``): BAM's launchers,
forward and backward, through Triton's real ``Autotuner.run``, ``JITFunction.run``, binder and kernel cache, on a
stand-in GPU (tests/recording_driver.py: one device, a fixed stream, sm_80 or sm_90, a timer under which a config
other than the first is fastest, kernels that record their launches). tests/compiled_launch_cases.py holds the cases
and the checks: every launch passes its plan's grid, scalars and constexprs; a plan's later launches reuse the
compiled kernel of its first; nothing compiles twice; every config compiles with the stages ``inspect`` checks; with
``BAM_TRITON_AUTOTUNE=0``, or one kept config, nothing is timed and the autotuner never runs."""
import os

import pytest

from devices import cpu_only, run_compiled

_TESTS = os.path.dirname(os.path.abspath(__file__))

# BAM_TRITON_AUTOTUNE=0 is read when the kernels are imported: the pinned pass first, then the same process unpinned.
_CHILD = """
import recording_driver
recording_driver.install({arch})
import compiled_launch_cases as cases
from bam_triton.kernels import _common
cases.record()
for pinned in (True, False):
    assert _common.PINNED == pinned
    cases.run_cases()
    print(pinned, cases.check(pinned))
    cases.reset()
    _common.PINNED = False
"""


def _child_path():
    """The child's PYTHONPATH: this directory, and the parent's entries (a Triton under test) without
    tests/triton_compat, whose Triton 3.2 timer refuses to time: the child brings its own."""
    parent = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and "triton_compat" not in p]
    return os.pathsep.join([_TESTS, *parent])


@cpu_only("runs the launchers in a compiled-mode subprocess of the CPU machine, on a stand-in driver")
@pytest.mark.parametrize("arch", [80, 90])
def test_launches_through_triton_match_the_plans(arch):
    run_compiled(_CHILD.format(arch=arch), PYTHONPATH=_child_path(), BAM_TRITON_AUTOTUNE="0")
