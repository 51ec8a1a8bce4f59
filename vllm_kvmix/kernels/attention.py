"""Paged attention over the packed kvmix cache, dequantizing in registers.

    query:  [T, Hq, D] fp16/bf16/fp32 (new tokens of all requests back to back)
    cache:  uint8[num_blocks, H, head_page_bytes]        (layout: vllm_kvmix.formats)
    query_start_loc: [B + 1] int32   seq_lens: [B] int32   block_table: [B, max_pages] int32
    out:    [T, Hq, D] (query dtype)

One kernel for every batch shape (prefill, chunked-prefill continuation,
decode, mixed), like vLLM's unified Triton attention.  Grid: (query blocks,
KV heads).  A program owns BLOCK_Q query tokens of one request times the
REP query heads that share its KV head (GQA: each page is loaded once per KV
head for all of them), walks the request's pages in order and keeps an online
softmax.  Pages are dequantized by :func:`vllm_kvmix.kernels.codec.decode_tile`.

Split-K: when the batch has too few (query block, KV head) programs to fill the
GPU (long contexts, small batches), a third grid axis splits each request's
pages into NUM_SPLITS ranges; partial (max, sum, acc) go to a workspace and
``_combine_kernel`` merges them.
"""

import functools

import torch
import triton
import triton.language as tl

from vllm_kvmix.formats import KVFormat
from vllm_kvmix.kernels.codec import decode_tile, rotate_store, softmax_step


