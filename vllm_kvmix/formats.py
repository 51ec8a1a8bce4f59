"""KV-cache format specs: names, bit widths, bytes per token and the paged layout.

Two schemes, same naming of bit widths (K-bit keys, V-bit values):

``kvmix-k{K}v{V}`` (the *page* scheme, the default)
    Pages of 64 tokens.  Keys are quantized per channel over the 64 tokens of
    a page (one fp16 scale and minimum per channel and page): a few key
    channels carry most of the energy and get their own range.  Values are
    rotated by a Hadamard transform over the head dimension and quantized per
    token in groups of 64 channels (fp16 scale and minimum).  A page is packed
    when it fills; until then each running sequence's last page lives in an
    8-bit staging slot (per-token, k8v8 layout), and a query always reads its
    own page from there, so token-by-token generation, prefill and chunked
    prefill see the same numbers.  See ``docs/formats.md`` for the evidence.

``kvmix-k{K}v{V}-tok[-g{G}]`` (the *tok* scheme, the first version)
    Asymmetric min-max quantization per token over groups of ``G`` head-dim
    channels (default 64) for both keys and values, packed on write, no
    staging.  The Triton kernels implement this scheme only so far.

This module is pure Python (no torch, no vLLM): everything downstream (the
reference quantizer, the kernels, the vLLM backend) takes its sizes and offsets
from :class:`KVFormat` and :class:`PageLayout`.

Page layout
-----------
vLLM hands each attention layer a cache of ``num_blocks`` pages.  A kvmix page
holds ``block_size`` tokens for every KV head; the bytes of one (page, kv-head)
pair are contiguous so that a kernel loads one KV head's page in one sweep::

    cache: uint8[num_blocks, num_kv_heads, head_page_bytes]

    head page = [ K codes | K meta | V codes | V meta ]
      K codes: uint8[block_size, head_size * k_bits / 8]   (low bits first)
      K meta : fp16 [block_size, head_size / group, 2]     (tok: scale, minimum per token group)
               fp16 [head_size, 2]                         (page: scale, minimum per channel)
      V codes: uint8[block_size, head_size * v_bits / 8]
      V meta : fp16 [block_size, head_size / group, 2]

Values are packed little-end first: with 4-bit codes, byte ``j`` holds channel
``2j`` in bits 0-3 and channel ``2j+1`` in bits 4-7.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

PREFIX = "kvmix-"
VALID_BITS = (2, 4, 8)
VALID_GROUPS = (32, 64, 128)
DEFAULT_GROUP = 64
META_BYTES_PER_GROUP = 4  # fp16 scale + fp16 minimum
BF16_BYTES = 2
# Pages must hold a multiple of this many tokens so every region of a head page
# starts on a 16-byte boundary (fp16 views, vector loads).
BLOCK_ALIGN = 16

PAGE = "page"
TOK = "tok"
SCHEMES = (PAGE, TOK)
# Tokens per page of the page scheme: the key-channel group and vLLM's kernel block size.
PAGE_TOKENS = 64
# Staging slots (the last, still-filling page of each running sequence) hold
# keys and rotated values at 8 bits per token in the tok layout.
STAGE_BITS = 8

_NAME_RE = re.compile(r"^kvmix-k(\d+)v(\d+)(-tok)?(?:-g(\d+))?$")
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
    """A kvmix KV-cache format: key bits, value bits, group size and scheme."""

    k_bits: int
    v_bits: int
    group: int = DEFAULT_GROUP
    scheme: str = PAGE

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise KVFormatError(f"kvmix scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.scheme == PAGE and self.group != DEFAULT_GROUP:
            raise KVFormatError(
                f"kvmix page formats use {DEFAULT_GROUP}-channel value groups and "
                f"{PAGE_TOKENS}-token key groups; a group size applies to -tok formats "
                f"(e.g. kvmix-k{self.k_bits}v{self.v_bits}-tok-g{self.group}). {_choices_hint()}"
            )
        if self.k_bits not in VALID_BITS or self.v_bits not in VALID_BITS:
            raise KVFormatError(
                f"kvmix bit widths must be in {VALID_BITS}, got k{self.k_bits}"
                f"v{self.v_bits}. {_choices_hint()}"
            )
        if self.group not in VALID_GROUPS:
            raise KVFormatError(
                f"kvmix group size must be in {VALID_GROUPS}, got {self.group}. "
                f"{_choices_hint()}"
            )

    # ---- naming -----------------------------------------------------------
    @property
    def name(self) -> str:
        suffix = "" if self.scheme == PAGE else "-tok"
        if self.group != DEFAULT_GROUP:
            suffix += f"-g{self.group}"
        return f"{PREFIX}k{self.k_bits}v{self.v_bits}{suffix}"

    @property
    def staged(self) -> bool:
        """Whether each running sequence's last page lives in an 8-bit staging slot."""
        return self.scheme == PAGE

    @property
    def rotates_values(self) -> bool:
        """Whether values are stored Hadamard-rotated (attention un-rotates its output)."""
        return self.scheme == PAGE

    @property
    def stage_format(self) -> KVFormat:
        """The layout of a staging slot: 8-bit keys and values per token, 64-channel groups."""
        return KVFormat(STAGE_BITS, STAGE_BITS, DEFAULT_GROUP, TOK)

    def stage_bytes_per_seq_head(self, head_size: int) -> int:
        """Staging bytes per running sequence, layer and KV head (0 without staging)."""
        if not self.staged:
            return 0
        return PAGE_TOKENS * self.stage_format.bytes_per_token_head(head_size)

    @property
    def kernel_block_size(self) -> int | None:
        """The page size the scheme requires of vLLM's kernel blocks (None: any multiple of 16)."""
        return PAGE_TOKENS if self.scheme == PAGE else None

    def __str__(self) -> str:
        return self.name

    # ---- sizes --------------------------------------------------------------
    def check_head_size(self, head_size: int) -> None:
        if head_size % self.group != 0:
            fitting = [g for g in VALID_GROUPS if head_size % g == 0]
            hint = (
                f"use one of: {', '.join(f'-g{g}' for g in fitting)}"
                if fitting
                else "no kvmix group size divides it"
            )
            raise KVFormatError(
                f"{self.name}: head size {head_size} is not divisible by the "
                f"group size {self.group}; {hint}."
            )

    def side_bytes_per_token(self, bits: int, head_size: int) -> int:
        self.check_head_size(head_size)
        return head_size * bits // 8 + (head_size // self.group) * META_BYTES_PER_GROUP

    def k_bytes_per_token(self, head_size: int) -> int:
        if self.scheme == PAGE:  # per-channel meta over a page, averaged per token
            self.check_head_size(head_size)
            return head_size * self.k_bits // 8 + head_size * META_BYTES_PER_GROUP // PAGE_TOKENS
        return self.side_bytes_per_token(self.k_bits, head_size)

    def v_bytes_per_token(self, head_size: int) -> int:
        return self.side_bytes_per_token(self.v_bits, head_size)

    def bytes_per_token_head(self, head_size: int) -> int:
        """Packed bytes of one token's K and V for one KV head, metadata included."""
        return self.k_bytes_per_token(head_size) + self.v_bytes_per_token(head_size)

    def bits_per_element(self, head_size: int) -> float:
        """Average stored bits per K/V element, metadata included."""
        return self.bytes_per_token_head(head_size) * 8 / (2 * head_size)

    def compression_vs_bf16(self, head_size: int) -> float:
        return 2 * head_size * BF16_BYTES / self.bytes_per_token_head(head_size)

    @functools.lru_cache(maxsize=256)  # noqa: B019 (frozen, hashable; called per layer per step)
    def layout(self, head_size: int, block_size: int) -> PageLayout:
        self.check_head_size(head_size)
        if block_size % BLOCK_ALIGN != 0:
            raise KVFormatError(
                f"{self.name}: block size {block_size} must be a multiple of "
                f"{BLOCK_ALIGN}."
            )
        if self.scheme == PAGE and block_size != PAGE_TOKENS:
            raise KVFormatError(
                f"{self.name}: pages hold {PAGE_TOKENS} tokens; got a kernel block size of {block_size}."
            )
        k_axis = "channel" if self.scheme == PAGE else "token"
        k = _side(self.k_bits, self.group, head_size, block_size, 0, k_axis)
        v = _side(self.v_bits, self.group, head_size, block_size, k.end, "token")
        return PageLayout(k=k, v=v)


