"""The JAX/Flax backend of the doctor (see :mod:`bnlab.doctor.backends`).

Takes ``flax.nnx`` modules (instances: the loader builds a class or calls a function) and
``flax.linen`` modules: unbound (the doctor initialises them from the probe's shape) or a
``(module, variables)`` pair of a trained one. JAX and Flax are imported only once a
Flax model is handled: :meth:`FlaxBackend.owns` looks Flax up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bnlab.doctor.backend import Backend, Batch, Change, Watcher
from bnlab.doctor.backends.flax.fixes import FlaxFixes
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


class FlaxBackend:
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
        except Exception:  # noqa: BLE001 - any failure means: not this shape
            return False
        return True

    def eval_output(self, model: Any, x: np.ndarray) -> np.ndarray | None:
        from bnlab.doctor.backends.flax import common

        return common.eval_output(model, x, _SEED[0])

    def probe(self, model: Any, inputs: Any, **options: Any) -> ProbeResult:
        from bnlab.doctor.backends.flax import probe

        return probe.probe(model, inputs, seed=_SEED[0], **options)

    def watcher(self, model: Any, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> Watcher:
        from bnlab.doctor.backends.flax import watch

        return watch.watcher(model, on_pass_start, optimizer)

    def describe_optimizer(self, model: Any, optimizer: Any) -> OptimizerInfo | None:
        from bnlab.doctor.backends.flax.train import optimizer_info

        return None if optimizer is None else optimizer_info(optimizer)

    def check_repairable(self, model: Any) -> None:
        from bnlab.doctor.backends.flax import repair

        repair.check_repairable(model)

    def repair(
        self, model: Any, batches: list[Batch], *, split: Iterable[str] | None = None
    ) -> tuple[Any, list[Change]]:
        from bnlab.doctor.backends.flax import repair

        return repair.repair(model, batches, split=split)

    def split_shared(self, model: Any, calls: dict[str, int]) -> Any:
        from bnlab.doctor.backends.flax import repair

        repair.check_repairable(model)
        return repair.split_shared(model, calls)

    def evaluate(self, model: Any, batches: list[Batch]) -> dict[str, Any]:
        from bnlab.doctor.backends.flax import repair

        return repair.evaluate(model, batches)

    def load_checkpoint(self, model: Any, path: Path) -> None:
        from bnlab.doctor.backends.flax import io

        io.load_checkpoint(model, path)

    def save_weights(self, model: Any) -> bytes:
        from bnlab.doctor.backends.flax import io

        return io.save_weights(model)

    def how_to_load(self, changes: list[Change], weights: Path, target: str, mlp_config: Any) -> str:
        from bnlab.doctor.backends.flax import io

        return io.how_to_load(changes, weights, target, mlp_config)


BACKEND: Backend = FlaxBackend()
