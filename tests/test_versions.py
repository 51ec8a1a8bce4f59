"""The vLLM 0.26 internals kvmix patches (vllm_kvmix.vllm.versions): fail here first if vLLM changes under us."""

import inspect
import subprocess
import sys
import typing

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm_kvmix.formats import KVFormatError, all_format_names  # noqa: E402
from vllm_kvmix.vllm import flash_prefill, versions  # noqa: E402

pytestmark = pytest.mark.skipif(not versions.supported(), reason="kvmix has no adaptation for this vLLM")
# patches of vLLM internals per version module (a new one, or one an upstream hook replaced, changes this on purpose)
EXPECTED_PATCHES = {"v0_26": 9, "v0_32": 10, "v0_33": 9, "v0_34": 9}
ON = versions.base_version(vllm.__version__)
only_026 = pytest.mark.skipif(ON != "0.26.0", reason="a vLLM 0.26 target")
only_032 = pytest.mark.skipif(ON != "0.32.0", reason="a vLLM 0.32 target")
only_034 = pytest.mark.skipif(ON != "0.34.0", reason="a vLLM 0.34 target")
REGISTRY = pytest.mark.skipif(ON not in ("0.33.0", "0.34.0"), reason="vLLM's dtype registry (0.33+)")
CUDA_WHEEL = ON in ("0.33.0", "0.34.0")  # vLLM's CUDA wheel on a CPU machine: no platform detected
# vLLM's own dtype registry (0.33+) or kvmix's patch of the CacheDType Literal (0.26, 0.32)
LITERAL = ON in ("0.26.0", "0.32.0")


def make_spec(fmt_name: str, sliding_window: int | None = None, **common):
    """A kvmix layer's KV-cache spec, made the way the running vLLM makes it: 0.26 builds kvmix's spec in the
    patched ``Attention.get_kv_cache_spec``; 0.32 passes vLLM's plain spec through the backend's
    ``customize_spec`` (the official hook)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from vllm_kvmix.formats import parse_format
    from vllm_kvmix.vllm.backend import backend_class
    from vllm_kvmix.vllm.spec import KvmixFullAttentionSpec, KvmixSlidingWindowSpec

    window = {} if sliding_window is None else {"sliding_window": sliding_window}
    if ON == "0.26.0":
        cls = KvmixSlidingWindowSpec if window else KvmixFullAttentionSpec
        return cls(kvmix_format=fmt_name, dtype=torch.uint8, **window, **common)
    base = (SlidingWindowSpec if window else FullAttentionSpec)(dtype=torch.bfloat16, **window, **common)
    return backend_class(parse_format(fmt_name)).customize_spec(base)


@pytest.fixture(scope="module", autouse=True)
def patched():
    assert versions.apply()
    assert versions.apply()  # idempotent


def test_vllm_version_supported():
    assert versions.base_version(vllm.__version__) in versions.SUPPORTED
    assert versions.base_version("0.26.0+cpu") == "0.26.0"
    assert versions.select("0.25.0") is None and versions.select("0.99.1") is None


def test_every_patch_is_listed_with_its_upstream_hook():
    """One list per version module: what each patch touches and the upstream hook that replaces it; each patch
    documents what it replaces and why, and is idempotent (applied twice by the fixture)."""
    module = versions.check_supported()
    assert module.VERSIONS == tuple(v for v, m in versions.MODULES.items() if m == module.__name__.rsplit(".", 1)[1])
    assert len(module.PATCHES) == EXPECTED_PATCHES[module.__name__.rsplit(".", 1)[1]]
    for patch, target, hook in module.PATCHES:
        assert target and hook, patch.__name__
        assert patch.__doc__ and len(patch.__doc__) > 80, patch.__name__


def test_unsupported_vllm_leaves_vllm_unchanged():
    """On a vLLM release kvmix does not support, loading the plugins warns once and patches nothing: the
    platform is vLLM's own, kvmix names are not accepted, Attention's spec method is vLLM's."""
    code = """
import sys, types, typing
sys.modules["vllm._version"] = types.SimpleNamespace(__version__="0.99.0", __version_tuple__=(0, 99, 0))
import vllm
assert vllm.__version__ == "0.99.0"
from vllm.plugins import load_general_plugins
load_general_plugins()
load_general_plugins()
from vllm.config.cache import CacheDType
from vllm.model_executor.layers.attention.attention import Attention
from vllm.platforms import current_platform
from vllm_kvmix.vllm import platform_plugin
assert "kvmix-k4v2" not in typing.get_args(CacheDType)
assert not getattr(Attention.get_kv_cache_spec, "_kvmix_patched", False)
assert type(current_platform).__module__.startswith("vllm.platforms"), type(current_platform)
assert platform_plugin() is None
print("INERT", type(current_platform).__name__)
"""
    env = {"VLLM_LOGGING_LEVEL": "INFO", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "INERT " in res.stdout and "INERT Kvmix" not in res.stdout  # vLLM's own platform (CPU, or none)
    warnings = [line for line in res.stdout.splitlines() if "vllm-kvmix supports vLLM" in line]
    assert len(warnings) == 1, res.stdout[-3000:]
    assert "found vLLM 0.99.0" in warnings[0] and "0.26.0" in warnings[0]


@only_026
def test_targets_have_expected_shape():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backend import AttentionBackend, AttentionImpl
    from vllm.v1.attention.selector import AttentionSelectorConfig
    from vllm.v1.engine import core
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    assert list(inspect.signature(Attention.get_kv_cache_spec).parameters) == ["self", "vllm_config"]
    assert list(inspect.signature(core.get_kv_cache_configs).parameters) == [
        "vllm_config", "kv_cache_specs", "available_memory",
    ]
    assert "kv_cache_dtype" in AttentionSelectorConfig._fields
    assert list(inspect.signature(AttentionBackend.get_kv_cache_shape).parameters) == [
        "num_blocks", "block_size", "num_kv_heads", "head_size", "cache_dtype_str",
    ]
    assert "do_kv_cache_update" not in AttentionImpl.__dict__  # we provide it ourselves
    assert "real_page_size_bytes" in FullAttentionSpec.__dict__
    assert "real_page_size_bytes" in SlidingWindowSpec.__dict__
    assert hasattr(EngineArgs, "create_engine_config")


@pytest.mark.skipif(not LITERAL, reason="vLLM validates registered dtypes itself")
def test_literal_extended_and_validated():
    from vllm.config.cache import CacheConfig, CacheDType

    args = typing.get_args(CacheDType)
    assert "fp8" in args and all(n in args for n in all_format_names())
    assert CacheConfig(cache_dtype="kvmix-k4v2").cache_dtype == "kvmix-k4v2"
    with pytest.raises(Exception):
        CacheConfig(cache_dtype="kvmix-k5v2")


@pytest.mark.skipif(not LITERAL, reason="vLLM validates registered dtypes itself")
def test_cli_choices_include_kvmix():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    assert parser.parse_args(["--kv-cache-dtype", "kvmix-k4v2"]).kv_cache_dtype == "kvmix-k4v2"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "kvmix-k5v2"])


