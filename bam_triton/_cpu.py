"""What runs differently on CPU tensors, in one place. Same layers, same parameters, same maths; only the way torch
is asked to compute changes, because oneDNN and the CPU's caches reward it (measurements: docs/design.md, "CPU path").

- :func:`pointwise_conv`: the spatial branch's 1x1 reduction C -> C/r on NCHW input as one batched matrix product
  (oneDNN would first reorder all of x to its blocked layout).
- :func:`spatial_branch`: BAM's dilated 3x3 convs and CBAM's 7x7 conv get channels_last input (oneDNN runs these
  narrow convs much faster so; their input is r times (BAM) or C/2 times (CBAM) smaller than x, so the conversion
  is cheap).
- :func:`apply_forward_in_chunks` (:func:`image_chunks`): the apply step a few images at a time, so its attention
  temporary stays in cache between its passes (CBAM's steps chunk the same way).

None of these runs on CUDA tensors or where plain ops are needed (``_backend.plain_ops_needed``: export, tracing,
``torch.func``), and the chunking not under ``torch.compile`` (inductor fuses the passes itself).
"""
import torch

from ._backend import plain_ops_needed

# Elements of the apply step's attention temporary per chunk (or one image when an image is larger).
APPLY_CHUNK_ELEMENTS = 2**20


def pointwise_conv(x, weight, bias):
    """``F.conv2d(x, weight, bias)`` for a 1x1 ``weight`` (C_out, C, 1, 1) on CPU NCHW ``x``, or None where the
    plain conv is the better choice (other devices and layouts)."""
    if x.device.type != "cpu" or x.dim() != 4 or plain_ops_needed() or not x.is_contiguous():
        return None
    n, c, h, w = x.shape
    c_out = weight.shape[0]
    rows = x.reshape(n, c, h * w)  # a view of NCHW memory
    y = torch.baddbmm(bias.reshape(1, -1, 1).expand(n, -1, h * w), weight.reshape(1, c_out, c).expand(n, -1, -1),
                      rows)
    return y.reshape(n, c_out, h, w)


def spatial_branch(layers, x):
    """Run ``layers`` (a spatial branch's Sequential, or a sequence of its layers) on ``x``, the convs other than 1x1
    on channels_last input when ``x`` is a CPU tensor. The (N, 1, H, W) output is the same memory either way."""
    on_cpu = x.device.type == "cpu" and not plain_ops_needed()
    if not on_cpu and isinstance(layers, torch.nn.Module):
        return layers(x)
    h = x
    for layer in layers:
        if on_cpu and isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1):
            h = h.contiguous(memory_format=torch.channels_last)
        h = layer(h)
    return h


def chunks_apply(x):
    """Whether the apply forward on ``x`` runs in image chunks: CPU, more than one chunk, not being compiled."""
    n = x.shape[0]
    image = x.numel() // n if n else 0  # not x[0].numel(): indexing makes a view, a dispatched op
    return (x.is_cpu and 0 < image and not torch.compiler.is_compiling()
            and max(1, APPLY_CHUNK_ELEMENTS // image) < n)


def image_chunks(x):
    """Slices of ``x``'s batch that keep a chunk's temporaries in the CPU's cache (``APPLY_CHUNK_ELEMENTS`` elements,
    or one image when an image is larger); one slice of the whole batch where :func:`chunks_apply` says no. A chunk
    of several images holds a multiple of the thread count where it can: ops that split a chunk's images between the
    threads (``bmm``) then keep them all busy (CBAM's training step at 8x1024x14² on 2 threads: chunks of 5 and 3
    images 10.0 ms, of 4 and 4 7.5 ms; docs/design.md, CPU path)."""
    n = x.shape[0]
    if not chunks_apply(x):
        return [slice(0, n)]
    step = max(1, APPLY_CHUNK_ELEMENTS // (x.numel() // n))
    threads = torch.get_num_threads()
    if step >= threads:
        step -= step % threads
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


def apply_forward_in_chunks(x, mc, ms, combine, logits, memory_format):
    """``x·(1 + sigmoid(mc ⊕ ms))`` a few images at a time, in ``x``'s ``memory_format``; ``logits(x, mc, ms, combine,
    out=)`` writes each chunk's ``mc ⊕ ms`` into one reused buffer; ``mc`` (N, C), ``ms`` (N, H·W)."""
    chunks = image_chunks(x)
    out = torch.empty_like(x, memory_format=memory_format)
    buffer = torch.empty_like(x[chunks[0]], dtype=torch.promote_types(mc.dtype, ms.dtype),
                              memory_format=memory_format)
    for images in chunks:
        att = logits(x[images], mc[images], ms[images], combine, out=buffer[:images.stop - images.start]).sigmoid_()
        torch.addcmul(x[images], x[images], att, out=out[images])
    return out
