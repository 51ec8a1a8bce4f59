"""The package's imports point one way: formats -> reference -> kernels / CPU path -> vLLM integration -> version layer
-> CLI.

Every import counts, also those inside functions.  Fails on a cycle, on an import against the order, on vLLM
imported outside ``vllm_kvmix.vllm``, and on a version module imported outside the version selector.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_kvmix"

# the layer of each module (by prefix, longest first); a module may import only its own layer or lower ones
LAYERS = [
    ("vllm_kvmix.formats", 0), ("vllm_kvmix.options", 0), ("vllm_kvmix.model_shape", 0), ("vllm_kvmix.staging", 0),
    ("vllm_kvmix.quant", 1), ("vllm_kvmix.allocation", 1),
    ("vllm_kvmix.reference", 2),
    ("vllm_kvmix.kernels", 3), ("vllm_kvmix.cpu", 3), ("vllm_kvmix.cpu_kernel", 3),  # the CPU path: the reference's writers
    ("vllm_kvmix.vllm.versions", 5), ("vllm_kvmix.vllm", 4),
    ("vllm_kvmix", 6),  # the package's __init__, __main__, cli, demo, evaluate, models, inspect_model, serve
]
# packages whose __init__ sits above their modules: vllm_kvmix.vllm's entry points go through the version layer
PACKAGE_LAYERS = {"vllm_kvmix.vllm": 5}


def layer(module: str) -> int:
    if module in PACKAGE_LAYERS:
        return PACKAGE_LAYERS[module]
    for prefix, n in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return n
    raise AssertionError(module)


def modules() -> dict[str, Path]:
    """Module name -> file; a package is named without ``__init__``."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything ``name`` imports (modules, or attributes of them)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{name}: relative import"
            base = node.module or ""
            subs = {f"{base}.{a.name}" for a in node.names}
            # `from pkg import submodule` imports the submodule (its package's __init__ runs first, but a
            # package __init__ here imports nothing at import time); `from module import name` the module
            found |= subs if subs <= set(modules()) else {base}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    g = {}
    for name, path in mods.items():
        targets = set()
        for imp in imports(name, path):
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != name and imp.startswith("vllm_kvmix"):
                targets.add(imp)
        g[name] = targets
    return g


def test_no_cycles():
    g = graph()
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in g.get(n, ()):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [n, m]))
            if m not in state:
                visit(m, stack + [n])
        state[n] = 2

    for n in g:
        if n not in state:
            visit(n, [])


def test_imports_follow_the_layers():
    bad = []
    for src, targets in graph().items():
        bad += [f"{src} -> {t}" for t in targets if layer(t) > layer(src)]
    assert not bad, bad


def test_only_the_integration_imports_vllm_and_only_the_selector_a_version_module():
    for name, path in modules().items():
        found = imports(name, path)
        if any(i == "vllm" or i.startswith("vllm.") for i in found):
            assert name.startswith("vllm_kvmix.vllm") or name in ("vllm_kvmix.evaluate", "vllm_kvmix.serve"), name
        if any(i.startswith("vllm_kvmix.vllm.versions.v") for i in found):
            assert name.startswith("vllm_kvmix.vllm.versions"), name
    kernels = [n for n in modules() if n.startswith("vllm_kvmix.kernels")]
    for name in kernels:  # kernels never import the reference they are tested against
        assert not any(i.startswith("vllm_kvmix.reference") for i in imports(name, modules()[name])), name
