"""Compile the page-attention kernel for sm_90 on a machine without a GPU and summarise its SASS.

    python benchmarks/kernels/sass.py [--fmt kvmix-k4v2] [--warps 2] [--stages 2] [--dump DIR]
    python benchmarks/kernels/sass.py --cuda [--source FILE] [-D NAME=VALUE ...]

``--cuda``: the CUDA decode kernel (csrc/page_decode.cu) built as it runs -- by NVRTC with the launcher's
options (libnvrtc ships in torch's CUDA wheels; no GPU needed) -- registers and stack, and the instructions
of each arm of the page loop's ``p == own`` branch: the packed-page arm (more mmas) is the per-page cost.
(nvcc's build of the same source differs: 1,250 instead of 1,380 instructions per k4v2 page.)

Triton ships ptxas and nvdisasm, so registers, spills, shared memory and the instruction mix of
the main loop can be read here; the GPU is only needed for timing.  Shapes: Llama-3.1-8B heads
(32 q / 8 kv / d=128), bf16 queries, decode (BLOCK_Q = 4 tokens x 4 heads).
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

try:  # the installed package (wheel or editable); a source tree run without installing: the tree
    import vllm_kvmix  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from vllm_kvmix.formats import parse_format  # noqa: E402
from vllm_kvmix.kernels import page as page_mod  # noqa: E402

PTR_TYPES = {"q_ptr": "*bf16", "out_ptr": "*bf16", "rot_ptr": "*fp32", "ws_acc_ptr": "*fp32", "ws_ml_ptr": "*fp32",
             "cache_ptr": "*u8", "stage_ptr": "*u8", "scratch_ptr": "*u8"}


def signature(fn, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = PTR_TYPES.get(name, "*i32")
        elif name in ("scale", "soft_cap"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_attention(fmt_name="kvmix-k4v2", d=128, rep=4, block_q=4, warps=2, stages=2, split=False,
                      kernel=None, extra=None, maxnreg=None):
    fn = kernel or page_mod._page_attention_kernel
    fmt = parse_format(fmt_name)
    stage, bits = page_mod._constants(fmt, d)
    consts = dict(D=d, REP=rep, REP_P=triton.next_power_of_2(rep), BLOCK_Q=block_q, **bits, **stage,
                  USE_WINDOW=False, USE_SOFTCAP=False, IEEE_DOT=False, SPLIT=split, **(extra or {}))
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = signature(fn, consts)
    # what the JIT's specialization sees on a real launch: 16-byte aligned tensors, strides multiple of 16
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
             if n.endswith("_ptr") or n.startswith("stride_")}
    src = ASTSource(fn, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages, maxnreg=maxnreg))


def sass(k) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def loops(text):
    """(start, end) line indices of backward branches (loop bodies) in the SASS listing."""
    lines = text.splitlines()
    labels = {}
    for i, ln in enumerate(lines):
        m = re.match(r"^\.(L_x_\d+):", ln.strip())
        if m:
            labels[m.group(1)] = i
    out = []
    for i, ln in enumerate(lines):
        m = re.search(r"\bBRA\b.*`\(\.(L_x_\d+)\)", ln)
        if m and labels.get(m.group(1), i + 1) < i:
            out.append((labels[m.group(1)], i))
    return lines, out


def opcode_mix(lines):
    c = collections.Counter()
    for ln in lines:
        m = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", ln)
        if m:
            c[m.group(2).split(".")[0]] += 1
    return c


def resources(k) -> str:
    """cuobjdump's resource line: registers, stack (spills land there), shared memory."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:\d+.*", out)
    return m.group(0) if m else out


def report(k, label):
    text = sass(k)
    md = k.metadata
    print(f"{label}: {resources(k)} (triton shared {md.shared} B)")
    lines, lps = loops(text)
    for a, b in lps:
        mix = opcode_mix(lines[a:b + 1])
        print(f"  loop lines {a}-{b}: {sum(mix.values())} instructions: "
              + " ".join(f"{op} {n}" for op, n in mix.most_common(18)))
    return text


def cuda_report(source, defines=(), head_size=128):
    """The CUDA decode kernel as it runs: NVRTC (torch's private wrapper, the launcher's options; no GPU needed)
    builds each instantiation the launcher names for sm_90.  Per variant: registers and spills (cuobjdump),
    then per arm of the page loop's branch (packed page / own page) its instruction count and mix."""
    from vllm_kvmix.kernels import cuda_decode

    src = open(source).read()
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for k_bits, v_bits, bf16 in ((4, 2, True), (4, 4, True), (8, 4, True)):
        cubin, _ = cuda_decode.nvrtc_cubin(src, k_bits, v_bits, bf16, tuple(defines), head_size=head_size)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            text = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                                  check=True).stdout
            res = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                                 text=True, check=True).stdout
        m = re.search(r"REG:\d+ STACK:\d+", res)
        print(f"k{k_bits}v{v_bits} bf16 {bf16} head size {head_size}: {m.group(0) if m else res.strip()}")
        lines, lps = loops(text)
        with_mma = [ab for ab in lps if opcode_mix(lines[ab[0]:ab[1] + 1])["HMMA"] > 0]
        a, b = min(with_mma, key=lambda ab: ab[1] - ab[0])  # the page loop: the innermost loop with mma
        seg = lines[a:b + 1]
        br = next(j for j, ln in enumerate(seg) if re.search(r"@!?P\d+\s+BRA", ln))
        label = re.search(r"`\(\.(L_x_\d+)\)", seg[br]).group(1)
        mid = next(j for j, ln in enumerate(seg) if ln.strip().startswith(f".{label}:"))
        arms = [opcode_mix(seg[:mid]), opcode_mix(seg[mid:])]
        packed = max(arms, key=lambda mix: mix["HMMA"])  # the 8-bit own page's keys need fewer S mmas
        for mix in arms:
            kind = "packed page" if mix is packed else "own page"
            print(f"  {kind}: {sum(mix.values())} instructions (local memory: LDL {mix['LDL']}, STL {mix['STL']}): "
                  + " ".join(f"{op} {n}" for op, n in mix.most_common(12)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda", action="store_true", help="the CUDA decode kernel (as NVRTC builds it) instead of the Triton one")
    ap.add_argument("--source", default=os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "page_decode.cu"))
    ap.add_argument("-D", dest="defines", action="append", default=[], help="a define of the CUDA build")
    ap.add_argument("--head-size", type=int, default=128, help="--cuda: the instantiation's head size")
    ap.add_argument("--fmt", default="kvmix-k4v2")
    ap.add_argument("--warps", type=int, default=2)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--split", action="store_true")
    ap.add_argument("--maxnreg", type=int, default=None)
    ap.add_argument("--dump", default=None)
    args = ap.parse_args()
    if args.cuda:
        cuda_report(args.source, tuple(args.defines), args.head_size)
        return
    k = compile_attention(args.fmt, warps=args.warps, stages=args.stages, split=args.split, maxnreg=args.maxnreg)
    text = report(k, f"{args.fmt} w{args.warps} s{args.stages}")
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(args.dump, f"attn.{ext}"), "w") as f:
                f.write(k.asm[ext])
        with open(os.path.join(args.dump, "attn.sass"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