@triton.jit
def _paged_attention_kernel(
    q_ptr, out_ptr, cache_ptr, block_table_ptr, qsl_ptr, seq_lens_ptr, qb_req_ptr, qb_tok_ptr,
    ws_acc_ptr, ws_ml_ptr, num_splits,
    scale, soft_cap, window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ch, stride_bt,
    D: tl.constexpr, PAGE: tl.constexpr, GROUP: tl.constexpr, REP: tl.constexpr,
    REP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    K_BITS: tl.constexpr, K_CODES: tl.constexpr, K_META: tl.constexpr,
    V_BITS: tl.constexpr, V_CODES: tl.constexpr, V_META: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, IEEE_DOT: tl.constexpr,
    SPLIT: tl.constexpr,
):
    qb = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    req = tl.load(qb_req_ptr + qb)
    tok0 = tl.load(qb_tok_ptr + qb)
    q_begin = tl.load(qsl_ptr + req)
    q_end = tl.load(qsl_ptr + req + 1)
    seq_len = tl.load(seq_lens_ptr + req)
    ctx = seq_len - (q_end - q_begin)  # position of the request's first new token

    BLOCK_M: tl.constexpr = BLOCK_Q * REP_P
    m = tl.arange(0, BLOCK_M)
    tok = tok0 + m // REP_P
    r = m % REP_P
    row_ok = (tok < q_end) & (r < REP)
    head = kvh * REP + r
    d = tl.arange(0, D)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    pos = ctx + tok - q_begin

    last = tl.minimum(tok0 + BLOCK_Q, q_end) - 1
    hi = ctx + last - q_begin + 1  # keys [lo, hi) can be seen by some row
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx + tok0 - q_begin - window + 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    t = tl.arange(0, PAGE)
    first_page = lo // PAGE
    end_page = tl.cdiv(hi, PAGE)
    if SPLIT:
        per = tl.cdiv(end_page - first_page, num_splits)
        first_page = first_page + split * per
        end_page = tl.minimum(end_page, first_page + per)
    for p in range(first_page, end_page):
        blk = tl.load(block_table_ptr + req * stride_bt + p).to(tl.int64)
        page = cache_ptr + blk * stride_cb + kvh * stride_ch
        kpos = p * PAGE + t
        t_ok = kpos < hi
        k = decode_tile(page, t, t_ok, D, K_BITS, GROUP, K_CODES, K_META)
        v = decode_tile(page, t, t_ok, D, V_BITS, GROUP, V_CODES, V_META)
        if IEEE_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k).to(q.dtype))
        s = s * scale
        if USE_SOFTCAP:
            s = soft_cap * (2.0 / (1.0 + tl.exp(-2.0 * s / soft_cap)) - 1.0)
        ok = row_ok[:, None] & t_ok[None, :] & (kpos[None, :] <= pos[:, None])
        if USE_WINDOW:
            ok = ok & (pos[:, None] - kpos[None, :] < window)
        s = tl.where(ok, s, float("-inf"))
        pr, alpha, m_new, l_i = softmax_step(s, m_i, l_i)
        if IEEE_DOT:
            pv = tl.dot(pr, v, input_precision="ieee")
        else:
            pv = tl.dot(pr.to(q.dtype), v.to(q.dtype))
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if SPLIT:
        base = (qb * tl.num_programs(1) + kvh) * num_splits + split
        tl.store(ws_acc_ptr + (base * BLOCK_M + m[:, None]) * D + d[None, :], acc)
        tl.store(ws_ml_ptr + (base * BLOCK_M + m) * 2, m_i)
        tl.store(ws_ml_ptr + (base * BLOCK_M + m) * 2 + 1, l_i)
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _combine_kernel(
    out_ptr, ws_acc_ptr, ws_ml_ptr, qsl_ptr, qb_req_ptr, qb_tok_ptr, num_splits, rot_ptr,
    stride_ot, stride_oh,
    D: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """Merge the split-K partials of one (query block, KV head); ``ROTATE``: output @ H (page scheme).

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


# Split-K fills one wave of SPLIT_PROGRAMS_PER_SM programs per SM: the page kernel's decode programs
# (page.LAUNCH: 4 warps capped at 128 registers; 2 warps took ~255) fit 4 to an SM.  page_bench.py --sweep on H100 (2026-11-23, bit-plane
# kernel): 16 x 32k took 0.70 ms with 3 splits (2 per SM), 0.55 ms with 4 and 8; 1 x 32k 0.094 ms
# with 32 splits, 0.088 ms with 64; 64 x 8k (512 programs) the same with 1 or 2.
SPLIT_PROGRAMS_PER_SM = 4


def num_splits_for(num_programs: int, max_pages: int, device) -> int:
    """Split-K factor: as many splits as fit one wave of SPLIT_PROGRAMS_PER_SM programs per SM,
    at least 4 pages per split, at most 64."""
    if device.type != "cuda":
        return 1
    target = SPLIT_PROGRAMS_PER_SM * _sm_count(device)
    if num_programs >= target:
        return 1
    return max(1, min(target // num_programs, max_pages // 4, 64))


# Pages of 16 tokens with sub-byte codes come out wrong on an H100 with Triton 3.6 (the
# register unpack of 16-row tiles; benchmarks/kernels/localize.py shows it) while 32 and 64
# are exact, so the kernel takes pages of a multiple of 32 tokens (the backend asks vLLM for them).
MIN_PAGE = 32

# Launch options of the attention kernel (benchmarks sweep them).
LAUNCH = {"num_warps": 4, "num_stages": 2}


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
    return (req.to(torch.int32).to(device, non_blocking=True),
            tok.to(torch.int32).to(device, non_blocking=True), block_q)


def block_q_for(num_heads: int, num_kv_heads: int, max_query_len: int = 1) -> int:
    """Query tokens per program (BLOCK_Q).

    A program's rows are BLOCK_Q query tokens x REP_P heads (the GQA group padded to a power
    of 2): at least 16 (tl.dot), and 64 when the batch has prefill rows, so each page is
    dequantized once per 64 rows, not per 16.
    """
    rep_p = triton.next_power_of_2(num_heads // num_kv_heads)
    rows = 64 if max_query_len > 16 else 16
    return max(1, rows // rep_p)


def paged_attention(
    query: torch.Tensor, cache: torch.Tensor, fmt: KVFormat, block_size: int,
    query_start_loc: list[int], seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float,
    causal: bool = True, sliding_window: int | None = None, soft_cap: float | None = None,
    out: torch.Tensor | None = None, plan: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    max_seq_len: int | None = None, num_splits: int | None = None,
    query_start_loc_dev: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launcher; same contract as :func:`vllm_kvmix.reference.paged_attention`
    (``seq_lens`` and ``block_table`` on the query's device)."""
    if not causal:
        raise NotImplementedError("kvmix Triton attention is causal (decoder) only")
    if block_size % MIN_PAGE:
        raise ValueError(
            f"kvmix Triton attention needs pages of a multiple of {MIN_PAGE} tokens, got {block_size}"
        )
    t, hq, d = query.shape
    h = cache.shape[1]
    out = torch.empty_like(query) if out is None else out
    if t == 0:
        return out
    if plan is None:
        max_q = max(b - a for a, b in zip(query_start_loc[:-1], query_start_loc[1:]))
        plan = plan_query_blocks(query_start_loc, block_q_for(hq, h, max_q), query.device)
    qb_req, qb_tok, bq = plan
    rep = hq // h
    rep_p = triton.next_power_of_2(rep)
    qsl = query_start_loc_dev
    if qsl is None:
        qsl = torch.tensor(query_start_loc, dtype=torch.int32).to(query.device)
    lay = fmt.layout(d, block_size)
    nqb = qb_req.numel()
    if num_splits is None:
        max_seq_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
        num_splits = num_splits_for(nqb * h, triton.cdiv(max_seq_len, block_size), query.device)
    block_m = bq * rep_p
    if num_splits > 1:
        ws_acc = torch.empty(nqb * h * num_splits * block_m * d, dtype=torch.float32, device=query.device)
        ws_ml = torch.empty(nqb * h * num_splits * block_m * 2, dtype=torch.float32, device=query.device)
    else:
        ws_acc = ws_ml = out  # unused
    _paged_attention_kernel[(nqb, h, num_splits)](
        query, out, cache, block_table, qsl, seq_lens, qb_req, qb_tok,
        ws_acc, ws_ml, num_splits,
        float(scale), float(soft_cap or 0.0), int(sliding_window or 0),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        cache.stride(0), cache.stride(1), block_table.stride(0),
        D=d, PAGE=block_size, GROUP=fmt.group, REP=rep, REP_P=rep_p, BLOCK_Q=bq,
        K_BITS=fmt.k_bits, K_CODES=lay.k.codes_offset, K_META=lay.k.meta_offset,
        V_BITS=fmt.v_bits, V_CODES=lay.v.codes_offset, V_META=lay.v.meta_offset,
        USE_WINDOW=sliding_window is not None, USE_SOFTCAP=bool(soft_cap),
        IEEE_DOT=query.dtype == torch.float32, SPLIT=num_splits > 1, **LAUNCH,
    )
    if num_splits > 1:
        _combine_kernel[(nqb, h)](
            out, ws_acc, ws_ml, qsl, qb_req, qb_tok, num_splits, out, out.stride(0), out.stride(1),
            D=d, REP=rep, REP_P=rep_p, BLOCK_Q=bq, ROTATE=False,
        )
    return out
