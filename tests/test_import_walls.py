"""The one-way walls between the project's packages and between the library's layers, read from the
source: every `import` (at module level, inside a function, under `TYPE_CHECKING`) is an edge of the
import graph."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mimo_jax", "sharding", "data_pipelines", "experiments")
# What each top-level package may import of the project; `mimo_jax` is the library and stands alone.
ALLOWED = {
    "mimo_jax": {"mimo_jax"},
    "sharding": {"sharding", "mimo_jax"},
    "data_pipelines": {"data_pipelines", "mimo_jax"},
    "experiments": {"experiments", "mimo_jax", "sharding", "data_pipelines"},
}


def library_layers() -> list[set[str]]:
    """The layers of `mimo_jax` in import order, as the README's layout section writes them
    (`layers: a, b -> c -> ...`): the one statement of the order."""
    found = re.findall(r"^\s*layers: (.+)$", (ROOT / "README.md").read_text(), re.M)
    assert len(found) == 1, f"README.md: expected one `layers:` line, found {len(found)}"
    return [{u.strip() for u in step.split(",")} for step in found[0].split("->")]


def layer_unit(module: str) -> str | None:
    """The layer a library module belongs to: its subpackage or top-level module of `mimo_jax`."""
    parts = module.split(".")
    return parts[1] if parts[0] == "mimo_jax" and len(parts) > 1 else None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports}, for every module of PACKAGES."""
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    modules = {_module_name(p) for p in files}
    graph = {}
    for path in files:
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
                # `from pkg import submodule` imports the submodule, not what pkg/__init__ holds
                targets = names + ([] if all(n in modules for n in names) else [base])
            else:
                continue
            for target in targets:
                # the longest project module that the imported name is or lies in
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_packages_import_only_what_stands_below_them():
    crossings = [
        f"{src} imports {dst}"
        for src, dsts in import_graph().items()
        for dst in dsts
        if dst.split(".")[0] not in ALLOWED[src.split(".")[0]]
    ]
    assert not crossings, "\n".join(sorted(crossings))


def test_no_module_imports_itself_back():
    assert cycles(import_graph()) == []


def test_library_layers_import_only_those_before_them():
    layers = library_layers()
    rank = {unit: i for i, step in enumerate(layers) for unit in step}
    graph = import_graph()
    units = {layer_unit(m) for m in graph} - {None}
    assert units - set(rank) == set(), "layers missing from README.md's `layers:` line"
    assert set(rank) - units == set(), "README.md's `layers:` line names no such layer"
    assert graph["mimo_jax"] == set(), "mimo_jax/__init__.py imports nothing of the project"
    wrong = sorted(
        f"{src} imports {dst}"
        for src, dsts in graph.items()
        for dst in dsts
        if (a := layer_unit(src)) and (b := layer_unit(dst)) and a != b and rank[b] >= rank[a]
    )
    assert not wrong, "\n".join(wrong)


def test_model_families_register_above_the_conversion_engine():
    graph = import_graph()
    assert "mimo_jax.lm.conversion" in graph["mimo_jax.model_checkpoint"]
    assert "mimo_jax.conversion.family" in graph["mimo_jax.lm.conversion"]


def test_the_graph_sees_imports_inside_functions():
    # The walls are only as good as the parser: a hidden import must show up as an edge.
    graph = import_graph()
    assert (
        "mimo_jax.tokenizer.audio_tokenizer" in graph["data_pipelines.encoders"]
    )  # inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_former_import_paths_still_work():
    """Modules renamed for what they hold keep their old names for users' imports."""
    from mimo_jax.inference import generation_loop, mimo_audio
    from mimo_jax.inference.generate import GenerationConfig, generate, generate_chunks
    from mimo_jax.inference.tasks import MimoAudio

    assert (generate, generate_chunks) == (
        generation_loop.generate,
        generation_loop.generate_chunks,
    )
    assert GenerationConfig is generation_loop.GenerationConfig
    assert MimoAudio is mimo_audio.MimoAudio
