"""Where in the user's code a norm layer is created and called: ``file:line``.

Framework-free. Two sources of lines:

- **Call sites** are read from the stack when a probe's hook sees a norm call
  (:func:`call_site`): the innermost frame in the user's own files, walking outward from
  the hook until the doctor's own frames begin (past them lies the doctor's caller, not
  the model).
- **Creation lines** are recorded while the doctor builds the model from ``FILE.py:NAME``
  (:func:`recording`): the ``__init__`` of each framework's norm classes is wrapped for
  that time only, and each new layer object is noted with the stack's innermost user
  frame. This sees every way of building a model (attributes, ``Sequential``, lists,
  loops, factory functions), which reading ``self.bn = ...`` lines from the class source
  could not; the price is that only models built by the doctor (the command line) get
  creation lines, not a model handed to :func:`bnlab.doctor.check` already built.
  Keras functional models are also called while they are built (``bn(x)`` on symbolic
  tensors); those applications are recorded the same way, because the probe later runs
  the layers from Keras's graph, with no user frame on the stack.

A frame is the user's unless its file belongs to the doctor, to a framework (torch,
Chainer, Keras, TensorFlow, JAX, numpy...), to the standard library, or to an installed
package. A layer built inside an installed library (torchvision's ``resnet18()``) has no
line in the user's files: its location names the library's file, with ``library`` set.
"""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

FrameKind = Literal["user", "library", "framework", "stdlib", "bnlab"]

# Top-level packages whose frames are never "where the user wrote it".
FRAMEWORKS = frozenset(
    {
        "torch",
        "chainer",
        "keras",
        "tensorflow",
        "tf_keras",
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "numpy",
        "cupy",
        "optree",
        "lightning",
        "pytorch_lightning",
        "lightning_fabric",
        "torchmetrics",
    }
)

_OWN = "bnlab"


@dataclass(frozen=True)
class SourceLocation:
    """A line of code: ``file`` as Python names it (the code object's file name), 1-based
    ``line``; ``library`` names the installed package the file belongs to when it is not
    the user's own. :meth:`to_dict` and ``str`` show the file relative to the working
    directory when inside it (worked out then, not in the hooks that record locations)."""

    file: str
    line: int
    library: str | None = None

    def __str__(self) -> str:
        return f"{shown(self.file)}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"file": shown(self.file), "line": self.line}
        if self.library is not None:
            data["library"] = self.library
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceLocation:
        return cls(str(data["file"]), int(data["line"]), data.get("library"))


def _prefixes(*names: str) -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    found = {str(Path(paths[name]).resolve()) for name in names if name in paths}
    return tuple(sorted(found))


_STDLIB = _prefixes("stdlib", "platstdlib")
_SITE = ("site-packages", "dist-packages")
# id(code object) -> (the code object, kind, library). By id: hashing a code object hashes
# its bytecode and constants, every time; the code object is kept so that ids stay unique.
_KINDS: dict[int, tuple[Any, FrameKind, str | None]] = {}


def _classify(frame: FrameType) -> tuple[FrameKind, str | None]:
    code = frame.f_code
    known = _KINDS.get(id(code))
    if known is not None and known[0] is code:
        return known[1], known[2]
    module = str(frame.f_globals.get("__name__") or "")
    top = module.split(".")[0]
    filename = code.co_filename
    kind: FrameKind
    library = None
    if top == _OWN:
        kind = "bnlab"
    elif top in FRAMEWORKS or filename.startswith("<"):  # <frozen importlib...>, <string>
        kind = "framework"
    else:
        parts = Path(filename).parts
        site = next((i for i, part in enumerate(parts) if part in _SITE), None)
        if site is not None:
            kind, library = "library", (parts[site + 1] if site + 1 < len(parts) else top)
            library = library.removesuffix(".py")
        elif filename.startswith(_STDLIB):
            kind = "stdlib"
        else:
            kind = "user"
    _KINDS[id(code)] = (code, kind, library)
    return kind, library


def shown(filename: str) -> str:
    """``filename`` relative to the working directory when inside it, else absolute."""
    path = os.path.abspath(filename)
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if rel.startswith("..") else rel


