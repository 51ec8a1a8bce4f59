"""Decode attention over packed pages in CUDA (``csrc/page_decode.cu``), compiled by NVRTC at first use.

Why CUDA here: the Triton page kernel spends ~3,900 warp-instructions per 64-token page (k4v2) moving
code bytes into the tensor-core operand layout one byte per register; the CUDA kernel chooses which
channels and tokens each lane's mma registers hold so the codes arrive as whole words (a shift and one
LOP3 per fp16 pair) -- ``docs/kernels.md`` has the counts and timings.

Scope: decode steps (one query token per request: ``StepPlan.decode`` and any batch whose
``max_query_len`` is 1), head sizes 64, 128 and 256 (one instantiation each: the pages of head size 256
are read in passes of 32 tokens, at 2 blocks per SM), any GQA group (a block per 8 query heads of a KV
head: the mma's rows), fp16 / bf16 queries, with or without a sliding window (an instantiation of its
own), no soft cap, keys 4 / 8 bits, values 2 / 4 bits.  One launch per layer does what the Triton path
does in three: stage the new token (``stage=(key, value)``: 8-bit, value rotated, into the staging slot;
what ``page._stage_kernel`` does), attend over the packed pages and the own page, merge the split-K
partials in the last block of each (row, KV head, chunk of query heads) and rotate the output back
(:meth:`vllm_kvmix.kernels.page.PageStep.run`).  Pages that fill are packed after it (``page._pack_kernel``).
Everything else runs the Triton kernels, the reference-tested path for all shapes; so does every
decode row when the user sets ``KVMIX_DECODE_KERNEL=triton`` (:mod:`vllm_kvmix.options`).

The source ships inside the package (``vllm_kvmix.csrc``, mapped from the checkout's ``csrc/`` by
pyproject.toml) and is found through :mod:`importlib.resources`.  NVRTC ships with PyTorch's CUDA wheels
(``nvidia-cuda-nvrtc``), so nothing is built at install time; the backend compiles the instantiations a
model needs at startup (:func:`prepare`), so a missing source or a failed compile stops the engine with
the reason instead of surfacing in the first decode step.  The one private PyTorch entry point used
(``torch.cuda._compile_kernel``) is wrapped in :func:`compile_cuda`, and ``tests/test_page_kernels.py``
checks that it is still there.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.resources
import math
from pathlib import Path

import torch

from vllm_kvmix.formats import PAGE_TOKENS, KVFormat

WARPS = 4  # warps per block (each walks its own pages); 4 blocks per SM at <= 128 registers (head size 256: 2)
MAX_SPLITS = 64  # split-K partials one block merges (the kernel's KVMIX_MAX_SPLITS: shared memory sm_w)
ROWS = 8  # query heads per block; workspace rows per (query block, KV head, chunk, split): the kernel's KVMIX_ROWS
RING_STAGES = 2  # packed page passes in each warp's shared-memory ring: the kernel's KVMIX_RING_STAGES
SOURCE_NAME = "page_decode.cu"
HEAD_SIZES = (64, 128, 256)  # the kernel's template parameter D (csrc/page_decode.cu HeadShape)
KEY_BITS = (4, 8)
VALUE_BITS = (2, 4)
DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)  # mma.sync m16n8k16 with bf16 operands, movmatrix


class KernelUnavailable(RuntimeError):
    """The CUDA decode kernel's source is missing or does not compile."""


def source_path() -> Path:
    """``page_decode.cu`` as installed with the package (``vllm_kvmix.csrc``, from the checkout's ``csrc/``); in a
    source tree run without installing (``PYTHONPATH=.``), the tree's ``csrc/``."""
    try:
        path = Path(str(importlib.resources.files("vllm_kvmix.csrc") / SOURCE_NAME))
    except ModuleNotFoundError:  # a source tree on sys.path, not installed: csrc/ is not a package there
        path = Path(__file__).resolve().parents[2] / "csrc" / SOURCE_NAME
    if not path.is_file():
        raise KernelUnavailable(
            f"kvmix: the CUDA decode kernel's source {SOURCE_NAME} is not installed with vllm_kvmix ({path}); "
            "reinstall the package from a wheel built by `pip wheel .` / `python -m build`, "
            "or set KVMIX_DECODE_KERNEL=triton to decode on the Triton kernel"
        )
    return path


