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
    for module, deps in IMPORTS.items():
        for target, _ in deps:
            if target.startswith("msdda.exporting"):
                assert module == "msdda.cli", module
            if target.startswith("msdda.zoo"):
                assert module == "msdda.cli" or module.startswith("msdda.zoo"), module


def test_importing_export_pulls_in_no_loader_engine_or_zoo():
    program = "import json, sys, msdda.export, msdda.export.tensorrt; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    modules = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "msdda.export.onnx_set" in modules
    above = {"msdda.loading", "msdda.engine", "msdda.zoo", "msdda.backends", "msdda.validation", "msdda.cli",
             "msdda.exporting", "diffusers"}
    assert modules & above == set()
