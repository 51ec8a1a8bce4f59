"""Split-K for the page attention kernels: how many splits, which query blocks, and the merge.

    query blocks: qb_req[NQB] int32 (request), qb_tok[NQB] int32 (first token), BLOCK_Q
    workspace:    ws_acc f32[NQB, H, splits, BLOCK_M, D], ws_ml f32[NQB, H, splits, BLOCK_M, 2]

When a batch has too few (query block, KV head) programs to fill the GPU (long
contexts, small batches), each request's pages are split into ranges whose
partial (max, sum, acc) go to a workspace; :func:`combine_kernel` merges them
(and rotates the output back, ``ROTATE``).  Planning runs on the host, once per
batch for all layers.
"""

import functools

import torch
import triton
import triton.language as tl

from vllm_kvmix.formats import PAGE_TOKENS
from vllm_kvmix.kernels.codec import rotate_store


@triton.jit(do_not_specialize=["num_splits"])
def combine_kernel(
    out_ptr, ws_acc_ptr, ws_ml_ptr, qsl_ptr, qb_req_ptr, qb_tok_ptr, num_splits, rot_ptr,
    stride_ot, stride_oh,
    D: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """Merge the split-K partials of one (query block, KV head); ``ROTATE``: output @ H (rotated values).

    Two passes: every split's maximum (CH splits per load), then the weighted sums against the
    global maximum -- the only value carried from split to split is the sum, so the loop (unrolled
    4x) keeps several splits' loads in flight instead of one round trip per split (a decode row
    of a short batch has 32-64 splits).
    """
    qb = tl.program_id(0)
    kvh = tl.program_id(1)
    req = tl.load(qb_req_ptr + qb)
    tok0 = tl.load(qb_tok_ptr + qb)
    q_end = tl.load(qsl_ptr + req + 1)
    BLOCK_M: tl.constexpr = BLOCK_Q * REP_P
    CH: tl.constexpr = (127 + BLOCK_M) // BLOCK_M
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    c = tl.arange(0, CH)
    tok = tok0 + m // REP_P
    r = m % REP_P
    row_ok = (tok < q_end) & (r < REP)
    head = kvh * REP + r
    base0 = (qb * tl.num_programs(1) + kvh) * num_splits
    m_all = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, CH):
        ok = (s0 + c) < num_splits
        row = (base0 + s0 + c)[:, None] * BLOCK_M + m[None, :]
        m_all = tl.maximum(m_all, tl.max(tl.load(ws_ml_ptr + row * 2, mask=ok[:, None], other=float("-inf")), 0))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for s in tl.range(0, num_splits, loop_unroll_factor=4):  # no dependence between splits' loads
        row = (base0 + s) * BLOCK_M + m
        w = tl.exp(tl.load(ws_ml_ptr + row * 2) - m_safe)
        l_all += w * tl.load(ws_ml_ptr + row * 2 + 1)
        acc += w[:, None] * tl.load(ws_acc_ptr + row[:, None] * D + d[None, :])
    o = acc / tl.where(l_all > 0, l_all, 1.0)[:, None]
    if ROTATE:
        rotate_store(o, rot_ptr, out_ptr, tok, head, row_ok, stride_ot, stride_oh, D)
    else:
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@functools.cache
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# Split-K fills one wave of the decode programs that fit an SM at once (programs_per_sm): the page kernels'
# decode programs (page.LAUNCH: 4 warps capped at 128 registers; the CUDA kernel's likewise) fit 4 to an SM
# up to head size 128; the CUDA kernel's head-size-256 blocks (216+ registers a thread) fit 2 (the kernel's
# KVMIX_MIN_BLOCKS / KVMIX_MIN_BLOCKS_256 launch bounds, csrc/page_decode.cu; a test ties the two).
# page_bench.py --sweep on H100 (2026-11-23, bit-plane kernel): 16 x 32k took 0.70 ms with 3 splits (2 per
# SM), 0.55 ms with 4 and 8; 1 x 32k 0.094 ms with 32 splits, 0.088 ms with 64; 64 x 8k (512 programs) the
# same with 1 or 2.  Head size 256, 8 KV heads (head_size_bench.py --splits, H100, results.md section 2):
# 1 x 32k 0.037 ms with 32 splits against 0.047 with 64, 1 x 128k 0.107 against 0.118, 4 x 32k 0.107 with 8
# against 0.114 with 16 (16 x 32k: the same with 2 or 4): one wave of 2 per SM each time.  The Triton page
# kernel's head-size-256 plans use the same count (its occupancy there is not measured).
PROGRAMS_PER_SM = 4
PROGRAMS_PER_SM_HEAD_256 = 2