def innermost(frame: FrameType | None) -> SourceLocation | None:
    """The innermost frame from ``frame`` outward that is the user's (or an installed
    library's: ``library`` set) rather than a framework's or the standard library's.

    None when no such frame lies between the first frames of the doctor (the hook that
    asks) and the next ones (the doctor's own call into the model). A library frame wins
    over a user frame further out: a BatchNorm made inside torchvision's ``resnet18()`` was
    written there, not on the user's line that called ``resnet18()``.
    """
    inside_hook = True
    while frame is not None:
        kind, package = _classify(frame)
        if kind == "bnlab":
            if not inside_hook:
                return None
        else:
            inside_hook = False
            if kind in ("user", "library"):
                return SourceLocation(frame.f_code.co_filename, frame.f_lineno, package)
        frame = frame.f_back
    return None


def call_site() -> SourceLocation | None:
    """Where the user's code called the layer whose hook is running now."""
    return innermost(sys._getframe(1))


# -- creation lines ---------------------------------------------------------------------


class _Registry:
    """Locations keyed by the layer object (weakly: the registry keeps nothing alive)."""

    def __init__(self) -> None:
        self._created: dict[int, tuple[weakref.ref[Any] | None, SourceLocation | None]] = {}
        self._applied: dict[int, list[tuple[SourceLocation | None, str | None]]] = {}

    def _alive(self, obj: Any) -> bool:
        entry = self._created.get(id(obj))
        return entry is not None and (entry[0] is None or entry[0]() is obj)

    def created(self, obj: Any, where: SourceLocation | None) -> None:
        if self._alive(obj):  # a subclass's __init__ calls its base's: keep the outer line
            return
        try:
            ref: weakref.ref[Any] | None = weakref.ref(obj)
        except TypeError:
            ref = None
        self._created[id(obj)] = (ref, where)
        self._applied.pop(id(obj), None)

    def applied(self, obj: Any, where: SourceLocation | None, producer: str | None) -> None:
        if self._alive(obj):
            self._applied.setdefault(id(obj), []).append((where, producer))

    def created_at(self, obj: Any) -> SourceLocation | None:
        return self._created[id(obj)][1] if self._alive(obj) else None

    def applied_at(self, obj: Any) -> list[tuple[SourceLocation | None, str | None]]:
        return list(self._applied.get(id(obj), [])) if self._alive(obj) else []


REGISTRY = _Registry()


def _norm_classes() -> list[type]:
    """The norm classes of the frameworks imported so far (none is imported here)."""
    found: list[type] = []
    torch = sys.modules.get("torch")
    if torch is not None:
        found.append(torch.nn.modules.batchnorm._NormBase)
    links = sys.modules.get("chainer.links")
    if links is not None:
        found.append(links.BatchNormalization)
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "layers"):
        found.append(keras.layers.BatchNormalization)
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None:
        found.append(nnx.BatchNorm)
    return found


def _producer_name(args: tuple[Any, ...]) -> str | None:
    """The Keras layer that made a symbolic input (``_keras_history``), None if unknown."""
    history = getattr(args[0], "_keras_history", None) if args else None
    operation = getattr(history, "operation", None) or (history[0] if isinstance(history, tuple) else None)
    return getattr(operation, "name", None)


def _wrap_init(init: Callable[..., Any]) -> Callable[..., Any]:
    def init_recorded(self: Any, *args: Any, **kwargs: Any) -> None:
        REGISTRY.created(self, innermost(sys._getframe(1)))
        init(self, *args, **kwargs)

    return init_recorded


def _wrap_call(call: Callable[..., Any]) -> Callable[..., Any]:
    def call_recorded(self: Any, *args: Any, **kwargs: Any) -> Any:
        REGISTRY.applied(self, innermost(sys._getframe(1)), _producer_name(args))
        return call(self, *args, **kwargs)

    return call_recorded


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """While inside: note where each norm layer is created (and, for Keras, applied).

    Patches the classes of the frameworks already imported and restores them on exit,
    whatever happens inside.
    """
    patched: list[tuple[type, str, Any]] = []
    try:
        for cls in _norm_classes():
            wrappers: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {"__init__": _wrap_init}
            if cls.__module__.startswith("keras"):  # applied while a functional graph is built
                wrappers["__call__"] = _wrap_call
            for name, wrap in wrappers.items():
                patched.append((cls, name, vars(cls).get(name)))  # None: inherited, deleted on exit
                setattr(cls, name, wrap(getattr(cls, name)))
        yield
    finally:
        for cls, name, original in reversed(patched):
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)


def created_at(layer: Any) -> SourceLocation | None:
    """Where ``layer`` was created, if the doctor saw it being built."""
    return REGISTRY.created_at(layer)


def applied_at(layer: Any) -> list[tuple[SourceLocation | None, str | None]]:
    """Where a Keras layer was applied while its functional model was built, in order,
    with the name of the layer that produced each input."""
    return REGISTRY.applied_at(layer)
