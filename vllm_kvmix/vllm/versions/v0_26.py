"""vLLM 0.26: every patch of vLLM internals kvmix needs there, in one place.

vLLM 0.26 has no registry for KV-cache dtypes: the accepted names are a
``Literal`` (``vllm.config.cache.CacheDType``) checked by pydantic, argparse and
the attention selector; the name -> torch dtype map is a dict; and the KV-cache
spec of an ``Attention`` layer is built inside the layer.  :data:`PATCHES` lists
each patch in the order :func:`apply` installs them (once per process, from the
``vllm.general_plugins`` entry point, before vLLM builds any config).  Every
patch says what it replaces and why, checks that what it replaces is what it
expects (raising otherwise), names the upstream hook that replaces it in later
vLLM releases, and leaves vLLM's own dtypes on vLLM's code path.
``tests/test_versions.py`` fails if any target changes shape.
"""

from __future__ import annotations

import functools

import torch

from vllm_kvmix.formats import all_format_names, is_kvmix, parse_any
from vllm_kvmix.staging import (
    DEFAULT_SEQS_KEY,
    SLOTS,
    STAGING_SHARE,
    fit_slots,
    max_num_seqs_is_default,
    stage_rows,
)
from vllm_kvmix.vllm.budget import kv_cache_summary, log_info, staging_bytes

VERSIONS = ("0.26.0",)


def patch_cache_dtype_literal() -> None:
    """Add the kvmix names to ``vllm.config.cache.CacheDType``.

    The Literal object is shared by ``CacheConfig.cache_dtype`` (pydantic),
    ``EngineArgs.kv_cache_dtype`` (argparse choices are read from it when the
    CLI parser is built, after plugins load) and the attention selector's
    ``assert kv_cache_dtype in get_args(CacheDType)``.  Extending its
    ``__args__`` in place updates every module that imported it; the pydantic
    dataclasses that embed it are rebuilt.  Remove when vLLM accepts
    plugin-registered cache dtypes.
    """
    from pydantic.dataclasses import rebuild_dataclass
    from vllm.config import cache as cache_mod
    from vllm.config.vllm import VllmConfig

    literal = cache_mod.CacheDType
    args = tuple(literal.__args__)
    if "auto" not in args or "fp8" not in args:
        raise RuntimeError("vllm.config.cache.CacheDType is not the Literal kvmix expects")
    new = tuple(n for n in all_format_names() if n not in args)
    if new:
        literal.__args__ = args + new
        rebuild_dataclass(cache_mod.CacheConfig, force=True)
        rebuild_dataclass(VllmConfig, force=True)


def patch_str_dtype_map() -> None:
    """Map kvmix names to ``torch.uint8`` in ``STR_DTYPE_TO_TORCH_DTYPE``.

    ``Attention.__init__`` calls ``kv_cache_dtype_str_to_dtype`` which indexes
    this dict; the cache of a kvmix layer is raw bytes.  Remove with the
    Literal patch.
    """
    from vllm.utils import torch_utils

    table = torch_utils.STR_DTYPE_TO_TORCH_DTYPE
    if not isinstance(table, dict) or table.get("fp8") is not torch.uint8:
        raise RuntimeError("vllm.utils.torch_utils.STR_DTYPE_TO_TORCH_DTYPE changed")
    for name in all_format_names():
        table.setdefault(name, torch.uint8)


def patch_attention_kv_cache_spec() -> None:
    """Return a kvmix spec from ``Attention.get_kv_cache_spec`` for kvmix layers.

    The spec's page size is what vLLM allocates per block; vLLM builds it
    inside the layer with no backend hook.  Other dtypes go to the original.
    Remove when backends can supply their layer's KV-cache spec.
    """
    from vllm.model_executor.layers.attention.attention import Attention

    original = Attention.get_kv_cache_spec
    if getattr(original, "_kvmix_patched", False):
        return

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):
        if not is_kvmix(self.kv_cache_dtype):
            return original(self, vllm_config)
        from vllm.v1.attention.backend import AttentionType

        from vllm_kvmix.vllm.spec import kvmix_spec_for_layer

        if self.attn_type in (AttentionType.ENCODER_ONLY, AttentionType.ENCODER):
            return None
        return kvmix_spec_for_layer(self, vllm_config)

    get_kv_cache_spec._kvmix_patched = True
    Attention.get_kv_cache_spec = get_kv_cache_spec


