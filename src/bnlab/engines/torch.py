"""The torch engine: the question's experiment in PyTorch, read top to bottom.

Speed comes from doing nothing twice (airbench's lesson): the data is moved to the device
once, minibatches are gathered by index, the host waits on the device once per epoch, not
once per batch, and each step runs only the kernels it needs (``torch_step`` writes the
backward out instead of recording an autograd graph).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from bnlab.config import EpochRecord, RunConfig
from bnlab.engines.common import BNCallLog, RunResult, diverged, environment, epoch_orders, split_batches
from bnlab.engines.torch_step import check_supported, evaluate, make_optimizer, train_step
from bnlab.errors import UsageError
from bnlab.models import batch_norms, build_model
from bnlab.rundir import RunRecorder


def check_config(cfg: RunConfig) -> None:
    """Everything a RunConfig can say, the torch engine runs; only the device may be absent."""
    resolve_device(cfg.train.device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"--device {name} was asked for, but this machine has no CUDA device "
            "PyTorch can use; use --device cpu (or auto)."
        )
    return torch.device(name)


def device_tensors(data: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Training images as uint8 (converted per batch), evaluation images as float32 / 255,
    labels as int64; all on the device, moved there once.

    Gathering a minibatch of uint8 rows and converting it is faster than gathering float32
    rows (a quarter of the memory traffic) and gives bit-identical values to the question's
    ``astype('float32') / 255``; it also keeps a 188 MB float copy of the training set out
    of memory.
    """
    from bnlab.data import to_float

    def put(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    def labels(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.int64)  # a fresh, writable copy

    train_u8 = np.array(data.train_images, dtype=np.uint8).reshape(len(data.train_images), -1)
    return (
        put(train_u8),
        put(labels(data.train_labels)),
        put(to_float(data.test_images)),
        put(labels(data.test_labels)),
    )


def gather_batch(images_u8: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The minibatch ``idx`` as float32 / 255 (the question's conversion) and its labels."""
    return images_u8.index_select(0, idx).to(torch.float32).div_(255), labels.index_select(0, idx)


class BNTrace(BNCallLog):
    """Records, at every training call of every BN module, the batch mean/var of its
    input and its running mean/var right after the call, for the first few channels.

    The training step reports each BN call to ``record`` (``loss_and_gradients``'s
    observer), which only reads. Values stay on the device until the end of the epoch
    so tracing adds no host synchronisation.
    """

    def __init__(self, model: torch.nn.Module, channels: int) -> None:
        norms = batch_norms(model)
        super().__init__(list(norms))
        self.channels = channels
        self._index = {id(module): idx for idx, module in enumerate(norms.values())}
        self._rows: list[torch.Tensor] = []
        self._epoch_rows: list[np.ndarray] = []

    def record(self, module: torch.nn.Module, x: torch.Tensor) -> None:
        x = x[:, : self.channels]
        var, mean = torch.var_mean(x, dim=0, correction=0)
        k = x.shape[1]
        running_mean, running_var = module.running_mean, module.running_var
        assert isinstance(running_mean, torch.Tensor) and isinstance(running_var, torch.Tensor)
        self._rows.append(torch.stack([mean, var, running_mean[:k], running_var[:k]]))
        self._log_call(self._index[id(module)])

    def end_epoch(self) -> None:
        if self._rows:
            self._epoch_rows.append(torch.stack(self._rows).cpu().numpy())
            self._rows.clear()

    def close(self) -> dict[str, np.ndarray]:
        self.end_epoch()
        values = np.concatenate(self._epoch_rows) if self._epoch_rows else np.zeros((0, 4, self.channels))
        # values: (calls, [batch_mean, batch_var, run_mean, run_var], channels)
        return {"values": values.astype(np.float32), **self._call_arrays()}


def run(
    cfg: RunConfig, data: Any, recorder: RunRecorder, *, initial_state: dict[str, torch.Tensor] | None = None
) -> RunResult:
    """Train one run with torch (``threads`` pinned for the run, restored after)."""
    previous_threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _run(cfg, data, recorder, initial_state)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: RunConfig, data: Any, recorder: RunRecorder, initial_state: dict[str, torch.Tensor] | None) -> RunResult:
    tc = cfg.train
    device = resolve_device(tc.device)
    model = build_model(cfg.model, seed=tc.seed)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    check_supported(model)
    model.to(device).train()
    optimizer = make_optimizer(model, tc)
    x_train, y_train, x_val, y_val = device_tensors(data, device)
    trace = BNTrace(model, tc.trace_bn_channels) if tc.trace_bn_channels else None

    extra: dict[str, Any] = {
        "engine": "torch",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),  # its kernels' ISA: AVX2, AVX512...
    }
    if device.type == "cuda":
        extra.update(cuda_device=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    recorder.start(environment(str(device), data, extra))
    step = 0
    for epoch, order in enumerate(epoch_orders(tc.seed, len(x_train), tc.epochs)):
        started = time.perf_counter()
        batches = split_batches(order.to(device), tc.batch_size, tc.batching)
        batch_loss = torch.empty(len(batches), device=device)
        batch_acc = torch.empty(len(batches), device=device)
        for i, idx in enumerate(batches):
            step += 1
            xb, yb = gather_batch(x_train, y_train, idx)
            loss, logits = train_step(model, optimizer, xb, yb, step, tc, trace.record if trace else None)
            if trace:
                trace.end_step()
            batch_loss[i] = loss
            batch_acc[i] = (logits.argmax(1) == yb).float().mean()
        val_loss, val_acc = evaluate(model, x_val, y_val)
        # The one host synchronisation of the epoch.
        losses = batch_loss.cpu()
        summary = torch.stack([batch_acc.mean(), val_loss, val_acc]).cpu().tolist()
        if not torch.isfinite(losses).all():
            bad = int((~torch.isfinite(losses)).nonzero()[0])
            raise diverged(cfg, epoch, bad, losses[bad].item())
        if trace:
            trace.end_epoch()
        recorder.epoch(
            EpochRecord(epoch, float(losses.mean()), summary[1], summary[0], summary[2], time.perf_counter() - started)
        )
    bn_trace = trace.close() if trace else None
    recorder.finish(model.state_dict(), bn_trace)
    return RunResult(cfg, recorder.history, model, recorder.out_dir, bn_trace)