def ring_stages(defines: tuple[str, ...] = ()) -> int:
    """Packed page passes in each warp's ring: the source's KVMIX_RING_STAGES, or an experiment build's."""
    for d in defines:
        key, _, value = d.partition("=")
        if key == "KVMIX_RING_STAGES":
            return int(value)
    return RING_STAGES


def ring(head_size: int) -> bool:
    """Whether packed pages reach the kernel through each warp's shared-memory ring (HeadShape::RING): head size
    256, whose 216+ registers a thread leave room for 2 blocks of 4 warps per SM only."""
    return head_size > 128


def pass_tokens(head_size: int) -> int:
    """Tokens of a page pass (the kernel's HeadShape::T): the whole page up to head size 128, half above."""
    return PAGE_TOKENS if head_size <= 128 else PAGE_TOKENS // 2


def pass_bytes(k_bits: int, v_bits: int, head_size: int) -> int:
    """Bytes of one packed page pass in a warp's ring (the kernel's PassLayout::BYTES): the pass's key codes, the
    page's key meta, the pass's value codes and value meta."""
    t, d = pass_tokens(head_size), head_size
    return t * d * k_bits // 8 + d * 4 + t * d * v_bits // 8 + t * (d // 64) * 4


def smem_bytes(k_bits: int, v_bits: int, head_size: int, defines: tuple[str, ...] = ()) -> int:
    """The kernel's dynamic shared memory: the warps' rings (head size 256), or the merge's acc fragments they turn
    into after the page loop, whichever is larger (the kernel traps if launched with less)."""
    rings = WARPS * ring_stages(defines) * pass_bytes(k_bits, v_bits, head_size) if ring(head_size) else 0
    return max(rings, WARPS * ROWS * (head_size + 4) * 4)


def static_smem_bytes() -> int:
    """The kernel's static shared arrays: per-warp (max, sum) rows, the split weights of the merge, one flag."""
    return 4 * (2 * WARPS * ROWS + MAX_SPLITS * ROWS) + 4


def block_smem_bytes(k_bits: int, v_bits: int, head_size: int) -> int:
    """All the shared memory a block of the served build takes: dynamic and static."""
    return smem_bytes(k_bits, v_bits, head_size) + static_smem_bytes()


@functools.cache
def smem_limit(index: int) -> int:
    """The shared memory a block may opt in to on CUDA device ``index``."""
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", 48 * 1024)


def fits_device(fmt: KVFormat, head_size: int, device: torch.device) -> bool:
    """Whether ``device`` gives a block the shared memory the instantiation needs (head size 256 with 8-bit keys
    needs more than the ~99 KB of sm_86 / sm_89 cards: those layers decode on the Triton kernel)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return block_smem_bytes(fmt.k_bits, fmt.v_bits, head_size) <= smem_limit(index)


def nvrtc_options(defines: tuple[str, ...] = ()) -> list[str]:
    """The NVRTC options of every compile (tests compile with them on a CPU: NVRTC needs no GPU)."""
    return ["-std=c++17", *(f"-D{d}" for d in defines)]


def kernel_name(k_bits: int, v_bits: int, bf16: bool, head_size: int = 128, window: bool = False) -> str:
    """The template instantiation NVRTC compiles by name for a format, query dtype, head size and whether the
    layer has a sliding window."""
    flag = lambda x: "true" if x else "false"  # noqa: E731
    return f"kvmix_page_decode<{k_bits}, {v_bits}, {WARPS}, {flag(bf16)}, {head_size}, {flag(window)}>"


def nvrtc_cubin(source: str, k_bits: int, v_bits: int, bf16: bool, defines: tuple[str, ...] = (),
                arch: str = "90", head_size: int = 128, window: bool = False) -> tuple[bytes, str]:
    """(cubin, mangled name) of one instantiation as the launcher compiles it, for ``arch`` -- NVRTC alone,
    no GPU needed (tests and benchmarks/kernels/sass.py run it on a CPU).  Private API of torch 2.11: the
    compile step ``torch.cuda._compile_kernel`` runs before loading the module."""
    from torch.cuda import _utils

    return _utils._nvrtc_compile(source, kernel_name(k_bits, v_bits, bf16, head_size, window),
                                 compute_capability=arch,
                                 nvcc_options=nvrtc_options(defines))


def compile_cuda(source: str, name: str, defines: tuple[str, ...] = (), smem: int = 0) -> Launcher:
    """PyTorch's NVRTC front end (private API, torch 2.11): compile ``name`` for the current GPU, launched with
    ``smem`` bytes of dynamic shared memory."""
    return Launcher(torch.cuda._compile_kernel(source, name, nvcc_options=nvrtc_options(defines)), smem)


class DecodeParams(ctypes.Structure):
    """The kernel's one argument, ``struct DecodeParams`` of ``page_decode.cu``, field for field."""

    _fields_ = [
        *[(name, ctypes.c_void_p) for name in (
            "q", "key", "value", "cache", "stage", "slots", "block_table", "qsl", "seq_lens", "qb_req",
            "ws_acc", "ws_ml", "counters", "out")],
        ("num_splits", ctypes.c_int), ("stage_new", ctypes.c_int), ("scale_log2e", ctypes.c_double),
        *[(name, ctypes.c_int) for name in (
            "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ot", "stride_oh",
            "stride_cb", "stride_ch", "stride_bt", "rep", "k_meta_off", "v_codes_off", "v_meta_off",
            "stride_ss", "stride_sh", "sk_meta_off", "sv_codes_off", "sv_meta_off", "window")],
    ]


