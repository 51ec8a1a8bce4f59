"""Faults through ``vllm serve`` on CPU (SmolLM2-135M, kvmix-k4v2): clients that disconnect, requests aborted
while running, while waiting in the queue and while preempted.  Afterwards every staging slot is free again and
greedy outputs equal those from before (slow)."""

import re
import threading
import time

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.engine, pytest.mark.slow]

from serving import Server  # noqa: E402

MAX_NUM_SEQS = 4
PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three primary colors are",
           "Alice was beginning to get very tired of sitting by her sister on the bank, and"]
# 12 MiB: after the staging slots, ~27 pages of 64 tokens -- four 550-token requests do not fit, so long
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
        before = _concurrently(lambda p: server.complete(p, 24), PROMPTS)

        # 3 x max_num_seqs streams at once: the first ones disconnect after their first token, the queued ones
        # while they are still waiting (1.5 s)
        t0 = time.time()
        first = [threading.Event() for _ in range(3 * MAX_NUM_SEQS)]
        threads = [threading.Thread(target=_stream, args=(server, f"Story {i}: once upon a time", 200,
                                                          lambda e=e: e.is_set() or time.time() - t0 > 1.5, e))
                   for i, e in enumerate(first)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        started = sum(e.is_set() for e in first)
        assert 0 < started < 3 * MAX_NUM_SEQS, f"{started} of {3 * MAX_NUM_SEQS} streams got a token"

        # long generations that outgrow the KV cache: disconnect once the server has preempted one of them
        preempted0 = server.metric("vllm:num_preemptions_total")
        threads = [threading.Thread(target=_stream, args=(
            server, f"{LONG_PROMPT} {i}", 500,
            lambda: server.metric("vllm:num_preemptions_total") > preempted0 or time.time() - t0 > 240))
            for i in range(MAX_NUM_SEQS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert server.metric("vllm:num_preemptions_total") > preempted0, "no request was preempted"

        after = _concurrently(lambda p: server.complete(p, 24), PROMPTS)
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

