"""The doctor's own training steps, on a copy of a PyTorch model.

Some BN mistakes (a shared BN above all) only show once the running statistics have
followed training for a while; ``check(..., train_steps=N)`` trains a copy first.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.doctor.batching import cycle
from bnlab.doctor.errors import UsageError, training_step_failed
from bnlab.doctor.records import TrainLog
from bnlab.doctor.torch_common import as_args, classes, first_tensor, is_norm, model_device


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
    tensor = first_tensor(out)
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
    cross-entropy. Batches cycle through ``batches`` or else repeat the probe batch.
    """
    device = model_device(model)
    if batches is None:
        if labels is None:
            labels = pseudo_labels(model, args)
        batches = [(args, labels)]
    loss_fn = loss_fn or F.cross_entropy
    factory = optimizer_factory or (lambda params: torch.optim.Adam(params, lr=lr))
    optimizer = factory(model.parameters())

    eval_steps: dict[str, int] = {}
    names = {id(m): name for name, m in model.named_modules()}
    step_seen: set[str] = set()

    def note_mode(module: nn.Module, _args: tuple) -> None:
        name = names[id(module)]
        if not module.training and name not in step_seen:
            eval_steps[name] = eval_steps.get(name, 0) + 1
        step_seen.add(name)

    handles = [m.register_forward_pre_hook(note_mode) for m in model.modules() if is_norm(m)]
    log = TrainLog(steps=steps)
    try:
        for step, (x, y) in zip(range(steps), cycle(batches)):
            step_seen.clear()
            model.train()
            xs = as_args(x, device)
            target = torch.as_tensor(y).to(device)
            try:
                loss = loss_fn(model(*xs), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            except Exception as err:  # noqa: BLE001 - reported as a probe failure
                raise training_step_failed(step, err) from err
            log.add_loss(step, float(loss.detach()))
    finally:
        for handle in handles:
            handle.remove()
    log.eval_mode_steps = eval_steps
    return log
