"""``bnlab.doctor.watch`` on a Keras model: not supported yet (Keras's ``fit`` runs the
steps inside the framework; a callback-based watcher is future work)."""

from __future__ import annotations

from typing import Any

from bnlab.doctor.errors import UnsupportedModel


def watcher(model: Any) -> Any:
    raise UnsupportedModel(
        "bnlab.doctor.watch does not support Keras models yet; check the model with "
        "bnlab.doctor.check(model, x, train_steps=N) or `bnlab doctor FILE.py:NAME`."
    )
