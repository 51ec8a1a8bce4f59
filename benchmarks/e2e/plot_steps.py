"""Where an e2e run's generate time goes, from the ``bench.py --steps`` rows of a results file (PNG).

    python3 benchmarks/e2e/plot_steps.py [RESULTS_JSON] [--run TEXT ...] [--out PNG]

One horizontal bar per ``--steps`` row whose ``run`` key contains one of the ``--run`` texts (default:
"97e1043" and "cead2ed", the commits of the H200 step-profile rows), labelled with its commit: the
prompt-chunk steps and the decode-only steps, each split by the GPU time of its traced steps (gemm /
attention / other, scaled to all steps of that kind as :func:`split` says; the rest of the steps'
wall time is "host / gaps"), and the time outside ``execute_model`` (scheduling, sampling).
Rows are synchronized per step, so they run slower than the plain rows: compare bars, not with them.
"""

import argparse
import json
import re

PARTS = [("prefill", "gemm", "#1f4e79"), ("prefill", "attention", "#2e86c1"), ("prefill", "other", "#85c1e9"),
         ("prefill", "host / gaps", "#d6eaf8"), ("decode", "gemm", "#7b241c"), ("decode", "attention", "#c0392b"),
         ("decode", "other", "#f1948a"), ("decode", "host / gaps", "#fadbd8"), (None, "outside steps", "#bbbbbb")]


def split(row: dict) -> dict:
    """Seconds per (kind, part) for one ``--steps`` row: an estimate from the few traced steps of each kind,
    scaled per token (prompt-chunk steps; decode attention and other) or per step (decode GEMMs, which
    read the weights once a step whatever the batch); "host / gaps" is the rest of the steps' wall time."""
    out = {}
    for kind in ("prefill", "decode"):
        n, tokens, sec = row["steps"][kind]
        tr = row.get("traced", {}).get(kind)
        if not n:
            continue
        if not tr:
            out[(kind, "host / gaps")] = sec
            continue
        for part in ("gemm", "attention", "other"):
            ms_step = tr["gpu_ms"].get(part, 0.0)
            per_step = kind == "decode" and part == "gemm"
            out[(kind, part)] = ms_step / 1e3 * (n if per_step else tokens / tr["tokens_per_step"])
        out[(kind, "host / gaps")] = max(0.0, sec - sum(out[(kind, p)] for p in ("gemm", "attention", "other")))
    out[(None, "outside steps")] = max(0.0, row["gen_s"] - sum(row["steps"][k][2] for k in ("prefill", "decode")))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="?", default="benchmarks/results/e2e-h200.json")
    ap.add_argument("--run", nargs="+", default=["97e1043", "cead2ed"],
                    help="substrings of the rows' run key, e.g. commits; a row matching any is drawn")
    ap.add_argument("--out", default="benchmarks/results/e2e-steps-h200.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in json.load(open(args.results))
            if "steps" in r and any(t in r.get("run", "") for t in args.run)]
    labels, splits = [], []
    for r in rows:
        name = "bf16" if r["kv_cache_dtype"] == "auto" else r["kv_cache_dtype"]
        m = re.search(r"commit ([0-9a-f]{7,40})", r.get("run", ""))
        commit = m.group(1) if m else ""
        labels.append(f"{r['workload']}: {name} ({commit})  {r['out_tok_s']:.0f} tok/s")
        splits.append(split(r))
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(rows) + 1.8))
    for i, sp in enumerate(splits):
        left = 0.0
        for kind, part, color in PARTS:
            w = sp.get((kind, part), 0.0)
            ax.barh(i, w, left=left, color=color, edgecolor="white",
                    label=f"{kind + ': ' if kind else ''}{part}" if i == 0 else None)
            left += w
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds of the generate call (bench.py --steps: synchronized per step)")
    ax.set_title("Where the e2e time goes (H200, Llama-3.1-8B shape, dummy weights)")
    ax.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25 - 0.02 * len(rows)))
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    for lab, sp in zip(labels, splits):
        print(lab, {f"{k or ''}:{p}": round(v, 2) for (k, p), v in sp.items()})


if __name__ == "__main__":
    main()
