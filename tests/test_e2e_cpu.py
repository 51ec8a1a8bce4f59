"""End to end through vLLM on CPU with real SmolLM2-135M (and Gemma-3-270M) weights (slow).

Bounds asserted here were measured on the 2-core CPU machine (docs/results.md has the full quality tables):
k8v8 greedy output shares 24, 24, 24 and 3 (or 17, 24, 13, 3) of 24 tokens with bf16 on the 4 prompts; perplexity on 1024 tokens of
alice29.txt: bf16 20.51, k8v8 20.66 (+0.7%), k4v2 21.13-21.33 (+3.0-4.0%, by machine).
"""

import contextlib
import json
import re
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.engine, pytest.mark.slow]

from vllm_kvmix import evaluate  # noqa: E402
from vllm_kvmix.formats import BF16_BYTES, parse_format  # noqa: E402
from vllm_kvmix.staging import STAGING_SHARE, fit_slots, stage_rows  # noqa: E402

PROMPTS = evaluate.DEFAULT_PROMPTS
MAX_TOKENS = 24
# SmolLM2: 30 layers x 3 KV heads x head size 64
BF16_TOKEN_BYTES = 30 * 3 * 2 * 64 * BF16_BYTES


@pytest.fixture(scope="module")
def windows(smollm2_dir, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return evaluate.text_windows(tok, texts["alice29.txt"], 1024, 1)


@pytest.fixture(scope="module")
def results(smollm2_dir, windows):
    out = {}
    for dtype in ("auto", "kvmix-k8v8", "kvmix-k4v2"):
        out[dtype] = evaluate.run(smollm2_dir, dtype, PROMPTS, MAX_TOKENS, ppl_windows=windows)
    return out


@pytest.fixture(scope="module")
def more_formats(smollm2_dir):
    """Engines of the other formats whose KV blocks are checked (no generation needed for that)."""
    return {dtype: evaluate.run(smollm2_dir, dtype) for dtype in ("kvmix-k8v4", "kvmix-k2v4")}


def test_block_count_ratio_matches_spec(results, more_formats):
    """KV blocks = (budget - staging) // packed page bytes, on the running vLLM (whatever hook it takes the page
    size from): a page-size hook that vLLM ignores would give bf16-sized pages and ~4x fewer blocks here."""
    bf16 = results["auto"].num_blocks * results["auto"].block_size  # tokens
    for dtype, r in {**results, **more_formats}.items():
        if dtype == "auto":
            continue
        fmt = parse_format(dtype)
        token_bytes = 30 * 3 * fmt.bytes_per_token_head(64)
        page = r.block_size * token_bytes
        # page formats: the staging pages of max_num_seqs sequences (+ 1: padded rows') come out of the budget
        staging = stage_rows(evaluate.MAX_NUM_SEQS) * 30 * 3 * fmt.stage_bytes_per_seq_head(64)
        assert r.num_blocks == (evaluate.KV_BUDGET_BYTES - staging) // page, (dtype, r.num_blocks, r.block_size)
        ratio = r.num_blocks * r.block_size / bf16
        expected = BF16_TOKEN_BYTES / token_bytes * (1 - staging / evaluate.KV_BUDGET_BYTES)
        assert ratio == pytest.approx(expected, rel=0.02), ratio


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_k8v8_greedy_agrees_with_bf16(results):
    """Common prefixes with bf16 (24 tokens): [24, 24, 24, 3] on one 2-core machine, [17, 24, 13, 3] on another
    (the bf16 model's CPU matmuls round differently by instruction set, and greedy decoding amplifies near-ties).
    The bound is on the overall share and one full agreement, not on every prompt; 4-bit values (k4v2) share
    far less (test_k4v2_generates_sensible_text checks those for sense instead)."""
    agree = [
        _common_prefix(a, b)
        for a, b in zip(results["kvmix-k8v8"].completion_ids, results["auto"].completion_ids)
    ]
    assert sum(n == MAX_TOKENS for n in agree) >= 1, agree
    assert sum(agree) / (MAX_TOKENS * len(agree)) >= 0.5, agree


def test_perplexity_bounds(results):
    bf16, k8v8, k4v2 = (results[d].ppl for d in ("auto", "kvmix-k8v8", "kvmix-k4v2"))
    assert 15 < bf16 < 26, bf16  # a real model on real text
    # k8v8: +0.7% on one machine, +0.57% on another (20.627 vs 20.510)
    assert abs(k8v8 / bf16 - 1) < 0.01, (k8v8, bf16)
    # measured 21.128 vs 20.513 (+3.0%) on one 2-core machine and 21.325 vs 20.510 (+4.0%) on another: the bf16
    # model's CPU matmuls round differently by instruction set, and one 1k window amplifies it; a per-token
    # min-max k4v2 measured +53% here and k2v4 +28% over 8 windows (docs/results.md)
    assert k4v2 / bf16 < 1.05, (k4v2, bf16)


def test_k4v2_generates_sensible_text(results):
    """Greedy completions run to the token limit or stop at the model's end token: the capital prompt's may
    end early (" Paris.\n\nThe answer is: 2018-01-11." stops at 21 of 24 tokens).  Which one a run gets
    depends on how vLLM's engine-core process receives the prompts: where its first step holds one prompt and
    the other three join later, the bf16 model's CPU matmuls run other batch shapes and round differently
    (a kvmix row does not depend on its batch: test_prefix_caching_and_chunked_prefill_do_not_change_outputs).
    On the 2-core machine: 2 runs whose first step held 1 prompt gave 21 tokens, 2 whose first step held all
    4 gave 24; with the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) all 4 prompts are in
    the first step, and 4 of 4 runs gave 24."""
    r = results["kvmix-k4v2"]
    assert all(0 < len(ids) <= MAX_TOKENS for ids in r.completion_ids)
    assert sum(len(ids) == MAX_TOKENS for ids in r.completion_ids) >= len(r.completion_ids) - 1
    assert "Paris" in r.completions[0]


SHARED = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
          "it was the age of foolishness, it was the epoch of belief. ") * 6