def test_str_dtype_map():
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    assert STR_DTYPE_TO_TORCH_DTYPE["kvmix-auto-b5"] is torch.uint8
    assert STR_DTYPE_TO_TORCH_DTYPE["kvmix-k4v2"] is torch.uint8
    assert STR_DTYPE_TO_TORCH_DTYPE["fp8"] is torch.uint8 and STR_DTYPE_TO_TORCH_DTYPE["bfloat16"] is torch.bfloat16


def test_engine_args_reject_bad_name_with_choices():
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(KVFormatError, match="Valid kvmix formats are kvmix-k.*kvmix-auto"):
        EngineArgs(model="unused", kv_cache_dtype="kvmix-k5v2").create_engine_config()


def test_platform_dispatch():
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from vllm_kvmix.vllm import platform_plugin
    from vllm_kvmix.vllm.platform import KvmixCpuPlatform

    if not CUDA_WHEEL:  # 0.33 / 0.34 are vLLM's CUDA wheel here: with no GPU vLLM detects no platform at all
        assert platform_plugin() == "vllm_kvmix.vllm.platform.KvmixCpuPlatform"
        from vllm.platforms import current_platform

        assert isinstance(current_platform, KvmixCpuPlatform)

    def cfg(dtype):
        return AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype=dtype, block_size=None)

    path = KvmixCpuPlatform.get_attn_backend_cls(None, cfg("kvmix-k2v8"))
    assert path == "vllm_kvmix.vllm.backend.KvmixAttentionBackend_k2v8"
    assert KvmixCpuPlatform.get_attn_backend_cls(None, cfg("auto")).endswith("CPUAttentionBackend")
    if ON != "0.26.0":  # vLLM's own CpuPlatform answers kvmix too (platform plugins skipped with VLLM_TARGET_DEVICE=cpu)
        from vllm.platforms.cpu import CpuPlatform

        assert CpuPlatform.get_attn_backend_cls(None, cfg("kvmix-k4v2")).endswith("KvmixAttentionBackend_k4v2")
        assert CpuPlatform.get_attn_backend_cls(None, cfg("auto")).endswith("CPUAttentionBackend")


