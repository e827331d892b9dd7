"""The floors of the package stay floors: the library never imports the trainer or the lab, the
trainer never imports the lab, nothing imports the CLI, and no module imports itself back.

Every ``import`` statement counts, at module level or inside a function (a lazy import still ties
the floors together).
"""

import ast
import warnings
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "moebalance"

LIBRARY = {"moebalance", *(f"moebalance.{m}" for m in ("checks", "routing", "rules", "balancing", "losses", "metrics", "experts", "moe"))}
# Deprecated aliases of moved modules (moebalance 0.1.x only): they import their new home on purpose.
ALIASES = {f"moebalance.{m}" for m in ("_moved", "config", "data", "model", "distributed", "expert_parallel")}

# floor -> the floors it may import (besides itself)
ALLOWED = {
    "library": set(),
    "parallel": {"library"},
    "integrations": {"library", "parallel"},
    "train": {"library", "parallel"},
    "lab": {"library", "parallel", "train"},
    "cli": {"library", "parallel", "integrations", "train", "lab"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor(mod: str) -> str:
    if mod in LIBRARY:
        return "library"
    if mod in ("moebalance.cli", "moebalance.__main__"):
        return "cli"
    sub = mod.split(".")[1]
    if sub in ALLOWED:
        return sub
    raise AssertionError(f"{mod} belongs to no floor: add it to the library or put it in a subpackage")


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py") if module_name(p) not in ALIASES}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The moebalance modules ``path`` imports (``from moebalance import x`` names module x if it is one)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("moebalance")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("moebalance"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out


GRAPH = {mod: imports_of(path, set(modules())) for mod, path in modules().items()}


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_imports_follow_the_floors(mod):
    here = floor(mod)
    for dep in GRAPH[mod]:
        assert dep not in ALIASES, f"{mod} imports the deprecated alias {dep}"
        there = floor(dep)
        assert there == here or there in ALLOWED[here], f"{mod} ({here}) must not import {dep} ({there})"
        assert there != "cli" or mod == "moebalance.__main__", f"{mod} imports the CLI"


def test_no_import_cycles():
    done, path = set(), []

    def visit(mod):
        if mod in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(mod) :] + [mod]))
        if mod in done:
            return
        path.append(mod)
        for dep in GRAPH.get(mod, ()):
            if dep != mod:
                visit(dep)
        path.pop()
        done.add(mod)

    for mod in sorted(GRAPH):
        visit(mod)


def test_every_subpackage_says_what_it_may_import():
    for init in PKG.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "may import" in doc, f"{init.relative_to(SRC)}: docstring must say what the floor may import"


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("moebalance.config", "moebalance.train.config", "get_preset"),
        ("moebalance.data", "moebalance.train.data", "prepare_data"),
        ("moebalance.model", "moebalance.train.model", "MoETransformer"),
        ("moebalance.distributed", "moebalance.parallel", "init_distributed"),
        ("moebalance.expert_parallel", "moebalance.parallel.expert_parallel", "apply_expert_parallel"),
    ],
)
def test_old_import_paths_warn_and_work(old, new, name):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(new)
    assert hasattr(mod, name)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_a_screen():
    """A function reads in one sitting: at most ~80 lines, docstring included."""
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these functions: " + ", ".join(long)
