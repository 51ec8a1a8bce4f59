"""GPU kernels of the page scheme, one job per module.

``page``        Triton: staging, pack on fill, page attention, and the step that runs them
``cuda_decode`` the CUDA decode kernel (``csrc/page_decode.cu``, compiled by NVRTC)
``prefill``     prefill rows on vLLM's FlashAttention over dequantized pages
``splitk``      split-K planning and the merge of partials
``planes``, ``codec``  Triton building blocks (bit planes, per-token quantizer)

Each launcher documents its shapes.  Kernels never import the reference
(:mod:`vllm_kvmix.reference`); tests compare the two.
"""