def patch_engine_args_validation() -> None:
    """Check a kvmix ``kv_cache_dtype`` in ``EngineArgs.create_engine_config``.

    Without it a misspelt name fails deep in pydantic with a list of ~60
    literals; this raises :class:`KVFormatError` naming the kvmix choices
    before any config is built.  Remove when vLLM validates plugin dtypes.
    Also marks, in the config's ``additional_config`` (vLLM's field for
    plugins), that ``max_num_seqs`` is vLLM's default rather than the user's:
    only then may :func:`patch_kv_cache_config_logging` lower it to fit the
    staging.  Keep that part while vLLM gives no other way to tell.
    """
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_kvmix_patched", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        name = self.kv_cache_dtype
        kvmix = isinstance(name, str) and name.startswith("kvmix")
        if kvmix:
            parse_any(name)  # raises KVFormatError with the valid choices
        if kvmix and self.max_num_seqs is None and isinstance(self.additional_config or {}, dict):
            # vLLM fills in its default max_num_seqs below; the config (and its checks) must know it did
            self.additional_config = {**(self.additional_config or {}), DEFAULT_SEQS_KEY: True}
        return original(self, *args, **kwargs)

    create_engine_config._kvmix_patched = True
    EngineArgs.create_engine_config = create_engine_config


def patch_kv_cache_config_logging() -> None:
    """Reserve the staging slots' bytes, then log format, bytes/token, blocks and ratio vs bf16.

    Wraps ``get_kv_cache_configs`` as imported by ``vllm.v1.engine.core`` (the
    engine core computes the block count there from ``available_memory``, one
    entry per worker).  Page-scheme layers keep ``max_num_seqs`` 8-bit staging
    pages per layer outside vLLM's blocks (:mod:`vllm_kvmix.staging`); their
    bytes come out of the memory vLLM may give to blocks, so a kvmix cache
    never exceeds the budget the user set.  Where ``max_num_seqs`` is vLLM's
    default, it is lowered here (the scheduler is built after this call) to
    what :func:`vllm_kvmix.staging.fit_slots` allows; the count reaches the
    workers in the kvmix specs of the configs (``set_stage_slots``).  Remove
    if vLLM grows per-layer side allocations in its KV-cache specs, or logs
    per-spec page sizes itself.
    """
    from vllm.v1.engine import core

    original = core.get_kv_cache_configs
    if getattr(original, "_kvmix_patched", False):
        return

    @functools.wraps(original)
    def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory, *rest):  # rest: 0.34's global groups
        scheduler = vllm_config.scheduler_config
        max_num_seqs = default_seqs = scheduler.max_num_seqs
        slot_bytes = [staging_bytes(specs, 0) for specs in kv_cache_specs]  # one slot (stage_rows(0) == 1)
        if any(slot_bytes) and max_num_seqs_is_default(vllm_config):
            # vLLM's default max_num_seqs: as many running sequences as staging fits in its share of the memory;
            # the scheduler, built after this call, runs at most that many
            max_num_seqs = min(fit_slots(default_seqs, m, b) for m, b in zip(available_memory, slot_bytes) if b)
            if max_num_seqs < default_seqs:
                scheduler.max_num_seqs = max_num_seqs
        reserved = [stage_rows(max_num_seqs) * b for b in slot_bytes]
        if any(reserved):
            left = [m - r for m, r in zip(available_memory, reserved)]
            if min(left) <= 0:
                raise ValueError(
                    f"kvmix: the staging pages of {max_num_seqs} running sequences (max_num_seqs) "
                    f"need {max(reserved) / 2**20:.1f} MiB, more than the KV-cache memory "
                    f"({min(available_memory) / 2**20:.1f} MiB); lower max_num_seqs or raise the budget"
                )
            available_memory = left
        configs = original(vllm_config, kv_cache_specs, available_memory, *rest)
        if any(reserved):
            from vllm_kvmix.vllm.spec import set_stage_slots

            for config in configs:  # the workers' builders size their staging from the spec
                set_stage_slots(config, max_num_seqs)
        try:
            if max_num_seqs < default_seqs:
                log_info(
                    f"kvmix: max_num_seqs {default_seqs} (vLLM's default) -> {max_num_seqs}: the staging of more "
                    f"running sequences would take over 1/{STAGING_SHARE} of the KV-cache memory; "
                    f"--max-num-seqs sets it (its staging then comes out of the KV cache)"
                )
            if reserved[0]:
                log_info(
                    f"kvmix: staging: {max_num_seqs} + 1 slots (max_num_seqs + padding) per layer x 64 tokens at "
                    f"8 bits = {reserved[0] / 2**20:.1f} MiB, taken out of the KV-cache memory"
                )
            for line in kv_cache_summary(configs[0], kv_cache_specs[0], reserved[0]):
                log_info(line)
        except Exception as e:  # a log line must never break startup
            log_info(f"kvmix: startup summary unavailable ({e!r})")
        return configs

    get_kv_cache_configs._kvmix_patched = True
    core.get_kv_cache_configs = get_kv_cache_configs


