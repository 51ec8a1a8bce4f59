"""Which (head size, page size, format) does the Triton attention get wrong on this GPU?"""
import torch

from vllm_kvmix import reference
from vllm_kvmix.formats import parse_format
from vllm_kvmix.kernels import attention
from vllm_kvmix.kernels.attention import paged_attention

attention.MIN_PAGE = 16  # lift the launcher's guard to show what it guards against

dev = "cuda"
for name in ["kvmix-k4v2-tok", "kvmix-k8v8-tok", "kvmix-k8v4-tok-g32"]:
    for D in (64, 128):
        for bs in (16, 32, 64):
            for rep in (1, 4):
                fmt = parse_format(name)
                H = 2
                g = torch.Generator(device=dev).manual_seed(0)
                L = 100
                nb = (L + bs - 1) // bs
                cache = torch.zeros(nb, H, fmt.layout(D, bs).head_page_bytes, dtype=torch.uint8, device=dev)
                k = torch.randn(L, H, D, device=dev, generator=g)
                v = torch.randn(L, H, D, device=dev, generator=g)
                reference.write_kv(cache, k, v, torch.arange(L, device=dev), fmt, bs)
                bt = torch.arange(nb, dtype=torch.int32, device=dev)[None]
                q = torch.randn(1, H * rep, D, device=dev, generator=g).half()
                ref = reference.paged_attention(q, cache, fmt, bs, [0, 1], [L], bt, D**-0.5)
                out = paged_attention(q, cache, fmt, bs, [0, 1], torch.tensor([L], dtype=torch.int32, device=dev), bt, D**-0.5, num_splits=1)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                print(f"{name:15} D={D:3} bs={bs:2} rep={rep} rel={err:.1e} {'OK' if err < 5e-3 else 'BAD'}", flush=True)
