"""Repository structure: no import cycles, a torch-free command line, self-contained docs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sds_vision"
# the team's private design notes (spelled in pieces so this file does not name them itself)
PRIVATE_NOTES = ("shared" + "/", "METHOD" + ".md", "BENCHMARKS" + ".md")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """Modules of the package imported at module level (not in functions or TYPE_CHECKING)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                continue
            if isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names if a.name.startswith("sds_vision")}
            elif isinstance(sub, ast.ImportFrom):
                base = sub.module or ""
                if sub.level:
                    anchor = package.split(".")[: len(package.split(".")) - sub.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if not base.startswith("sds_vision"):
                    continue
                found.add(base)
                for alias in sub.names:  # `from . import transfer` imports a submodule
                    if (PACKAGE.parent / (base + "." + alias.name).replace(".", "/")).with_suffix(
                            ".py").is_file():
                        found.add(f"{base}.{alias.name}")
    return found - {name}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for dep in _top_level_imports(path):
            while dep not in modules and "." in dep:  # `from .x import Name` of a package
                dep = dep.rpartition(".")[0]
            deps.add(dep)
        graph[name] = deps - {name}
    return graph


def _topological(graph: dict[str, set[str]]) -> list[str]:
    order, state = [], {}

    def visit(n: str, stack: list[str]) -> None:
        if state.get(n) == "done":
            return
        if state.get(n) == "active":
            cycle = stack[stack.index(n):] + [n]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        state[n] = "active"
        for d in sorted(graph[n]):
            visit(d, stack + [n])
        state[n] = "done"
        order.append(n)

    for n in sorted(graph):
        visit(n, [])
    return order


def test_no_import_cycles_and_every_module_imports_in_dependency_order():
    order = _topological(_graph())  # raises on a cycle, naming it
    assert "sds_vision.cli" in order and "sds_vision.methods.sds_lora" in order
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % order
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cycle_detection_is_not_vacuous():
    with pytest.raises(AssertionError, match="import cycle: a -> b -> a"):
        _topological({"a": {"b"}, "b": {"a"}})


def test_command_line_parsers_do_not_import_torch():
    code = ("import sys; from sds_vision.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'timm', 'albumentations', 'torchmetrics') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_docs_are_self_contained():
    """The repository never sends a reader to the team's private design notes."""
    offenders = []
    for path in ROOT.rglob("*"):
        if path.suffix not in (".py", ".md") or ".git" in path.parts:
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if any(mark in line for mark in PRIVATE_NOTES):
                offenders.append(f"{path.relative_to(ROOT)}:{i}")
    assert not offenders, offenders
    readme = (ROOT / "README.md").read_text()
    assert "docs/method.md" in readme and "docs/benchmarks.md" in readme