def test_backend_classes_resolve_by_name():
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    cls = resolve_obj_by_qualname("vllm_kvmix.vllm.backend.KvmixAttentionBackend_k4v2")
    assert cls.FORMAT.name == "kvmix-k4v2"
    if ON == "0.26.0":  # 0.26 asks the backend for the cache shape; 0.32 takes it from the spec and layout
        assert cls.get_kv_cache_shape(10, 64, 3, 64) == (10, 3, 64 * 56)  # 64-token pages
    assert cls.get_supported_kernel_block_sizes() == [64]
    assert cls.forward_includes_kv_cache_update  # writes and attends in one call (staging)
    assert AttentionBackendEnum[cls.get_name()] is AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum.CUSTOM.get_path().startswith("vllm_kvmix")


def test_specs_page_size_and_grouping():
    """The page vLLM allocates is the packed page (the bug of a page-size hook the running vLLM ignores would
    show here: 0.32 ignores 0.26's ``real_page_size_bytes`` and would allocate bf16-sized pages)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_kvmix.vllm.spec import KvmixFullAttentionSpec, KvmixSlidingWindowSpec

    common = dict(block_size=128, num_kv_heads=3, head_size=64)
    full = make_spec("kvmix-k4v2", **common)
    assert isinstance(full, KvmixFullAttentionSpec) and full.dtype == torch.uint8
    assert full.page_size_bytes == 128 * 3 * 56
    assert KvmixFullAttentionSpec.merge([full, full]) == full
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(full) is FullAttentionSpec
    sw = make_spec("kvmix-k8v4", sliding_window=512, **common)
    assert isinstance(sw, KvmixSlidingWindowSpec)
    assert sw.page_size_bytes == 128 * 3 * (68 + 36)
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(sw) is SlidingWindowSpec
    # vLLM reads an AssertionError from merge as "not one spec" (kv_cache_utils.is_kv_cache_spec_uniform)
    with pytest.raises(AssertionError, match="mix kvmix page formats"):
        KvmixFullAttentionSpec.merge([full, make_spec("kvmix-k8v8", **common)])


def test_group_window_only_for_groups_of_sliding_window_layers():
    """The window split-K plans divide (``spec.group_window``): a sliding-window group's, none for a full-attention
    group, for a full-attention spec that carries a window (the hybrid manager off: such a group also holds
    full-attention layers) or for per-layer specs of which one attends its whole context."""
    from types import SimpleNamespace

    from vllm_kvmix.vllm.spec import KvmixFullAttentionSpec, group_head_size, group_window

    common = dict(block_size=64, num_kv_heads=3, head_size=64)
    sw, sw2, full = (make_spec("kvmix-k4v2", sliding_window=512, **common),
                     make_spec("kvmix-k4v2", sliding_window=1024, **common), make_spec("kvmix-k4v2", **common))
    assert group_window(sw) == 512 and group_window(full) is None
    unified = KvmixFullAttentionSpec(kvmix_format="kvmix-k4v2", dtype=torch.uint8, sliding_window=512, **common)
    assert group_window(unified) is None
    assert group_window(SimpleNamespace(kv_cache_specs={"a": sw, "b": sw2})) == 1024
    assert group_window(SimpleNamespace(kv_cache_specs={"a": sw, "b": full})) is None
    # and the head size its split-K plan counts programs by: the largest of the group's
    wide = make_spec("kvmix-k4v2", **dict(common, head_size=256))
    assert group_head_size(full) == 64 and group_head_size(SimpleNamespace(kv_cache_specs={"a": sw, "b": wide})) == 256


@pytest.mark.skipif(CUDA_WHEEL, reason="0.33+: the builder is not built without a detected platform here")
def test_builder_plans_decode_splits_over_its_groups_window(monkeypatch):
    """The metadata builder of a sliding-window group hands its window to the decode plan (a CUDA-graph decode
    batch: the plan the GPU path builds, here on CPU buffers), so split-K divides the window's pages: 17 for a
    1024-token window with the model's 8464 tokens, at least 2 a split; 133 for a full-attention group, at least 4;
    both in waves of 2 programs an SM, the group's head size being 256."""
    from types import SimpleNamespace

    from vllm_kvmix.kernels import page, splitk
    from vllm_kvmix.staging import StagingSlots
    from vllm_kvmix.vllm import backend

    monkeypatch.setattr(backend, "refuse_unsupported", lambda *a: None)
    monkeypatch.setattr(backend, "SLOTS", StagingSlots())  # this process's table stays the engines' own
    seen = []
    monkeypatch.setattr(splitk, "num_splits_for",
                        lambda programs, pages, device, floor, per_sm: seen.append((pages, floor, per_sm)) or 1)
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=4), model_config=SimpleNamespace(
        max_model_len=8464))
    common = dict(block_size=64, num_kv_heads=4, head_size=256)
    n = 2
    m = SimpleNamespace(causal=True, num_reqs=n, query_start_loc_cpu=torch.arange(n + 1, dtype=torch.int32),
                        query_start_loc=torch.arange(n + 1, dtype=torch.int32),
                        seq_lens=torch.tensor([9000, 40], dtype=torch.int32), max_query_len=1, num_actual_tokens=n,
                        max_seq_len=9000, block_table_tensor=None, slot_mapping=None)
    for spec, pages in ((make_spec("kvmix-k4v2", sliding_window=1024, **common), (17, 2, 2)),
                        (make_spec("kvmix-k4v2", **common), (133, 4, 2))):
        builder = backend.KvmixMetadataBuilder(spec, ["l0"], cfg, torch.device("cpu"))
        builder.heads = (8, 4)  # the GPU path's planning, on CPU tensors
        builder._decode_bufs = page.DecodeBuffers(4, 4, "cpu")
        seen.clear()
        assert builder.build_for_cudagraph_capture(m).page_plan is not None
        assert seen == [pages]


