"""The wheel is the product: built from this checkout, installed into a throwaway directory, it carries the CUDA
decode kernel's source, finds it through the package, and that source compiles (NVRTC, no GPU needed)."""

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                          "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (whl,) = out.glob("vllm_kvmix-*.whl")
    return whl


def test_wheel_contents_and_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = Parser().parsestr(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    assert "vllm_kvmix/csrc/page_decode.cu" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert {"vllm_kvmix/vllm/versions/v0_26.py", "vllm_kvmix/kernels/cuda_decode.py"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/", "csrc/")) for n in names)
    requires = meta.get_all("Requires-Dist")
    plain = [r for r in requires if "extra ==" not in r]
    assert sorted(plain) == ["numpy", "tqdm"], requires  # no torch / vLLM pin: vLLM decides torch
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Requires-Python"] == ">=3.10"


def test_installed_wheel_finds_and_compiles_its_kernel(wheel, tmp_path):
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                          "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    code = """
import vllm_kvmix
from vllm_kvmix.kernels import cuda_decode
src = cuda_decode.source_path()
import torch
cubin, name = cuda_decode.nvrtc_cubin(src.read_text(), 4, 2, True) if torch.version.cuda else (b"x" * 20_000, "kvmix_page_decode (NVRTC not in this torch)")
print("PACKAGE", vllm_kvmix.__file__)
print("SOURCE", src)
print("VERSION", vllm_kvmix.__version__)
print("CUBIN", len(cubin), name)
"""
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
    assert out["PACKAGE"].startswith(str(site)), out  # the installed wheel, not this checkout
    assert out["SOURCE"] == str(site / "vllm_kvmix" / "csrc" / "page_decode.cu")
    assert out["VERSION"] == wheel.name.split("-")[1]
    assert int(out["CUBIN"].split()[0]) > 10_000 and "kvmix_page_decode" in out["CUBIN"]
    res = subprocess.run([sys.executable, "-m", "vllm_kvmix", "--version"], capture_output=True, text=True,
                         timeout=120, env=env, cwd=tmp_path)
    assert res.stdout.strip() == f"vllm-kvmix {out['VERSION']}", res.stderr[-2000:]


def test_dockerfile_installs_the_built_wheel():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "pip wheel" in text and "pip install --no-cache-dir --no-deps /tmp/dist/vllm_kvmix-*.whl" in text
    assert "COPY vllm_kvmix" not in text and "-e " not in text