def programs_per_sm(head_size: int) -> int:
    """Decode programs of ``head_size`` that run on one SM at once."""
    return PROGRAMS_PER_SM_HEAD_256 if head_size > 128 else PROGRAMS_PER_SM


# Pages a split gets at least (split_count): 4 of a full context, 2 of a sliding window, whose plan counts the pages a
# long row reads in full (pages_read).  H100, head size 256, a 1024-token window (17 pages) at 1 and 4 x 8k:
# 8 splits 0.012 / 0.014 ms, 4 splits 0.016 / 0.017 (head_size_bench.py --window 1024 --splits, results.md section 2).
FULL_SPLIT_MIN_PAGES = 4
WINDOW_SPLIT_MIN_PAGES = 2


def split_min_pages(window: int | None) -> int:
    """The pages a split gets at least, for a layer with sliding window ``window`` (None: full attention)."""
    return FULL_SPLIT_MIN_PAGES if window is None else WINDOW_SPLIT_MIN_PAGES


def num_splits_for(num_programs: int, max_pages: int, device, min_pages: int, per_sm: int) -> int:
    """Split-K factor on ``device`` (1 off CUDA): :func:`split_count` for its SM count."""
    if device.type != "cuda":
        return 1
    return split_count(num_programs, max_pages, _sm_count(device), min_pages, per_sm)


def split_count(num_programs: int, max_pages: int, sm_count: int, min_pages: int = FULL_SPLIT_MIN_PAGES,
                per_sm: int = PROGRAMS_PER_SM) -> int:
    """Split-K factor: as many splits as fit one wave of ``per_sm`` programs per SM (:func:`programs_per_sm`),
    at least ``min_pages`` of the ``max_pages`` a program reads (:func:`pages_read`) per split, at most 64."""
    target = per_sm * sm_count
    if num_programs >= target:
        return 1
    return max(1, min(target // num_programs, max_pages // min_pages, 64))


def pages_read(max_seq_len: int, window: int | None = None, block_q: int = 1) -> int:
    """Pages a query block of ``block_q`` consecutive tokens reads at most: every page of ``max_seq_len``
    tokens, or with a sliding window of ``window`` tokens the pages its keys span (``window + block_q - 1``
    tokens that may start anywhere in a page).  The kernels split a row's pages from the window's first one,
    so this, not the context, is what a split count divides."""
    pages = triton.cdiv(max_seq_len, PAGE_TOKENS)
    if window is None:
        return pages
    return min(pages, triton.cdiv(window + block_q - 2, PAGE_TOKENS) + 1)


def plan_splits(num_programs: int, max_seq_len: int, window: int | None, block_q: int, device, head_size: int) -> int:
    """Split-K factor of ``num_programs`` (query block, KV head) programs of ``head_size`` whose query blocks of
    ``block_q`` tokens read at most ``max_seq_len`` tokens' pages (``window``: a sliding window's)."""
    return num_splits_for(num_programs, pages_read(max_seq_len, window, block_q), device, split_min_pages(window),
                          programs_per_sm(head_size))


def plan_query_blocks(query_start_loc, block_q: int, device, reqs=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per query block: its request and its first token, plus BLOCK_Q (CPU planning, once per batch);
    ``reqs``: only these requests' rows (default: all)."""
    qsl = torch.as_tensor(query_start_loc, dtype=torch.int64, device="cpu")
    ids = torch.arange(qsl.numel() - 1) if reqs is None else torch.as_tensor(reqs, dtype=torch.int64)
    starts = qsl[:-1][ids]
    n_blk = (qsl[1:][ids] - starts + block_q - 1) // block_q
    blk = torch.repeat_interleave(torch.arange(ids.numel()), n_blk)
    first = torch.cumsum(n_blk, 0) - n_blk
    req = ids[blk]
    tok = starts[blk] + (torch.arange(blk.numel()) - first[blk]) * block_q
    return host_to_device(req.to(torch.int32), device), host_to_device(tok.to(torch.int32), device), block_q


def host_to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A tensor planned on the host, on ``device`` without waiting for the stream: copied from pinned memory
    on CUDA (a non-blocking copy from pageable memory waits for every launch queued so far)."""
    if torch.device(device).type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def block_q_for(num_heads: int, num_kv_heads: int, max_query_len: int = 1) -> int:
    """Query tokens per program (BLOCK_Q).

    A program's rows are BLOCK_Q query tokens x REP_P heads (the GQA group padded to a power
    of 2): at least 16 (tl.dot), and 64 when the batch has prefill rows, so each page is
    dequantized once per 64 rows, not per 16.
    """
    rep_p = triton.next_power_of_2(num_heads // num_kv_heads)
    rows = 64 if max_query_len > 16 else 16
    return max(1, rows // rep_p)
