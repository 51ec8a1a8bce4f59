"""KV-cache format specs: names, bit widths, bytes per token and the paged layout.

``kvmix-k{K}v{V}`` (K, V in {2, 4, 8}): pages of 64 tokens.  Keys are quantized
per channel over the 64 tokens of a page (one fp16 scale and minimum per channel
and page): a few key channels carry most of the energy and get their own range.
Values are rotated by a Hadamard transform over the head dimension and quantized
per token in groups of 64 channels (fp16 scale and minimum).  A page is packed
when it fills; until then each running sequence's last page lives in an 8-bit
staging slot (per token: keys in groups of 16 channels, rotated values in groups
of 64, :func:`stage_layout`), and a query always reads its own
page from there, so token-by-token generation, prefill and chunked prefill see
the same numbers.  ``docs/formats.md`` has the evidence for each choice.

``kvmix-auto[-b{B}]`` picks a format per layer at startup under an average
bit budget (:class:`AutoFormat`, :mod:`vllm_kvmix.allocation`).

This module is pure Python (no torch, no vLLM): everything downstream (the
reference quantizer, the kernels, the vLLM backend) takes its sizes and offsets
from :class:`KVFormat` and :class:`PageLayout`.

Page layout
-----------
vLLM hands each attention layer a cache of ``num_blocks`` pages.  A kvmix page
holds 64 tokens for every KV head; the bytes of one (page, kv-head) pair are
contiguous so that a kernel loads one KV head's page in one sweep::

    cache: uint8[num_blocks, num_kv_heads, head_page_bytes]

    head page = [ K codes | K meta | V codes | V meta ]
      K codes: uint8[64, head_size * k_bits / 8]      (low bits first)
      K meta : fp16 [head_size, 2]                     (scale, minimum per channel)
      V codes: uint8[64, head_size * v_bits / 8]
      V meta : fp16 [64, head_size / 64, 2]            (scale, minimum per token group)

    staging slot = [ K codes u8[64, head_size] | K meta f16[64, head_size / 16, 2]
                   | V codes u8[64, head_size] | V meta f16[64, head_size / 64, 2] ]

Codes are packed little-end first: with 4-bit codes, byte ``j`` holds channel
``2j`` in bits 0-3 and channel ``2j+1`` in bits 4-7.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

PREFIX = "kvmix-"
VALID_BITS = (2, 4, 8)
# Channels per value group (packed and staged): one fp16 (scale, minimum) each.
GROUP = 64
META_BYTES_PER_GROUP = 4  # fp16 scale + fp16 minimum
BF16_BYTES = 2
# Tokens per page: the key-channel group and vLLM's kernel block size.
PAGE_TOKENS = 64
# Staging slots (the last, still-filling page of each running sequence) hold
# keys and rotated values at 8 bits per token.
STAGE_BITS = 8
# Channels per staged key group.  Keys are not rotated: a channel with a large offset (a k_proj bias) sets
# the range of its whole group, and every packed page is quantized from the staged copy.  On
# Qwen2.5-Coder-1.5B (k_proj bias norm 1237 in layer 0) k8v4 cost +0.90% perplexity with 64-channel groups and
# -0.21% with 16-channel groups (docs/results.md, section 5); the slot grows by 3 * head_size / 16 bytes a token.
STAGE_KEY_GROUP = 16

_NAME_RE = re.compile(r"^kvmix-k(\d+)v(\d+)$")
_AUTO_RE = re.compile(r"^kvmix-auto(?:-b(\d+))?$")
# kvmix-auto: average code bits per element over K and V (k4v2's bytes)
AUTO_DEFAULT_BITS = 3
AUTO_BITS = (2, 3, 4, 5, 6, 8)


class KVFormatError(ValueError):
    """An invalid kvmix format name, or a format that does not fit the model."""


@dataclass(frozen=True)
class SideLayout:
    """Byte layout of one side (K or V) of a head page."""

    bits: int
    group: int
    head_size: int
    block_size: int
    codes_offset: int
    meta_offset: int
    axis: str = "token"  # "token": meta per token group; "channel": per channel over the page

    @property
    def codes_bytes_per_token(self) -> int:
        return self.head_size * self.bits // 8

    @property
    def groups_per_token(self) -> int:
        return self.head_size // self.group

    @property
    def codes_bytes(self) -> int:
        return self.block_size * self.codes_bytes_per_token

    @property
    def meta_bytes(self) -> int:
        if self.axis == "channel":
            return self.head_size * META_BYTES_PER_GROUP
        return self.block_size * self.groups_per_token * META_BYTES_PER_GROUP

    @property
    def end(self) -> int:
        return self.meta_offset + self.meta_bytes


@dataclass(frozen=True)
class PageLayout:
    """Offsets of the K and V regions inside one (page, kv-head) byte range."""

    k: SideLayout
    v: SideLayout

    @property
    def head_page_bytes(self) -> int:
        return self.v.end


@dataclass(frozen=True)
class KVFormat:
    """A kvmix KV-cache format: ``k_bits``-bit keys and ``v_bits``-bit values in 64-token pages."""

    k_bits: int
    v_bits: int

    def __post_init__(self) -> None:
        if self.k_bits not in VALID_BITS or self.v_bits not in VALID_BITS:
            raise KVFormatError(
                f"kvmix bit widths must be in {VALID_BITS}, got k{self.k_bits}"
                f"v{self.v_bits}. {_choices_hint()}"
            )

    # ---- naming -----------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{PREFIX}k{self.k_bits}v{self.v_bits}"

    def __str__(self) -> str:
        return self.name

    # ---- sizes --------------------------------------------------------------
    def check_head_size(self, head_size: int) -> None:
        check_head_size(head_size, self.name)

    def k_bytes_per_token(self, head_size: int) -> int:
        """Key codes plus the per-channel (scale, minimum) of a page, averaged per token."""
        self.check_head_size(head_size)
        return head_size * self.k_bits // 8 + head_size * META_BYTES_PER_GROUP // PAGE_TOKENS

    def v_bytes_per_token(self, head_size: int) -> int:
        """Value codes plus one (scale, minimum) per 64-channel group."""
        self.check_head_size(head_size)
        return head_size * self.v_bits // 8 + (head_size // GROUP) * META_BYTES_PER_GROUP

    def bytes_per_token_head(self, head_size: int) -> int:
        """Packed bytes of one token's K and V for one KV head, metadata included."""
        return self.k_bytes_per_token(head_size) + self.v_bytes_per_token(head_size)

    def bits_per_element(self, head_size: int) -> float:
        """Average stored bits per K/V element, metadata included."""
        return self.bytes_per_token_head(head_size) * 8 / (2 * head_size)

    def compression_vs_bf16(self, head_size: int) -> float:
        return 2 * head_size * BF16_BYTES / self.bytes_per_token_head(head_size)

    @staticmethod
    def stage_bytes_per_seq_head(head_size: int) -> int:
        """Staging bytes per running sequence, layer and KV head: one 64-token page at 8 bits."""
        return stage_layout(head_size).head_page_bytes

    @functools.lru_cache(maxsize=256)  # noqa: B019 (frozen, hashable; called per layer per step)
    def layout(self, head_size: int, block_size: int = PAGE_TOKENS) -> PageLayout:
        """Byte layout of a packed head page: keys per channel over the page, values per token."""
        self.check_head_size(head_size)
        if block_size != PAGE_TOKENS:
            raise KVFormatError(
                f"{self.name}: pages hold {PAGE_TOKENS} tokens; got a kernel block size of {block_size}."
            )
        k = _side(self.k_bits, head_size, block_size, 0, "channel")
        v = _side(self.v_bits, head_size, block_size, k.end, "token")
        return PageLayout(k=k, v=v)