STRESS_PROMPTS = [SHARED + tail for tail in ("The king said", "Meanwhile, the queen", "In the end,")]


def _stress_outputs(model, **kw):
    """Prompts one by one (later ones hit the shared prefix in the cache), then all at once.

    ~220-token prompts (one full shared page of 128) + 40 tokens cross into a third page while
    decoding.  fp32 model: vLLM's CPU bf16 kernels round differently for different batch
    shapes (a last-bit change can flip a quantization code); in fp32 the kvmix path is exact.
    """
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=40, temperature=0.0)
    llm = evaluate.make_llm(model, "kvmix-k4v2", max_model_len=512, dtype="float32", **kw)
    try:
        one_by_one = [llm.generate([p], params, use_tqdm=False)[0] for p in STRESS_PROMPTS]
        batched = llm.generate(STRESS_PROMPTS, params, use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in one_by_one + batched]
        metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()} if not kw.get(
            "disable_log_stats", True) else {}
        return ids, metrics
    finally:
        del llm


@pytest.fixture(scope="module")
def plain_outputs(smollm2_dir):
    return _stress_outputs(smollm2_dir, enable_prefix_caching=False)[0]


def test_prefix_caching_and_chunked_prefill_do_not_change_outputs(smollm2_dir, plain_outputs):
    """Prefix-cache hits on full pages and 64-token prefill chunks reproduce the plain run exactly."""
    cached, _ = _stress_outputs(smollm2_dir, enable_prefix_caching=True, max_num_batched_tokens=64)
    assert cached == plain_outputs


