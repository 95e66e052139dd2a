"""Which framework a model belongs to, without importing Chainer unless it is in use."""

from __future__ import annotations

import sys
from typing import Any

FRAMEWORKS = ("torch", "chainer")


def is_torch_model(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def is_chainer_model(obj: Any) -> bool:
    # A Chainer model can only exist if chainer has been imported already.
    chainer = sys.modules.get("chainer")
    return chainer is not None and isinstance(obj, chainer.Link)


def detect(model: Any) -> str:
    """``"torch"`` or ``"chainer"``; TypeError for anything else."""
    if is_torch_model(model):
        return "torch"
    if is_chainer_model(model):
        return "chainer"
    raise TypeError(
        f"expected a torch.nn.Module or a chainer.Link, got {type(model).__module__}."
        f"{type(model).__qualname__}"
    )
