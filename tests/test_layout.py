"""The house rules that keep bnlab readable: no import cycle between its modules (counting
every import, also those inside functions and under ``TYPE_CHECKING``), and the light
commands (help, presets, convert) never import a framework."""

import ast
import subprocess
import sys
from pathlib import Path

import bnlab

SRC = Path(bnlab.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_import_module(func: ast.expr) -> bool:
    """``importlib.import_module(...)`` or a bare ``import_module(...)``."""
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )


def _imports(source: str, package: str, modules: set[str]) -> set[str]:
    """bnlab modules imported by ``source`` (a module of ``package``), counting EVERY import
    wherever it stands: module level, inside functions and classes, under ``if
    TYPE_CHECKING``, in ``try``/``if`` blocks, and ``importlib.import_module("bnlab...")``
    with a literal name. An import inside a function still ties the two modules together
    (and runs as soon as that function does), so it counts toward a cycle like any other.
    ``from pkg import sub`` of a submodule is an edge to the submodule; ``from pkg import
    name`` of anything else is an edge to ``pkg``. A package's own ``__init__`` runs before
    any of its submodules in any case, so that implicit edge is not counted."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: ``from . import x`` inside ``package``
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            subs = {f"{base}.{alias.name}" for alias in node.names} & modules
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(base)
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            name = node.args[0]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                found.add(name.value)
    return {name for name in found if name == "bnlab" or name.startswith("bnlab.")}


def _package(path: Path) -> str:
    """The package a module file belongs to (for its relative imports)."""
    return _module_name(path.parent / "__init__.py")


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    return {
        name: {m for m in _imports(path.read_text(), _package(path), set(modules)) if m in modules and m != name}
        for name, path in modules.items()
    }


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def _tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other (directly or around a loop), so that
    a failure names all of them at once, not only the first cycle found."""
    reach = {node: _reachable(graph, node) for node in graph}
    groups = {tuple(sorted(n for n in reach[node] if node in reach[n])) for node in graph if node in reach[node]}
    return sorted(list(group) for group in groups)


def test_no_import_cycle_between_bnlab_modules():
    graph = _graph()
    assert len(graph) > 20  # the walk found the package
    assert _tangles(graph) == [], "; ".join(" <-> ".join(group) for group in _tangles(graph))


def test_cycle_finder_finds_a_cycle():
    assert _tangles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    two = {"a": {"b"}, "b": {"a", "c"}, "c": set(), "d": {"e"}, "e": {"d"}}
    assert _tangles(two) == [["a", "b"], ["d", "e"]]
    assert _tangles({"a": {"b"}, "b": set()}) == []


def test_every_kind_of_import_is_an_edge():
    source = """
import typing
import bnlab.a
from bnlab import b, not_a_module
if typing.TYPE_CHECKING:
    from bnlab.c import Thing
try:
    from bnlab.d import thing
except ImportError:
    pass
def later():
    import importlib
    from bnlab.e import f
    from .g import h
    importlib.import_module("bnlab.i")
    importlib.import_module(name_in_a_variable)
class Holder:
    from bnlab import j
"""
    modules = {"bnlab", *(f"bnlab.{m}" for m in "abcdeghij"), "bnlab.e.f"}
    assert _imports(source, "bnlab", modules) == {
        "bnlab",  # ``not_a_module`` comes from the package itself
        *(f"bnlab.{m}" for m in "abcdgij"),
        "bnlab.e.f",  # ``from bnlab.e import f``: f is a submodule, the edge goes to it
    }


def test_the_graph_sees_imports_inside_functions():
    graph = _graph()
    # bnlab.cli imports the presets only inside its command handlers, never at module level
    assert "bnlab.presets" in graph["bnlab.cli"]


def _private_imports(source: str) -> set[str]:
    """``module:name`` for each ``_private`` name ``source`` imports from a bnlab module."""
    return {
        f"{node.module}:{alias.name}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnlab")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    }


def test_no_private_name_crosses_modules():
    """A helper two modules use is public, in one module both import. (The doctor is left
    out while its own restructuring into ``doctor/backends/`` lands.)"""
    assert _private_imports("from bnlab.report import _CSS, CONFIDENCE\nfrom bnlab import __version__") == {
        "bnlab.report:_CSS"
    }
    crossing = {
        str(path.relative_to(SRC)): sorted(_private_imports(path.read_text()))
        for path in SRC.rglob("*.py")
        if SRC / "doctor" not in path.parents
    }
    assert {k: v for k, v in crossing.items() if v} == {}


HEAVY = ("torch", "chainer", "tensorflow", "keras", "ray", "matplotlib", "scipy")


def _imported_after(argv: list[str]) -> set[str]:
    code = (
        "import sys, contextlib, io\nfrom bnlab.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(sys.argv[1:])\n    except SystemExit:\n        pass\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_help_presets_and_convert_import_no_framework():
    for argv in (
        ["--help"],
        ["presets"],
        ["convert", "--from", "chainer", "--decay", "0.9", "--to", "torch"],
        ["train", "--help"],
        ["conventions"],
    ):
        assert _imported_after(argv) == set(), argv


def test_import_bnlab_is_lazy():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, bnlab; bnlab.PRESETS; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == []
