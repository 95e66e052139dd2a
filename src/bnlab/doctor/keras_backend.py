"""The Keras 3 backend of the doctor (see :mod:`bnlab.doctor.backends`).

Keras (and TensorFlow or torch under it) is imported only once a Keras model is
handled: :func:`owns` reads the module names of the model's classes, never ``keras``.
It is registered before "torch" because a Keras 3 model on the torch backend is also a
``torch.nn.Module`` whose BatchNormalization layers torch's hooks would not see.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bnlab.doctor.records import OptimizerInfo, ProbeResult

NAME = "keras"


def _from_keras(cls: type) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return module == "keras" or module.startswith("keras.")


def owns(model: Any) -> bool:
    # A class defined in keras (keras.src.models...) somewhere in the model's bases;
    # tf_keras (Keras 2) lives in tf_keras.* and is not taken.
    return not isinstance(model, type) and any(_from_keras(c) for c in type(model).__mro__)


def probe(model: Any, inputs: Any, **options: Any) -> ProbeResult:
    from bnlab.doctor import keras_probe

    return keras_probe.probe(model, inputs, **options)


def watcher(model: Any, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> Any:
    from bnlab.doctor import keras_watch

    return keras_watch.watcher(model, on_pass_start, optimizer)


def describe_optimizer(model: Any, optimizer: Any) -> OptimizerInfo | None:
    from bnlab.doctor.keras_train import optimizer_info

    return None if optimizer is None else optimizer_info(model, optimizer)