def test_preemption_does_not_corrupt_outputs(smollm2_dir, plain_outputs):
    """640 tokens of KV blocks for 3 requests that each grow from 2 to 3 pages while decoding:
    running requests are preempted and recomputed, and must produce the same tokens.  (vLLM's CPU blocks
    are 128 tokens on 0.26; from 0.32 kvmix asks for 64-token blocks.)"""
    import vllm

    from vllm_kvmix.vllm import versions

    block = 128 if versions.base_version(vllm.__version__) == "0.26.0" else 64
    preempted, metrics = _stress_outputs(
        smollm2_dir, enable_prefix_caching=False, max_num_seqs=3, num_gpu_blocks_override=640 // block,
        disable_log_stats=False,
    )
    assert metrics.get("vllm:num_preemptions", 0) > 0, metrics
    assert preempted == plain_outputs


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_result(code: str, **env) -> tuple[dict, str]:
    """Run ``code`` in a fresh interpreter (engine in-process, vLLM's INFO logs on); its ``RESULT <json>`` line."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "INFO", **env}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    logs = p.stdout + p.stderr
    assert p.returncode == 0, logs[-4000:]
    line = next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.split(" ", 1)[1]), logs


def test_kvmix_auto_plans_at_startup_under_llm(smollm2_dir):
    """kvmix-auto-b5 through LLM(...): a per-layer plan from the loaded weights, logged as a table;
    KV blocks exactly those of k8v2 (same bytes); sensible greedy text.  In a child process with
    the engine in-process (so the plan can be read back) and vLLM's INFO logs on."""
    code = (
        "import json\n"
        "from vllm_kvmix import evaluate\n"
        "from vllm_kvmix.vllm import autoplan\n"
        f"r = evaluate.run({smollm2_dir!r}, 'kvmix-auto-b5', ['The capital of France is'], 12)\n"
        "print('RESULT', json.dumps(dict(plan=autoplan.LAST_PLAN, blocks=r.num_blocks, "
        "block_size=r.block_size, text=r.completions[0])))\n"
    )
    res, logs = _child_result(code)
    assert "kvmix: kvmix-auto-b5: 5 bits/element on average over K and V, 30 layers, per-layer page sizes" in logs
    assert logs.count("self_attn.attn |") == 30
    formats = {f"k{k}v{v}" for _, k, v in res["plan"]}
    assert formats == {"k8v4", "k4v4"} and len(res["plan"]) == 30  # keys to 8 bits in half the layers
    k8v2 = parse_format("kvmix-k8v2")
    staging = stage_rows(evaluate.MAX_NUM_SEQS) * 30 * 3 * k8v2.stage_bytes_per_seq_head(64)
    page = res["block_size"] * 30 * 3 * k8v2.bytes_per_token_head(64)
    assert res["blocks"] == (evaluate.KV_BUDGET_BYTES - staging) // page
    assert "Paris" in res["text"]


def test_default_max_num_seqs_is_fitted_to_the_staging_and_engines_follow_one_another(smollm2_dir):
    """With vLLM's default max_num_seqs and a small KV budget, the engine runs only the sequences whose staging
    fits in 1/16 of the budget, so k4v2 keeps >= 4x bf16's tokens; more prompts than that all complete.  A second
    engine in the same process starts with every staging slot free (the first engine's last finished requests
    are never reported to it).  In a child process with the engine in-process and vLLM's INFO logs on."""
    code = (
        "import gc, json\n"
        "from vllm import SamplingParams\n"
        "from vllm_kvmix import evaluate\n"
        "runs = []\n"
        "for _ in range(2):\n"
        f"    llm = evaluate.make_llm({smollm2_dir!r}, 'kvmix-k4v2', max_num_seqs=None, max_model_len=1024,\n"
        "                            kv_cache_memory_bytes=64 << 20)\n"
        "    cfg = llm.llm_engine.vllm_config\n"
        "    outs = llm.generate(evaluate.DEFAULT_PROMPTS * 3, SamplingParams(max_tokens=12, temperature=0),\n"
        "                        use_tqdm=False)\n"
        "    runs.append(dict(seqs=cfg.scheduler_config.max_num_seqs, blocks=cfg.cache_config.num_gpu_blocks,\n"
        "                     block_size=cfg.cache_config.block_size, texts=[o.outputs[0].text for o in outs]))\n"
        "    del llm; gc.collect()\n"
        "print('RESULT', json.dumps(runs))\n"
    )
    runs, logs = _child_result(code)
    m = re.search(r"kvmix: max_num_seqs (\d+) \(vLLM's default\) -> (\d+):", logs)
    assert m, logs[-4000:]
    default, seqs = int(m.group(1)), int(m.group(2))
    fmt = parse_format("kvmix-k4v2")
    slot = 30 * 3 * fmt.stage_bytes_per_seq_head(64)
    budget = 64 << 20
    assert seqs == fit_slots(default, budget, slot) < default
    assert stage_rows(seqs) * slot <= budget / STAGING_SHARE
    for run in runs:
        assert run["seqs"] == seqs  # the scheduler runs at most that many
        page = run["block_size"] * 30 * 3 * fmt.bytes_per_token_head(64)
        assert run["blocks"] == (budget - stage_rows(seqs) * slot) // page
        assert run["blocks"] * run["block_size"] >= 4.0 * budget / BF16_TOKEN_BYTES  # >= 4x bf16's tokens
        assert len(run["texts"]) == 3 * len(PROMPTS) and all(t.strip() for t in run["texts"])
        assert "Paris" in run["texts"][0]
    assert runs[1]["texts"] == runs[0]["texts"]