def patch_step_requests() -> None:
    """Tell :data:`vllm_kvmix.staging.SLOTS` about every model-runner step.

    vLLM 0.26 has two GPU model runners; attention metadata carries no request
    ids in either.  Remove both wraps when it does.

    * ``vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states`` (V1; the
      CPU runner inherits it): afterwards ``input_batch.req_ids`` lists the
      requests in the row order of this step's attention metadata.
    * ``vllm.v1.worker.gpu.model_runner.GPUModelRunner.prepare_inputs`` (V2, the
      default on CUDA): returns the step's ``InputBatch`` whose ``req_ids`` are
      in row order; dummy runs build theirs with ``InputBatch.make_dummy`` and
      never come here.  Its ``finish_requests`` runs in every step, also in
      steps that schedule no tokens (vLLM's warm-up finishes its fake requests
      in one): the slots are released there.

    The finished and preempted ids (whose staging slots are free again) come
    from the scheduler output.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._update_states
    if not getattr(original, "_kvmix_patched", False):

        @functools.wraps(original)
        def _update_states(self, scheduler_output):
            released = released_ids(scheduler_output)
            result = original(self, scheduler_output)
            batch = self.input_batch
            SLOTS.on_step(batch.req_ids[: batch.num_reqs], released)
            return result

        _update_states._kvmix_patched = True
        GPUModelRunner._update_states = _update_states
    try:
        patch_v2_step_requests()
    except ImportError:  # a build without the V2 runner (vLLM CPU wheels import it fine)
        pass


def released_ids(scheduler_output) -> set:
    """The requests whose staging slots are free after this step: finished or preempted."""
    return set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())


def patch_v2_step_requests() -> None:
    """The V2 model runner's half of :func:`patch_step_requests` (``prepare_inputs`` / ``finish_requests``)."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as RunnerV2

    original_v2 = RunnerV2.prepare_inputs
    if getattr(original_v2, "_kvmix_patched", False):
        return
    original_finish = RunnerV2.finish_requests

    @functools.wraps(original_finish)
    def finish_requests(self, scheduler_output):
        SLOTS.release(released_ids(scheduler_output))
        return original_finish(self, scheduler_output)

    @functools.wraps(original_v2)
    def prepare_inputs(self, scheduler_output, *args, **kwargs):
        batch = original_v2(self, scheduler_output, *args, **kwargs)
        SLOTS.on_step(list(batch.req_ids[: batch.num_reqs]))
        return batch

    finish_requests._kvmix_patched = True
    prepare_inputs._kvmix_patched = True
    RunnerV2.finish_requests = finish_requests
    RunnerV2.prepare_inputs = prepare_inputs


def patch_auto_plan() -> None:
    """Resolve ``kvmix-auto`` layers to concrete formats in the model runners' ``get_kv_cache_spec``.

    The first call after the weights load and before any KV-cache spec exists
    (the CPU runner inherits it; every worker calls it): the plan needs the
    loaded W_K / W_V, and the specs, backends and page sizes that follow need
    the plan (:mod:`vllm_kvmix.vllm.autoplan`).  vLLM 0.26 has no post-load
    hook for plugins.  Remove when it does.
    """
    def make(original):
        @functools.wraps(original)
        def get_kv_cache_spec(self):
            from vllm_kvmix.vllm import autoplan

            autoplan.resolve(self)
            return original(self)

        return get_kv_cache_spec

    wrap_runners("get_kv_cache_spec", make, "_kvmix_patched")


def model_runners() -> list[type]:
    """vLLM's model-runner classes here: V1 (the CPU runner inherits it; gone in 0.34) and V2 (CUDA's default)."""
    import importlib

    runners = []
    for module in ("vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.model_runner"):
        try:
            runners.append(importlib.import_module(module).GPUModelRunner)
        except ImportError:
            pass
    if not runners:
        raise RuntimeError("kvmix: no vLLM model runner found (vllm.v1.worker.gpu_model_runner / gpu.model_runner)")
    return runners