class Launcher:
    """``cuLaunchKernel`` of a compiled kernel with its :class:`DecodeParams`, on the current stream.

    PyTorch's ``_CudaKernel.__call__`` inspects every argument and looks libcuda up on each call; a decode
    step launches this once per layer, so the struct is passed straight to the driver here.
    """

    MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CUfunction_attribute

    def __init__(self, kernel, smem: int = 0):
        self.func = kernel.func
        self.lib = torch.cuda._utils._get_gpu_runtime_library()
        self.smem = smem
        if smem > 48 * 1024:  # above the default limit a kernel must opt in
            err = self.lib.cuFuncSetAttribute(self.func, self.MAX_DYNAMIC_SHARED_SIZE_BYTES, ctypes.c_int(smem))
            if err != 0:
                raise RuntimeError(f"kvmix: the decode kernel cannot get {smem} bytes of shared memory "
                                   f"(CUDA error {err})")

    def __call__(self, grid, block, params: DecodeParams) -> None:
        ptrs = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        err = self.lib.cuLaunchKernel(self.func, grid[0], grid[1], grid[2], block[0], block[1], block[2], self.smem, stream,
                                      ptrs, None)
        if err != 0:
            raise RuntimeError(f"kvmix: cuLaunchKernel failed with CUDA error {err}")


@functools.cache
def compiled(k_bits: int, v_bits: int, bf16: bool, defines: tuple[str, ...] = (), head_size: int = 128,
             window: bool = False) -> Launcher:
    """The compiled instantiation (once per process); benchmarks pass build ``defines`` of an experiment."""
    path, name = source_path(), kernel_name(k_bits, v_bits, bf16, head_size, window)
    try:
        return compile_cuda(path.read_text(), name, defines, smem_bytes(k_bits, v_bits, head_size, defines))
    except Exception as e:  # noqa: BLE001 -- NVRTC's log is in the message; say which kernel and what to do
        raise KernelUnavailable(
            f"kvmix: compiling the CUDA decode kernel {name} from {path} "
            f"failed: {e}. Set KVMIX_DECODE_KERNEL=triton to decode on the Triton kernel"
        ) from e


def covers(fmt: KVFormat, head_size: int, rep: int, dtype: torch.dtype, sliding_window=None, soft_cap=None) -> bool:
    """Whether the CUDA kernel implements this layer's decode: head sizes 64 / 128 / 256, any GQA group (in
    chunks of ``ROWS`` query heads), fp16 / bf16, keys 4 / 8 bits, values 2 / 4 bits, any sliding window, no
    soft cap (the Triton kernel takes the rest)."""
    return (head_size in HEAD_SIZES and rep >= 1 and dtype in DTYPES and fmt.k_bits in KEY_BITS
            and fmt.v_bits in VALUE_BITS and not soft_cap)


def prepare(fmt: KVFormat, dtype: torch.dtype, head_size: int, sliding_window=None) -> Launcher:
    """Compile the instantiation a layer will use, at startup (raises :class:`KernelUnavailable`)."""
    return compiled(fmt.k_bits, fmt.v_bits, dtype == torch.bfloat16, head_size=head_size,
                    window=sliding_window is not None)


