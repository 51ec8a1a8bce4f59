import pytest

from vllm_kvmix.formats import (
    KVFormat,
    KVFormatError,
    all_format_names,
    is_auto,
    is_kvmix,
    parse_any,
    parse_format,
    stage_layout,
)


@pytest.mark.parametrize("name,k,v", [("kvmix-k4v2", 4, 2), ("kvmix-k8v4", 8, 4), ("kvmix-k2v4", 2, 4),
                                      ("kvmix-k8v8", 8, 8)])
def test_parse(name, k, v):
    fmt = parse_format(name)
    assert (fmt.k_bits, fmt.v_bits) == (k, v)
    assert parse_format(fmt.name) == fmt and fmt.name == name and str(fmt) == name


@pytest.mark.parametrize(
    "name",
    [
        "kvmix-k5v2", "kvmix-k4", "kvmix-k4v2-tok", "kvmix-k4v2-tok-g32", "kvmix-", "kvmix-k4v3",
        "kvmixk4v2", "", "kvmix-k4v2-g32", "kvmix-k4v2-page", "kvmix-auto-b7",
    ],
)
def test_invalid_names_list_choices(name):
    with pytest.raises(KVFormatError) as e:
        parse_any(name)
    msg = str(e.value)
    assert "kvmix-k4v2" in msg and "{2|4|8}" in msg and "kvmix-auto" in msg


def test_head_size_must_be_a_power_of_two_multiple_of_the_value_group():
    with pytest.raises(KVFormatError, match="kvmix-k4v2: head size 96 is not a power of two and a multiple of 64"):
        parse_format("kvmix-k4v2").bytes_per_token_head(96)
    with pytest.raises(KVFormatError, match="head size 40"):
        parse_format("kvmix-k8v4").layout(40)
    with pytest.raises(KVFormatError, match="kvmix-auto-b5: head size 80"):
        parse_any("kvmix-auto-b5").check_head_size(80)
    with pytest.raises(KVFormatError, match="head size 192 is not a power of two"):
        parse_format("kvmix-k4v2").check_head_size(192)
    for d in (64, 128, 256, 512):
        parse_format("kvmix-k4v2").check_head_size(d)


def test_bytes_per_token_llama_8b():
    # head size 128: K4 = 64 B codes + 128 channels * 4 B meta / 64 tokens; V2 = 32 B + 2 groups * 4 B meta
    fmt = parse_format("kvmix-k4v2")
    assert fmt.k_bytes_per_token(128) == 72
    assert fmt.v_bytes_per_token(128) == 40
    assert fmt.bits_per_element(128) == 3.5
    assert round(fmt.compression_vs_bf16(128), 2) == 4.57
    assert 32 * 8 * fmt.bytes_per_token_head(128) == 28672


def test_staging_bytes():
    # 64 tokens x (K8: 128 B codes + 8 groups of 16 channels x 4 B meta; V8: 128 B + 2 groups of 64 x 4 B)
    # per sequence, layer and head
    assert parse_format("kvmix-k4v2").stage_bytes_per_seq_head(128) == 64 * (160 + 136)
    assert stage_layout(128).head_page_bytes == 64 * (160 + 136)
    lay = stage_layout(64)
    assert (lay.k.bits, lay.v.bits, lay.k.axis, lay.v.axis) == (8, 8, "token", "token")
    assert (lay.k.group, lay.v.group) == (16, 64)


@pytest.mark.parametrize("name", [n for n in all_format_names() if not is_auto(n)])
@pytest.mark.parametrize("head_size", [64, 128, 256])
def test_layout_regions_tile_the_page(name, head_size):
    fmt = parse_format(name)
    block_size = 64  # one page per kernel block
    for lay, per_token in ((fmt.layout(head_size), fmt.bytes_per_token_head(head_size)),
                           (stage_layout(head_size), fmt.stage_bytes_per_seq_head(head_size) // 64)):
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
        assert lay.head_page_bytes == pos == block_size * per_token
    assert fmt.layout(head_size).k.axis == "channel" and fmt.layout(head_size).v.axis == "token"


def test_pages_hold_64_tokens():
    with pytest.raises(KVFormatError, match="pages hold 64 tokens"):
        parse_format("kvmix-k4v2").layout(64, 128)


def test_names_and_prefix():
    names = all_format_names()
    # the 9 uniform formats, kvmix-auto and -b2..b8 (b3 twice)
    assert len(set(names)) == len(names) == 9 + 7
    assert [n for n in names if is_auto(n)] == [
        "kvmix-auto-b2", "kvmix-auto", "kvmix-auto-b4", "kvmix-auto-b5", "kvmix-auto-b6", "kvmix-auto-b8",
        "kvmix-auto-b3",
    ]
    assert "kvmix-k4v2" in names and not any("-tok" in n or "-g" in n for n in names)
    assert is_kvmix("kvmix-k4v2") and not is_kvmix("fp8") and not is_kvmix(None)
    with pytest.raises(KVFormatError):
        KVFormat(3, 2)


def test_formats_cli_table(capsys):
    from vllm_kvmix.cli import main

    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "| kvmix-k4v2 | 4 | 2 | 3.50 | 28672 | 4.57x | 4736 KiB |" in out
    assert "| auto (bf16) | 16 | 16 | 16.00 | 131072 | 1.00x | - |" in out
    assert out.count("| kvmix-k") == 9


def test_version_flag(capsys):
    from vllm_kvmix import __version__
    from vllm_kvmix.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"vllm-kvmix {__version__}"
