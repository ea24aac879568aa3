"""The package's import graph: no module imports one that imports it back
(a package's __init__ re-exporting its submodules aside; imports for type
annotations only do not count), and no verb module imports the dispatcher
that imports the verbs."""

from __future__ import annotations

import ast
from pathlib import Path

from pymoe.cli import COMMANDS

PACKAGE = Path(__file__).resolve().parent.parent / "pymoe"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_only(tree: ast.Module) -> set[int]:
    """The ids of the import nodes under `if TYPE_CHECKING:`."""
    return {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }


def import_graph(*, type_only: bool = False) -> dict[str, set[str]]:
    """module -> the pymoe modules it imports, at the top or inside functions
    (with `type_only`, those under `if TYPE_CHECKING:` too)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        tree = ast.parse(path.read_text())
        skip = set() if type_only else _type_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                mod = ".".join([*base, *([node.module] if node.module else [])])
                deps.update(m for m in (mod, *(f"{mod}.{a.name}" for a in node.names)) if m in files)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in files)
        graph[name] = deps - {name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert {"pymoe.chat", "pymoe.demo", "pymoe.model", "pymoe.chat_template"} <= graph.keys()
    cycles = sorted(
        (a, b)
        for a, deps in graph.items()
        for b in deps
        if a < b and a in graph[b] and not b.startswith(f"{a}.")  # a package and its own submodule
    )
    assert cycles == []


def test_chat_template_does_not_know_the_model():
    """It gets llama.cpp's renderer and the tokenizer as functions (not even a type import)."""
    assert "pymoe.model" not in import_graph(type_only=True)["pymoe.chat_template"]


def test_verb_modules_do_not_import_the_dispatcher():
    graph = import_graph()
    assert [module for module, _ in COMMANDS.values() if "pymoe.cli" in graph[module]] == []