@pytest.mark.skipif(CUDA_WHEEL, reason="0.33+ plan groups elsewhere (kv_cache_planning); no engines on 0.33 / 0.34 here")
def test_per_layer_page_sizes_make_one_group():
    """kvmix-auto var mode: full-attention layers with different page formats -> one KV-cache group
    of per-layer specs (UniformTypeKVCacheSpecs); even mode: equal specs whatever the layer format."""
    from types import SimpleNamespace

    from vllm.v1.core.kv_cache_utils import get_kv_cache_groups, is_kv_cache_spec_uniform
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    from vllm_kvmix.vllm.spec import KvmixFullAttentionSpec

    common = dict(block_size=64, num_kv_heads=3, head_size=64)
    specs = {f"l{i}": make_spec(f, **common) for i, f in enumerate(["kvmix-k8v4", "kvmix-k4v4", "kvmix-k4v2"])}
    assert not is_kv_cache_spec_uniform(specs)
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=False))
    (group,) = get_kv_cache_groups(cfg, specs)
    assert isinstance(group.kv_cache_spec, UniformTypeKVCacheSpecs)
    assert group.kv_cache_spec.page_size_bytes == sum(s.page_size_bytes for s in specs.values())
    a = KvmixFullAttentionSpec(kvmix_format="kvmix-k4v2", kvmix_layer_format="kvmix-k2v4", dtype=torch.uint8, **common)
    b = KvmixFullAttentionSpec(kvmix_format="kvmix-k4v2", dtype=torch.uint8, **common)
    assert a == b and hash(a) == hash(b)  # the layer format is for logs only


def test_v2_runner_patch_targets():
    """CUDA's default model runner in 0.26 (vllm/v1/worker/gpu): where rows and releases come from."""
    from vllm.v1.worker.gpu import model_runner as v2
    from vllm.v1.worker.gpu.input_batch import InputBatch

    runner = v2.GPUModelRunner
    assert runner.prepare_inputs._kvmix_patched and runner.finish_requests._kvmix_patched
    assert runner.get_kv_cache_spec._kvmix_patched
    assert list(inspect.signature(runner.finish_requests).parameters) == ["self", "scheduler_output"]
    assert {"req_ids", "num_reqs"} <= set(InputBatch.__dataclass_fields__)
    src = inspect.getsource(runner.execute_model)
    # releases happen before the early return of steps that schedule no tokens
    assert src.index("self.finish_requests(scheduler_output)") < src.index("total_num_scheduled_tokens == 0")


