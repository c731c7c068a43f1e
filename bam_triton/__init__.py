"""bam-triton: BAM (Bottleneck Attention Module, Park et al., BMVC 2018) for PyTorch, with Triton kernels for its
memory-bound steps. ``import bam_triton`` never imports triton: the kernels load on their first launch.

    >>> from bam_triton import BAM
    >>> bam = BAM(256)                       # drop in after a network stage
"""
from ._backend import BACKENDS, default_backend
from ._dtypes import SUPPORTED_DTYPES, TOLERANCES
from .module import BAM
from .ops import COMBINES, bam_apply, channel_pool

__version__ = "0.1.0"

__all__ = ["BAM", "bam_apply", "channel_pool", "BACKENDS", "COMBINES", "SUPPORTED_DTYPES", "TOLERANCES",
           "default_backend", "__version__"]
