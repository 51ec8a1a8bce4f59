"""Decode attention over packed pages in CUDA (``csrc/page_decode.cu``), compiled by NVRTC at first use.

Why CUDA here: the Triton page kernel spends ~3,900 warp-instructions per 64-token page (k4v2) moving
code bytes into the tensor-core operand layout one byte per register; the CUDA kernel chooses which
channels and tokens each lane's mma registers hold so the codes arrive as whole words (a shift and one
LOP3 per fp16 pair) -- ``benchmarks/kernels/NOTES.md`` has the counts and timings.

Scope: decode steps (one query token per request: ``StepPlan.decode`` and any batch whose
``max_query_len`` is 1), head size 128, GQA groups of at most 8, fp16 / bf16 queries, no sliding window
or soft cap, keys 4 / 8 bits, values 2 / 4 bits.  One launch per layer does what the Triton path does in
three: stage the new token (``stage=(key, value)``: 8-bit, value rotated, into the staging slot; what
``page._stage_kernel`` does), attend over the packed pages and the own page, merge the split-K partials in
the last block of each (row, KV head) and rotate the output back
(:meth:`vllm_kvmix.kernels.page.PageStep.run`).  Pages that fill are packed after it (``page._pack_kernel``).
Everything else runs the Triton kernels, the reference-tested path for all shapes.

NVRTC ships with PyTorch's CUDA wheels (``nvidia-cuda-nvrtc``), so nothing is built at install time;
the one private PyTorch entry point used (``torch.cuda._compile_kernel``) is wrapped in
:func:`compile_cuda`, and ``tests/test_page_kernels.py`` checks that it is still there.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
from pathlib import Path

import torch

from vllm_kvmix.formats import KVFormat

WARPS = 4  # warps per block (each walks its own pages); 4 blocks per SM at <= 128 registers
MAX_SPLITS = 64  # split-K partials one block merges (the kernel's KVMIX_MAX_SPLITS: shared memory sm_w)
ROWS = 8  # workspace rows per (query block, KV head, split): the GQA group, padded (the kernel's KVMIX_ROWS)
SOURCE_NAME = "page_decode.cu"
HEAD_SIZE = 128
DISABLE_ENV = "KVMIX_CUDA_DECODE"  # "0": always the Triton kernel (benchmarks compare the two)
# Preprocessor defines of the compile: empty as served; benchmarks set experiments of the source here
# (``("KVMIX_MIN_BLOCKS=3",)``, page_bench.py --experiments) and time them against the served build in one run.
DEFINES: tuple[str, ...] = ()
# The source's open experiments (off as served), one define set per build: page_bench.py times them by default,
# and the GPU oracle, nvcc and NVRTC tests build them.  KVMIX_KEYS_PER_TILE: counted, not yet timed
# (benchmarks/kernels/NOTES.md, session 11).
EXPERIMENTS: tuple[tuple[str, ...], ...] = (("KVMIX_KEYS_PER_TILE=1",),)


def source_path() -> Path:
    """``csrc/page_decode.cu`` of the checkout the package runs from (editable installs), or the copy
    installed next to this module (``kernels/csrc/``: package data, as docker/Dockerfile places it)."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "csrc" / SOURCE_NAME, here.parent / "csrc" / SOURCE_NAME):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"kvmix: {SOURCE_NAME} not found next to the package (csrc/)")


def nvrtc_options(defines: tuple[str, ...] = ()) -> list[str]:
    """The NVRTC options of every compile (tests compile with them on a CPU: NVRTC needs no GPU)."""
    return ["-std=c++17", *(f"-D{d}" for d in defines)]


def kernel_name(k_bits: int, v_bits: int, bf16: bool) -> str:
    """The template instantiation NVRTC compiles by name for a format and query dtype."""
    return f"kvmix_page_decode<{k_bits}, {v_bits}, {WARPS}, {'true' if bf16 else 'false'}>"