def check_head_size(head_size: int, name: str = "kvmix") -> None:
    """Values are rotated by a Hadamard transform over the head (a power of two) and quantized in groups of 64."""
    if head_size % GROUP != 0 or head_size & (head_size - 1):
        raise KVFormatError(
            f"{name}: head size {head_size} is not a power of two and a multiple of {GROUP} (values are rotated "
            f"over the head and quantized in groups of {GROUP}); kvmix formats need head sizes of 64, 128, 256, 512"
        )


@functools.lru_cache(maxsize=64)
def stage_layout(head_size: int) -> PageLayout:
    """A staging slot: one 64-token page at 8 bits per token, keys in 16-channel groups, rotated values in 64."""
    check_head_size(head_size)
    k = _side(STAGE_BITS, head_size, PAGE_TOKENS, 0, "token", STAGE_KEY_GROUP)
    v = _side(STAGE_BITS, head_size, PAGE_TOKENS, k.end, "token")
    return PageLayout(k=k, v=v)


def _side(bits: int, head_size: int, block_size: int, start: int, axis: str, group: int = GROUP) -> SideLayout:
    codes_bytes = block_size * head_size * bits // 8
    return SideLayout(
        bits=bits,
        group=group,
        head_size=head_size,
        block_size=block_size,
        codes_offset=start,
        meta_offset=start + codes_bytes,
        axis=axis,
    )


