"""The Keras 3 backend of the doctor (see :mod:`bnlab.doctor.backends`).

Keras (and TensorFlow or torch under it) is imported only once a Keras model is
handled: :meth:`KerasBackend.owns` reads the module names of the model's classes, never
``keras``. It is registered before "torch" because a Keras 3 model on the torch backend
is also a ``torch.nn.Module`` whose BatchNormalization layers torch's hooks would not see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bnlab.doctor.backend import Backend, Batch, Change, Watcher
from bnlab.doctor.backends.keras.fixes import KerasFixes
from bnlab.doctor.records import OptimizerInfo, ProbeResult


def _from_keras(cls: type) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return module == "keras" or module.startswith("keras.")


class KerasBackend:
    NAME = "keras"
    WEIGHTS_NAME = "model.keras"
    fixes = KerasFixes()

    def owns(self, model: Any) -> bool:
        # A class defined in keras (keras.src.models...) somewhere in the model's bases;
        # tf_keras (Keras 2) lives in tf_keras.* and is not taken.
        return not isinstance(model, type) and any(_from_keras(c) for c in type(model).__mro__)

    def copy(self, model: Any) -> Any:
        from bnlab.doctor.backends.keras.common import trial

        return trial(model)

    def seed(self, seed: int) -> None:
        return None  # Keras draws from its backend's generators (torch's is seeded by that backend)

    def runs_on(self, model: Any, x: np.ndarray) -> bool:
        from bnlab.doctor.backends.keras.common import runs_on

        return runs_on(model, x)

    def eval_output(self, model: Any, x: np.ndarray) -> np.ndarray | None:
        from bnlab.doctor.backends.keras.common import eval_output

        return eval_output(model, x)

    def probe(self, model: Any, inputs: Any, **options: Any) -> ProbeResult:
        from bnlab.doctor.backends.keras import probe

        return probe.probe(model, inputs, **options)

    def watcher(self, model: Any, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> Watcher:
        from bnlab.doctor.backends.keras import watch

        return watch.watcher(model)

    def describe_optimizer(self, model: Any, optimizer: Any) -> OptimizerInfo | None:
        from bnlab.doctor.backends.keras.train import optimizer_info

        return None if optimizer is None else optimizer_info(model, optimizer)

    def check_repairable(self, model: Any) -> None:
        from bnlab.doctor.backends.keras import repair

        repair.check_repairable(model)

    def repair(
        self, model: Any, batches: list[Batch], *, split: Iterable[str] | None = None
    ) -> tuple[Any, list[Change]]:
        from bnlab.doctor.backends.keras import repair

        return repair.repair(model, batches, split=split)

    def split_shared(self, model: Any, calls: dict[str, int]) -> Any:
        from bnlab.doctor.backends.keras import repair

        return repair.split_shared(model, calls)

    def evaluate(self, model: Any, batches: list[Batch]) -> dict[str, Any]:
        from bnlab.doctor.backends.keras import repair

        return repair.evaluate(model, batches)

    def load_checkpoint(self, model: Any, path: Path) -> None:
        from bnlab.doctor.backends.keras import io

        io.load_checkpoint(model, path)

    def save_weights(self, model: Any) -> bytes:
        from bnlab.doctor.backends.keras import io

        return io.save_weights(model)

    def how_to_load(self, changes: list[Change], weights: Path, target: str, mlp_config: Any) -> str:
        from bnlab.doctor.backends.keras import io

        return io.how_to_load(changes, weights, target, mlp_config)


BACKEND: Backend = KerasBackend()