def test_auto_plan_patch_targets():
    from vllm.model_executor.layers.linear import QKVParallelLinear, UnquantizedLinearMethod

    from vllm_kvmix.vllm.versions.v0_26 import model_runners

    for runner in model_runners():  # V1 (not in 0.34) and V2
        assert runner.get_kv_cache_spec._kvmix_patched
        assert list(inspect.signature(runner.get_kv_cache_spec).parameters) == ["self"]
    assert UnquantizedLinearMethod.process_weights_after_loading._kvmix_patched
    assert list(inspect.signature(UnquantizedLinearMethod.process_weights_after_loading).parameters) == [
        "self", "layer",
    ]
    src = inspect.getsource(QKVParallelLinear.__init__)
    for attr in ("self.num_heads", "self.num_kv_heads", "self.num_kv_head_replicas", "self.head_size"):
        assert attr in src
    # the CPU backend empties the weight after loading: why the norms are stashed before it
    from vllm.model_executor.layers import utils as layer_utils

    assert "torch.empty(0" in inspect.getsource(layer_utils.dispatch_cpu_unquantized_gemm)


def test_staging_is_reserved_out_of_the_budget():
    """Page formats: max_num_seqs staging pages per layer come out of the KV memory, or startup fails clearly."""
    from types import SimpleNamespace

    from vllm.v1.engine import core

    from vllm_kvmix.vllm.budget import staging_bytes
    from vllm_kvmix.vllm.spec import KvmixFullAttentionSpec

    from vllm.v1.kv_cache_interface import FullAttentionSpec

    common = dict(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.uint8)
    specs = {f"l{i}": KvmixFullAttentionSpec(kvmix_format="kvmix-k4v2", **common) for i in range(30)}
    bf16_specs = {f"l{i}": FullAttentionSpec(**{**common, "dtype": torch.bfloat16}) for i in range(30)}
    assert staging_bytes(specs, 16) == (16 + 1) * 30 * 3 * 64 * (80 + 68)  # keys, values; + the padded rows' slot
    assert staging_bytes(bf16_specs, 16) == 0  # vLLM's own dtypes reserve nothing
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=256), additional_config={})  # the user's 256
    with pytest.raises(ValueError, match="lower max_num_seqs"):
        core.get_kv_cache_configs(cfg, [specs], [64 << 20])


