"""Prefill attention of the page scheme on a FlashAttention kernel: dequantize pages, attend paged.

The page scheme's attention (:func:`vllm_kvmix.reference.staged.step`): a query at
position ``p`` reads every page before ``p // 64`` packed and its own page from the
8-bit copy, tokens ``<= p``.  The Triton page kernel does that with the dequantization
in its loop, which for prefill (64+ query rows per page) leaves the tensor cores mostly
idle.  Here the same math runs as:

1. ``_dequant_kernel`` writes each prefill request's packed pages ``0 .. last - 1`` and
   the 8-bit copies of its touched pages (``first .. last``) as ``dtype`` pages
   ``[n, 64, H, D]``; tokens past a page's valid count are zero.  Values stay in the
   rotated basis, scaled by ``1 / sqrt(D)`` (one rounding to ``dtype``, as the attention
   kernels round V for their dots);
2. one ``flash_attn_varlen_func`` call (vLLM's FlashAttention, paged K/V) over
   *entries*: the new tokens of request ``r`` that sit in page ``j`` form one entry whose
   block-table row is ``[packed 0 .. j-1, 8-bit j]`` with ``seqused_k`` = the last of
   them + 1 and bottom-right-aligned causal masking -- each query sees keys ``<= p``,
   earlier pages packed, its own page at 8 bits: exactly the reference's keys;
3. the output back from the rotated basis: one GEMM per run of rows with the +-1 Sylvester
   matrix ``S`` (``H = S / sqrt(D)``, the ``1 / sqrt(D)`` already in the values) -- the
   reference's "attend, then rotate the output".  On an H200 these GEMMs take 0.09 ms for a
   16k-token step's rows (per layer), where rotating the pages in the dequant kernel (fp32
   dots) took 0.35 ms (``benchmarks/kernels/prefill_parts.py``).

Tokens of the batch that are not in a prefill request (decode rows, padding) sit in
entries with no keys.  Planning is on the host (numpy) from ``query_start_loc`` and
``seq_lens`` on the CPU: prefill batches run outside CUDA graphs.  Requests go in groups
of at most ``max_pages`` dequantized pages (:func:`plan_groups`), one dequant + one
FlashAttention call each, so the memory is bounded by one group (:func:`transient_bytes`,
which the backend takes during vLLM's memory profiling); a request that alone needs more
is left to the Triton kernel (``max_pages_for`` sizes the bound so that none does).

``flash_attn`` is a callable with the signature of :func:`reference_flash_attn` -- vLLM's
kernel through :func:`vllm_kvmix.vllm.flash_prefill.flash_attn_prefill` on CUDA, the
pure-PyTorch stand-in in tests on CPU.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from vllm_kvmix.formats import PAGE_TOKENS
from vllm_kvmix.kernels.codec import _unpack, code_f32, decode_tile
from vllm_kvmix.kernels.splitk import host_to_device
from vllm_kvmix.quant import hadamard

P: tl.constexpr = tl.constexpr(PAGE_TOKENS)
FIELDS = 5  # per dequantized page: request, page, staged (0 packed / 1 the 8-bit copy), destination, valid tokens
NF: tl.constexpr = tl.constexpr(FIELDS)  # the same, as the kernel reads its page list


@triton.jit
def _dequant_kernel(
    list_ptr, qsl_ptr, seq_ptr, slot_ptr, sbase_ptr, block_table_ptr,
    cache_ptr, stage_ptr, scratch_ptr, k_out_ptr, v_out_ptr, v_scale,
    stride_cb, stride_ch, stride_bt, stride_ss, stride_sh, stride_xs, stride_xh,
    stride_op, stride_ot, stride_oh,
    D: tl.constexpr, K_BITS: tl.constexpr, K_CODES: tl.constexpr, K_META: tl.constexpr,
    V_BITS: tl.constexpr, V_CODES: tl.constexpr, V_META: tl.constexpr,
    SK_META: tl.constexpr, SK_GROUP: tl.constexpr, SV_CODES: tl.constexpr, SV_META: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    req = tl.load(list_ptr + i * NF)
    page = tl.load(list_ptr + i * NF + 1)
    staged = tl.load(list_ptr + i * NF + 2)
    dst = tl.load(list_ptr + i * NF + 3).to(tl.int64)
    n_valid = tl.load(list_ptr + i * NF + 4)
    d = tl.arange(0, D)
    # rows per pass (D=256: 32 rows, the registers of a 64-row tile at D=128)
    TR: tl.constexpr = P if D <= 128 else P * 128 // D
    for t0 in tl.static_range(0, P, TR):
        t = t0 + tl.arange(0, TR)
        ok = t < n_valid
        if staged == 0:  # a packed page: keys per channel over the page, values per token
            blk = tl.load(block_table_ptr + req * stride_bt + page).to(tl.int64)
            src = cache_ptr + blk * stride_cb + h * stride_ch
            CBK: tl.constexpr = D * K_BITS // 8
            byte = tl.load(src + K_CODES + t[:, None] * CBK + tl.arange(0, CBK)[None, :], mask=ok[:, None], other=0)
            kmeta = (src + K_META).to(tl.pointer_type(tl.float16))
            ks = tl.load(kmeta + 2 * d).to(tl.float32)
            km = tl.load(kmeta + 2 * d + 1).to(tl.float32)
            k = code_f32(_unpack(byte.to(tl.int32), K_BITS)) * ks[None, :] + km[None, :]
            k = tl.where(ok[:, None], k, 0.0)
            v = decode_tile(src, t, ok, D, V_BITS, 64, V_CODES, V_META)
        else:  # the 8-bit copy: the request's slot for its first touched page, scratch pages after it
            q0 = tl.load(qsl_ptr + req)
            q1 = tl.load(qsl_ptr + req + 1)
            ctx = tl.load(seq_ptr + req) - (q1 - q0)
            jj = page - ctx // P
            if jj == 0:
                src = stage_ptr + tl.load(slot_ptr + req).to(tl.int64) * stride_ss + h * stride_sh
            else:
                src = scratch_ptr + (tl.load(sbase_ptr + req).to(tl.int64) + jj - 1) * stride_xs + h * stride_xh
            k = decode_tile(src, t, ok, D, 8, SK_GROUP, 0, SK_META)
            v = decode_tile(src, t, ok, D, 8, 64, SV_CODES, SV_META)
        off = dst * stride_op + t[:, None] * stride_ot + h * stride_oh
        tl.store(k_out_ptr + off + d[None, :], k.to(k_out_ptr.dtype.element_ty))
        tl.store(v_out_ptr + off + d[None, :], (v * v_scale).to(v_out_ptr.dtype.element_ty))


def pages_needed(qsl: list[int], seq: list[int], r: int) -> int:
    """Dequantized pages request ``r`` needs: its packed pages before the last, and its touched pages at 8 bits."""
    ctx = seq[r] - (qsl[r + 1] - qsl[r])
    first, last = ctx // PAGE_TOKENS, (seq[r] - 1) // PAGE_TOKENS
    return last + (last - first + 1)


def max_pages_for(max_model_len: int, max_num_batched_tokens: int) -> int:
    """Pages one request can need in a step (so a group of this many never leaves one out)."""
    return -(-max_model_len // PAGE_TOKENS) + -(-max_num_batched_tokens // PAGE_TOKENS) + 1


def plan_groups(qsl: list[int], seq: list[int], reqs: list[int], num_tokens: int, device,
                max_pages: int = 1 << 30):
    """``reqs`` in groups of at most ``max_pages`` dequantized pages, one :class:`PrefillPlan` each (the
    groups run one after the other through the same memory); returns ``(plans, rest)``, ``rest`` = the
    requests that alone need more pages (for another kernel), in batch order."""
    groups, cur, n, rest = [], [], 0, []
    for r in reqs:
        if qsl[r + 1] <= qsl[r]:
            continue
        need = pages_needed(qsl, seq, r)
        if need > max_pages:
            rest.append(r)
            continue
        if n + need > max_pages:
            groups.append(cur)
            cur, n = [], 0
        cur.append(r)
        n += need
    if cur:
        groups.append(cur)
    return [PrefillPlan(qsl, seq, g, num_tokens, device) for g in groups], rest


class PrefillPlan:
    """Host plan of one group of a step's prefill rows (shared by all layers).

    ``qsl`` / ``seq``: the batch's query starts ``[B + 1]`` and sequence lengths ``[B]``
    (host lists); ``reqs``: the requests to attend here (the others' rows get no keys).
    """

    def __init__(self, qsl: list[int], seq: list[int], reqs: list[int], num_tokens: int, device):
        pages, cu, used, ents, self.reqs = [], [np.zeros(1, np.int64)], [], [], []
        n = 0  # dequantized pages so far
        end = 0  # batch rows covered so far
        for r in reqs:
            q0, q1, s = qsl[r], qsl[r + 1], seq[r]
            ctx = s - (q1 - q0)
            first, last = ctx // PAGE_TOKENS, (s - 1) // PAGE_TOKENS
            if q1 <= q0:
                continue
            self.reqs.append(r)
            if q0 > end:  # rows before this request (decode rows, other kernels' requests): no keys
                cu.append(np.array([q0]))
                used.append(np.zeros(1, np.int64))
                ents.append((np.zeros(1, np.int64), np.full(1, -1), 0))
            p = np.arange(last, dtype=np.int64)  # packed pages 0 .. last-1 -> n + p
            pages.append(np.stack([np.full(last, r), p, np.zeros(last, np.int64), n + p,
                                   np.full(last, PAGE_TOKENS)], 1))
            j = np.arange(first, last + 1, dtype=np.int64)  # touched pages: 8-bit copies -> n + last + (j - first)
            sid = n + last + j - first
            pages.append(np.stack([np.full(j.size, r), j, np.ones(j.size, np.int64), sid,
                                   np.minimum(PAGE_TOKENS, s - j * PAGE_TOKENS)], 1))
            hi = np.minimum(s, (j + 1) * PAGE_TOKENS)  # entry j: keys at positions < hi, queries up to hi
            cu.append(q0 + hi - ctx)
            used.append(hi)
            ents.append((j, sid, n))  # block-table row of entry j: [n + 0 .. n + j-1, sid]
            n += last + j.size
            end = q1
        if end < num_tokens or not ents:
            cu.append(np.array([num_tokens]))
            used.append(np.zeros(1, np.int64))
            ents.append((np.zeros(1, np.int64), np.full(1, -1), 0))
        self.num_pages = n
        cu_np = np.concatenate(cu).astype(np.int32)
        used_np = np.concatenate(used).astype(np.int32)
        jj = np.concatenate([e[0] for e in ents])
        sid = np.concatenate([e[1] for e in ents])
        base = np.concatenate([np.full(e[0].size, e[2]) for e in ents])
        col = np.arange(max(1, int(jj.max()) + 1))[None, :]
        table = np.where(col < jj[:, None], base[:, None] + col, 0)
        table = np.where(col == jj[:, None], np.maximum(sid, 0)[:, None], table).astype(np.int32)
        self.max_seqlen_q = int(np.diff(cu_np).max())
        self.max_seqlen_k = int(used_np.max())
        self.row_ranges = [(qsl[r], qsl[r + 1]) for r in self.reqs]

        def dev(x):
            return host_to_device(torch.from_numpy(np.ascontiguousarray(x)), device)

        self.pages = dev(np.concatenate(pages).astype(np.int32) if pages else np.zeros((0, FIELDS), np.int32))
        self.cu_seqlens_q = dev(cu_np)
        self.seqused_k = dev(used_np)
        self.block_table = dev(table)


def dequantize_pages(plan: PrefillPlan, cache, stage, scratch, block_table, common, fmt_consts, d: int, dtype):
    """The plan's pages as ``(k, v)``, each ``dtype[num_pages, 64, H, D]``; values in the rotated basis times
    ``1 / sqrt(D)`` (:func:`attend` rotates the output back)."""
    stage_consts, bits = fmt_consts
    h = cache.shape[1]
    k = torch.empty((plan.num_pages, PAGE_TOKENS, h, d), dtype=dtype, device=cache.device)
    v = torch.empty_like(k)
    _dequant_kernel[(plan.num_pages, h)](
        plan.pages, *common, block_table, cache, stage, scratch, k, v, d**-0.5,
        cache.stride(0), cache.stride(1), block_table.stride(0), stage.stride(0), stage.stride(1),
        scratch.stride(0), scratch.stride(1), k.stride(0), k.stride(1), k.stride(2),
        D=d, **bits, **stage_consts,
    )
    return k, v


ROT_ROWS = 4096  # query tokens per output-rotation GEMM (bounds its temporary where ``out`` is strided)


def attend(plan: PrefillPlan, query, out, k, v, scale: float, flash_attn, sliding_window=None, soft_cap=None):
    """Attention of the plan's rows into ``out`` (no other row of ``out`` is written).

    FlashAttention writes a scratch tensor in the rotated basis; each run of the plan's rows goes to ``out``
    times ``S``, the +-1 Sylvester matrix in the query dtype (exact products, fp32 accumulation, one
    rounding; the ``1 / sqrt(D)`` of ``H = S / sqrt(D)`` is in the values, :func:`dequantize_pages`).
    """
    o = torch.empty_like(query)
    flash_attn(query, k, v, o, plan.cu_seqlens_q, plan.max_seqlen_q, plan.seqused_k, plan.max_seqlen_k,
               plan.block_table, scale, sliding_window, soft_cap)
    rotate_rows(o, out, plan.row_ranges)


def rotate_rows(o, out, row_ranges) -> None:
    """``out[t0:t1] = o[t0:t1] @ S`` for each ``(t0, t1)`` of ``row_ranges``, in GEMMs of at most ``ROT_ROWS``
    tokens in ``o``'s dtype (``S``: the +-1 Sylvester matrix; ``out`` may be strided)."""
    d = o.shape[-1]
    signs = _sign_matrix(d, o.dtype, o.device)
    for t0, t1 in _merged(row_ranges):
        for c0 in range(t0, t1, ROT_ROWS):
            c1 = min(t1, c0 + ROT_ROWS)
            dst = out[c0:c1]
            if dst.is_contiguous():
                torch.mm(o[c0:c1].view(-1, d), signs, out=dst.view(-1, d))
            else:
                dst.copy_(torch.mm(o[c0:c1].view(-1, d), signs).view(dst.shape))


def transient_bytes(max_pages: int, num_tokens: int, num_heads: int, num_kv_heads: int, head_size: int,
                    dtype_bytes: int = 2) -> int:
    """Memory one layer's prefill attention takes for ``num_tokens`` rows: the dequantized pages of a
    group, FlashAttention's scratch output and one rotation GEMM's output (where ``out`` is strided)."""
    pages = max_pages * 2 * PAGE_TOKENS * num_kv_heads * head_size * dtype_bytes
    return pages + (num_tokens + ROT_ROWS) * num_heads * head_size * dtype_bytes


def _merged(ranges):
    runs = []
    for t0, t1 in ranges:
        if runs and runs[-1][1] == t0:
            runs[-1] = (runs[-1][0], t1)
        else:
            runs.append((t0, t1))
    return runs


@functools.cache
def _sign_matrix(d: int, dtype, device) -> torch.Tensor:
    """The +-1 Sylvester matrix S of the rotation H = S / sqrt(d) (exact in any float dtype)."""
    return torch.sign(hadamard(d, torch.float32, device)).to(dtype)


def reference_flash_attn(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, block_table, scale,
                         sliding_window=None, soft_cap=None):
    """Pure-PyTorch paged varlen attention with ``flash_attn_varlen_func``'s contract (fp64 inside).

    Entry ``e``: queries ``cu_seqlens_q[e] .. cu_seqlens_q[e+1]``, keys the first ``seqused_k[e]``
    tokens of pages ``block_table[e]``, causal aligned bottom-right; no keys -> zero output.
    """
    cu = cu_seqlens_q.tolist()
    used = seqused_k.tolist()
    bt = block_table.cpu()
    hq, h = q.shape[1], k.shape[2]
    for e in range(len(cu) - 1):
        q0, q1, nk = cu[e], cu[e + 1], used[e]
        if q1 <= q0:
            continue
        if nk == 0:
            out[q0:q1] = 0
            continue
        ids = bt[e, : (nk + PAGE_TOKENS - 1) // PAGE_TOKENS].to(k.device)
        kk = k[ids].reshape(-1, h, k.shape[-1])[:nk].double().repeat_interleave(hq // h, dim=1)
        vv = v[ids].reshape(-1, h, v.shape[-1])[:nk].double().repeat_interleave(hq // h, dim=1)
        qq = q[q0:q1].double()
        s = torch.einsum("qhd,khd->hqk", qq, kk) * scale
        if soft_cap:
            s = soft_cap * torch.tanh(s / soft_cap)
        qpos = torch.arange(q1 - q0, device=q.device)[:, None] + (nk - (q1 - q0))
        kpos = torch.arange(nk, device=q.device)[None, :]
        mask = kpos <= qpos
        if sliding_window:
            mask &= qpos - kpos < sliding_window
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", p, vv).to(out.dtype)


reference_flash_attn.dtypes = (torch.float32, torch.float16, torch.bfloat16)
