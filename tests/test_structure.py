"""The package's architecture, checked on its import graph: sub-packages in layers (the model at the bottom), no
module importing a layer above its own, no import cycles, and the model free of distributed, compile and benchmark
code. Imports inside functions count as much as those at the top."""

import ast
from pathlib import Path

import pytest

from .helpers import ROOT

PKG = ROOT / "src" / "mvdit"
# What each sub-package may import: itself and the layers below it.
LAYERS = {
    "constants": 0,
    "model": 1,  # the network, position embeddings, config, preconditioning and sampler
    "data": 2,  # datasets, manifests, the synthetic renderer, video files, prompt sets
    "encoders": 2,  # the video tokenizer and T5 text encoder loaders
    "workflow": 2,  # the experiment schema and Snakemake's locks
    "assets": 2,  # checkpoint loading, atomic files, the hub
    "adapters": 3,  # LoRA
    "runtime": 3,  # processes, FSDP, context parallelism, compilation, checkpointing, kernels, FP8
    "training": 4,
    "inference": 4,
    "tiny": 5,  # the embedded default's stand-in assets (fixtures in the real formats)
    "refvec": 5,  # parity with upstream's reference vectors
}
MODEL_MAY_NOT_IMPORT = ("torch.distributed", "torch._dynamo", "torch.compile", "torch.utils.checkpoint")


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The mvdit modules `path` imports (from X import y resolves to X.y when that is a module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    """module -> the mvdit modules it imports."""
    mods = modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def edges(g: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, deps in g.items() for b in deps}


def cycle(g: dict[str, set[str]]) -> list[str]:
    """One import cycle (depth-first search), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        path.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return path[path.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        path.pop()
        return []

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return []


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_sub_package_has_a_layer():
    subs = {p.name if p.is_dir() else p.stem for p in PKG.iterdir() if not p.name.startswith(("_", "."))}
    subs -= {"experiment.schema"}
    assert subs == set(LAYERS), "give new sub-packages a layer in LAYERS (and a row in the README's package table)"


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{a} -> {b}"
        for a, b in edges(graph())
        if layer(a) and layer(b) and layer(a) != layer(b) and LAYERS[layer(b)] >= LAYERS[layer(a)]
    ]
    assert not upward, upward


def test_no_import_cycles():
    assert cycle(graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) == []


def test_the_model_imports_only_itself_and_the_constants():
    outside = [
        f"{a} -> {b}" for a, b in edges(graph()) if layer(a) == "model" and layer(b) not in ("model", "constants")
    ]
    assert not outside, outside


@pytest.mark.parametrize("path", sorted((PKG / "model").glob("*.py")), ids=lambda p: p.name)
def test_the_model_has_no_distributed_compile_or_checkpointing_code(path):
    text = path.read_text()
    assert not [m for m in MODEL_MAY_NOT_IMPORT if m in text]
    assert ".compile(" not in text and "dist." not in text


def test_the_graph_sees_the_imports_it_checks():
    """The checks above would pass on an empty graph: the parser must find known edges, including a local import."""
    e = edges(graph())
    assert ("mvdit.model.network", "mvdit.model.posemb") in e
    assert ("mvdit.inference.session", "mvdit.runtime.fp8") in e  # `from mvdit.runtime import fp8`
    assert ("mvdit.tiny.tokenizer", "mvdit.data.synthetic") in e
    assert len(e) > 60


def test_every_data_file_of_the_package_is_installed():
    """A non-editable install (pip install ., the conda envs) ships only .py files unless pyproject names the rest."""
    import fnmatch
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    data = [
        p for p in PKG.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    data = [p for p in data if ".egg-info" not in str(p)]
    missing = [
        str(p.relative_to(PKG.parent))
        for p in data
        if not any(
            fnmatch.fnmatch(p.name, pat) for pat in declared.get(".".join(p.parent.relative_to(PKG.parent).parts), [])
        )
    ]
    assert data and not missing, missing
