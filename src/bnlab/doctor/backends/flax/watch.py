"""``bnlab.doctor.watch`` on a Flax training loop: placeholder until the nnx watcher lands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bnlab.doctor.backend import Watcher
from bnlab.doctor.errors import UnsupportedModel


def watcher(model: Any, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> Watcher:
    raise UnsupportedModel("bnlab.doctor.watch does not support Flax models yet.")
