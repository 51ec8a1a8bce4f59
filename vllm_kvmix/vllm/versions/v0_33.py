"""vLLM 0.33 (unit level: tested with vLLM's CUDA wheel installed on a CPU machine; no engine runs here).

The first release with vLLM's dtype registry (``register_kv_cache_dtype``): the same hooks and patches as
0.34 (:mod:`vllm_kvmix.vllm.versions.v0_34`), except that 0.33 still has the V1 GPU model runner (the CPU
runner's base), so both runners' step hooks are patched, as on 0.26 / 0.32.
"""

from __future__ import annotations

from vllm_kvmix.vllm.versions import v0_26, v0_34

VERSIONS = ("0.33.0",)

# (patch, what it touches, the upstream hook that replaces it): 0.34's list with both runners' step hooks
PATCHES = tuple(
    (v0_26.patch_step_requests, "GPUModelRunner._update_states (V1, CPU runner), V2 prepare_inputs/finish_requests",
     "none on V1; V2's CommonAttentionMetadata.req_idx could replace the V2 wraps")
    if patch is v0_26.patch_v2_step_requests else (patch, target, hook)
    for patch, target, hook in v0_34.PATCHES
)


def apply() -> None:
    """Install every patch and hook (each is idempotent)."""
    for patch, _, _ in PATCHES:
        patch()
