"""The doctor's own training steps, on a copy of a PyTorch model.

Some BN mistakes (a shared BN above all) only show once the running statistics have
followed training for a while; ``check(..., train_steps=N)`` trains a copy first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.doctor.backends.torch.common import (
    as_args,
    classes,
    float_dtype,
    model_device,
    optimizer_info,
    output_tensor,
)
from bnlab.doctor.backends.torch.watch import TorchWatcher
from bnlab.doctor.batching import cycle, staged_step
from bnlab.doctor.errors import UsageError
from bnlab.doctor.records import TrainLog


def pseudo_labels(model: nn.Module, args: tuple, seed: int = 0) -> torch.Tensor:
    """Random class labels shaped like the model's predictions, for label-free probes.

    Training on them still moves every running statistic the way real training would;
    the checks only need the statistics to follow the weights.
    """
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model(*args)
    finally:
        for module, mode in was_training.items():
            module.training = mode
    if classes(out) is None:
        raise UsageError(
            "train_steps needs labels (or train_batches) when the model's output is not class "
            "scores of shape (N, C, ...)"
        )
    tensor, _ = output_tensor(out)
    assert tensor is not None  # classes() found it
    generator = torch.Generator().manual_seed(seed)
    shape = (tensor.shape[0],) + tuple(tensor.shape[2:])
    return torch.randint(0, tensor.shape[1], shape, generator=generator).to(tensor.device)


def train(
    model: nn.Module,
    args: tuple,
    labels: Any,
    steps: int,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    optimizer_factory: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer] | None = None,
    batches: Iterable[tuple[Any, Any]] | None = None,
    lr: float = 0.01,
) -> TrainLog:
    """``steps`` optimizer steps on ``model`` (already a copy), the way a user trains it.

    ``optimizer_factory(params)`` defaults to Adam(lr); ``loss_fn(output, labels)`` to
    cross-entropy. Batches cycle through ``batches`` or else repeat the probe batch. For a
    model returning a tuple or dict, the loss reads the tensor the probe reads
    (:func:`~bnlab.doctor.backends.torch.common.output_tensor`). The log records, per norm layer,
    the steps it spent in eval mode and how its running statistics moved.
    """
    device, dtype = model_device(model), float_dtype(model)
    if batches is None:
        if labels is None:
            labels = pseudo_labels(model, args)
        batches = [(args, labels)]
    loss_fn = loss_fn or F.cross_entropy
    factory = optimizer_factory or (lambda params: torch.optim.Adam(params, lr=lr))
    optimizer = factory(model.parameters())

    watcher = TorchWatcher(model)
    eval_steps: Counter[str] = Counter()
    log = TrainLog(steps=steps, optimizer=optimizer_info(model, optimizer))
    watcher.attach()
    try:
        for step, (x, y) in zip(range(steps), cycle(batches)):
            model.train()
            xs = as_args(x, device, dtype)
            target = torch.as_tensor(y).to(device)
            loss = staged_step(
                step,
                lambda: _output(model, xs),  # noqa: B023 - called at once
                lambda output: loss_fn(output, target),  # noqa: B023 - called at once
                lambda loss: _update(optimizer, loss),
                _number,
            )
            eval_steps.update({c.path for c in watcher.calls if not c.training})
            watcher.calls.clear()
            log.add_loss(step, float(loss.detach()))
    finally:
        watcher.detach()
    log.eval_mode_steps = dict(eval_steps)
    log.updates = watcher.updates()
    return log


def _output(model: nn.Module, xs: tuple) -> torch.Tensor:
    output, _ = output_tensor(model(*xs))
    if output is None:
        raise TypeError("the model's output holds no tensor")
    return output


def _update(optimizer: Any, loss: Any) -> None:
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _number(loss: Any) -> float | None:
    return float(loss.detach()) if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None
