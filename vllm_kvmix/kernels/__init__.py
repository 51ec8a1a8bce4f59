"""Triton kernels, one file each: ``write`` (quantize-on-write) and ``attention``.

Each file stacks ``@triton.jit`` kernel -> launcher with the shapes in its
docstring.  The per-side quantizer lives in :mod:`vllm_kvmix.kernels.codec`
so the attention loop does not change when the format does.  Kernels never
import the reference; tests compare the two.
"""
