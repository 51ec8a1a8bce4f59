"""vLLM's own decode kernels and the timing helpers every kernel benchmark here shares (one GPU, one process).

Peers (need vLLM 0.26.0 on the device, see ../shared/gpu/README.md): FA3 bf16 and fp8 through
vllm_flash_attn (paged, block 16, shuffled blocks), vLLM's Triton unified attention bf16, and vLLM's
bf16 cache write (``reshape_and_cache_flash``).  GB/s counts the K/V bytes each kernel must read.
Llama-3.1-8B heads: 32 q / 8 kv / d=128.
"""

import torch
import triton

dev = "cuda"
HQ, HKV, D = 32, 8, 128
PEER_BS = 16


def bench(f):
    return triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")


def reshape_and_cache_ms(k, v, slot_mapping, n_blocks, graph=False):
    """vLLM's bf16 cache write (block PEER_BS) of ``k`` / ``v`` at ``slot_mapping`` (replayed from a CUDA
    graph with ``graph``); None without vLLM."""
    try:
        from vllm import _custom_ops as ops
    except Exception as e:  # noqa: BLE001
        print("reshape_and_cache_flash unavailable:", repr(e)[:200])
        return None
    kc = torch.zeros(n_blocks, PEER_BS, k.shape[1], k.shape[2], dtype=torch.bfloat16, device=k.device)
    vc = torch.zeros_like(kc)
    one = torch.ones((), device=k.device)
    write = lambda: ops.reshape_and_cache_flash(k, v, kc, vc, slot_mapping, "auto", one, one)  # noqa: E731
    return triton.testing.do_bench_cudagraph(write) if graph else bench(write)


def copy_bw():
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    return 2 * x.numel() / (bench(lambda: y.copy_(x)) * 1e-3) / 1e9


def paged_bf16(B, L, hkv, d, gen):
    """A paged bf16 cache of B x L tokens in shuffled blocks of PEER_BS: k, v, block table, cu_q, seq lens."""
    nb = B * L // PEER_BS
    k = torch.randn(nb, PEER_BS, hkv, d, dtype=torch.bfloat16, device=dev, generator=gen)
    v = torch.randn_like(k)
    bt = torch.randperm(nb, device=dev, dtype=torch.int32, generator=gen).view(B, L // PEER_BS)
    cu_q = torch.arange(B + 1, device=dev, dtype=torch.int32)
    seq = torch.full((B,), L, device=dev, dtype=torch.int32)
    return k, v, bt, cu_q, seq


def peers(B, L, q, out, gen):
    res = {}
    k, v, bt, cu_q, seq = paged_bf16(B, L, HKV, D, gen)
    kv_bytes = 2 * B * L * HKV * D
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        f = lambda: flash_attn_varlen_func(q, k, v, 1, cu_q, L, seqused_k=seq, softmax_scale=D**-0.5,  # noqa: E731
                                           causal=True, block_table=bt, out=out, fa_version=3)
        res["fa3_bf16"] = (bench(f), kv_bytes * 2)
        k8, v8, q8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn), q.to(torch.float8_e4m3fn)
        one = torch.ones(B, HKV, device=dev, dtype=torch.float32)
        f8 = lambda: flash_attn_varlen_func(q8, k8, v8, 1, cu_q, L, seqused_k=seq, softmax_scale=D**-0.5,  # noqa: E731
                                            causal=True, block_table=bt, out=out, fa_version=3,
                                            q_descale=one, k_descale=one, v_descale=one)
        res["fa3_fp8"] = (bench(f8), kv_bytes)
    except Exception as e:  # noqa: BLE001
        print("FA3 unavailable:", repr(e)[:200])
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        g = lambda: unified_attention(q, k, v, out, cu_q, 1, seq, L, D**-0.5, True, (-1, -1), bt, 0.0,  # noqa: E731
                                      None, None, None)
        res["vllm_triton_bf16"] = (bench(g), kv_bytes * 2)
    except Exception as e:  # noqa: BLE001
        print("vLLM Triton unavailable:", repr(e)[:200])
    return res