@pytest.mark.parametrize("dtype", ["kvmix-k4v2", "kvmix-auto"])
def test_vllm_serve_answers_completions_and_chat(smollm2_dir, tmp_path, dtype):
    import requests

    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_kvmix", "serve", smollm2_dir, "--host", "127.0.0.1",
         "--port", str(port), "--kv-cache-dtype", dtype, "--enforce-eager",
         "--max-model-len", "1024", "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "8",
         "--served-model-name", "smollm2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        else:
            pytest.fail("server did not come up in 300 s")
        r = requests.post(base + "/v1/completions", json={
            "model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
        }, timeout=120)
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["text"]
        r = requests.post(base + "/v1/chat/completions", json={
            "model": "smollm2", "messages": [{"role": "user", "content": "Name a color."}],
            "max_tokens": 16, "temperature": 0,
        }, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip()
        logs = (tmp_path / "serve.log").read_text()
        if dtype == "kvmix-auto":  # the startup hook ran in the server's engine; b3 = the k4v2 floors
            assert "kvmix: kvmix-auto: 3 bits/element on average over K and V, 30 layers" in logs
            assert logs.count("self_attn.attn |") == 30
        assert "kvmix: kvmix-k4v2 on 30 layers: 3.50 bits/element, 5040 bytes/token" in logs
        assert "kvmix: staging: 8 + 1 slots (max_num_seqs + padding) per layer x 64 tokens at 8 bits = 7.3 MiB" in logs
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_bad_names_fail_with_choices(smollm2_dir):
    from vllm_kvmix.formats import KVFormatError

    with pytest.raises(KVFormatError, match="Valid kvmix formats"):
        evaluate.make_llm(smollm2_dir, "kvmix-k4v2-tok")
    p = subprocess.run(
        [sys.executable, "-m", "vllm_kvmix", "serve", smollm2_dir, "--kv-cache-dtype", "kvmix-k5v2"],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 2
    assert "invalid choice: 'kvmix-k5v2'" in p.stderr and "kvmix-k4v2" in p.stderr


def test_bf16_is_unchanged_by_the_plugin(smollm2_dir):
    """vLLM's own bf16 cache with the plugin installed gives the same greedy tokens and KV blocks as with every
    plugin off (``VLLM_PLUGINS=""``: an allowlist naming none), on the CPU platform our platform plugin wraps."""
    code = (
        "import json\n"
        "from vllm.platforms import current_platform\n"
        "from vllm_kvmix import evaluate\n"
        f"r = evaluate.run({smollm2_dir!r}, 'auto', evaluate.DEFAULT_PROMPTS, 16)\n"
        "print('RESULT', json.dumps(dict(ids=r.completion_ids, blocks=r.num_blocks, "
        "platform=type(current_platform).__name__)))\n"
    )
    with_plugin, _ = _child_result(code)
    without, logs = _child_result(code, VLLM_PLUGINS="")
    assert with_plugin["platform"] == "KvmixCpuPlatform" and without["platform"] == "CpuPlatform"
    assert "Platform plugin kvmix is activated" not in logs and "kvmix:" not in logs  # listed, never loaded
    assert with_plugin["ids"] == without["ids"] and with_plugin["blocks"] == without["blocks"]


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_inspect_shows_the_plan_the_engine_uses(model):
    """``kvmix inspect`` (safetensors on disk, no vLLM) and the engine's kvmix-auto plan (weights as vLLM loaded
    them) agree layer for layer at b3 and b5, and at b5 with vLLM's hybrid KV-cache manager disabled (on
    Gemma-3's sliding-window layers that is what allows per-layer page sizes)."""
    from vllm_kvmix import inspect_model, models

    path = str(models.ensure_model(model))
    code = (
        "import json\n"
        "from vllm_kvmix import evaluate\n"
        "from vllm_kvmix.vllm import autoplan\n"
        "plans = {}\n"
        "for b, nohybrid in ((3, False), (5, False), (5, True)):\n"
        f"    evaluate.run({path!r}, f'kvmix-auto-b{{b}}', ['Hello'], 2, disable_hybrid_kv_cache_manager=nohybrid)\n"
        "    plans[f'{b}{nohybrid}'] = [[k, v] for _, k, v in autoplan.LAST_PLAN]\n"
        "print('RESULT', json.dumps(plans))\n"
    )
    engine, _ = _child_result(code)
    norms, shape = inspect_model.read_norms(path)
    for b, nohybrid in ((3, False), (5, False), (5, True)):
        assert [list(p) for p in inspect_model.plan(norms, shape, b, nohybrid)] == engine[f"{b}{nohybrid}"], b
    assert len(set(map(tuple, engine["5True"]))) > 1  # b5 is a real per-layer plan, not one format everywhere
    if model == "gemma3-270m":  # hybrid manager on: one page size, the K-first pair of 5 bits on every layer
        assert set(map(tuple, engine["5False"])) == {(8, 2)}


TP_CHILD = """
import json, re, sys

def main():
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], tensor_parallel_size=int(sys.argv[2]), dtype="float32", kv_cache_dtype="kvmix-auto",
              max_model_len=512, kv_cache_memory_bytes=64 << 20, enforce_eager=True, max_num_seqs=4, seed=0)
    prompts = ["The capital of France is", "def fibonacci(n):", "The three primary colors are", "Once upon a time"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    print("RESULT", json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)

if __name__ == "__main__":
    main()
"""


def _file_logging(path) -> dict:
    """A ``VLLM_LOGGING_CONFIG_PATH`` config: vLLM's records at INFO into ``path`` as ``<pid> <message>`` lines."""
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"pid": {"format": "%(process)d %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(path), "formatter": "pid",
                              "level": "INFO"}},
        "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}},
    }


