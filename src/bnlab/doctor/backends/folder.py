"""The hops every backend makes the same way: from its class into the modules of its own
folder (``probe.py``, ``repair.py``, ``io.py``), imported only when called, so that the
framework is imported only once one of its models is handled.

A backend class derives from :class:`FolderBackend` and adds what differs between
frameworks (recognising a model, copies, input trials, watch, optimizer, repairability).
The module names are the folder layout of ``backends/README.md``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from bnlab.doctor.backend import Batch, Change
from bnlab.doctor.records import ProbeResult


class FolderBackend:
    """Delegates to ``<the class's package>.probe`` / ``.repair`` / ``.io``."""

    def _module(self, name: str) -> ModuleType:
        return importlib.import_module(f"{type(self).__module__}.{name}")

    def has_own_name(self, model: Any) -> bool:
        return True  # the class's name, which its author chose

    def probe(self, model: Any, inputs: Any, **options: Any) -> ProbeResult:
        result: ProbeResult = self._module("probe").probe(model, inputs, **options)
        return result

    def repair(
        self, model: Any, batches: list[Batch], *, split: Iterable[str] | None = None
    ) -> tuple[Any, list[Change]]:
        new, changes = self._module("repair").repair(model, batches, split=split)
        return new, changes

    def split_shared(self, model: Any, calls: dict[str, int]) -> Any:
        return self._module("repair").split_shared(model, calls)

    def evaluate(self, model: Any, batches: list[Batch]) -> dict[str, Any]:
        numbers: dict[str, Any] = self._module("repair").evaluate(model, batches)
        return numbers

    def load_checkpoint(self, model: Any, path: Path, notes: list[str] | None = None) -> Any:
        loaded = self._module("io").load_checkpoint(model, path, [] if notes is None else notes)
        return model if loaded is None else loaded  # loaded in place, or a new model

    def save_weights(self, model: Any) -> bytes:
        data: bytes = self._module("io").save_weights(model)
        return data

    def how_to_load(self, changes: list[Change], weights: Path, target: str, mlp_config: Any) -> str:
        text: str = self._module("io").how_to_load(changes, weights, target, mlp_config)
        return text
