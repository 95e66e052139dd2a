"""The doctor's house: every framework in its own folder under ``doctor/backends/``, behind
one ``Backend`` protocol; the rest of the doctor imports no framework, never asks which
framework it is talking to, and has no import cycle (imports inside functions counted)."""

from __future__ import annotations

import ast
import graphlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bnlab.doctor
from bnlab.doctor.backend import Backend
from bnlab.doctor.backends import BACKENDS, load

DOCTOR = Path(bnlab.doctor.__file__).resolve().parent
BACKEND_DIR = DOCTOR / "backends"
FRAMEWORKS = {"torch", "chainer", "keras", "tensorflow", "tf_keras", "jax", "flax", "optax", "lightning"}
# A comparison with a framework's name, or with a backend's NAME: dispatch that belongs in a backend.
DISPATCH = re.compile(
    r"""(==|!=)\s*["'](torch|chainer|keras|tensorflow|jax|flax)["']|\.NAME\s*(==|!=)|\bframework\s*(==|!=)"""
)
# Every backend folder holds these modules (flax and later frameworks too).
BACKEND_MODULES = {"__init__", "probe", "train", "watch", "repair", "fixes", "io", "common"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(DOCTOR.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in ``path``: module level, inside functions,
    under ``TYPE_CHECKING``. ``from a import b`` names both ``a`` and ``a.b``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _outside_backends() -> list[Path]:
    return [p for p in DOCTOR.rglob("*.py") if BACKEND_DIR not in p.parents]


def test_no_module_outside_backends_imports_a_framework() -> None:
    offenders = {
        str(path.relative_to(DOCTOR)): sorted(m for m in _all_imports(path) if m.split(".")[0] in FRAMEWORKS)
        for path in _outside_backends()
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(offenders) > 30  # the walk found the doctor's core and checks


def test_no_module_outside_backends_dispatches_on_a_framework_name() -> None:
    found = [
        f"{path.relative_to(DOCTOR)}:{number}: {line.strip()}"
        for path in _outside_backends()
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if DISPATCH.search(line)
    ]
    assert found == []


def test_dispatch_pattern_catches_the_old_branches() -> None:
    for line in (
        'if layer.framework == "chainer":',
        "kind == 'torch'",
        "if backend.NAME == x:",
        'framework != "keras"',
    ):
        assert DISPATCH.search(line), line
    assert not DISPATCH.search('framework="torch"')


def _edges(path: Path, modules: set[str]) -> set[str]:
    """The doctor modules ``path`` imports anywhere (inside functions and under
    ``TYPE_CHECKING`` too). ``from pkg import sub`` of a submodule is an edge to the
    submodule alone (the package's ``__init__`` runs first in any case), as in
    tests/test_layout.py."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(node.module)
    return found & modules


def _doctor_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in DOCTOR.rglob("*.py")}
    return {name: _edges(path, set(modules)) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return list(err.args[1])
    return None


def test_no_import_cycle_in_the_doctor_counting_every_import() -> None:
    graph = _doctor_graph()
    assert "bnlab.doctor.backends.keras.probe" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    assert _cycle({"a": {"b"}, "b": {"a"}}) in (["a", "b", "a"], ["b", "a", "b"])


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_folder_has_the_same_modules(name: str) -> None:
    folder = BACKEND_DIR / name
    assert {p.stem for p in folder.glob("*.py")} >= BACKEND_MODULES
    assert BACKENDS[name] == f"bnlab.doctor.backends.{name}"


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_registered_backend_has_every_protocol_member(name: str) -> None:
    backend = load(name)
    assert backend.NAME == name
    missing = sorted(m for m in _protocol_members(Backend) if not hasattr(backend, m))
    assert missing == []


def _protocol_members(protocol: type) -> set[str]:
    return {m for m in vars(protocol) if not m.startswith("_")} | set(getattr(protocol, "__annotations__", {}))


def test_mypy_rejects_a_backend_that_forgets_a_method(tmp_path: Path) -> None:
    """The registry types each folder's BACKEND as ``Backend``: a class without ``evaluate``
    (say) is a type error, not a silent fallback."""
    mypy = Path(sys.executable).with_name("mypy")
    if not mypy.exists():
        pytest.skip("mypy is not installed in this environment")
    src = tmp_path / "incomplete.py"
    src.write_text(
        textwrap.dedent(
            """
            from typing import Any

            from bnlab.doctor.backend import Backend
            from bnlab.doctor.backends.torch import TorchBackend


            class Incomplete:
                NAME = "incomplete"

                def owns(self, model: Any) -> bool:
                    return False


            class AlmostTorch(TorchBackend):
                pass


            BACKEND: Backend = Incomplete()
            ALMOST: Backend = AlmostTorch()
            """
        )
    )
    done = subprocess.run(
        [str(mypy), "--no-incremental", "--follow-imports=silent", "--ignore-missing-imports", str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"PYTHONPATH": str(DOCTOR.parent.parent), "PATH": "/usr/bin:/bin"},
    )
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, done.stdout
    assert "incomplete.py:19" in errors[0] and '"Incomplete"' in errors[0] and '"Backend"' in errors[0]
