"""The Chainer backend of the doctor (see :mod:`bnlab.doctor.backends`).

Chainer is imported only once a Chainer model is handled.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from bnlab.doctor.records import OptimizerInfo, ProbeResult

NAME = "chainer"


def owns(model: Any) -> bool:
    # A Chainer model can only exist if chainer has been imported already.
    chainer = sys.modules.get("chainer")
    return chainer is not None and isinstance(model, chainer.Link)


def probe(model: Any, inputs: Any, **options: Any) -> ProbeResult:
    from bnlab.doctor import chainer_probe

    if isinstance(inputs, tuple):  # watch hands over the forward's positional arguments
        inputs = inputs[0]
    return chainer_probe.probe(model, inputs, **options)


def watcher(model: Any, on_pass_start: Callable[[tuple], None], optimizer: Any = None) -> Any:
    from bnlab.doctor.chainer_watch import ChainerWatcher

    return ChainerWatcher(model, on_pass_start, optimizer)


def describe_optimizer(model: Any, optimizer: Any) -> OptimizerInfo | None:
    from bnlab.doctor.chainer_watch import optimizer_info

    return optimizer_info(model, optimizer)