def test_default_max_num_seqs_targets():
    """What fitting vLLM's default max_num_seqs relies on: EngineArgs leaves max_num_seqs None until
    create_engine_config fills in the default and passes additional_config into the config, and the engine core
    sizes the KV cache (get_kv_cache_configs) before it builds the scheduler, in __init__."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.core import EngineCore

    fields = {f.name: f for f in dataclasses.fields(EngineArgs)}
    assert fields["max_num_seqs"].default is None
    assert "additional_config" in fields
    assert "additional_config=self.additional_config" in inspect.getsource(EngineArgs.create_engine_config)
    init = inspect.getsource(EngineCore.__init__)
    assert 0 <= init.index("self._initialize_kv_caches(") < init.index("Scheduler(")
    assert "get_kv_cache_configs(" in inspect.getsource(EngineCore._initialize_kv_caches)


@pytest.mark.skipif(CUDA_WHEEL, reason="0.33+'s VllmConfig needs a detected platform; none without a GPU")
@pytest.mark.parametrize("memory", [64 << 20, 4 << 30])
def test_default_max_num_seqs_is_lowered_to_fit_the_staging(memory):
    """vLLM's default max_num_seqs (marked in additional_config): where its staging would take over 1/16 of the
    KV memory, the scheduler's max_num_seqs is lowered to what fits, the workers' specs carry the count and the
    blocks get the rest (>= 4x bf16's tokens for k4v2); where it fits, nothing changes.  A max_num_seqs the user
    set is kept (test_staging_is_reserved_out_of_the_budget)."""
    import types

    from vllm.config import VllmConfig
    from vllm.v1.engine import core

    from vllm_kvmix.staging import DEFAULT_SEQS_KEY, STAGING_SHARE, fit_slots, stage_rows
    from vllm_kvmix.vllm.budget import staging_bytes
    from vllm_kvmix.vllm.spec import stage_slots_of

    specs = {f"l{i}": make_spec("kvmix-k4v2", block_size=64, num_kv_heads=3, head_size=64) for i in range(30)}
    cfg = VllmConfig()
    cfg.model_config = types.SimpleNamespace(max_model_len=1024, original_max_model_len=1024)
    cfg.scheduler_config.max_num_seqs = 256
    cfg.additional_config[DEFAULT_SEQS_KEY] = True
    if hasattr(cfg.cache_config, "kv_cache_layout"):  # 0.32+: resolved by the engine core before this call
        cfg.cache_config.kv_cache_layout = "LBHNC"
    (config,) = core.get_kv_cache_configs(cfg, [specs], [memory])
    slot = staging_bytes(specs, 0)
    seqs = cfg.scheduler_config.max_num_seqs
    assert seqs == fit_slots(256, memory, slot)
    if memory == 64 << 20:
        assert seqs == 3 and stage_rows(seqs) * slot <= memory / STAGING_SHARE
    else:
        assert seqs == 256  # 257 slots take 4.7% of 4 GiB: vLLM's default kept
    assert stage_slots_of(config.kv_cache_groups[0].kv_cache_spec) == seqs
    page = 64 * 30 * 3 * 56  # k4v2, head size 64: 56 bytes per token and head
    assert config.num_blocks == (memory - staging_bytes(specs, seqs)) // page
    assert config.num_blocks * 64 >= 4.0 * memory / (30 * 3 * 2 * 64 * 2)  # >= 4x bf16's tokens


@pytest.mark.skipif(CUDA_WHEEL, reason="0.33+'s VllmConfig needs a detected platform; none without a GPU")
def test_flash_attn_prefill_targets():
    """The FlashAttention prefill path reads vLLM's fa_utils (kernel + version), the builder's host
    sequence lengths, and the config of the engine whose layers are being built."""
    import types

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.attention.backends import fa_utils

    assert callable(fa_utils.is_flash_attn_varlen_func_available) and callable(fa_utils.get_flash_attn_version)
    src = inspect.getsource(fa_utils)
    assert "from vllm.vllm_flash_attn import" in src and "flash_attn_varlen_func," in src  # the CUDA kernel
    assert "seq_lens_cpu_upper_bound" in CommonAttentionMetadata.__dataclass_fields__
    assert flash_prefill.scheduler_limits() is None  # no engine being built
    cfg = VllmConfig()
    cfg.model_config = types.SimpleNamespace(max_model_len=4096)  # what scheduler_limits reads of it
    with set_current_vllm_config(cfg):
        assert flash_prefill.scheduler_limits() == (4096, cfg.scheduler_config.max_num_batched_tokens)
    fa = flash_prefill.flash_attn_prefill()
    if torch.cuda.is_available():  # vLLM's FA varlen kernel, or None only where vLLM has none for this GPU
        assert fa is None or callable(fa)
    else:
        assert fa is None  # no CUDA here


def _config(dtype="kvmix-k4v2", spec=None, parallel=None, budget=None, seqs=8, **model):
    import types

    from vllm.config import ParallelConfig

    shape = {"use_mla": False, "is_encoder_decoder": False, "is_attention_free": False, "head_size": 128, **model}
    model_config = types.SimpleNamespace(**shape, get_head_size=lambda: shape["head_size"],
                                         get_num_layers=lambda p: 30, get_num_kv_heads=lambda p: 3)
    return types.SimpleNamespace(cache_config=types.SimpleNamespace(cache_dtype=dtype, kv_cache_memory_bytes=budget),
                                 speculative_config=spec, parallel_config=parallel or ParallelConfig(),
                                 model_config=model_config, scheduler_config=types.SimpleNamespace(max_num_seqs=seqs))


@pytest.mark.parametrize("case,cause,fix", [
    ({"spec": object()}, "speculative decoding is not supported", "Remove --speculative-config"),
    ({"use_mla": True}, "multi-head latent attention", "Use a model with standard attention"),
    ({"is_encoder_decoder": True}, "encoder-decoder models are not supported", "Use a decoder-only model"),
    ({"is_attention_free": True}, "no attention layers", "Leave --kv-cache-dtype at auto"),
    ({"head_size": 192}, "head size 192 is not a power of two", "Use a model with such a head size"),
    ({"head_size": 80}, "head size 80", "auto / fp8"),
    # 30 layers x 3 heads x one 8-bit page of head size 128 (keys 64 x (128 + 8 x 4) B, values 64 x (128 + 2 x 4) B)
    # = 1.63 MiB a sequence, 9 slots
    ({"budget": 8 << 20, "seqs": 8}, "staging pages of --max-num-seqs 8 running sequences need 14.6 MiB",
     "Lower --max-num-seqs (at most 2 here)"),
])
def test_configurations_kvmix_cannot_serve_end_with_cause_and_fix(case, cause, fix):
    """The platform hook's check: one message naming the cause and the fix; vLLM's own dtypes pass untouched."""
    from vllm_kvmix.vllm.config_checks import KvmixConfigError, check

    for dtype in ("kvmix-k4v2", "kvmix-auto-b4"):
        with pytest.raises(KvmixConfigError, match=cause) as e:
            check(_config(dtype, **case))
        assert fix in str(e.value) and str(e.value).startswith(f"--kv-cache-dtype {dtype}: ")
    check(_config("auto", **case))
    check(_config("fp8", **case))
    check(_config())  # the defaults serve


def test_micro_batching_is_refused_and_the_attribute_is_vllms():
    import types

    from vllm.config import ParallelConfig

    from vllm_kvmix.formats import parse_format
    from vllm_kvmix.vllm.backend import refuse_unsupported
    from vllm_kvmix.vllm.config_checks import KvmixConfigError

    assert isinstance(ParallelConfig.use_ubatching, property)
    page = parse_format("kvmix-k4v2")
    refuse_unsupported(page, _config(), torch.device("cpu"))
    dbo = _config(parallel=types.SimpleNamespace(use_ubatching=True))
    with pytest.raises(KvmixConfigError, match="micro-batching"):
        refuse_unsupported(page, dbo, torch.device("cpu"))


@only_026  # the GPU's vLLM: the FlashAttention prefill path is CUDA's
def test_block_table_width_is_the_model_runners():
    """flash_prefill.block_table_width mirrors vLLM 0.26's GPU model runner (the prefill kernels compile at
    startup against a block table of that width); fails if the runner's sizing changes."""
    from vllm.v1.worker.gpu import model_runner

    src = inspect.getsource(model_runner.GPUModelRunner.initialize_kv_cache)
    assert "cdiv(\n                block_table_max_model_len, spec.block_size * self.dcp_size\n            )" in src
    assert "alignment = 128 // spec.block_size" in src
    assert "max_num_blocks = cdiv(max_num_blocks, alignment) * alignment" in src
    assert flash_prefill.block_table_width(1000, 64) == 16 and flash_prefill.block_table_width(8720, 64) == 138
    assert flash_prefill.block_table_width(8720, 16) == 552 and flash_prefill.block_table_width(100, 256) == 1