def wrap_runners(method: str, make, marker: str) -> None:
    """Replace ``method`` of every model runner by ``make(original)`` once (``marker`` set on the wrapper)."""
    for runner in model_runners():
        original = getattr(runner, method)
        if getattr(original, marker, False):
            continue
        wrapper = make(original)
        wrapper._kvmix_patched = True
        setattr(wrapper, marker, True)
        setattr(runner, method, wrapper)


def patch_stash_qkv_norms() -> None:
    """Keep W_K / W_V group norms of fused QKV projections before vLLM's CPU backend empties the weight.

    ``UnquantizedLinearMethod.process_weights_after_loading`` on CPU repacks the
    weight for oneDNN / sgl-kernel and replaces ``layer.weight`` by an empty
    tensor, so kvmix-auto could not read the norms afterwards.  Runs only when
    the configured cache dtype is ``kvmix-auto[-bB]``.  Remove when vLLM has a
    post-load hook that runs before weight processing.
    """
    from vllm.model_executor.layers.linear import QKVParallelLinear, UnquantizedLinearMethod

    original = UnquantizedLinearMethod.process_weights_after_loading
    if getattr(original, "_kvmix_patched", False):
        return

    @functools.wraps(original)
    def process_weights_after_loading(self, layer):
        from vllm.config import get_current_vllm_config_or_none

        from vllm_kvmix.formats import is_auto

        config = get_current_vllm_config_or_none()
        if isinstance(layer, QKVParallelLinear) and config is not None and is_auto(config.cache_config.cache_dtype):
            from vllm_kvmix.vllm.autoplan import stash_kv_norms

            stash_kv_norms(layer)
        return original(self, layer)

    process_weights_after_loading._kvmix_patched = True
    UnquantizedLinearMethod.process_weights_after_loading = process_weights_after_loading


def register_custom_backend() -> None:
    """Point ``AttentionBackendEnum.CUSTOM`` at the kvmix base backend.

    kvmix backends report ``get_name() == "CUSTOM"`` (layers look their backend
    up in the enum by name); registering the path keeps ``CUSTOM.get_path()``
    valid.  Uses vLLM's public ``register_backend``; not a patch.
    """
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )

    register_backend(AttentionBackendEnum.CUSTOM, "vllm_kvmix.vllm.backend.KvmixAttentionBackend")


# (patch, what it touches, the upstream hook that replaces it)
PATCHES = (
    (patch_cache_dtype_literal, "vllm.config.cache.CacheDType (Literal) + CacheConfig/VllmConfig rebuilt",
     "vllm.config.cache.register_kv_cache_dtype (0.33)"),
    (patch_str_dtype_map, "vllm.utils.torch_utils.STR_DTYPE_TO_TORCH_DTYPE (dict entries)",
     "register_kv_cache_dtype (0.33)"),
    (patch_attention_kv_cache_spec, "Attention.get_kv_cache_spec (kvmix layers only)",
     "AttentionBackend.customize_spec with the CUSTOM backend (0.28)"),
    (patch_engine_args_validation, "EngineArgs.create_engine_config (kvmix names validated first)",
     "register_kv_cache_dtype validation (0.33)"),
    (patch_kv_cache_config_logging, "vllm.v1.engine.core.get_kv_cache_configs (staging reserved, default max_num_seqs "
     "fitted to it, summary)",
     "none yet: no per-spec side allocation in vLLM"),
    (patch_step_requests, "GPUModelRunner._update_states (V1), GPUModelRunner.prepare_inputs/finish_requests "
     "(V2): the step's request ids", "none yet: attention metadata carries no request ids"),
    (patch_auto_plan, "GPUModelRunner.get_kv_cache_spec (V1, V2): kvmix-auto's plan after load",
     "none yet: no post-load hook for plugins"),
    (patch_stash_qkv_norms, "UnquantizedLinearMethod.process_weights_after_loading (kvmix-auto only)",
     "none yet: no post-load hook before weight processing"),
    (register_custom_backend, "AttentionBackendEnum.CUSTOM via vLLM's public register_backend (not a patch)",
     "-"),
)


def apply() -> None:
    """Install every patch (each is idempotent)."""
    for patch, _, _ in PATCHES:
        patch()