def nvrtc_cubin(source: str, k_bits: int, v_bits: int, bf16: bool, defines: tuple[str, ...] = (),
                arch: str = "90") -> tuple[bytes, str]:
    """(cubin, mangled name) of one instantiation as the launcher compiles it, for ``arch`` -- NVRTC alone,
    no GPU needed (tests and benchmarks/kernels/sass.py run it on a CPU).  Private API of torch 2.11: the
    compile step ``torch.cuda._compile_kernel`` runs before loading the module."""
    from torch.cuda import _utils

    return _utils._nvrtc_compile(source, kernel_name(k_bits, v_bits, bf16), compute_capability=arch,
                                 nvcc_options=nvrtc_options(defines))


def compile_cuda(source: str, name: str, defines: tuple[str, ...] = ()) -> Launcher:
    """PyTorch's NVRTC front end (private API, torch 2.11): compile ``name`` for the current GPU."""
    return Launcher(torch.cuda._compile_kernel(source, name, nvcc_options=nvrtc_options(defines)))


class Launcher:
    """``cuLaunchKernel`` of a compiled kernel with typed arguments, on the current stream.

    PyTorch's ``_CudaKernel.__call__`` inspects every argument and looks libcuda up on each call; a decode
    step launches this once per layer, so the arguments are packed straight into their C types here.
    Argument kinds: ``"p"`` (tensor -> pointer), ``"i"`` (C int), ``"d"`` (double).
    """

    def __init__(self, kernel):
        self.func = kernel.func
        self.lib = torch.cuda._utils._get_gpu_runtime_library()

    def __call__(self, grid, block, kinds: str, args) -> None:
        if len(kinds) != len(args):
            raise ValueError(f"kvmix: {len(args)} kernel arguments for {len(kinds)} kinds")
        c = [ctypes.c_void_p(a.data_ptr()) if k == "p" else ctypes.c_int(a) if k == "i" else ctypes.c_double(a)
             for k, a in zip(kinds, args)]
        ptrs = (ctypes.c_void_p * len(c))(*[ctypes.addressof(x) for x in c])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        err = self.lib.cuLaunchKernel(self.func, grid[0], grid[1], grid[2], block[0], block[1], block[2], 0, stream,
                                      ptrs, None)
        if err != 0:
            raise RuntimeError(f"kvmix: cuLaunchKernel failed with CUDA error {err}")


@functools.cache
def _kernel(k_bits: int, v_bits: int, bf16: bool, defines: tuple[str, ...] = ()) -> Launcher:
    return compile_cuda(source_path().read_text(), kernel_name(k_bits, v_bits, bf16), defines)


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0" and _source_found()


@functools.cache
def _source_found() -> bool:
    """A wheel built without csrc/ runs decode on the Triton kernel, and says so once."""
    try:
        source_path()
        return True
    except FileNotFoundError as e:
        logging.getLogger("vllm_kvmix").warning("%s: decode attention runs on the Triton kernel", e)
        return False


def supports(fmt: KVFormat, query: torch.Tensor, head_size: int, num_kv_heads: int,
             sliding_window, soft_cap) -> bool:
    rep = query.shape[1] // num_kv_heads
    return (
        enabled() and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
        and head_size == HEAD_SIZE and rep <= 8 and fmt.k_bits in (4, 8) and fmt.v_bits in (2, 4)
        and fmt.group == 64 and not sliding_window and not soft_cap
    )


@functools.cache
def _counters_for(device: torch.device) -> list:
    return [torch.zeros(0, dtype=torch.int32, device=device)]


def counters(n: int, device: torch.device) -> torch.Tensor:
    """The split-K arrival counters of ``n`` (row, KV head) pairs: zero between launches (the last block of
    each pair resets its own), one buffer per device, grown outside CUDA-graph capture.  Launches on one
    stream run in order, so layers share it; two streams running decode at once would not."""
    held = _counters_for(device)
    if held[-1].numel() < n:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("kvmix: decode split-K counters grown during CUDA-graph capture (warm up first)")
        # the smaller buffers stay allocated: graphs captured earlier replay their addresses
        held.append(torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device))
    return held[-1]


