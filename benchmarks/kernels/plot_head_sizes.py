"""Decode speedup against context length, one line per head size: a ``head_size_bench.py`` JSON drawn as a PNG.

    python benchmarks/kernels/plot_head_sizes.py RESULT.json OUT.png [--kernel "kvmix-k4v2 graph"]

One panel per batch size in the file; y: the bf16 baseline's time over the kernel's (FA3 bf16 where the
bench found vLLM), x: context tokens (log scale).
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("result")
    ap.add_argument("png")
    ap.add_argument("--kernel", default="kvmix-k4v2 graph")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    data = json.load(open(args.result))
    rows = [r for r in data["attention"] if r["kernel"] == args.kernel]
    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4), sharey=True, squeeze=False)
    for ax, B in zip(axes[0], batches):
        for d in sorted({r["d"] for r in rows}):
            pts = sorted((r["L"], r["speedup_vs_baseline"]) for r in rows if r["B"] == B and r["d"] == d)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"head size {d}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens per sequence")
        ax.set_title(f"batch {B}")
        ax.grid(alpha=0.3)
    base = rows[0]["baseline"] if rows else ""
    axes[0][0].set_ylabel(f"{args.kernel} speedup over {base}")
    axes[0][0].legend()
    fig.suptitle(args.title or f"Decode attention, {data['device']}")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
