"""KV capacity and throughput of every KV format against bf16, from one run's rows of a results file (PNG).

    python3 benchmarks/e2e/plot_formats.py [RESULTS_JSON] [--run TEXT] [--out PNG]

Takes the plain rows (not ``--steps``) whose ``run`` key contains ``--run`` (default "71fda59": the
commit's rows), one per (format, workload), and draws two panels for the ``cap`` and ``long`` workloads:
KV tokens (blocks x block size) and output tokens/s, each as a ratio to the bf16 FLASH_ATTN row of the
same workload and run.  A format without a row for a workload gets no bar there.
"""

import argparse
import json

WORKLOADS = ("cap", "long")
ORDER = [("auto", "bf16"), ("fp8", "fp8"), ("int4_per_token_head", "int4_per_token_head"),
         ("kvmix-k8v4", "kvmix-k8v4"), ("kvmix-k4v4", "kvmix-k4v4"), ("kvmix-k4v2", "kvmix-k4v2")]
COLORS = {"bf16": "#7f8c8d", "fp8": "#2e86c1", "int4_per_token_head": "#85c1e9", "kvmix-k8v4": "#f5b041",
          "kvmix-k4v4": "#e67e22", "kvmix-k4v2": "#c0392b"}


def ratios(rows: list[dict], run: str) -> dict:
    """{(workload, label): (tokens ratio, out tok/s ratio)} against the bf16 row of the same workload."""
    picked = {}
    for r in rows:
        if run in r.get("run", "") and "steps" not in r and r["workload"] in WORKLOADS:
            picked[(r["workload"], r["kv_cache_dtype"])] = r
    out = {}
    for wl in WORKLOADS:
        base = picked.get((wl, "auto"))
        if base is None:
            continue
        base_tokens = base["blocks"] * base["block_size"]
        for dtype, label in ORDER:
            r = picked.get((wl, dtype))
            if r is not None:
                out[(wl, label)] = (r["blocks"] * r["block_size"] / base_tokens, r["out_tok_s"] / base["out_tok_s"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="?", default="benchmarks/results/e2e-h200.json")
    ap.add_argument("--run", default="71fda59", help="substring of the rows' run key, e.g. a commit")
    ap.add_argument("--out", default="benchmarks/results/e2e-formats-h200.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.results) as f:
        data = ratios(json.load(f), args.run)
    if not data:
        raise SystemExit(f"no rows whose run contains {args.run!r} with a bf16 row in {args.results}")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    labels = [label for _, label in ORDER]
    width = 0.13
    for ax, (idx, title) in zip(axes, ((0, "KV tokens in the same memory (x bf16)"), (1, "output tokens/s (x bf16)"))):
        for j, label in enumerate(labels):
            xs, ys = [], []
            for i, wl in enumerate(WORKLOADS):
                if (wl, label) in data:
                    xs.append(i + (j - (len(labels) - 1) / 2) * width)
                    ys.append(data[(wl, label)][idx])
            bars = ax.bar(xs, ys, width, color=COLORS[label], label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(WORKLOADS)), WORKLOADS)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, max(v[idx] for v in data.values()) * 1.15)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.suptitle(f"vLLM 0.26.0, Llama-3.1-8B shape, one run (rows of {args.run}; {args.results.split('/')[-1]})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
