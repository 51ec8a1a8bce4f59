"""What kvmix needs of the device, checked when a kvmix layer's backend is built (startup).

* CPU: the eager reference path; nothing to check.
* CUDA (NVIDIA): compute capability >= 8.0 (the Triton page kernels' bf16 tensor-core dots and the CUDA
  decode kernel's ``mma.sync`` / ``movmatrix``), and the CUDA decode kernel compiled for the layer's
  format and dtype before the first step (unless ``KVMIX_DECODE_KERNEL=triton``).
* Anything else (ROCm, XPU, TPU, ...): refused, naming what is supported.

Each refusal is an error that names the requirement; there is no silent fallback to another format.
"""

from __future__ import annotations

import logging

import torch

from vllm_kvmix.formats import KVFormat
from vllm_kvmix.kernels import cuda_decode
from vllm_kvmix.options import CUDA, DECODE_KERNEL_ENV, decode_kernel

logger = logging.getLogger("vllm.kvmix")


class UnsupportedDevice(RuntimeError):
    """kvmix cannot run on this device."""


def check_device(fmt, device: torch.device) -> None:
    """Raise :class:`UnsupportedDevice` unless kvmix's kernels can run on ``device``."""
    if device.type == "cpu":
        return
    if device.type != "cuda" or getattr(torch.version, "hip", None):
        kind = "ROCm" if getattr(torch.version, "hip", None) else device.type
        raise UnsupportedDevice(
            f"{fmt}: kvmix runs on NVIDIA CUDA GPUs (compute capability >= "
            f"{cuda_decode.MIN_CAPABILITY[0]}.{cuda_decode.MIN_CAPABILITY[1]}) and on CPU, not on {kind}"
        )
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < cuda_decode.MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise UnsupportedDevice(
            f"{fmt}: kvmix's kernels need an NVIDIA GPU of compute capability >= "
            f"{cuda_decode.MIN_CAPABILITY[0]}.{cuda_decode.MIN_CAPABILITY[1]} (Ampere or newer: bf16 tensor-core "
            f"mma); {name} is {cap[0]}.{cap[1]}. Use one of vLLM's own KV-cache dtypes on this GPU"
        )


def prepare_decode(fmt: KVFormat, head_size: int, rep: int, dtype: torch.dtype, sliding_window=None,
                   soft_cap=None) -> str:
    """Pick and prepare a format's decode kernel on CUDA at startup; returns a log line naming it.

    The CUDA kernel is compiled here when it will serve (raising
    :class:`~vllm_kvmix.kernels.cuda_decode.KernelUnavailable` with the reason if it cannot), so a
    broken install fails at startup, not in the first decode step.
    """
    choice = decode_kernel()
    if choice != CUDA:
        return (f"kvmix: {fmt.name} decode on the Triton page kernel ({DECODE_KERNEL_ENV}={choice}); "
                "the CUDA decode kernel is not used")
    if not cuda_decode.covers(fmt, head_size, rep, dtype, sliding_window, soft_cap):
        return (f"kvmix: {fmt.name} decode on the Triton page kernel: the CUDA decode kernel covers head sizes "
                f"{cuda_decode.HEAD_SIZES}, keys {cuda_decode.KEY_BITS} / values {cuda_decode.VALUE_BITS} bits, "
                f"fp16 / bf16, no soft cap (this layer: head size {head_size}, "
                f"{dtype}, window {sliding_window}, soft cap {soft_cap})")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    if device is not None and not cuda_decode.fits_device(fmt, head_size, device):
        return (f"kvmix: {fmt.name} decode on the Triton page kernel: the CUDA decode kernel at head size {head_size} "
                f"needs {cuda_decode.block_smem_bytes(fmt.k_bits, fmt.v_bits, head_size)} bytes of shared memory per "
                f"block, {torch.cuda.get_device_name(device)} gives {cuda_decode.smem_limit(device.index)}")
    cuda_decode.prepare(fmt, dtype, head_size, sliding_window)
    name = cuda_decode.kernel_name(fmt.k_bits, fmt.v_bits, dtype == torch.bfloat16, head_size,
                                   sliding_window is not None)
    return f"kvmix: {fmt.name} decode on the CUDA kernel ({name} from {cuda_decode.source_path()})"
