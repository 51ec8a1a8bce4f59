"""The kvmix attention backend: metadata builder (plan) and impl (run).

One backend class per format: vLLM's model runner asks the backend class for
the cache shape without telling it the layer's format (it passes "auto" for
specs that are not vLLM's own quantized kinds), so the format is a class
attribute.  ``backend_class_path(fmt)`` names the class; the module-level
``__getattr__`` creates it on first use in every process.

Cache tensor of a layer: ``uint8[num_blocks, num_kv_heads, head_page_bytes]``
(:mod:`vllm_kvmix.formats`).  ``forward`` writes and attends in one call: on
CUDA :func:`vllm_kvmix.kernels.page.page_step`, on CPU
:func:`vllm_kvmix.cpu.step` (batched; checked against :func:`vllm_kvmix.reference.staged.step`), with the request's staging slot from
:data:`vllm_kvmix.staging.SLOTS`; each layer's staging tensor is allocated on
its first real step (its bytes are taken out of the KV-cache budget at sizing,
:mod:`vllm_kvmix.vllm.budget`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from vllm_kvmix.formats import PAGE_TOKENS, AutoFormat, KVFormat, all_format_names, parse_any, parse_format
from vllm_kvmix.reference.staged import RequestStep
from vllm_kvmix.staging import SLOTS, stage_rows
from vllm_kvmix.vllm import flash_prefill
from vllm_kvmix.vllm.config_checks import check as check_config
from vllm_kvmix.vllm.device import check_device, prepare_decode
from vllm_kvmix.vllm.spec import group_head_size, group_window, layer_specs, stage_slots_of

logger = logging.getLogger("vllm.kvmix")

_CLASS_PREFIX = "KvmixAttentionBackend_"
_logged: set[str] = set()


def _log_once(line: str) -> None:
    if line not in _logged:
        _logged.add(line)
        logger.info(line)


def _head_pages(kv_cache: torch.Tensor) -> torch.Tensor:
    """The layer's cache as ``uint8[blocks, kv_heads, head_page_bytes]``: vLLM releases that allocate per-token
    states hand a head-major ``[blocks, kv_heads, 64, bytes_per_token]`` view (a view again here; never a copy)."""
    if kv_cache.dim() == 4:
        return kv_cache.view(kv_cache.shape[0], kv_cache.shape[1], -1)
    return kv_cache


def _group_formats(kv_cache_spec) -> list[tuple[KVFormat, object]]:
    """(format, spec) of each distinct layer format of a KV-cache group (kvmix-auto: several)."""
    out = {}
    for spec in layer_specs(kv_cache_spec):
        name = getattr(spec, "kvmix_layer_format", "") or spec.kvmix_format
        out.setdefault(name, (parse_format(name), spec))
    return list(out.values())


def refuse_unsupported(fmt, vllm_config, device) -> None:
    """Engine settings kvmix cannot serve correctly: the platform hook refused them already
    (:mod:`vllm_kvmix.vllm.config_checks`); checked again where a worker builds the layer's metadata, for
    configurations built without it.  And the device: a clear error at startup, not wrong tokens."""
    check_config(vllm_config)
    check_device(fmt, device)


@dataclass
class KvmixMetadata:
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [B + 1] int32, device
    seq_lens: torch.Tensor  # [B] int32, device
    block_table: torch.Tensor  # [B, max_blocks] int32, device
    slot_mapping: torch.Tensor  # [T] int64, device
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int] | None  # CPU path only
    causal: bool = True
    # one entry per request, and the number of staging slots per layer
    requests: list[RequestStep] | None = None  # CPU path
    slots: torch.Tensor | None = None  # CUDA path: [B] int32 staging slot per request, device
    page_plan: object | None = None  # CUDA path: kernels.page.StepPlan, shared by the step's layers
    stage_slots: int = 0
    dummy: bool = False  # a build no model-runner step announced (profiling, warm-up)


class KvmixMetadataBuilder(AttentionMetadataBuilder[KvmixMetadata]):
    """Plans a step for all layers of one KV-cache group.

    CUDA graphs: page formats on CUDA declare ``UNIFORM_SINGLE_TOKEN_DECODE``.
    A batch of one-token requests (padded to a captured size or not) gets a
    :meth:`StepPlan.decode <vllm_kvmix.kernels.page.StepPlan.decode>` over
    this builder's persistent :class:`~vllm_kvmix.kernels.page.DecodeBuffers`
    and vLLM's persistent ``query_start_loc`` / ``seq_lens`` / block table, with
    a grid fixed by the row count and the model's maximum length, so a graph
    captured on dummy rows replays on real ones; ``build`` writes the rows'
    staging slots into the buffers before the replay.  Padded rows have no
    tokens and the dummy staging slot.  Other batches run eagerly (vLLM's
    piecewise graphs around attention).
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.heads = None
        self.fmt = parse_format(kv_cache_spec.kvmix_format)
        # the engine core's count (vLLM's default max_num_seqs may have been lowered to fit), else max_num_seqs
        self.stage_slots = stage_slots_of(kv_cache_spec) or vllm_config.scheduler_config.max_num_seqs
        self.max_model_len = vllm_config.model_config.max_model_len
        SLOTS.reset(self.stage_slots)  # a new KV cache: no earlier engine's request holds a slot in it
        # builds before the first announced step (profiling, warm-up, graph capture) are dummies
        self._generation = SLOTS.generation
        self._decode_bufs = None
        self._window = group_window(kv_cache_spec)  # split-K counts divide the pages a window spans
        self._head_size = group_head_size(kv_cache_spec)  # and fill a wave of the programs an SM holds
        refuse_unsupported(self.fmt, vllm_config, device)
        if device.type == "cuda":
            num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
            self.heads = (num_heads, kv_cache_spec.num_kv_heads)
            for fmt, spec in _group_formats(kv_cache_spec):
                _log_once(prepare_decode(fmt, spec.head_size, num_heads // spec.num_kv_heads,
                                         vllm_config.model_config.dtype, getattr(spec, "sliding_window", None)))
            from vllm_kvmix.kernels.page import DecodeBuffers
            from vllm_kvmix.kernels.prefill import max_pages_for

            # rows: any batch vLLM runs or pads to a captured size; the staging tensor has one more slot than
            # the running sequences: the padded rows' (stage_rows)
            rows = max(self.stage_slots, vllm_config.scheduler_config.max_num_seqs,
                       vllm_config.compilation_config.max_cudagraph_capture_size or 0)
            self._decode_bufs = DecodeBuffers(rows, self.stage_slots, device)
            # prefill on FlashAttention: groups of at most this many dequantized pages (one request's most)
            self._prefill_pages = max_pages_for(self.max_model_len,
                                                vllm_config.scheduler_config.max_num_batched_tokens)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> KvmixMetadata:
        return self._build(common_attn_metadata, capture=False)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> KvmixMetadata:
        """Graph capture: the real kernels on dummy rows (dummy staging slot, vLLM's null block 0)."""
        return self._build(common_attn_metadata, capture=True)

    def _build(self, m: CommonAttentionMetadata, capture: bool) -> KvmixMetadata:
        if isinstance(m.causal, torch.Tensor):
            raise NotImplementedError("kvmix: per-token (dynamic) causality is not supported")
        n = m.num_reqs
        qsl_cpu = m.query_start_loc_cpu[: n + 1].tolist()
        seq_lens_cpu = requests = slots = page_plan = None
        if self.heads is None:  # CPU: the reference wants host lists
            seq_lens_cpu = m.seq_lens[:n].cpu().tolist()
        decode = m.max_query_len == 1 and m.num_actual_tokens == n
        if capture:  # a decode graph: every row is padding; other captures leave attention out
            step_slots = [self.stage_slots] * n if decode and self._decode_bufs is not None else None
        else:
            step_slots = self._step_slots(n, qsl_cpu)
        dummy = step_slots is None
        if not dummy and self.heads is not None:
            from vllm_kvmix.kernels.page import StepPlan  # plans its own query blocks

            if decode:
                slots = self._decode_bufs.set_slots(step_slots)
                page_plan = StepPlan.decode(self._decode_bufs, m.query_start_loc, m.seq_lens, n,
                                            self.max_model_len, *self.heads, window=self._window,
                                            head_size=self._head_size)
            else:
                slots = torch.tensor(step_slots, dtype=torch.int32, pin_memory=True).to(self.device, non_blocking=True)
                fa = flash_prefill.flash_attn_prefill()
                seq_cpu = None
                if fa is not None:  # exact for prefill rows (no speculative decoding: refused above)
                    bound = m.seq_lens_cpu_upper_bound
                    seq_cpu = (bound if bound is not None else m.seq_lens).to("cpu")[:n].tolist()
                page_plan = StepPlan(m.query_start_loc, m.seq_lens[:n], m.num_actual_tokens, m.max_query_len,
                                     qsl_cpu, m.max_seq_len, *self.heads, seq_lens_cpu=seq_cpu, flash_attn=fa,
                                     max_prefill_pages=self._prefill_pages, window=self._window,
                                     head_size=self._head_size)
        elif not dummy:
            requests = self._request_steps(qsl_cpu, seq_lens_cpu, step_slots)
        return KvmixMetadata(
            num_actual_tokens=m.num_actual_tokens,
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
            query_start_loc_cpu=qsl_cpu,
            seq_lens_cpu=seq_lens_cpu,
            causal=bool(m.causal),
            requests=requests,
            slots=slots,
            page_plan=page_plan,
            stage_slots=self.stage_slots,
            dummy=dummy,
        )

    def _step_slots(self, n: int, qsl: list[int]) -> list[int] | None:
        """The staging slot of each of the ``n`` rows; None for a dummy build (no step announced since the last).

        Rows past the announced requests are padding (a batch padded to a captured graph size):
        they must have no tokens, and get the dummy slot.
        """
        SLOTS.configure(self.stage_slots)
        if SLOTS.generation == self._generation:
            return None
        self._generation = SLOTS.generation
        real = min(n, len(SLOTS.rows))
        if qsl[n] != qsl[real]:
            raise RuntimeError(
                f"kvmix: the batch has {n} rows with tokens but the model runner announced {real} "
                "requests; vLLM's step bookkeeping changed under the plugin"
            )
        return SLOTS.slots_for_rows(real) + [self.stage_slots] * (n - real)

    @staticmethod
    def _request_steps(qsl: list[int], seq_lens: list[int], slots: list[int]) -> list[RequestStep]:
        steps = []
        for b, (seq, slot) in enumerate(zip(seq_lens, slots)):
            q0, q1 = qsl[b], qsl[b + 1]
            steps.append(RequestStep(q0=q0, q1=q1, ctx=seq - (q1 - q0), seq=seq, slot=slot))
        return steps


