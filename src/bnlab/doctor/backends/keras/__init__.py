"""The Keras 3 backend of the doctor (see :mod:`bnlab.doctor.backends`).

Keras (and TensorFlow or torch under it) is imported only once a Keras model is
handled: :meth:`KerasBackend.owns` reads the module names of the model's classes, never
``keras``. It is registered before "torch" because a Keras 3 model on the torch backend
is also a ``torch.nn.Module`` whose BatchNormalization layers torch's hooks would not see.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bnlab.doctor.backend import Backend, Watcher
from bnlab.doctor.backends.folder import FolderBackend
from bnlab.doctor.backends.keras.fixes import KerasFixes
from bnlab.doctor.records import OptimizerInfo


def _from_keras(cls: type) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return module == "keras" or module.startswith("keras.")


class KerasBackend(FolderBackend):
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

    def has_own_name(self, model: Any) -> bool:
        from bnlab.doctor.backends.keras.probe import has_own_name

        return has_own_name(model)

    def runs_on(self, model: Any, x: np.ndarray) -> bool:
        from bnlab.doctor.backends.keras.common import runs_on

        return runs_on(model, x)

    def eval_output(self, model: Any, x: np.ndarray) -> np.ndarray | None:
        from bnlab.doctor.backends.keras.common import eval_output

        return eval_output(model, x)

    def watcher(self, model: Any, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> Watcher:
        from bnlab.doctor.backends.keras import watch

        return watch.watcher(model, on_pass_start, optimizer)

    def describe_optimizer(self, model: Any, optimizer: Any) -> OptimizerInfo | None:
        from bnlab.doctor.backends.keras.train import optimizer_info

        return None if optimizer is None else optimizer_info(model, optimizer)

    def check_repairable(self, model: Any) -> None:
        from bnlab.doctor.backends.keras import repair

        repair.check_repairable(model)


BACKEND: Backend = KerasBackend()
