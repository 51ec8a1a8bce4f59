"""Decode time against the split-K count, one line per head size: ``head_size_bench.py --splits`` rows as a PNG.

    python benchmarks/kernels/plot_splits.py RESULT.json OUT.png [--format kvmix-k4v2]

RESULT.json: one ``head_size_bench.py`` output (``attention`` rows) or a file of several runs (``runs``, as
``benchmarks/results/decode-splits-h100.json``).  One panel per (batch, context) shape that has ``graph
splits=N`` rows; y: the graph replay's time per layer, x: the split count (log scale); the planned count is
marked with a ring, and each ``graph +KVMIX_MIN_SPLIT_PAGES=N`` build as a dashed level.
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows_of(data: dict) -> list[dict]:
    """Every ``attention`` row of the file, runs after runs; a (shape, kernel) measured twice keeps its first."""
    seen, out = set(), []
    for run in data["runs"] if "runs" in data else [data]:
        for r in run["attention"]:
            key = (r["d"], r["B"], r["L"], r.get("window", 0), r.get("plan_len"), r["kernel"])
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("result")
    ap.add_argument("png")
    ap.add_argument("--format", default="kvmix-k4v2")
    args = ap.parse_args()
    rows = [r for r in rows_of(json.load(open(args.result))) if r["kernel"].startswith(args.format + " graph")]
    swept = sorted({(r.get("window", 0), r.get("plan_len") or 0, r["L"], r["B"])
                    for r in rows if " splits=" in r["kernel"]})
    cols = min(3, len(swept))
    nrows = -(-len(swept) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(swept):]:
        ax.set_visible(False)
    for ax, (window, plan, L, B) in zip(axes.flat, swept):
        for i, d in enumerate(sorted({r["d"] for r in rows})):
            mine = [r for r in rows if r["B"] == B and r["L"] == L and r.get("window", 0) == window
                    and (r.get("plan_len") or 0) == plan and r["d"] == d]
            pts = sorted((r["splits"], 1000 * r["ms"]) for r in mine if " splits=" in r["kernel"])
            if not pts:
                continue
            color = f"C{i}"
            ax.plot(*zip(*pts), marker="o", color=color, label=f"head size {d}")
            for r in mine:
                if r["kernel"] == args.format + " graph":
                    ax.plot(r["splits"], 1000 * r["ms"], marker="o", ms=12, mfc="none", color=color)
                elif "+KVMIX_MIN_SPLIT_PAGES=" in r["kernel"]:
                    ax.axhline(1000 * r["ms"], color=color, lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("split-K count")
        ax.set_title(f"{B} x {L}" + (f", window {window}" if window else "") + (f", plan {plan}" if plan else ""),
                     fontsize=10)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("graph replay, us per layer")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{args.format} decode against the split-K count "
                 "(ring: the planned count; dashed: a page-floor build)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.png, dpi=90)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