@only_032
def test_032_targets_have_expected_shape():
    """What v0_32 relies on: the official backend hooks, the spec field the page size comes from, the cached
    argparse choices, the CPU platform's backend answer, and the unchanged patch targets."""
    from vllm.engine import arg_utils
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.platforms import cpu as cpu_platform
    from vllm.v1.attention.backend import AttentionBackend
    from vllm.v1.attention.selector import AttentionSelectorConfig
    from vllm.v1.engine import core
    from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout
    from vllm.v1.worker import utils as worker_utils

    assert list(inspect.signature(Attention.get_kv_cache_spec).parameters) == ["self", "vllm_config"]
    assert list(inspect.signature(core.get_kv_cache_configs).parameters) == [
        "vllm_config", "kv_cache_specs", "available_memory",
    ]
    assert "kv_cache_dtype" in AttentionSelectorConfig._fields
    assert "customize_spec" in AttentionBackend.__dict__ and "supported_kv_cache_layouts" in AttentionBackend.__dict__
    assert "backend.customize_spec(spec)" in inspect.getsource(worker_utils.customize_attention_spec)
    assert "state_content_bytes" in AttentionSpec.__dataclass_fields__
    assert "get_kv_cache_shape" not in AttentionBackend.__dict__  # 0.26's shape method is inert here
    assert KVCacheLayout.LBHNC
    assert hasattr(arg_utils._compute_kwargs, "cache_clear")
    assert cpu_platform.CpuPlatform.get_attn_backend_cls.__func__._kvmix_patched


