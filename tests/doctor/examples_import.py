"""The project's example programs (examples/*.py), imported as modules for the tests."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def import_example(name: str) -> ModuleType:
    """``examples/NAME.py`` as a module; sys.path is restored afterwards."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))
