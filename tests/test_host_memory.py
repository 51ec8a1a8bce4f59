"""The CPU KV budget ``python -m vllm_kvmix serve`` sets when the user sets none (vllm_kvmix/host_memory.py)."""

from vllm_kvmix.host_memory import MIN_KV_BYTES, default_kv_cache_bytes, serve_args_with_kv_budget

GIB = 1 << 30


def test_the_rule(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    # available - 2 x checkpoint - 4 GiB
    assert default_kv_cache_bytes(str(tmp_path), available=20 * GIB, total=64 * GIB) == 16 * GIB - 2000
    # at most half the machine; at least 1 GiB
    assert default_kv_cache_bytes(str(tmp_path), available=20 * GIB, total=24 * GIB) == 12 * GIB
    assert default_kv_cache_bytes(str(tmp_path), available=3 * GIB, total=24 * GIB) == MIN_KV_BYTES


def test_only_on_cpu_and_only_when_the_user_sets_none(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    args, note = serve_args_with_kv_budget(["m", "--port", "1"], on_cpu=True)
    assert args[:3] == ["m", "--port", "1"] and args[3] == "--kv-cache-memory-bytes" and int(args[4]) >= MIN_KV_BYTES
    assert note.startswith("kvmix: KV cache budget")
    for user in (["m", "--gpu-memory-utilization", "0.5"], ["m", "--kv-cache-memory-bytes=1000"]):
        assert serve_args_with_kv_budget(user, on_cpu=True) == (user, None)
    assert serve_args_with_kv_budget(["m"], on_cpu=False) == (["m"], None)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    assert serve_args_with_kv_budget(["m"], on_cpu=True) == (["m"], None)