@only_032
def test_032_customize_spec_and_layout():
    """The backend's hooks: a 1-token spec (vLLM sizes sliding-window blocks with it) gives one token's packed
    bytes; pages are head-major, so the impl's 4D view flattens to [blocks, heads, head_page_bytes]."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheLayout

    from vllm_kvmix.vllm.backend import _head_pages, backend_class
    from vllm_kvmix.formats import parse_format

    cls = backend_class(parse_format("kvmix-k4v2"))
    one = cls.customize_spec(FullAttentionSpec(block_size=1, num_kv_heads=2, head_size=128, dtype=torch.bfloat16))
    assert one.page_size_bytes == 2 * 112 and one.kvmix_format == "kvmix-k4v2"
    assert cls.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
    cache = torch.zeros(5, 2, 64, 112, dtype=torch.uint8)
    flat = _head_pages(cache)
    assert flat.shape == (5, 2, 64 * 112) and flat.data_ptr() == cache.data_ptr()
    with pytest.raises(RuntimeError):  # a token-major view cannot be flattened without a copy: refused
        _head_pages(cache.transpose(1, 2).contiguous().transpose(1, 2))


@REGISTRY
def test_dtypes_registered_through_vllms_hook():
    """vLLM 0.33 / 0.34's ``register_kv_cache_dtype``: every kvmix name known, raw bytes, no vLLM quantization mode;
    CacheConfig accepts them and rejects a misspelling."""
    from vllm.config.cache import CacheConfig, CacheDType, get_kv_cache_dtype_handler, is_known_kv_cache_dtype
    from vllm.v1.kv_cache_interface import KVQuantMode

    for name in all_format_names():
        assert is_known_kv_cache_dtype(name)
        handler = get_kv_cache_dtype_handler(name)
        assert handler.torch_dtype() is torch.uint8 and handler.quant_mode() == KVQuantMode.NONE
    assert "kvmix-k4v2" not in typing.get_args(CacheDType)  # no Literal patch on this version
    assert CacheConfig(cache_dtype="kvmix-k4v2").cache_dtype == "kvmix-k4v2"
    with pytest.raises(Exception, match="Invalid kv_cache_dtype"):
        CacheConfig(cache_dtype="kvmix-k5v2")


@only_034
def test_034_targets_have_expected_shape():
    """What v0_34 relies on: the dtype registry, the backend hooks, the V2 runner alone, unchanged targets."""
    import importlib

    from vllm.config import cache
    from vllm.v1.attention.backend import AttentionBackend
    from vllm.v1.engine import core
    from vllm.v1.kv_cache_interface import AttentionSpec
    from vllm.v1.worker.gpu import model_runner as v2

    assert callable(cache.register_kv_cache_dtype)
    assert "customize_spec" in AttentionBackend.__dict__ and "supported_kv_cache_layouts" in AttentionBackend.__dict__
    assert "state_content_bytes" in AttentionSpec.__dataclass_fields__
    assert list(inspect.signature(core.get_kv_cache_configs).parameters) == [
        "vllm_config", "kv_cache_specs", "available_memory", "global_kv_cache_groups",
    ]
    assert core.get_kv_cache_configs._kvmix_patched
    with pytest.raises(ImportError):
        importlib.import_module("vllm.v1.worker.gpu_model_runner")
    runner = v2.GPUModelRunner
    assert runner.prepare_inputs._kvmix_patched and runner.finish_requests._kvmix_patched
    assert runner.get_kv_cache_spec._kvmix_patched


@pytest.mark.skipif(ON != "0.33.0", reason="a vLLM 0.33 target")
def test_033_targets_have_expected_shape():
    """0.33: the dtype registry and the backend hooks as in 0.34, and still both model runners (step hooks on each)."""
    from vllm.config import cache
    from vllm.v1.engine import core
    from vllm.v1.worker import gpu_model_runner as v1
    from vllm.v1.worker.gpu import model_runner as v2

    assert callable(cache.register_kv_cache_dtype)
    assert list(inspect.signature(core.get_kv_cache_configs).parameters) == [
        "vllm_config", "kv_cache_specs", "available_memory", "global_kv_cache_groups",
    ]
    assert core.get_kv_cache_configs._kvmix_patched
    assert v1.GPUModelRunner._update_states._kvmix_patched and v1.GPUModelRunner.get_kv_cache_spec._kvmix_patched
    assert v2.GPUModelRunner.prepare_inputs._kvmix_patched and v2.GPUModelRunner.get_kv_cache_spec._kvmix_patched
