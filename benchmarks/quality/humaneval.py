"""HumanEval pass@1 of KV-cache formats through vLLM's engine on CPU, with real weights.

Greedy decoding of every problem (164, or ``--limit``) through the model's chat template: the user turn asks
for the function, the reply's first fenced Python block (else the reply) is the answer; where the answer does
not define the entry point, it is appended to the prompt as a body.  Each program (answer + the problem's tests
+ ``check(entry_point)``) runs in a limited child process (``sandbox.py``: 10 s, 1 GiB, no network or
environment of ours), never in this one.

    python benchmarks/quality/humaneval.py --models qwen2.5-coder-0.5b --formats auto kvmix-k4v2 kvmix-k2v4
    python benchmarks/quality/humaneval.py --from-json a.json b.json     # one table and plot from runs

Writes ``<out>.json`` (a row per model and format, with each problem's outcome and the provenance key),
``<out>.md`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sandbox  # noqa: E402

INSTRUCTION = "Complete the following Python function. Reply with the complete function in one Python code block.\n\n"
FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)


def messages(problem: dict) -> list[dict]:
    return [{"role": "user", "content": INSTRUCTION + "```python\n" + problem["prompt"] + "```"}]


def program(problem: dict, reply: str) -> str:
    """The code to test: the reply's first fenced block (or the reply), with the prompt's imports; the prompt plus
    the reply as the body where the reply does not define the entry point."""
    m = FENCE.search(reply)
    code = m.group(1) if m else reply
    if not re.search(rf"^\s*def {re.escape(problem['entry_point'])}\s*\(", code, re.M):
        code = problem["prompt"] + code
    else:
        imports = [ln for ln in problem["prompt"].splitlines() if ln.startswith(("import ", "from "))]
        code = "\n".join(imports) + "\n" + code
    return f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def evaluate(model: str, fmt: str, problems: list[dict], max_tokens: int, timeout: float) -> dict:
    from tqdm import tqdm
    from vllm import SamplingParams

    from vllm_kvmix.evaluate import make_llm
    from vllm_kvmix.models import ensure_model

    mdir = str(ensure_model(model, quiet=True))
    t0 = time.time()
    llm = make_llm(mdir, fmt, max_model_len=2048, max_num_seqs=16)
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template(messages(p), tokenize=False, add_generation_prompt=True) for p in problems]
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=True)
    gen_s = time.time() - t0
    replies = [o.outputs[0].text for o in outs]
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    results = []
    for p, r in tqdm(list(zip(problems, replies)), desc=f"{model} {fmt}: tests", unit="problem"):
        out = sandbox.run(program(p, r), timeout)
        results.append({"task_id": p["task_id"], "passed": out.passed, "reason": out.reason})
    passed = sum(r["passed"] for r in results)
    return {"model": model, "kv_cache_dtype": fmt, "problems": len(problems), "passed": passed,
            "pass_at_1": round(100 * passed / len(problems), 2), "generated_tokens": tokens,
            "generation_s": round(gen_s, 1), "max_tokens": max_tokens, "results": results, "replies": replies}


def markdown(rows: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        base = next((r for r in mine if r["kv_cache_dtype"] == "auto"), None)
        lines += [f"### {model} ({mine[0]['problems']} problems, greedy, chat template, max {mine[0]['max_tokens']} "
                  f"tokens, vLLM {mine[0].get('vllm', '?')} CPU, commit {mine[0].get('commit', '?')})", "",
                  "| KV cache | pass@1 % | passed | vs bf16, points | changed problems vs bf16 | generated tokens | "
                  "engine start + generation s |", "|---|---|---|---|---|---|---|"]
        for r in mine:
            if base is not None:
                ref = {x["task_id"]: x["passed"] for x in base["results"]}
                changed = sum(ref.get(x["task_id"]) != x["passed"] for x in r["results"])
                delta = f"{r['pass_at_1'] - base['pass_at_1']:+.1f}"
            else:
                changed, delta = "-", "-"
            name = "bf16 (`auto`)" if r["kv_cache_dtype"] == "auto" else r["kv_cache_dtype"]
            lines.append(f"| {name} | {r['pass_at_1']:.1f} | {r['passed']} / {r['problems']} | {delta} | {changed} | "
                         f"{r['generated_tokens']} | {r['generation_s']} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        names = ["bf16" if r["kv_cache_dtype"] == "auto" else r["kv_cache_dtype"].removeprefix("kvmix-") for r in mine]
        ax.bar(names, [r["pass_at_1"] for r in mine], color=["0.5" if n == "bf16" else "C0" for n in names])
        for i, r in enumerate(mine):
            ax.text(i, r["pass_at_1"] + 0.5, f"{r['pass_at_1']:.1f}", ha="center", fontsize=8)
        ax.set_title(f"{model}: HumanEval pass@1\n({mine[0]['problems']} problems, greedy)", fontsize=10)
        ax.set_ylabel("pass@1 %")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b"])
    ap.add_argument("--formats", nargs="+", default=["auto", "kvmix-k4v4", "kvmix-k4v2", "kvmix-k2v4", "kvmix-auto"])
    ap.add_argument("--limit", type=int, default=0, help="the first N problems (0: all 164)")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/humaneval"))
    ap.add_argument("--from-json", nargs="+", metavar="JSON", help="render earlier runs' rows instead of running")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        rows = [r for f in args.from_json for r in json.loads(Path(f).read_text())]
    else:
        from benchmarks import provenance
        from vllm_kvmix.models import ensure_humaneval

        key = provenance.key()
        problems = ensure_humaneval()
        problems = problems[: args.limit] if args.limit else problems
        rows = []
        for model in args.models:
            for fmt in args.formats:
                rows.append({**key, **evaluate(model, fmt, problems, args.max_tokens, args.timeout)})
                (out.parent / (out.name + ".json")).write_text(json.dumps(rows, indent=1) + "\n")
                print(f"{model} {fmt}: pass@1 {rows[-1]['pass_at_1']:.1f}% ({rows[-1]['passed']}/{len(problems)}), "
                      f"{rows[-1]['generation_s']} s", flush=True)
    md = markdown(rows)
    (out.parent / (out.name + ".md")).write_text(md + "\n")
    plot(rows, out.parent / (out.name + ".png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