@dataclass(frozen=True)
class AutoFormat:
    """``kvmix-auto[-b{B}]``: page-scheme bits chosen per layer at startup under a budget.

    ``avg_bits``: average code bits per element over keys and values (metadata
    is the same for every page format, so the bytes equal those of a uniform
    page format with ``k_bits + v_bits == 2 * avg_bits``).  Each layer's
    concrete :class:`KVFormat` comes from :mod:`vllm_kvmix.allocation`; until
    then a layer carries this placeholder.
    """

    avg_bits: int = AUTO_DEFAULT_BITS

    def __post_init__(self) -> None:
        if self.avg_bits not in AUTO_BITS:
            raise KVFormatError(
                f"kvmix-auto budgets are b{{{'|'.join(map(str, AUTO_BITS))}}} average bits per element, "
                f"got b{self.avg_bits}. {_choices_hint()}"
            )

    @property
    def name(self) -> str:
        return f"{PREFIX}auto" + ("" if self.avg_bits == AUTO_DEFAULT_BITS else f"-b{self.avg_bits}")

    def check_head_size(self, head_size: int) -> None:
        check_head_size(head_size, self.name)

    def __str__(self) -> str:
        return self.name


# ---- names ------------------------------------------------------------------
def all_formats() -> list[KVFormat]:
    """Every uniform kvmix format, keys' bits first."""
    return [KVFormat(k, v) for k in VALID_BITS for v in VALID_BITS]


def all_format_names() -> list[str]:
    """Every accepted name: the uniform formats, then kvmix-auto and its budgets."""
    auto = [AutoFormat(b).name for b in AUTO_BITS] + [f"{PREFIX}auto-b{AUTO_DEFAULT_BITS}"]
    return [f.name for f in all_formats()] + auto


def _choices_hint() -> str:
    bits = "|".join(map(str, VALID_BITS))
    return (
        f"Valid kvmix formats are kvmix-k{{{bits}}}v{{{bits}}} (e.g. kvmix-k4v2, kvmix-k8v4), "
        f"kvmix-auto (bits per layer from weight norms, k4v2's bytes) or "
        f"kvmix-auto-b{{{'|'.join(map(str, AUTO_BITS))}}}."
    )


def is_kvmix(name: object) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def is_auto(name: object) -> bool:
    return isinstance(name, str) and _AUTO_RE.match(name) is not None


def parse_any(name: str) -> KVFormat | AutoFormat:
    """A concrete format or a ``kvmix-auto`` placeholder."""
    m = _AUTO_RE.match(name or "")
    if m is not None:
        return AutoFormat(int(m.group(1) or AUTO_DEFAULT_BITS))
    return parse_format(name)


def parse_format(name: str) -> KVFormat:
    """Parse ``kvmix-k{K}v{V}``; raise :class:`KVFormatError` otherwise."""
    if is_auto(name):
        raise KVFormatError(
            f"{name} is resolved to a format per layer when the model's weights are loaded "
            "(vllm_kvmix.vllm.autoplan); no layer format was assigned here"
        )
    m = _NAME_RE.match(name or "")
    if m is None:
        raise KVFormatError(f"Invalid kvmix KV-cache format {name!r}. {_choices_hint()}")
    return KVFormat(int(m.group(1)), int(m.group(2)))
