"""bnlab: reproduce, diagnose and explain batch normalization.

The public API, imported lazily (``import bnlab`` loads no framework):

- ``bnlab.train(cfg, ...)``: one run on any engine (``bnlab.engines.train``);
- ``bnlab.compare(presets, seeds, out, ...)``: a sweep with statistics and a report;
- ``bnlab.load_run(run_dir)``: ``(model, config)`` of a finished run of any engine;
- ``bnlab.doctor``: ``check(model, inputs)``, ``watch(model)``: BN misuse in your model;
- ``bnlab.conventions``: the frameworks' BN conventions and converters;
- ``bnlab.PRESETS``, ``bnlab.get_preset``, ``bnlab.RunConfig``, ``bnlab.apply_overrides``.

One concept per module, dependencies pointing down the list:
``cli`` -> ``comparison`` -> ``sweep``, ``grid_report`` -> ``report`` -> ``figures`` ->
``engines`` (``torch``, ``torch_step``, ``chainer``, ``tensorflow``, ``common``) -> ``rundir``
-> ``table`` -> ``presets`` -> ``config`` -> ``conventions``, ``errors``; ``models`` and
``data`` beside the engines; ``doctor`` on its own (it uses ``conventions``, ``data``,
``rundir``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> (module, attribute); attribute None means the module itself.
_PUBLIC: dict[str, tuple[str, str | None]] = {
    "train": ("bnlab.engines", "train"),
    "compare": ("bnlab.comparison", "compare"),
    "load_run": ("bnlab.rundir", "load_run"),
    "doctor": ("bnlab.doctor", None),
    "conventions": ("bnlab.conventions", None),
    "PRESETS": ("bnlab.presets", "PRESETS"),
    "get_preset": ("bnlab.presets", "get_preset"),
    "RunConfig": ("bnlab.config", "RunConfig"),
    "ModelConfig": ("bnlab.config", "ModelConfig"),
    "TrainConfig": ("bnlab.config", "TrainConfig"),
    "apply_overrides": ("bnlab.config", "apply_overrides"),
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bnlab' has no attribute {name!r}")
    module_name, attribute = _PUBLIC[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)


def __dir__() -> list[str]:
    return sorted(__all__)
