"""bam-triton: BAM (Bottleneck Attention Module, Park et al., BMVC 2018) and CBAM (Convolutional Block Attention
Module, Woo et al., ECCV 2018) for PyTorch, with Triton kernels for their memory-bound steps. ``import bam_triton``
never imports triton: the kernels load on their first launch.

    >>> from bam_triton import BAM
    >>> bam = BAM(256)                       # drop in after a network stage
    >>> from bam_triton import CBAM
    >>> cbam = CBAM(256)                     # drop in at the end of every residual block
"""
from ._backend import BACKENDS, default_backend
from ._dtypes import SUPPORTED_DTYPES, TOLERANCES
from .cbam import CBAM
from .cbam_ops import POOL_TYPES, cbam_apply, cbam_channel_pool, cbam_spatial_pool
from .module import BAM
from .ops import COMBINES, bam_apply, channel_pool

__version__ = "0.1.0"

__all__ = ["BAM", "CBAM", "bam_apply", "channel_pool", "cbam_apply", "cbam_channel_pool", "cbam_spatial_pool",
           "POOL_TYPES", "BACKENDS", "COMBINES", "SUPPORTED_DTYPES", "TOLERANCES", "default_backend", "__version__"]
