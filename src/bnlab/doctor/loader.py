"""Import a user's file by path and build the model named on the command line.

``bnlab doctor path/to/file.py:NAME``: NAME is a model class (built with no
arguments), a function with no arguments returning a model, or a model instance.
Every way this can fail becomes a :class:`LoadError` whose message is one paragraph
saying which file, what went wrong and what to do; the CLI prints it and exits 2.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
import zlib
from pathlib import Path
from types import ModuleType
from typing import Any

from bnlab.doctor.backends import missing_framework, recognised
from bnlab.doctor.errors import a_type, quote_error
from bnlab.doctor.locations import recording
from bnlab.errors import EXIT_USAGE, BnlabError


class LoadError(BnlabError):
    """The target could not be loaded; ``str(err)`` is the message for the user."""

    exit_code = EXIT_USAGE


def split_target(target: str) -> tuple[Path, str]:
    """``"dir/file.py:Name"`` -> (path, name)."""
    path, sep, name = target.rpartition(":")
    if not sep or not path or not name:
        raise LoadError(f"expected FILE.py:NAME (for example examples/question_torch.py:MyModel), got {target!r}.")
    if not name.isidentifier():
        raise LoadError(f"{name!r} in {target!r} is not a Python name; NAME must be a class or function.")
    return Path(path), name


def _module_name(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem)
    return f"bnlab_doctor_user_{stem}_{zlib.crc32(str(path.resolve()).encode()):08x}"


def _exception_text(err: BaseException) -> str:
    if isinstance(err, SyntaxError):
        where = f" ({Path(err.filename or '').name}, line {err.lineno})" if err.lineno else ""
        return f"SyntaxError: {err.msg}{where}"
    return quote_error(err)


def import_file(path: Path, purpose: str = "the model") -> ModuleType:
    """Execute ``path`` as a module; its folder is importable while it loads (sibling imports).

    ``purpose`` (what the file defines) only words the messages.
    """
    if not path.is_file():
        raise LoadError(f"{path}: no such file. Give the path to the Python file that defines {purpose}.")
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"{path} cannot be imported as Python; it should be a .py file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and deepcopy look modules up here
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # noqa: BLE001 - anything the user's file raises
        sys.modules.pop(name, None)
        elsewhere = missing_framework(err, path)  # a Chainer model in the numpy-2 environment
        if elsewhere is not None:
            raise elsewhere from err
        hint = (
            'The file ran its script part on import: put it under `if __name__ == "__main__":`.'
            if isinstance(err, SystemExit)
            else f"Fix it (`python {path}` shows the full traceback) and run bnlab doctor again."
        )
        raise LoadError(
            f"could not import {path}: {_exception_text(err)}. bnlab doctor imports the file to "
            f"find {purpose}, so it must import cleanly. {hint}"
        ) from err
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def is_model(obj: Any) -> bool:
    """A model instance of a framework the doctor knows (or refuses with a message)."""
    return not isinstance(obj, type) and recognised(obj)


_MODEL_BASES = {"Module", "Link", "Chain", "ChainList", "Model"}


def _candidates(module: ModuleType) -> list[str]:
    """Names in the file that could be meant: model classes and plain functions."""
    names = []
    for attr, value in vars(module).items():
        if attr.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if (
            inspect.isclass(value)
            and _MODEL_BASES & {b.__name__ for b in inspect.getmro(value)}
            or inspect.isfunction(value)
        ):
            names.append(attr)
    return names


def build(module: ModuleType, name: str, path: Path) -> Any:
    """The model that ``name`` stands for in ``module``."""
    if not hasattr(module, name):
        found = ", ".join(_candidates(module)) or "none"
        raise LoadError(f"{path} has no attribute {name!r}. Model classes and functions in it: {found}.")
    obj = getattr(module, name)
    if is_model(obj):
        return obj
    if not callable(obj):
        raise LoadError(f"{path}:{name} is {a_type(obj)}, not a model class or function.")
    try:
        model = obj()
    except SystemExit as err:  # sys.exit() in the user's constructor: not the doctor's status
        raise LoadError(
            f"calling {name}() from {path} called sys.exit ({_exception_text(err)}); NAME must "
            "build and return the model without ending the program."
        ) from err
    except Exception as err:  # noqa: BLE001 - the user's constructor
        raise LoadError(
            f"calling {name}() from {path} raised {_exception_text(err)}. NAME must be a model "
            "class whose constructor needs no arguments, or a function with no arguments "
            "returning a model; wrap your constructor in such a function if it needs arguments."
        ) from err
    if not is_model(model):
        raise LoadError(
            f"{path}:{name}() returned {a_type(model)}, not a keras.Model, a "
            "torch.nn.Module, a chainer.Link or a Flax module (a flax.nnx.Module, a "
            "flax.linen.Module, or a (linen module, variables) pair)."
        )
    return model


def load_model(target: str) -> Any:
    """``"file.py:NAME"`` -> the model instance."""
    path, name = split_target(target)
    # Note where each norm layer is created (the frameworks imported by then are patched
    # for the time of the build only): the report points at those lines.
    with recording():
        module = import_file(path)
    with recording():  # again: importing the file may have imported a framework
        return build(module, name, path)
