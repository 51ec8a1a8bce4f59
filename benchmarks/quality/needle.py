"""Passkey retrieval at long context: does a KV format keep what bf16 retrieves?

A 5-digit passkey sentence is hidden at several depths of a haystack of real English text (the brotli
sdist's books); the model's chat template asks for it at the end; greedy decoding, 12 new tokens; a hit
is the passkey's digits in the reply.  One engine per format through vLLM's CPU engine, every prompt of a
format in one generate call.

    python benchmarks/quality/needle.py --model qwen2.5-coder-1.5b --formats auto kvmix-k4v2 kvmix-k2v4 \\
        --lengths 2048 4096 8192 --depths 0.1 0.5 0.9
    python benchmarks/quality/needle.py --from-json a.json b.json --out benchmarks/results/needle-...

Writes ``<out>.json`` (every prompt's reply and hit, with the provenance key) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

QUESTION = "What is the passkey hidden in the text above? Answer with the number only."
NEEDLE = "The passkey is {key}. Remember it: the passkey is {key}."


def prompts(tok, lengths: list[int], depths: list[float], seed: int = 0) -> list[dict]:
    """One prompt per (length, depth): haystack tokens around the needle, wrapped in the chat template so that
    the whole prompt is ``length`` tokens (within a few)."""
    from vllm_kvmix.models import ensure_texts

    texts = ensure_texts()
    hay = tok(" ".join(texts[n][3000:] for n in sorted(texts)), add_special_tokens=False)["input_ids"]
    rnd = random.Random(seed)
    frame = tok.apply_chat_template([{"role": "user", "content": "X\n\n" + QUESTION}], tokenize=False,
                                    add_generation_prompt=True)
    frame = len(tok(frame, add_special_tokens=False)["input_ids"])
    out = []
    for length in lengths:
        for depth in depths:
            key = str(rnd.randrange(10000, 100000))
            needle = tok(" " + NEEDLE.format(key=key) + " ", add_special_tokens=False)["input_ids"]
            n = length - frame - len(needle)
            start = rnd.randrange(0, len(hay) - n)
            body = hay[start:start + n]
            cut = int(depth * n)
            text = tok.decode(body[:cut] + needle + body[cut:])
            chat = tok.apply_chat_template([{"role": "user", "content": text + "\n\n" + QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
            out.append({"length": length, "depth": depth, "key": key, "prompt": chat})
    return out


def evaluate(model: str, fmt: str, lengths: list[int], depths: list[float]) -> dict:
    from vllm import SamplingParams

    from vllm_kvmix.evaluate import make_llm
    from vllm_kvmix.models import ensure_model

    mdir = str(ensure_model(model, quiet=True))
    t0 = time.time()
    llm = make_llm(mdir, fmt, max_model_len=max(lengths) + 64, max_num_seqs=4,
                   kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    cases = prompts(tok, lengths, depths)
    outs = llm.generate([c["prompt"] for c in cases], SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=True)
    for c, o in zip(cases, outs):
        c["reply"] = o.outputs[0].text
        c["prompt_tokens"] = len(o.prompt_token_ids)
        c["hit"] = c["key"] in c["reply"]
        del c["prompt"]
    del llm
    return {"model": model, "kv_cache_dtype": fmt, "cases": cases, "hits": sum(c["hit"] for c in cases),
            "seconds": round(time.time() - t0, 1)}


def markdown(rows: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        lengths = sorted({c["length"] for r in mine for c in r["cases"]})
        depths = sorted({c["depth"] for r in mine for c in r["cases"]})
        lines += [f"### {model}: passkey hits per context length (depths {', '.join(map(str, depths))}; "
                  f"vLLM {mine[0].get('vllm', '?')} CPU)", "",
                  "| KV cache | " + " | ".join(f"{n} tokens" for n in lengths) + " | all | seconds | commits |",
                  "|---|" + "---|" * (len(lengths) + 3)]
        for r in mine:
            cells = []
            for n in lengths:
                cs = [c for c in r["cases"] if c["length"] == n]
                cells.append(f"{sum(c['hit'] for c in cs)} / {len(cs)}" if cs else "--")
            name = "bf16 (`auto`)" if r["kv_cache_dtype"] == "auto" else r["kv_cache_dtype"]
            lines.append(f"| {name} | " + " | ".join(cells)
                         + f" | {r['hits']} / {len(r['cases'])} | {r['seconds']} | {r.get('commit', '?')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--formats", nargs="+", default=["auto", "kvmix-k4v2", "kvmix-k2v4"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/needle"))
    ap.add_argument("--from-json", nargs="+", metavar="JSON", help="render earlier runs' rows instead of running")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.from_json:  # runs of one model and format (e.g. other lengths) become one row
        rows = []
        for r in (r for f in args.from_json for r in json.loads(Path(f).read_text())):
            key = (r["model"], r["kv_cache_dtype"])
            same = next((x for x in rows if (x["model"], x["kv_cache_dtype"]) == key), None)
            if same is None:
                rows.append({**r, "cases": list(r["cases"])})
            else:
                same["cases"] += r["cases"]
                same["hits"] += r["hits"]
                same["seconds"] = round(same["seconds"] + r["seconds"], 1)
                same["commit"] = ", ".join(dict.fromkeys([same.get("commit", "?"), r.get("commit", "?")]))
    else:
        from benchmarks import provenance

        rows = []
        for fmt in args.formats:
            rows.append({**evaluate(args.model, fmt, args.lengths, args.depths), **provenance.key()})
            print(f"{fmt}: {rows[-1]['hits']} / {len(rows[-1]['cases'])} hits", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / (out.name + ".json")).write_text(json.dumps(rows, indent=1))
    (out.parent / (out.name + ".md")).write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
