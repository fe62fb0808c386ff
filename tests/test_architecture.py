"""The layout stays readable: every module imports on its own in a fresh interpreter, `app/` has no import
circle (counting imports inside functions, which would otherwise hide one), and no module grows past the
size a reader can hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_APP_LINES = 400


def app_modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "app").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The app modules `path` imports, at the top or inside functions (`from app.x import y` counts app.x.y
    when that is a module, else app.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("app"):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found.update(n for n in names if n in modules)
            if not any(n in modules for n in names):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_inside_app():
    modules = app_modules()
    graph = {name: imported_modules(path, modules) - {name} for name, path in modules.items()}
    assert cycles(graph) == []
    # The checker sees a circle when there is one.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.integration  # interpreters that import torch, ray and transformers: seconds each
def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n in app_modules() if n != "app"] + [
        ".".join(p.relative_to(ROOT).with_suffix("").parts) for p in sorted((ROOT / "jobs").glob("*.py"))
        if p.name != "__init__.py"]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    # One interpreter per module would take a minute; modules are imported one after another, each first
    # in its own fresh interpreter only when the shared one fails (to name the culprit).
    done = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        failing = [n for n in names if subprocess.run([sys.executable, "-c", code, n], cwd=ROOT, capture_output=True,
                                                      timeout=120).returncode != 0]
        pytest.fail(f"modules that do not import: {failing}\n{done.stderr[-3000:]}")
    for name in ("app.data.media", "app.losses", "app.models.composites"):  # the first of a chain, alone
        alone = subprocess.run([sys.executable, "-c", code, name], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert alone.returncode == 0, alone.stderr[-3000:]


def test_the_dataset_functions_import_no_model_code():
    """Ray Train's controller and each Ray Data split coordinator unpickle the datasets, and with them the
    modules of their batch functions, at the start of every run: those modules must not pull in the models
    (transformers' modeling code costs ~2.5 s a process on this machine)."""
    code = ("import sys, app.data.samples, app.data.feature_cache\n"
            "print(sorted(m for m in sys.modules if m.startswith('app.models') or m == 'transformers.modeling_utils'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_no_app_module_is_longer_than_a_reader_can_hold():
    lengths = {name: len(path.read_text().splitlines()) for name, path in app_modules().items()}
    assert {n: k for n, k in lengths.items() if k > MAX_APP_LINES} == {}


def test_no_model_or_checkpoint_loads_code():
    """Hugging Face models load without trust_remote_code (a model folder from a bucket cannot ship code), and
    every torch.load is restricted to tensors and plain values."""
    sources = {path: path.read_text() for folder in ("app", "jobs", "bench") for path in (ROOT / folder).rglob("*.py")}
    assert [str(p) for p, text in sources.items() if "trust_remote_code" in text] == []
    loads = [(str(path), node) for path, text in sources.items() for node in ast.walk(ast.parse(text))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]
    unsafe = [f"{path}:{node.lineno}" for path, node in loads
              if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)]
    assert loads and unsafe == []
