"""Load test: ``vllm serve`` with each KV format in turn, driven by vLLM's own ``vllm bench serve``.

    python benchmarks/load/run.py [--formats auto kvmix-k4v2] [--runs 5] [--out benchmarks/results/load-cpu.json]

For each format and run: start ``python -m vllm_kvmix serve MODEL`` on 127.0.0.1 (same memory settings for
every format), wait until it answers, run ``vllm bench serve`` (random prompts generated locally, fixed seed),
sample the server's resident memory every 0.2 s, stop the server.  A row per run: wall time of the bench,
requests completed / failed, request and output throughput, TTFT / TPOT percentiles, peak RSS (largest process
and whole process tree), and whether the server died.  Runs on CPU (the default model: SmolLM2-135M) and on a
GPU machine (``--model`` a local directory, ``--server-args`` for its settings).  Server logs go to
``--logs``; the terminal shows one line per run and the table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import provenance  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeakRSS(threading.Thread):
    """Largest RSS of one process, and of the whole tree, under ``pid`` while running."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak_proc = self.peak_tree = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                self.peak_proc = max(self.peak_proc, max(rss, default=0))
                self.peak_tree = max(self.peak_tree, sum(rss))
            except psutil.Error:
                pass
            self.stop.wait(0.2)


def wait_ready(port: int, server: subprocess.Popen, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode} before answering")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"server not ready after {timeout:.0f} s")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def bench_command(args, port: int, result: Path) -> list[str]:
    return [
        sys.executable, "-m", "vllm_kvmix", "vllm", "bench", "serve",
        "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}", "--model", str(args.model),
        "--tokenizer", str(args.model), "--dataset-name", "random", "--seed", "0",
        "--random-input-len", str(args.input_len), "--random-range-ratio", str(args.range_ratio),
        "--random-output-len", str(args.output_len), "--ignore-eos",
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
        "--request-rate", "inf", "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name, "--disable-tqdm",
    ]


def one_run(args, kv_dtype: str, log: Path) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm_kvmix", "serve", str(args.model), "--host", "127.0.0.1", "--port", str(port),
           "--kv-cache-dtype", kv_dtype, "--max-num-seqs", str(args.max_num_seqs),
           "--max-model-len", str(args.max_model_len), *args.server_args]
    row = {"kv_cache_dtype": kv_dtype, "server": " ".join(cmd[1:]).replace(str(port), "PORT")}
    with open(log, "a") as logf:
        logf.write(f"\n=== {' '.join(cmd)}\n")
        logf.flush()
        server = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        peak = PeakRSS(server.pid)
        peak.start()
        try:
            wait_ready(port, server, args.start_timeout)
            with tempfile.TemporaryDirectory() as tmp:
                result = Path(tmp) / "result.json"
                t0 = time.time()
                bench = subprocess.run(bench_command(args, port, result), stdout=logf, stderr=subprocess.STDOUT)
                row["wall_s"] = round(time.time() - t0, 1)
                row["bench_rc"] = bench.returncode
                data = json.loads(result.read_text()) if result.exists() else {}
        except (RuntimeError, TimeoutError) as e:
            row["error"] = str(e)
            data = {}
        finally:
            row["server_died"] = server.poll() is not None
            peak.stop.set()
            peak.join()
            stop(server)
    row["peak_rss_proc_gib"] = round(peak.peak_proc / 2**30, 2)
    row["peak_rss_tree_gib"] = round(peak.peak_tree / 2**30, 2)
    row["completed"] = data.get("completed", 0)
    row["failed"] = args.num_prompts - row["completed"]
    for key in ("request_throughput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms",
                "p99_tpot_ms", "p50_e2el_ms", "p99_e2el_ms"):
        if key in data:
            row[key] = round(data[key], 3)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| format | run | wall s | done / failed | req/s | out tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
             "| peak RSS proc / tree GiB | server died |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(
            f"| {r['kv_cache_dtype']} | {r['run']} | {r.get('wall_s', '-')} | {r['completed']} / {r['failed']} "
            f"| {r.get('request_throughput', '-')} | {r.get('output_throughput', '-')} "
            f"| {r.get('p50_ttft_ms', '-')} / {r.get('p99_ttft_ms', '-')} "
            f"| {r.get('p50_tpot_ms', '-')} / {r.get('p99_tpot_ms', '-')} "
            f"| {r['peak_rss_proc_gib']} / {r['peak_rss_tree_gib']} | {r['server_died']} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per format over its runs: wall time mean (min-max), failures, TTFT / TPOT medians' mean, peak RSS max, and
    the wall-time and RSS ratios to the first format (the baseline, bf16 by default)."""
    import statistics

    by = {}
    for r in rows:
        by.setdefault(r["kv_cache_dtype"], []).append(r)
    base = None
    lines = ["| format | runs | wall s, mean (min-max) | vs first | failed | died | TTFT p50 ms | TPOT p50 ms "
             "| peak RSS GiB, worker (tree) | vs first |", "|---" * 10 + "|"]
    for fmt, rs in by.items():
        walls = [r["wall_s"] for r in rs if "wall_s" in r]
        wall = statistics.mean(walls) if walls else float("nan")
        rss = max(r["peak_rss_proc_gib"] for r in rs)
        tree = max(r["peak_rss_tree_gib"] for r in rs)
        if base is None:
            base = (wall, rss)
        mean = lambda k: statistics.mean(r[k] for r in rs if k in r) if any(k in r for r in rs) else float("nan")
        lines.append(
            f"| {fmt} | {len(rs)} | {wall:.1f} ({min(walls, default=0):.1f}-{max(walls, default=0):.1f}) "
            f"| {wall / base[0]:.2f}x | {sum(r['failed'] for r in rs)} | {sum(r['server_died'] for r in rs)} "
            f"| {mean('p50_ttft_ms'):.0f} | {mean('p50_tpot_ms'):.0f} | {rss} ({tree}) | {rss / base[1]:.3f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local model directory (default: SmolLM2-135M from PyPI)")
    ap.add_argument("--formats", nargs="+", default=["auto", "kvmix-k4v2"])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--range-ratio", type=float, default=0.3)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more `vllm serve` options (last)")
    ap.add_argument("--out", type=Path, help="append the rows to this JSON file")
    ap.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "kvmix-load.log")
    args = ap.parse_args(argv)
    if args.model is None:
        from vllm_kvmix.models import ensure_model

        args.model = ensure_model()
    key = provenance.key()
    print(f"server logs: {args.logs}", flush=True)
    rows = []
    for run in range(1, args.runs + 1):
        for fmt in args.formats:
            row = {**key, "run": run, **one_run(args, fmt, args.logs)}
            rows.append(row)
            print(f"{fmt} run {run}: {row.get('wall_s')} s, {row['completed']}/{args.num_prompts} done, "
                  f"peak RSS {row['peak_rss_proc_gib']} GiB, server died: {row['server_died']}", flush=True)
    print(table(rows))
    print(summary(rows))
    if args.out:
        old = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.write_text(json.dumps(old + rows, indent=1) + "\n")
    return 0 if all(r["failed"] == 0 and not r["server_died"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
