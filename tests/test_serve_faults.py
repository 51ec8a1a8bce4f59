"""Faults through ``vllm serve`` on CPU (SmolLM2-135M, kvmix-k4v2): clients that disconnect, requests aborted
while running, while waiting in the queue and while preempted.  Afterwards every staging slot is free again and
greedy outputs equal those from before (slow)."""

import re
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.engine, pytest.mark.slow]

from serving import Server  # noqa: E402

MAX_NUM_SEQS = 4
PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three primary colors are",
           "Alice was beginning to get very tired of sitting by her sister on the bank, and"]
# 12 MiB: after the staging slots, ~25 pages of 64 tokens -- four 550-token requests do not fit, so long
# generations get preempted
KV_BYTES = 12 << 20
LONG_PROMPT = " ".join(f"Item {i} is a word." for i in range(50))


def _stream(server, prompt: str, max_tokens: int, stop_when, got_token: threading.Event | None = None) -> None:
    """A streaming completion whose client disconnects once ``stop_when()`` holds (checked between chunks and
    every 0.1 s while no chunk comes)."""
    import requests

    r = requests.post(server.base + "/v1/completions", stream=True, timeout=300, json={
        "model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    done = threading.Event()

    def watch():
        while not done.is_set():
            if stop_when():
                r.close()  # the disconnect: vLLM aborts the request
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for line in r.iter_lines():
            if line.startswith(b"data: {") and got_token is not None:
                got_token.set()
    except Exception:  # noqa: BLE001 -- the connection closed under the reader: the point of the test
        pass
    finally:
        done.set()


def _slots_in_use(logs: str) -> list[int]:
    return [int(n) for n in re.findall(r"kvmix: staging slots in use: (\d+) of", logs)]


def test_aborted_requests_free_their_slots_and_change_no_output(smollm2_dir, tmp_path):
    with Server(smollm2_dir, tmp_path / "serve.log", "--kv-cache-dtype", "kvmix-k4v2", "--enforce-eager",
                "--max-model-len", "1024", "--max-num-seqs", str(MAX_NUM_SEQS),
                "--kv-cache-memory-bytes", str(KV_BYTES), env={"VLLM_LOGGING_LEVEL": "DEBUG"}) as server:
        # one at a time: a batch's composition changes the model's own matmul rounding (bf16 too), and a
        # quantized cache can turn a last-bit difference into another code
        before = [server.complete(p, 24) for p in PROMPTS]

        # 3 x max_num_seqs streams: max_num_seqs run (and hold every seat), the others wait in the queue; the
        # waiting ones disconnect first, then the running ones, each after its first token
        stop_waiting, stop_running = threading.Event(), threading.Event()
        got = [threading.Event() for _ in range(3 * MAX_NUM_SEQS)]

        def streams(idx, stop):
            return [threading.Thread(target=_stream, args=(server, f"Story {i}: once upon a time", 900, stop.is_set,
                                                           got[i])) for i in idx]

        running = streams(range(MAX_NUM_SEQS), stop_running)
        for t in running:
            t.start()
        assert all(e.wait(120) for e in got[:MAX_NUM_SEQS]), "the running streams got no token"
        waiting = streams(range(MAX_NUM_SEQS, 3 * MAX_NUM_SEQS), stop_waiting)
        for t in waiting:
            t.start()
        time.sleep(2)
        assert not any(e.is_set() for e in got[MAX_NUM_SEQS:]), "a queued stream got a token: not waiting"
        stop_waiting.set()
        for t in waiting:
            t.join(120)
        stop_running.set()
        for t in running:
            t.join(120)

        # long generations that outgrow the KV cache: disconnect once the server has preempted one of them (or
        # after 240 s of this phase, counted from its own start: the phases before it take longer on a loaded
        # machine, and a deadline shared with them ran out before any preemption)
        preempted0 = server.metric("vllm:num_preemptions_total")
        t_long = time.time()
        threads = [threading.Thread(target=_stream, args=(
            server, f"{LONG_PROMPT} {i}", 500,
            lambda: server.metric("vllm:num_preemptions_total") > preempted0 or time.time() - t_long > 240))
            for i in range(MAX_NUM_SEQS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert server.metric("vllm:num_preemptions_total") > preempted0, "no request was preempted"

        together = _concurrently(lambda p: server.complete(p, 24), PROMPTS)  # max_num_seqs at once: all complete
        assert all(together)
        after = [server.complete(p, 24) for p in PROMPTS]
        assert after == before
        time.sleep(2)  # the step after the last one tells the worker the requests finished
        logs = server.logs()
    slots = _slots_in_use(logs)
    assert slots and max(slots) <= MAX_NUM_SEQS, slots
    assert slots[-1] == 0, f"staging slots still held after every request ended: {slots[-5:]}"


def _concurrently(fn, items):
    out = [None] * len(items)

    def run(i):
        out[i] = fn(items[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out



@pytest.mark.parametrize("args, expect", [
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}'],
     ["--kv-cache-dtype kvmix-k4v2: speculative decoding is not supported", "Remove --speculative-config"]),
    (["--max-num-seqs", "256", "--kv-cache-memory-bytes", str(16 << 20)],
     ["staging pages of --max-num-seqs 256 running sequences need", "Lower --max-num-seqs (at most 17 here)"]),
    # vLLM's own check, with kvmix's page sizes: 20 MiB of pages hold ~4k tokens
    (["--max-model-len", "8192", "--max-num-seqs", "4", "--kv-cache-memory-bytes", str(24 << 20)],
     ["max seq len (8192)", "the estimated maximum model length is"]),
])
def test_bad_configurations_stop_at_startup_with_cause_and_fix(smollm2_dir, args, expect):
    p = subprocess.run([sys.executable, "-m", "vllm_kvmix", "serve", smollm2_dir, "--kv-cache-dtype", "kvmix-k4v2",
                        "--enforce-eager", *args], capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    for line in expect:
        assert line in out, out[-3000:]