def _side(bits: int, group: int, head_size: int, block_size: int, start: int, axis: str) -> SideLayout:
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

    # Every concrete format an auto layer can get is a staged page format.
    staged = True
    rotates_values = True
    kernel_block_size = PAGE_TOKENS

    def check_head_size(self, head_size: int) -> None:
        KVFormat(2, 2).check_head_size(head_size)

    def __str__(self) -> str:
        return self.name


# ---- names ------------------------------------------------------------------
def all_formats() -> list[KVFormat]:
    """Every kvmix format: page formats, then tok formats (default group size first)."""
    groups = (DEFAULT_GROUP, *[g for g in VALID_GROUPS if g != DEFAULT_GROUP])
    page = [KVFormat(k, v) for k in VALID_BITS for v in VALID_BITS]
    tok = [KVFormat(k, v, g, TOK) for g in groups for k in VALID_BITS for v in VALID_BITS]
    return page + tok


def all_format_names() -> list[str]:
    """Every accepted name: canonical names, then the explicit ``-tok-g64`` spellings."""
    canonical = [f.name for f in all_formats()]
    explicit_default = [
        f"{f.name}-g{DEFAULT_GROUP}" for f in all_formats() if f.scheme == TOK and f.group == DEFAULT_GROUP
    ]
    auto = [AutoFormat(b).name for b in AUTO_BITS] + [f"{PREFIX}auto-b{AUTO_DEFAULT_BITS}"]
    return canonical + explicit_default + auto


def _choices_hint() -> str:
    bits = "|".join(map(str, VALID_BITS))
    groups = "|".join(map(str, VALID_GROUPS))
    return (
        f"Valid kvmix formats are kvmix-k{{{bits}}}v{{{bits}}} (page scheme) and "
        f"kvmix-k{{{bits}}}v{{{bits}}}-tok with an optional -g{{{groups}}} group suffix "
        f"(default -g{DEFAULT_GROUP}), e.g. kvmix-k4v2, kvmix-k8v4, kvmix-k4v2-tok-g32; "
        f"kvmix-auto (bits per layer from weight norms, k4v2's bytes) or kvmix-auto-b{{{'|'.join(map(str, AUTO_BITS))}}}."
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
    """Parse ``kvmix-k{K}v{V}`` or ``kvmix-k{K}v{V}-tok[-g{G}]``; raise :class:`KVFormatError` otherwise."""
    if is_auto(name):
        raise KVFormatError(
            f"{name} is resolved to a format per layer when the model's weights are loaded "
            "(vllm_kvmix.vllm.autoplan); no layer format was assigned here"
        )
    m = _NAME_RE.match(name or "")
    if m is None:
        raise KVFormatError(f"Invalid kvmix KV-cache format {name!r}. {_choices_hint()}")
    k, v = int(m.group(1)), int(m.group(2))
    scheme = TOK if m.group(3) else PAGE
    g = int(m.group(4) or DEFAULT_GROUP)
    return KVFormat(k, v, g, scheme)
