"""Startup checks of the device and the CUDA decode kernel (no GPU needed: capability and compiles mocked)."""

import pytest
import torch

from vllm_kvmix.formats import parse_format
from vllm_kvmix.kernels import cuda_decode
from vllm_kvmix.options import DECODE_KERNEL_ENV, decode_kernel

pytest.importorskip("vllm")
from vllm_kvmix.vllm.device import UnsupportedDevice, check_device, prepare_decode  # noqa: E402

K4V2 = parse_format("kvmix-k4v2")


@pytest.fixture(autouse=True)
def fresh_compiles():
    cuda_decode.compiled.cache_clear()
    yield
    cuda_decode.compiled.cache_clear()


def test_cpu_needs_nothing():
    check_device(K4V2, torch.device("cpu"))


@pytest.mark.parametrize("cap, ok", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True), ((12, 0), True)])
def test_compute_capability(monkeypatch, cap, ok):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mock GPU")
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    if ok:
        check_device(K4V2, torch.device("cuda", 0))
    else:
        with pytest.raises(UnsupportedDevice, match=rf"capability >= 8.0 .*Mock GPU is {cap[0]}.{cap[1]}"):
            check_device(K4V2, torch.device("cuda", 0))


def test_non_nvidia_devices_are_refused(monkeypatch):
    with pytest.raises(UnsupportedDevice, match="NVIDIA CUDA GPUs .* and on CPU, not on xpu"):
        check_device(K4V2, torch.device("xpu"))
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    with pytest.raises(UnsupportedDevice, match="not on ROCm"):
        check_device(K4V2, torch.device("cuda", 0))


def test_decode_kernel_option(monkeypatch):
    monkeypatch.delenv(DECODE_KERNEL_ENV, raising=False)
    assert decode_kernel() == "cuda"
    monkeypatch.setenv(DECODE_KERNEL_ENV, "Triton")
    assert decode_kernel() == "triton"
    line = prepare_decode(K4V2, 128, 4, torch.bfloat16)
    assert "Triton page kernel (KVMIX_DECODE_KERNEL=triton)" in line
    monkeypatch.setenv(DECODE_KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="choose 'cuda' .* or 'triton'"):
        decode_kernel()


def test_layers_outside_the_cuda_kernel_say_so(monkeypatch):
    monkeypatch.delenv(DECODE_KERNEL_ENV, raising=False)
    line = prepare_decode(parse_format("kvmix-k2v4"), 128, 4, torch.bfloat16)
    assert ("kvmix-k2v4 decode on the Triton page kernel: the CUDA decode kernel covers head sizes (64, 128, 256)"
            in line)
    assert "Triton" in prepare_decode(K4V2, 512, 4, torch.bfloat16)
    assert "Triton" in prepare_decode(K4V2, 256, 4, torch.bfloat16, soft_cap=30.0)


def test_layers_whose_shared_memory_the_gpu_lacks_decode_on_triton(monkeypatch):
    """Head size 256 reads pages through a shared-memory ring: with 8-bit keys it needs more than a 99 KB card
    (sm_86 / sm_89) gives a block; such a layer decodes on the Triton kernel and the startup line says why."""
    monkeypatch.delenv(DECODE_KERNEL_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a 99 KB card")
    monkeypatch.setattr(cuda_decode, "smem_limit", lambda index: 99 * 1024)
    k8v4 = parse_format("kvmix-k8v4")
    need = cuda_decode.smem_bytes(8, 4, 256) + cuda_decode.static_smem_bytes()
    assert need > 99 * 1024
    line = prepare_decode(k8v4, 256, 2, torch.bfloat16)
    assert line == (f"kvmix: kvmix-k8v4 decode on the Triton page kernel: the CUDA decode kernel at head size 256 "
                    f"needs {need} bytes of shared memory per block, a 99 KB card gives {99 * 1024}")
    dev = torch.device("cuda", 0)
    assert not cuda_decode.fits_device(k8v4, 256, dev)
    assert cuda_decode.fits_device(K4V2, 256, dev) and cuda_decode.fits_device(k8v4, 128, dev)
    monkeypatch.setattr(cuda_decode, "smem_limit", lambda index: 227 * 1024)  # H100 / H200
    assert all(cuda_decode.fits_device(parse_format(f), d, dev) for f in ("kvmix-k8v4", "kvmix-k4v2") for d in (64, 128, 256))


def test_missing_kernel_source_is_a_startup_error(monkeypatch, tmp_path):
    """A package without page_decode.cu stops the engine at startup naming the file and the fixes."""
    monkeypatch.delenv(DECODE_KERNEL_ENV, raising=False)

    class Missing:
        def __truediv__(self, name):
            return tmp_path / name

    monkeypatch.setattr(cuda_decode.importlib.resources, "files", lambda pkg: Missing())
    with pytest.raises(cuda_decode.KernelUnavailable, match=r"page_decode.cu is not installed .*pip wheel .*"
                                                            r"KVMIX_DECODE_KERNEL=triton"):
        prepare_decode(K4V2, 128, 4, torch.bfloat16)


@pytest.mark.skipif(torch.version.cuda is None, reason="this torch has no NVRTC (a CPU build)")
def test_kernel_that_does_not_compile_is_a_startup_error(monkeypatch, tmp_path):
    """NVRTC's error reaches the user with the kernel's name (real NVRTC, no GPU: compile step only)."""
    monkeypatch.delenv(DECODE_KERNEL_ENV, raising=False)
    bad = tmp_path / cuda_decode.SOURCE_NAME
    bad.write_text(cuda_decode.source_path().read_text().replace("struct DecodeParams {", "struct DecodeParams {{", 1))
    monkeypatch.setattr(cuda_decode, "source_path", lambda: bad)

    def nvrtc_only(source, name, defines=(), smem=0):
        k_bits, v_bits = int(name.split("<")[1].split(",")[0]), int(name.split(",")[1])
        return cuda_decode.nvrtc_cubin(source, k_bits, v_bits, "true" in name, defines)

    monkeypatch.setattr(cuda_decode, "compile_cuda", nvrtc_only)
    with pytest.raises(cuda_decode.KernelUnavailable,
                       match=r"compiling the CUDA decode kernel kvmix_page_decode<4, 2, 4, true, 128, false> .* failed"):
        prepare_decode(K4V2, 128, 4, torch.bfloat16)
    monkeypatch.setattr(cuda_decode, "source_path", lambda: bad.with_name("x.cu"))  # the good source compiles
    good = tmp_path / "x.cu"
    good.write_text(bad.read_text().replace("struct DecodeParams {{", "struct DecodeParams {", 1))
    cuda_decode.compiled.cache_clear()
    line = prepare_decode(K4V2, 128, 4, torch.bfloat16)
    assert "decode on the CUDA kernel (kvmix_page_decode<4, 2, 4, true, 128, false>" in line
