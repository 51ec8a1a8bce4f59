"""Staging slots: which 8-bit slot holds each running request's still-filling page.

The page scheme keeps the last, partial page of every running request at 8
bits until it fills (:mod:`vllm_kvmix.reference.staged`).  A request owns one
slot from its first step until vLLM reports it finished or preempted (a
preempted request recomputes from its first token, so its staged tokens are
dead).  Running requests never exceed vLLM's ``max_num_seqs``, so that many
slots per layer always suffice; they are reserved out of the KV-cache budget.
Where ``max_num_seqs`` is vLLM's default (1024 on a large GPU), its staging
would take a large share of a small budget: :func:`fit_slots` then lowers it
to the sequences whose staging fits in 1/:data:`STAGING_SHARE` of the KV-cache
memory (the version layer does it where vLLM sizes the cache, before the
scheduler exists).  A ``max_num_seqs`` the user set is kept.

Pure Python.  vLLM's model runner tells :data:`SLOTS` about every step
(``vllm_kvmix.vllm.versions``, ``patch_step_requests``): the request ids of the
persistent batch's rows, in the order the attention metadata uses, and the
ids it dropped.  Metadata builds that no step announced are vLLM's dummy
runs (profiling, warm-up); they must not touch the caches.
"""

from __future__ import annotations

import logging

# under vLLM's logger: ``VLLM_LOGGING_LEVEL=DEBUG`` shows the slot count whenever it changes
logger = logging.getLogger("vllm.kvmix")


class StagingSlotsExhausted(RuntimeError):
    pass


class StagingSlots:
    def __init__(self) -> None:
        self.capacity: int | None = None
        self.slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self.rows: list[str] = []
        self.generation = 0
        self._reported = 0

    @property
    def in_use(self) -> int:
        """Slots held by requests now (0 whenever no request is running)."""
        return len(self.slot_of)

    def _report(self) -> None:
        if self.in_use != self._reported:
            self._reported = self.in_use
            logger.debug("kvmix: staging slots in use: %d of %s", self.in_use, self.capacity)

    def reset(self, capacity: int) -> None:
        """A new KV cache (a new engine in this process): no request holds a slot in it.

        Slots of an earlier engine's requests are dropped: its last finished
        requests are never reported (vLLM reports finished ids in the next step).
        """
        self.capacity = capacity
        self.slot_of = {}
        self._free = list(range(capacity - 1, -1, -1))
        self.rows = []
        self._report()

    def configure(self, capacity: int) -> None:
        """Set the number of slots (``max_num_seqs``); the first build of a process does it."""
        if self.capacity == capacity:
            return
        if self.slot_of:
            raise RuntimeError("kvmix: staging slots reconfigured while requests hold slots")
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))

    def on_step(self, rows: list[str], released: set[str] | frozenset[str] = frozenset()) -> None:
        """A model-runner step: release ``released`` ids, record the batch rows."""
        self.release(released)
        self.rows = list(rows)
        self.generation += 1

    def release(self, req_ids) -> None:
        """Free the slots of finished / preempted requests (also from steps that run no tokens)."""
        for req_id in req_ids:
            slot = self.slot_of.pop(req_id, None)
            if slot is not None:
                self._free.append(slot)
        self._report()

    def slots_for_rows(self, num_rows: int) -> list[int]:
        """Slots of the first ``num_rows`` batch rows, allocating for new requests."""
        if self.capacity is None:
            raise RuntimeError("kvmix: staging slots used before configure()")
        if num_rows > len(self.rows):
            raise RuntimeError(
                f"kvmix: the batch has {num_rows} requests but the model runner announced "
                f"{len(self.rows)}; vLLM's step bookkeeping changed under the plugin"
            )
        out = []
        for req_id in self.rows[:num_rows]:
            slot = self.slot_of.get(req_id)
            if slot is None:
                if not self._free:
                    raise StagingSlotsExhausted(
                        f"kvmix: all {self.capacity} staging slots are held by running requests "
                        "(more running requests than max_num_seqs?)"
                    )
                slot = self._free.pop()
                self.slot_of[req_id] = slot
            out.append(slot)
        self._report()
        return out


def stage_rows(max_num_seqs: int) -> int:
    """Staging slots per layer: one per running request, plus one (the last) for the padded rows of
    CUDA-graph batches, which is never a request's."""
    return max_num_seqs + 1


# Where max_num_seqs is vLLM's default, staging takes at most 1/STAGING_SHARE of the KV-cache memory: the
# block pool then holds ~2,300 tokens per running sequence (a staging slot is ~150 tokens of k4v2 pages).
STAGING_SHARE = 16
# The key in vLLM's ``additional_config`` (its field for plugins) saying that max_num_seqs is vLLM's default
DEFAULT_SEQS_KEY = "kvmix_default_max_num_seqs"


def max_num_seqs_is_default(vllm_config) -> bool:
    """Whether the engine's max_num_seqs is vLLM's default (marked under :data:`DEFAULT_SEQS_KEY`), not the user's."""
    extra = getattr(vllm_config, "additional_config", None)
    return isinstance(extra, dict) and bool(extra.get(DEFAULT_SEQS_KEY))


def fit_slots(max_num_seqs: int, kv_memory: int, slot_bytes: int) -> int:
    """Running sequences (at most ``max_num_seqs``, at least 1) whose staging, ``slot_bytes`` each plus the padded
    rows' slot, fits in 1/:data:`STAGING_SHARE` of ``kv_memory``."""
    return max(1, min(max_num_seqs, kv_memory // (STAGING_SHARE * slot_bytes) - 1))


# One table per process: a slot is a request's, whatever layer or KV-cache group asks.
SLOTS = StagingSlots()
