"""The JAX/Flax backend of the doctor (see :mod:`bnlab.doctor.backends`).

Takes ``flax.nnx`` modules (instances: the loader builds a class or calls a function) and
``flax.linen`` modules: unbound (the doctor initialises them from the probe's shape) or a
``(module, variables)`` pair of a trained one. JAX and Flax are imported only once a
Flax model is handled: :meth:`FlaxBackend.owns` looks Flax up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from bnlab.doctor.backend import Backend, Watcher
from bnlab.doctor.backends.flax.fixes import FlaxFixes
from bnlab.doctor.backends.folder import FolderBackend
from bnlab.doctor.records import OptimizerInfo, ProbeResult

# The seed of the CLI (``--seed``): keys for initialising a linen module and pseudo labels.
_SEED = [0]


def _nnx_module(model: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(model, nnx.Module)


def _linen_module(model: Any) -> bool:
    linen = sys.modules.get("flax.linen")
    if linen is None:
        return False
    if isinstance(model, tuple) and len(model) == 2:  # (module, variables)
        return isinstance(model[0], linen.Module) and isinstance(model[1], Mapping)
    return isinstance(model, linen.Module)


class FlaxBackend(FolderBackend):
    NAME = "flax"
    WEIGHTS_NAME = "model.msgpack"
    fixes = FlaxFixes()

    def owns(self, model: Any) -> bool:
        return not isinstance(model, type) and (_nnx_module(model) or _linen_module(model))

    def copy(self, model: Any) -> Any:
        from bnlab.doctor.backends.flax import common

        return common.copy(model)

    def seed(self, seed: int) -> None:
        _SEED[0] = seed  # JAX has no global generator: keys are made from this when needed

    def runs_on(self, model: Any, x: np.ndarray) -> bool:
        from bnlab.doctor.backends.flax import common

        try:
            common.eval_output(model, x, _SEED[0])
        except Exception as err:  # noqa: BLE001 - any failure means: not this shape ...
            if getattr(err, "keys_differ", False):  # ... but a linen checkpoint's keys are not the shape's
                raise
            return False
        return True

    def eval_output(self, model: Any, x: np.ndarray) -> np.ndarray | None:
        from bnlab.doctor.backends.flax import common

        return common.eval_output(model, x, _SEED[0])

    def watcher(self, model: Any, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> Watcher:
        from bnlab.doctor.backends.flax import watch

        return watch.watcher(model, on_pass_start, optimizer)

    def describe_optimizer(self, model: Any, optimizer: Any) -> OptimizerInfo | None:
        from bnlab.doctor.backends.flax.train import optimizer_info

        return None if optimizer is None else optimizer_info(optimizer)

    def check_repairable(self, model: Any) -> None:
        from bnlab.doctor.backends.flax import repair

        repair.check_repairable(model)

    def probe(self, model: Any, inputs: Any, **options: Any) -> ProbeResult:
        return super().probe(model, inputs, seed=_SEED[0], **options)


BACKEND: Backend = FlaxBackend()
