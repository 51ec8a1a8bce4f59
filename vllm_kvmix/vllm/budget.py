"""The KV-cache memory kvmix takes besides vLLM's blocks, and the startup lines that account for it.

Each running sequence's still-filling page lives in an 8-bit staging slot per
layer (:mod:`vllm_kvmix.staging`), ``max_num_seqs + 1`` slots per layer; their
bytes come out of the memory vLLM may give to KV blocks (the version layer calls
:func:`staging_bytes` where vLLM computes the block count), so a kvmix cache
never exceeds the budget the user set.  :func:`kv_cache_summary` writes the
startup lines: format, bits/element, bytes/token, blocks and the ratio vs bf16.
"""

from __future__ import annotations

from vllm_kvmix.formats import BF16_BYTES, is_kvmix, parse_format
from vllm_kvmix.staging import stage_rows


def staging_bytes(layer_specs: dict, max_num_seqs: int) -> int:
    """Bytes of the staging slots of every kvmix layer of one worker (``layer_specs``: name -> KV-cache spec)."""
    total = 0
    for spec in layer_specs.values():
        name = getattr(spec, "kvmix_format", None)
        if is_kvmix(name):
            fmt = parse_format(name)
            total += stage_rows(max_num_seqs) * spec.num_kv_heads * fmt.stage_bytes_per_seq_head(spec.head_size)
    return total


def log_info(line: str) -> None:
    # A child of vLLM's "vllm" logger, so vLLM's handlers and levels apply.
    from vllm.logger import init_logger

    init_logger("vllm.kvmix").info(line)


def kv_cache_summary(kv_cache_config, layer_specs: dict, reserved: int = 0) -> list[str]:
    """Startup lines: per format, bytes/token over all layers, blocks, ratio vs bf16.

    ``reserved``: staging bytes taken out of the same memory (bf16 would have had them too).
    """
    kvmix_layers = {n: s for n, s in layer_specs.items() if is_kvmix(getattr(s, "kvmix_format", None))}
    if not kvmix_layers:
        return []
    per_fmt: dict[str, list] = {}
    for spec in kvmix_layers.values():
        per_fmt.setdefault(getattr(spec, "kvmix_layer_format", "") or spec.kvmix_format, []).append(spec)
    lines = []
    total_kvmix = total_bf16 = 0
    for name, specs in per_fmt.items():
        fmt = parse_format(name)
        tok = sum(s.num_kv_heads * fmt.bytes_per_token_head(s.head_size) for s in specs)
        bf16 = sum(s.num_kv_heads * 2 * s.head_size * BF16_BYTES for s in specs)
        total_kvmix += tok
        total_bf16 += bf16
        lines.append(
            f"kvmix: {name} on {len(specs)} layers: {fmt.bits_per_element(specs[0].head_size):.2f} "
            f"bits/element, {tok} bytes/token (bf16: {bf16}), {bf16 / tok:.2f}x"
        )
    blocks = kv_cache_config.num_blocks
    block_size = next(iter(kvmix_layers.values())).block_size
    bf16_blocks = int((blocks * block_size * total_kvmix + reserved) / (block_size * total_bf16))
    lines.append(
        f"kvmix: KV cache {blocks} blocks; bf16 in the same memory would get "
        f"~{bf16_blocks} blocks ({blocks / max(bf16_blocks, 1):.2f}x more with kvmix)"
    )
    return lines
