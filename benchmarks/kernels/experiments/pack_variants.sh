#!/usr/bin/env bash
# The write path (stage + pack, kvmix-k4v2) under variants of the pack kernel's clip search, on a GPU, from
# the repository root of a scratch copy: it EDITS vllm_kvmix/kernels/{codec,page}.py in place (the error sums'
# type, the pack launch's warps, CLIP_STEPS 1 = the plain min-max range).  Never run it in a checkout you keep.
#   bash benchmarks/kernels/experiments/pack_variants.sh
# Prints, per variant, (case, stage + pack us, pack us) from CUDA-graph replay (page_bench.write_bench).
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
C=vllm_kvmix/kernels/codec.py; P=vllm_kvmix/kernels/page.py
variant() {  # NAME ERR_DTYPE WARPS CLIP_STEPS
  sed -i "s/^CLIP_ERR_DTYPE = tl.constexpr(tl\.[a-z0-9]*)/CLIP_ERR_DTYPE = tl.constexpr(tl.$2)/" $C
  sed -i "s/^LAUNCH_PACK = {\"num_warps\": [0-9]*}/LAUNCH_PACK = {\"num_warps\": $3}/" $P
  sed -i "s/^CLIP_STEPS = tl.constexpr(.*)/CLIP_STEPS = tl.constexpr($4)/" $C
  python3 -c "
import sys; sys.path.insert(0, 'benchmarks/kernels'); import torch, page_bench as pb
pb.FORMATS = ['kvmix-k4v2']
rows = pb.write_bench(torch.Generator(device='cuda').manual_seed(0))
print('$1', [(r['case'][:26], round(r['graph_ms'] * 1000, 1), round(r.get('pack_graph_ms', 0) * 1000, 1)) for r in rows])
" 2>&1 | grep "^$1"
}
variant A_fp64_w4 float64 4 _CLIP_STEPS
variant B_fp32_w4 float32 4 _CLIP_STEPS
variant C_fp32_w8 float32 8 _CLIP_STEPS
variant D_fp32_w16 float32 16 _CLIP_STEPS
variant E_fp64_w16 float64 16 _CLIP_STEPS
variant F_fp64_w8 float64 8 _CLIP_STEPS
variant G_noclip_w8 float32 8 1
variant H_noclip_w4 float32 4 1
