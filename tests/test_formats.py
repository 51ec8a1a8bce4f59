import pytest

from vllm_kvmix.formats import (
    KVFormat,
    KVFormatError,
    all_format_names,
    is_auto,
    is_kvmix,
    parse_format,
)


@pytest.mark.parametrize(
    "name,k,v,g,scheme",
    [
        ("kvmix-k4v2", 4, 2, 64, "page"),
        ("kvmix-k8v4", 8, 4, 64, "page"),
        ("kvmix-k2v4", 2, 4, 64, "page"),
        ("kvmix-k4v2-tok", 4, 2, 64, "tok"),
        ("kvmix-k4v2-tok-g32", 4, 2, 32, "tok"),
        ("kvmix-k8v8-tok-g128", 8, 8, 128, "tok"),
        ("kvmix-k4v2-tok-g64", 4, 2, 64, "tok"),
    ],
)
def test_parse(name, k, v, g, scheme):
    fmt = parse_format(name)
    assert (fmt.k_bits, fmt.v_bits, fmt.group, fmt.scheme) == (k, v, g, scheme)
    assert parse_format(fmt.name) == fmt
    assert fmt.staged == fmt.rotates_values == (scheme == "page")


@pytest.mark.parametrize(
    "name",
    [
        "kvmix-k5v2", "kvmix-k4", "kvmix-k4v2-tok-g7", "kvmix-k4v2-tok-g48", "kvmix-", "kvmix-k4v3",
        "kvmixk4v2", "", "kvmix-k4v2-g32", "kvmix-k4v2-page",
    ],
)
def test_invalid_names_list_choices(name):
    with pytest.raises(KVFormatError) as e:
        parse_format(name)
    msg = str(e.value)
    assert "kvmix-k4v2" in msg and "-g{32|64|128}" in msg and "{2|4|8}" in msg


def test_head_size_not_divisible_by_group():
    fmt = parse_format("kvmix-k4v2-tok-g128")
    with pytest.raises(KVFormatError, match="head size 96 is not divisible.*-g32"):
        fmt.bytes_per_token_head(96)
    with pytest.raises(KVFormatError, match="no kvmix group size divides it"):
        parse_format("kvmix-k4v2-tok").layout(40, 16)
    with pytest.raises(KVFormatError, match="head size 96"):
        parse_format("kvmix-k4v2").bytes_per_token_head(96)


@pytest.mark.parametrize("name", ["kvmix-k4v2", "kvmix-k4v2-tok"])
def test_bytes_per_token_llama_8b(name):
    # head size 128.  tok g64: K4 = 64 B codes + 2 groups * 4 B meta; V2 = 32 + 8.
    # page: K4 = 64 B codes + 128 channels * 4 B meta / 64 tokens; V2 the same as tok.
    fmt = parse_format(name)
    assert fmt.k_bytes_per_token(128) == 72
    assert fmt.v_bytes_per_token(128) == 40
    assert fmt.bits_per_element(128) == 3.5
    assert round(fmt.compression_vs_bf16(128), 2) == 4.57
    assert 32 * 8 * fmt.bytes_per_token_head(128) == 28672


def test_staging_bytes():
    # 64 tokens x (K8 + V8: 2 x (128 B codes + 2 groups x 4 B meta)) per sequence, layer and head
    assert parse_format("kvmix-k4v2").stage_bytes_per_seq_head(128) == 64 * 2 * 136
    assert parse_format("kvmix-k4v2-tok").stage_bytes_per_seq_head(128) == 0
    assert parse_format("kvmix-k4v2").kernel_block_size == 64
    assert parse_format("kvmix-k4v2-tok").kernel_block_size is None


@pytest.mark.parametrize("name", [n for n in all_format_names() if not is_auto(n)])
@pytest.mark.parametrize("head_size,block_size", [(64, 16), (128, 128), (256, 32)])
def test_layout_regions_tile_the_page(name, head_size, block_size):
    fmt = parse_format(name)
    if head_size % fmt.group:
        pytest.skip("group does not divide head size")
    if fmt.scheme == "page":
        block_size = 64  # one page per kernel block
    lay = fmt.layout(head_size, block_size)
    regions = [
        (lay.k.codes_offset, lay.k.codes_bytes),
        (lay.k.meta_offset, lay.k.meta_bytes),
        (lay.v.codes_offset, lay.v.codes_bytes),
        (lay.v.meta_offset, lay.v.meta_bytes),
    ]
    pos = 0
    for off, size in regions:
        assert off == pos and off % 16 == 0
        pos += size
    assert lay.head_page_bytes == pos == block_size * fmt.bytes_per_token_head(head_size)


def test_block_size_alignment():
    with pytest.raises(KVFormatError, match="multiple of 16"):
        parse_format("kvmix-k4v2-tok").layout(64, 8)
    with pytest.raises(KVFormatError, match="pages hold 64 tokens"):
        parse_format("kvmix-k4v2").layout(64, 128)


def test_names_and_prefix():
    names = all_format_names()
    # page, tok x 3 group sizes, explicit -tok-g64 spellings, kvmix-auto and -b2..b8 (b3 twice)
    assert len(set(names)) == len(names) == 9 + 9 * 3 + 9 + 7
    assert [n for n in names if is_auto(n)] == [
        "kvmix-auto-b2", "kvmix-auto", "kvmix-auto-b4", "kvmix-auto-b5", "kvmix-auto-b6", "kvmix-auto-b8",
        "kvmix-auto-b3",
    ]
    assert "kvmix-k4v2" in names and "kvmix-k4v2-tok-g32" in names
    assert is_kvmix("kvmix-k4v2") and not is_kvmix("fp8") and not is_kvmix(None)
    with pytest.raises(KVFormatError):
        KVFormat(3, 2)


def test_formats_cli_table(capsys):
    from vllm_kvmix.cli import main

    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "| kvmix-k4v2 | 4 | 2 | K: channel x 64 tok, V: 64 ch (rotated) | 3.50 | 28672 | 4.57x | 4352 KiB |" in out
    assert "| kvmix-k4v2-tok | 4 | 2 | K, V: 64 ch | 3.50 | 28672 | 4.57x | - |" in out
    assert "| auto (bf16) | 16 | 16 | - | 16.00 | 131072 | 1.00x | - |" in out