def test_tensor_parallel_ranks_plan_alike_and_match_one_rank(tmp_path):
    """``--tensor-parallel-size 2`` on the CPU engine (one core per rank) with kvmix-auto on Gemma-3-270M (1 KV
    head, replicated on both ranks), fp32: both ranks log the plan TP=1 logs, the KV cache gets the same blocks,
    and greedy outputs follow TP=1's.  Not bit for bit everywhere: from layer 1 on, vLLM's all-reduce of the
    row-parallel output projection sums in another order, so K and V differ from TP=1 in the last bits (in
    both runs of vLLM's own cache too); kvmix's attention of equal inputs is equal on both (layer 0), but a
    value on a code boundary can take the other code.  Measured: 24, 24, 9 and 24 of 24 tokens equal."""
    from vllm_kvmix import models

    model = str(models.ensure_model("gemma3-270m"))
    script = tmp_path / "tp.py"
    script.write_text(TP_CHILD)
    runs = {}
    for tp in (1, 2):
        # each process's log records as whole lines in a file of its own lines, keyed by pid: several processes
        # writing one pipe through block-buffered stdout can cut a line in two and attribute its half to another
        record = tmp_path / f"tp{tp}.records"
        config = tmp_path / f"tp{tp}.logging.json"
        config.write_text(json.dumps(_file_logging(record)))
        env = {**os.environ, "VLLM_LOGGING_LEVEL": "INFO", "VLLM_CPU_OMP_THREADS_BIND": "0|1",
               "VLLM_LOGGING_CONFIG_PATH": str(config)}
        p = subprocess.run([sys.executable, str(script), model, str(tp)], capture_output=True, text=True,
                           timeout=900, env=env)
        (tmp_path / f"tp{tp}.log").write_text(p.stdout + p.stderr)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        ids = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT ")).split(" ", 1)[1])
        plans, blocks = {}, []
        for line in record.read_text().splitlines():
            pid, _, msg = line.partition(" ")
            if re.match(r"kvmix: model\.layers\.\d+\.\S+ \|", msg):
                plans.setdefault(pid, []).append(msg)
            blocks += re.findall(r"kvmix: KV cache (\d+) blocks", msg)
        runs[tp] = (ids, plans, blocks)
    ids1, plans1, blocks1 = runs[1]
    ids2, plans2, blocks2 = runs[2]
    assert len(plans1) == 1 and len(plans2) == 2, (plans1.keys(), plans2.keys())
    (plan1,) = plans1.values()
    assert len(plan1) == 18 and all(p == plan1 for p in plans2.values()), {
        pid: sorted(set(p) ^ set(plan1)) for pid, p in plans2.items()}
    assert blocks1 and blocks1[-1] == blocks2[-1]
    same = [sum(a == b for a, b in zip(x, y)) for x, y in zip(ids1, ids2)]
    assert all(x[0] == y[0] for x, y in zip(ids1, ids2)) and sum(s == 24 for s in same) >= 2, same
