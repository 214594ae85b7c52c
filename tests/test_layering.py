"""Imports go one way (ARCHITECTURE.md): kernels <- (schedule, atomic, hashing) <- export <- backends <- engine
<- cli. export/ builds artifacts and imports neither the loader, the Engine nor the zoo; the backends take from
export/ only what loads an artifact (its metadata check, TensorRT deserialisation), never what builds one.

Checked twice: statically (every ``import`` in the package's source, lazy ones inside functions included) and
by importing msdda.export in a fresh interpreter."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"engine": "msdda", "kernels": "msdda.kernels", "export": "msdda.export"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts[1:])
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[rel.parts[0]], *parts])


def _imports() -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """{module: [(imported msdda module, names imported from it)]} for every module of the package."""
    out = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "aot" in path.parts:
                continue
            name = _module_name(path)
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            found = []
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    target = node.module or ""
                    if node.level:
                        target = ".".join(package[:len(package) - node.level + 1] + ([target] if target else []))
                    found.append((target, tuple(a.name for a in node.names)))
                elif isinstance(node, ast.Import):
                    found.extend((a.name, ()) for a in node.names)
            out[name] = [(t, names) for t, names in found if t == "msdda" or t.startswith("msdda.")]
    return out


IMPORTS = _imports()


def _of(prefix: str) -> dict:
    return {m: deps for m, deps in IMPORTS.items() if m == prefix or m.startswith(prefix + ".")}


def test_the_scan_sees_the_package():
    assert {"msdda.engine", "msdda.export.onnx", "msdda.backends.tensorrt_backend", "msdda.kernels.compose"} \
        <= set(IMPORTS)
    assert any(t == "msdda.export.artifacts" and "check_weights_tag" in names
               for t, names in IMPORTS["msdda.backends.onnxruntime_backend"])


def test_kernels_import_nothing_from_the_engine():
    for module, deps in _of("msdda.kernels").items():
        assert all(t.startswith("msdda.kernels") for t, _ in deps), (module, deps)


def test_export_imports_only_what_lies_below_it():
    allowed = ("msdda.export", "msdda.atomic", "msdda.errors", "msdda.hashing", "msdda.kernels")
    for module, deps in _of("msdda.export").items():
        for target, names in deps:
            if target == "msdda":
                assert set(names) <= {"__version__"}, (module, names)
                continue
            assert target.startswith(allowed), f"{module} imports {target}"


def test_backends_take_only_loading_code_from_export():
    loading = {"msdda.export.tensorrt": {"require_tensorrt", "TensorRTUnavailable", "deserialize"}}
    for module, deps in _of("msdda.backends").items():
        for target, names in deps:
            assert not target.startswith(("msdda.engine", "msdda.backend_artifacts", "msdda.exporting",
                                          "msdda.cli", "msdda.zoo")), f"{module} imports {target}"
            if target == "msdda.export.artifacts":
                continue
            if target in loading:
                assert set(names) <= loading[target], f"{module} imports {set(names) - loading[target]} from {target}"
            else:
                assert not target.startswith("msdda.export"), f"{module} imports {target}"


def test_only_the_cli_loads_model_folders_to_export_them_or_knows_the_zoo():
    command_line = ("msdda.cli", "msdda.cli_common")   # the zoo is every command's default models
    for module, deps in IMPORTS.items():
        for target, _ in deps:
            if target.startswith("msdda.exporting"):
                assert module == "msdda.cli", module
            if target.startswith("msdda.zoo"):
                assert module in command_line or module.startswith("msdda.zoo"), module


def test_importing_export_pulls_in_no_loader_engine_or_zoo():
    program = "import json, sys, msdda.export, msdda.export.tensorrt; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    modules = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "msdda.export.onnx_set" in modules
    above = {"msdda.loading", "msdda.engine", "msdda.zoo", "msdda.backends", "msdda.validation", "msdda.cli",
             "msdda.exporting", "diffusers"}
    assert modules & above == set()


# ---------------------------------------------------------------------- the declared layer order, and no circle
# Lowest first. A module may import modules of its own layer or of a lower one (lazy imports inside functions
# included); a module missing here fails the test, so every new module declares where it sits.
LAYERS = (
    ("msdda.kernels",),
    ("msdda.errors", "msdda.schedule", "msdda.atomic", "msdda.hashing", "msdda.precision", "msdda.validation",
     "msdda.sampling", "msdda.progress"),
    ("msdda.export",),
    ("msdda.loading", "msdda.strategies", "msdda.lora", "msdda.conditioning", "msdda.backends"),
    ("msdda.backend_artifacts", "msdda.graphs", "msdda.request"),
    ("msdda.engine", "msdda"),
    ("msdda.runfolder", "msdda.exporting", "msdda.coalesce", "msdda.zoo", "msdda.benchmark", "msdda.http_limits",
     "msdda.scheduler"),
    ("msdda.cli_common", "msdda.ray_runtime"),
    ("msdda.http_api", "msdda.serve", "msdda.batch"),
    ("msdda.cli",),
)


def layer_of(module: str) -> int:
    """The layer of a module: that of the longest declared prefix (a package's name covers its modules)."""
    best = None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[1]):
                best = (index, len(name))
    assert best is not None, f"{module} is in no layer of tests/test_layering.py's LAYERS: declare it"
    return best[0]


def import_graph(imports=None) -> dict[str, set[str]]:
    """{module: modules it imports}. ``from msdda import engine`` is an edge to msdda.engine (a submodule), ``from
    msdda import Engine`` one to the package ``msdda``; ``from msdda import __version__`` none (the version is the
    package's first line and imports nothing)."""
    imports = IMPORTS if imports is None else imports
    graph: dict[str, set[str]] = {m: set() for m in imports}
    for module, deps in imports.items():
        for target, names in deps:
            if target == "msdda" and set(names) <= {"__version__"}:
                continue
            submodules = {f"{target}.{n}" for n in names} & set(imports)
            graph[module] |= submodules or ({target} if target in imports else set())
            if submodules and set(names) - {s.rsplit(".", 1)[1] for s in submodules} and target in imports:
                graph[module].add(target)
        graph[module].discard(module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}        # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt) and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_every_import_goes_down_the_declared_layers():
    for module, targets in import_graph().items():
        for target in targets:
            assert layer_of(target) <= layer_of(module), f"{module} (layer {layer_of(module)}) imports {target} " \
                                                          f"(layer {layer_of(target)})"


def test_the_package_has_no_import_circle():
    assert find_cycle(import_graph()) is None, f"import circle: {' -> '.join(find_cycle(import_graph()))}"


def test_the_circle_check_sees_a_planted_circle():
    planted = dict(IMPORTS)
    planted["msdda.validation"] = [*IMPORTS["msdda.validation"], ("msdda.cli", ("CliError",))]
    cycle = find_cycle(import_graph(planted))
    assert cycle is not None and cycle[0] == cycle[-1] and "msdda.cli" in cycle and "msdda.validation" in cycle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