def supports(fmt: KVFormat, query: torch.Tensor, head_size: int, num_kv_heads: int,
             sliding_window, soft_cap) -> bool:
    """Whether a decode step of ``query`` runs on the CUDA kernel: the user's choice
    (:func:`vllm_kvmix.options.decode_kernel`) and :func:`covers`."""
    from vllm_kvmix.options import CUDA, decode_kernel

    return (query.is_cuda and decode_kernel() == CUDA
            and covers(fmt, head_size, query.shape[1] // num_kv_heads, query.dtype, sliding_window, soft_cap)
            and fits_device(fmt, head_size, query.device))


@functools.cache
def _counters_for(device: torch.device) -> list:
    return [torch.zeros(0, dtype=torch.int32, device=device)]


def counters(n: int, device: torch.device) -> torch.Tensor:
    """The split-K arrival counters of ``n`` (row, KV head, chunk) triples: zero between launches (the last block of
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
           fmt: KVFormat, bits: dict, stage_consts: dict, new_kv=None, sliding_window=None) -> None:
    """Attention of each decode row over its packed pages and staged own page into ``out`` (rotated back),
    split-K merged in the kernel.  ``new_kv = (key, value)``: first stage the step's new tokens (else they
    are already staged).  ``sliding_window``: the row at position ``seq - 1`` attends to keys at positions
    ``>= seq - sliding_window`` (the Triton kernel's rule); None: to all.

    ``bits`` / ``stage_consts``: the byte offsets of the packed and staged page
    (:func:`vllm_kvmix.kernels.page._constants`, the Triton kernels' constexprs); key codes start each
    head page in both, as the Triton kernels also assume."""
    h, d = cache.shape[1], query.shape[2]
    rep = query.shape[1] // h
    if d not in HEAD_SIZES:
        raise ValueError(f"kvmix: CUDA decode takes head sizes {HEAD_SIZES}, not {d}")
    if bits["K_CODES"] != 0:
        raise ValueError("kvmix: the CUDA decode kernel expects key codes at the start of a head page")
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"kvmix: CUDA decode takes 1..{MAX_SPLITS} splits")
    pairs = h * -(-rep // ROWS)  # (KV head, chunk of <= ROWS query heads): one block each per split
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
        ws_acc = torch.empty(nqb * pairs * num_splits * ROWS * d, dtype=torch.float32, device=query.device)
        ws_ml = torch.empty(nqb * pairs * num_splits * ROWS * 2, dtype=torch.float32, device=query.device)
        arrivals = counters(nqb * pairs, query.device)
    else:
        ws_acc = ws_ml = arrivals = out  # unread with one split
    params = DecodeParams(
        q=query.data_ptr(), key=key.data_ptr(), value=value.data_ptr(), cache=cache.data_ptr(),
        stage=stage.data_ptr(), slots=slots.data_ptr(), block_table=block_table.data_ptr(), qsl=qsl.data_ptr(),
        seq_lens=seq_lens.data_ptr(), qb_req=qb_req.data_ptr(), ws_acc=ws_acc.data_ptr(), ws_ml=ws_ml.data_ptr(),
        counters=arrivals.data_ptr(), out=out.data_ptr(),
        num_splits=num_splits, stage_new=int(new_kv is not None), scale_log2e=float(scale) * math.log2(math.e),
        stride_qt=query.stride(0), stride_qh=query.stride(1), stride_kt=key.stride(0), stride_kh=key.stride(1),
        stride_vt=value.stride(0), stride_vh=value.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_cb=cache.stride(0), stride_ch=cache.stride(1), stride_bt=block_table.stride(0), rep=rep,
        k_meta_off=bits["K_META"], v_codes_off=bits["V_CODES"], v_meta_off=bits["V_META"],
        stride_ss=stage.stride(0), stride_sh=stage.stride(1), sk_meta_off=stage_consts["SK_META"],
        sv_codes_off=stage_consts["SV_CODES"], sv_meta_off=stage_consts["SV_META"],
        window=int(sliding_window or 0),
    )
    kernel = compiled(fmt.k_bits, fmt.v_bits, query.dtype == torch.bfloat16, head_size=d,
                      window=sliding_window is not None)
    kernel((nqb, pairs, num_splits), (WARPS * 32, 1, 1), params)
