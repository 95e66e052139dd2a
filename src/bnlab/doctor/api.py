"""``check``: probe a model and run every check on what the probe saw."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from bnlab.doctor.backend import Backend
from bnlab.doctor.backends import chosen
from bnlab.doctor.diagnose import run_checks
from bnlab.doctor.errors import UsageError
from bnlab.doctor.findings import Report


def check(
    model: Any,
    inputs: Any,
    *,
    labels: Any = None,
    train_steps: int = 0,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    optimizer_factory: Callable[..., Any] | None = None,
    train_batches: Iterable[tuple[Any, Any]] | None = None,
    lr: float = 0.01,
    framework: str | Backend = "auto",
    source: str = "",
) -> Report:
    """Diagnose the batch normalization of ``model`` on the probe batch ``inputs``.

    The model is never modified: probing and training happen on a deep copy.

    - ``labels``: class labels of ``inputs``, to report accuracy in train and eval mode.
    - ``train_steps``: optimizer steps to run on the copy before probing (a shared BN
      shows its full effect only after training). Batches come from ``train_batches``
      (an iterable of ``(x, y)``, cycled) or else repeat ``(inputs, labels)``; without
      labels, random labels over the model's classes stand in. Staleness and train/eval
      agreement are judged on the model as handed over, not on the briefly trained copy.
    - ``loss_fn(output, labels)``: defaults to cross-entropy.
    - ``optimizer_factory``: PyTorch: ``factory(params) -> Optimizer``, e.g.
      ``functools.partial(torch.optim.SGD, lr=0.1)``; Chainer: ``factory() -> Optimizer``
      (set up on the copy by the doctor). Defaults to Adam with learning rate ``lr``.
      Its weight decay on norm parameters is checked.
    - ``framework``: ``"auto"`` (detected), a backend name (``"torch"``, ``"chainer"``...),
      or a ``Backend`` already detected (the command line detects once and passes it on).
    - ``source``: a few words on where ``inputs`` came from, shown in the report.
    """
    if train_steps < 0:
        raise UsageError("train_steps must be >= 0")
    backend = chosen(model, framework)
    probe = backend.probe(
        model,
        inputs,
        labels=labels,
        train_steps=train_steps,
        loss_fn=loss_fn,
        optimizer_factory=optimizer_factory,
        train_batches=train_batches,
        lr=lr,
    )
    return run_checks(probe, backend.fixes, source=source)
