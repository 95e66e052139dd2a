"""The house rules that keep bnlab readable: no import cycle between its modules, and the
light commands (help, presets, convert) never import a framework."""

import ast
import subprocess
import sys
from pathlib import Path

import bnlab

SRC = Path(bnlab.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """bnlab modules imported by ``path`` at module level (not inside functions, and not
    under ``if TYPE_CHECKING``): the edges that can make an import cycle. ``from pkg import
    sub`` of a submodule is an edge to the submodule (a package's own ``__init__`` runs
    before any of its submodules in any case)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in [node] if not isinstance(node, (ast.If, ast.Try)) else ast.walk(node):
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("bnlab"):
                subs = {f"{sub.module}.{a.name}" for a in sub.names} & modules
                found.update(subs)
                if len(subs) < len(sub.names):
                    found.add(sub.module)
            elif isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names if a.name.startswith("bnlab"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    return {
        name: {m for m in _imports(path, set(modules)) if m in modules and m != name} for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_bnlab_modules():
    graph = _graph()
    assert len(graph) > 20  # the walk found the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


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