def launch(query, cache, stage, slots, block_table, qsl, seq_lens, qb_req, out, num_splits: int, scale: float,
           fmt: KVFormat, bits: dict, stage_consts: dict, new_kv=None) -> None:
    """Attention of each decode row over its packed pages and staged own page into ``out`` (rotated back),
    split-K merged in the kernel.  ``new_kv = (key, value)``: first stage the step's new tokens (else they
    are already staged).

    ``bits`` / ``stage_consts``: the byte offsets of the packed and staged page
    (:func:`vllm_kvmix.kernels.page._constants`, the Triton kernels' constexprs); key codes start each
    head page in both, as the Triton kernels also assume."""
    h = cache.shape[1]
    rep = query.shape[1] // h
    if bits["K_CODES"] != 0:
        raise ValueError("kvmix: the CUDA decode kernel expects key codes at the start of a head page")
    if not 1 <= num_splits <= MAX_SPLITS or rep > ROWS:
        raise ValueError(f"kvmix: CUDA decode takes 1..{MAX_SPLITS} splits and GQA groups of <= {ROWS}")
    key, value = new_kv if new_kv is not None else (query, query)  # unread without new_kv
    named = (("cache", cache), ("stage", stage), ("block_table", block_table), ("query_start_loc", qsl),
             ("seq_lens", seq_lens), ("slots", slots), ("query", query), ("key", key), ("value", value), ("out", out))
    for name, x in named:
        if x.stride(-1) != 1:
            raise ValueError(f"kvmix: CUDA decode needs a contiguous last axis of {name}")
    for x in (cache, stage):
        if x.data_ptr() % 16 or x.stride(0) % 16 or x.stride(1) % 16:
            raise ValueError("kvmix: CUDA decode needs 16-byte aligned head pages")
    if out.data_ptr() % 4 or out.stride(0) % 2 or out.stride(1) % 2:
        raise ValueError("kvmix: CUDA decode stores the output in 4-byte words (even strides)")
    if any(x.dtype != query.dtype for x in (key, value, out)):
        raise ValueError("kvmix: CUDA decode takes query, new keys / values and output of one dtype")
    if any(x.dtype != torch.int32 for x in (block_table, qsl, seq_lens, slots, qb_req)):
        raise ValueError("kvmix: CUDA decode takes int32 block tables, lengths and slots")
    nqb = qb_req.numel()
    if num_splits > 1:
        ws_acc = torch.empty(nqb * h * num_splits * ROWS * HEAD_SIZE, dtype=torch.float32, device=query.device)
        ws_ml = torch.empty(nqb * h * num_splits * ROWS * 2, dtype=torch.float32, device=query.device)
        arrivals = counters(nqb * h, query.device)
    else:
        ws_acc = ws_ml = arrivals = out  # unread with one split
    kernel = _kernel(fmt.k_bits, fmt.v_bits, query.dtype == torch.bfloat16, DEFINES)
    kernel(
        (nqb, h, num_splits), (WARPS * 32, 1, 1), "pppppppppp" "pppp" "iid" "iiiiiiiiiiii" "iiiiiiii",
        [query, key, value, cache, stage, slots, block_table, qsl, seq_lens, qb_req,
         ws_acc, ws_ml, arrivals, out,
         num_splits, int(new_kv is not None), float(scale) * math.log2(math.e),
         query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
         out.stride(0), out.stride(1), cache.stride(0), cache.stride(1), block_table.stride(0), rep,
         bits["K_META"], bits["V_CODES"], bits["V_META"],
         stage.stride(0), stage.stride(1), stage_consts["SK_META"], stage_consts["SV_CODES"], stage_consts["SV_META"]],
    )