class KvmixAttentionImpl(AttentionImpl[KvmixMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **unsupported,
    ) -> None:
        # kvmix-auto: a placeholder until vllm_kvmix.vllm.autoplan assigns the layer's format
        self.fmt: KVFormat | AutoFormat = parse_any(kv_cache_dtype)
        self.fmt.check_head_size(head_size)
        if alibi_slopes is not None:
            raise NotImplementedError(f"{self.fmt.name}: ALiBi is not supported")
        if sinks is not None:
            raise NotImplementedError(f"{self.fmt.name}: attention sinks are not supported")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"{self.fmt.name}: only decoder self-attention")
        if kv_sharing_target_layer_name is not None:
            raise NotImplementedError(f"{self.fmt.name}: cross-layer KV sharing")
        if unsupported:
            raise NotImplementedError(f"{self.fmt.name}: unsupported options {sorted(unsupported)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.sliding_window = sliding_window
        self.kv_cache_dtype = kv_cache_dtype
        self.logits_soft_cap = logits_soft_cap or None
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.stage: torch.Tensor | None = None  # page scheme: this layer's staging slots
        self._prefill_limits = flash_prefill.scheduler_limits()  # (max_model_len, max_num_batched_tokens) or None
        self._prefill_compiled = False

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KvmixMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("kvmix: fused output quantization")
        if attn_metadata is None or attn_metadata.dummy:  # profiling / warm-up: leave caches alone
            self._prepare_prefill(query)
            return output.fill_(0)
        n = attn_metadata.num_actual_tokens
        m = attn_metadata
        kv_cache = _head_pages(kv_cache)
        if query.is_cuda:
            from vllm_kvmix.kernels.page import page_step

            page_step(
                query[:n], key[:n], value[:n], kv_cache, self._stage(kv_cache, m.stage_slots), self.fmt,
                m.query_start_loc, m.seq_lens[: m.slots.shape[0]], m.slots, m.block_table, self.scale, m.max_query_len,
                sliding_window=self.sliding_window, soft_cap=self.logits_soft_cap, out=output[:n], plan=m.page_plan,
            )
            return output
        from vllm_kvmix import cpu

        res = cpu.step(
            query[:n], key[:n], value[:n], kv_cache, self._stage(kv_cache, m.stage_slots),
            self.fmt, m.requests, m.block_table, self.scale,
            causal=m.causal, sliding_window=self.sliding_window, soft_cap=self.logits_soft_cap,
        )
        output[:n].copy_(res.view(output[:n].shape))
        return output

    def _prepare_prefill(self, query: torch.Tensor) -> None:
        """During vLLM's memory profiling (a dummy step of max_num_batched_tokens rows), allocate what the
        FlashAttention prefill path takes per layer call, so the KV cache is sized around it; and compile its
        dequant kernel for this layer once (``page.compile_prefill_kernels``)."""
        limits = self._prefill_limits
        if limits is None or query.shape[0] <= 1 or not query.is_cuda or torch.cuda.is_current_stream_capturing():
            return
        if not isinstance(self.fmt, KVFormat) or flash_prefill.flash_attn_prefill() is None:
            return
        from vllm_kvmix.kernels.page import FA_DTYPES, compile_prefill_kernels
        from vllm_kvmix.kernels.prefill import max_pages_for, transient_bytes

        nbytes = transient_bytes(max_pages_for(*limits), query.shape[0], self.num_heads, self.num_kv_heads,
                                 self.head_size, query.element_size())
        torch.empty(nbytes, dtype=torch.uint8, device=query.device)
        if not self._prefill_compiled and query.dtype in FA_DTYPES:  # else the first prompt compiles (seconds)
            self._prefill_compiled = True
            try:
                compile_prefill_kernels(self.fmt, self.head_size, self.num_kv_heads, query.dtype,
                                        flash_prefill.block_table_width(limits[0], PAGE_TOKENS), query.device)
            except Exception as e:  # noqa: BLE001 -- a warm-up: the kernels still compile on first use
                logger.warning("kvmix: compiling the prefill kernels at startup failed (%r); the first prompt "
                               "compiles them", e)

    def _stage(self, kv_cache: torch.Tensor, slots: int) -> torch.Tensor:
        """This layer's staging slots, ``slots`` + 1 (the last: padded rows'); allocated on first use."""
        if self.stage is None:  # the bytes budget.staging_bytes reserved for this layer
            if kv_cache.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("kvmix: staging allocated during CUDA-graph capture (no warm-up run?)")
            page = self.fmt.stage_bytes_per_seq_head(self.head_size)
            self.stage = torch.zeros(
                (stage_rows(slots), self.num_kv_heads, page), dtype=torch.uint8, device=kv_cache.device
            )
        return self.stage


class KvmixAttentionBackend(AttentionBackend):
    """Base class; vLLM sees one subclass per format (``FORMAT`` set)."""

    FORMAT: ClassVar[KVFormat | AutoFormat | None] = None
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
    supported_kv_cache_dtypes: ClassVar[list[str]] = all_format_names()

    @staticmethod
    def get_name() -> str:
        # Attention layers look their backend up in AttentionBackendEnum by name.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[KvmixAttentionImpl]:
        return KvmixAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KvmixMetadataBuilder]:
        return KvmixMetadataBuilder

    @classmethod
    def get_supported_kernel_block_sizes(cls, *spec) -> list[int]:
        return [PAGE_TOKENS]  # a page is the key-channel group

    @classmethod
    def get_kv_cache_shape(
        cls,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        if not isinstance(cls.FORMAT, KVFormat):
            raise TypeError(f"{cls.__name__}: use a per-format kvmix backend class (kvmix-auto layers get one at load)")
        layout = cls.FORMAT.layout(head_size, block_size)
        return (num_blocks, num_kv_heads, layout.head_page_bytes)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        if include_num_layers_dimension:
            raise NotImplementedError
        return (0, 1, 2)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


def backend_class_name(fmt: KVFormat | AutoFormat) -> str:
    return _CLASS_PREFIX + fmt.name.removeprefix("kvmix-").replace("-", "_")


def backend_class_path(fmt: KVFormat | AutoFormat) -> str:
    return f"{__name__}.{backend_class_name(fmt)}"


def backend_class(fmt: KVFormat | AutoFormat) -> type[KvmixAttentionBackend]:
    name = backend_class_name(fmt)
    cls = globals().get(name)
    if cls is None:
        attrs = {"FORMAT": fmt, "__module__": __name__}
        cls = type(name, (KvmixAttentionBackend,), attrs)
        cls.__qualname__ = name
        globals()[name] = cls
    return cls


def __getattr__(name: str):
    # Lets vLLM resolve "vllm_kvmix.vllm.backend.KvmixAttentionBackend_k4v2" in
    # any process (resolve_obj_by_qualname imports the module, then getattr).
    if name.startswith(_CLASS_PREFIX):
        suffix = name.removeprefix(_CLASS_PREFIX).replace("_", "-")
        return backend_class(parse_any("kvmix-" + suffix))
    raise AttributeError(name)
