"""The training loop with the seed's semantics, and the run directory it writes.

Read top to bottom: configuration, the table, the run directory, the BN trace, then
``train()`` itself. Speed comes from doing nothing twice (airbench's lesson): the data
is moved to the device once, minibatches are gathered by index, the host waits on the
device once per epoch, not once per batch, and each step runs only the kernels it needs
(``bnlab.backprop`` writes the backward out instead of recording an autograd graph).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnlab import __version__
from bnlab.backprop import NormObserver, check_supported, cross_entropy_and_grad, loss_and_gradients
from bnlab.models import MLP, ModelConfig, batch_norms, build_model

ENGINES = ("torch", "chainer", "tensorflow")
ADAM_EPS_MODES = ("chainer", "torch")
TRAIN_METRICS = ("train-forward", "eval-after-step")
BATCHINGS = ("slices", "array-split")


@dataclass(frozen=True)
class TrainConfig:
    """How the model is trained. Defaults are the seed's: batch 1000, 100 epochs, Adam.

    ``adam_eps_mode="chainer"`` adds eps to sqrt(v) before the bias correction, as
    Chainer's and TF1's Adam do; ``"torch"`` adds it after, as ``torch.optim.Adam`` does.
    ``train_metrics="train-forward"`` averages the loss/accuracy of the training forward
    pass (the Chainer program); ``"eval-after-step"`` re-evaluates each batch in eval mode
    after the update (the TensorFlow program's ``loss.eval`` without ``training=True``).
    ``batching="slices"`` cuts the permutation every ``batch_size`` (Chainer program);
    ``"array-split"`` splits it into ``n // batch_size`` near-equal parts (TF program).
    """

    epochs: int = 100
    batch_size: int = 1000
    lr: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    adam_eps_mode: str = "chainer"
    train_metrics: str = "train-forward"
    batching: str = "slices"
    seed: int = 0
    device: str = "auto"
    threads: int = 1
    engine: str = "torch"
    trace_bn_channels: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1; got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1; got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number; got {self.lr}"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "Adam betas must lie in [0, 1)"),
            (self.adam_eps >= 0, f"adam_eps must be >= 0; got {self.adam_eps}"),
            (self.adam_eps_mode in ADAM_EPS_MODES, f"adam_eps_mode must be one of {ADAM_EPS_MODES}"),
            (self.train_metrics in TRAIN_METRICS, f"train_metrics must be one of {TRAIN_METRICS}"),
            (self.batching in BATCHINGS, f"batching must be one of {BATCHINGS}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}"),
            (self.threads >= 0, f"threads must be >= 0 (0 keeps torch's default); got {self.threads}"),
            (self.engine in ENGINES, f"engine must be one of {ENGINES}; got {self.engine!r}"),
            (self.trace_bn_channels >= 0, "trace_bn_channels must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class RunConfig:
    """One run: a named preset's model and training settings, on a data set."""

    preset: str
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dataset: str = "mnist"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        model = dict(d["model"])
        model["widths"] = tuple(model["widths"])
        return cls(preset=d["preset"], model=ModelConfig(**model), train=TrainConfig(**d["train"]),
                   dataset=d.get("dataset", "mnist"))


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    train_acc: float
    val_acc: float
    seconds: float


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run directory keeps the epochs before it."""


# ----------------------------------------------------------------------------- the table

TABLE_HEADER = "epoch  train/loss  val/loss  train/acc   val/acc"


def format_row(rec: EpochRecord, *, seconds: bool = False) -> str:
    """One row of the seed's table; seconds, when asked for, go in a trailing column."""
    row = "{0:>4d} {1:>10.4f} {2:>10.4f} {3:>10.4f} {4:>10.4f}".format(
        rec.epoch, rec.train_loss, rec.val_loss, rec.train_acc, rec.val_acc)
    return f"{row} {rec.seconds:>8.2f}s" if seconds else row


def format_table(history: list[EpochRecord], *, seconds: bool = False) -> str:
    return "\n".join([TABLE_HEADER, *(format_row(r, seconds=seconds) for r in history)])


# ----------------------------------------------------------------------- the run directory

def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write via a temp file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def environment(device: torch.device, data_sha256: dict[str, str] | None, data_source: str | None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a reader needs to reproduce or judge a run: versions, hardware, data identity."""
    env: dict[str, Any] = {
        "bnlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "data_source": data_source,
        "data_sha256": data_sha256,
    }
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    env.update(extra or {})
    return env


class RunRecorder:
    """Prints the seed's table and keeps the run directory valid after every epoch.

    Files: config.json, environment.json, history.json (``status`` running / complete /
    diverged), history.csv, checkpoint.pt (state_dict, loads with weights_only=True) and,
    when traced, bn_trace.npz. Both engines (torch and chainer) record through this class.
    """

    def __init__(self, cfg: RunConfig, out_dir: str | os.PathLike | None,
                 echo: Callable[[str], None] | None = print, show_seconds: bool = True) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.echo = echo
        self.show_seconds = show_seconds
        self.history: list[EpochRecord] = []
        self.status = "running"
        self.message = ""

    def start(self, env: dict[str, Any]) -> None:
        if self.out_dir is not None:
            atomic_write_json(self.out_dir / "config.json", self.cfg.to_dict())
            atomic_write_json(self.out_dir / "environment.json", env)
            self._write_history()
        if self.echo:
            self.echo(TABLE_HEADER)

    def epoch(self, rec: EpochRecord) -> None:
        self.history.append(rec)
        if self.echo:
            self.echo(format_row(rec, seconds=self.show_seconds))
        if self.out_dir is not None:
            self._write_history()

    def diverged(self, message: str) -> None:
        self.status, self.message = "diverged", message
        if self.out_dir is not None:
            self._write_history()

    def finish(self, state_dict: dict[str, torch.Tensor], bn_trace: dict[str, np.ndarray] | None = None) -> None:
        if self.out_dir is not None:
            buf = io.BytesIO()
            cpu_state = {k: v.detach().cpu() for k, v in state_dict.items()}
            torch.save({"model": cpu_state, "config": self.cfg.to_dict()}, buf)
            atomic_write_bytes(self.out_dir / "checkpoint.pt", buf.getvalue())
            if bn_trace:
                npz = io.BytesIO()
                np.savez(npz, **bn_trace)
                atomic_write_bytes(self.out_dir / "bn_trace.npz", npz.getvalue())
        # history.json is written last: "complete" on disk means every other file is there.
        self.status = "complete"
        if self.out_dir is not None:
            self._write_history()

    def _write_history(self) -> None:
        assert self.out_dir is not None
        records = [dataclasses.asdict(r) for r in self.history]
        atomic_write_json(self.out_dir / "history.json", {
            "preset": self.cfg.preset, "seed": self.cfg.train.seed, "status": self.status,
            "message": self.message, "epochs_planned": self.cfg.train.epochs, "history": records})
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[f.name for f in dataclasses.fields(EpochRecord)])
        writer.writeheader()
        writer.writerows(records)
        atomic_write_text(self.out_dir / "history.csv", out.getvalue())


def read_history(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The saved history.json of a run directory, or None if absent or unreadable."""
    try:
        return json.loads((Path(run_dir) / "history.json").read_text())
    except (OSError, ValueError):
        return None


def load_checkpoint(path: str | os.PathLike) -> tuple[MLP, RunConfig]:
    """Rebuild a trained model from checkpoint.pt without unpickling arbitrary objects."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    cfg = RunConfig.from_dict(payload["config"])
    model = build_model(cfg.model)
    model.load_state_dict(payload["model"])
    return model, cfg


# ------------------------------------------------------------------------ data and order

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but this machine has no CUDA device "
                         "PyTorch can use; use --device cpu (or auto).")
    return torch.device(name)


def epoch_orders(seed: int, n: int, epochs: int) -> Iterator[torch.Tensor]:
    """The seeded permutation of the training set for each epoch, made on the CPU.

    Made on the CPU on every device so that CPU and CUDA runs (and the Chainer engine)
    see the same minibatches for the same seed.
    """
    gen = torch.Generator().manual_seed(seed + 7919)  # a stream apart from weight init
    for _ in range(epochs):
        yield torch.randperm(n, generator=gen)


def split_batches(order: torch.Tensor, batch_size: int, batching: str) -> list[torch.Tensor]:
    """Cut an epoch's permutation into minibatches of indices.

    Each minibatch's indices are sorted: the same random partition of the data set, but
    rows are then gathered in memory order, which is several times faster on the CPU than
    random order (the hardware prefetcher follows it). Only the order of samples inside a
    batch changes, which the loss (a mean) and BN's statistics do not depend on, up to
    float rounding.
    """
    if batching == "slices":
        parts = torch.split(order, batch_size)
    else:
        parts = torch.tensor_split(order, max(1, len(order) // batch_size))
    return [torch.sort(p).values for p in parts]


def check_minibatches(cfg: RunConfig, n_train: int) -> None:
    """Refuse, before any training, a split that hands batch norm a one-sample minibatch:
    its batch variance is 0 and the running (unbiased) variance would become NaN."""
    m = cfg.model
    if m.norm == "none" and not m.logits_norm:
        return
    tc = cfg.train
    if tc.batching == "slices":
        smallest = n_train % tc.batch_size or min(tc.batch_size, n_train)
    else:
        smallest = n_train // max(1, n_train // tc.batch_size)
    if smallest < 2:
        raise ValueError(
            f"batch_size {tc.batch_size} with batching {tc.batching!r} leaves a minibatch of {smallest} "
            f"sample out of {n_train}, and batch normalization needs at least 2 samples per minibatch "
            "in training. Choose a batch size that does not leave a remainder of 1, or use "
            "--set batching=array-split (near-equal minibatches).")


def load_data(dataset: str, data_dir: str | os.PathLike | None):
    """The named data set, read and verified by bnlab.data."""
    from bnlab.data import load_dataset

    return load_dataset(dataset, data_dir)


def device_tensors(data, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Training images as uint8 (converted per batch), evaluation images as float32 / 255,
    labels as int64; all on the device, moved there once.

    Gathering a minibatch of uint8 rows and converting it is faster than gathering float32
    rows (a quarter of the memory traffic) and gives bit-identical values to the seed's
    ``astype('float32') / 255``; it also keeps a 188 MB float copy of the training set out
    of memory.
    """
    from bnlab.data import to_float

    def put(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    def labels(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.int64)  # a fresh, writable copy

    train_u8 = np.array(data.train_images, dtype=np.uint8).reshape(len(data.train_images), -1)
    return (put(train_u8), put(labels(data.train_labels)),
            put(to_float(data.test_images)), put(labels(data.test_labels)))


def gather_batch(images_u8: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The minibatch ``idx`` as float32 / 255 (the seed's conversion) and its labels."""
    return images_u8.index_select(0, idx).to(torch.float32).div_(255), labels.index_select(0, idx)


# ---------------------------------------------------------------------------- BN tracing

class BNCallLog:
    """Which BN module each recorded call went to, and which call of that module within its
    step it was (site 0 after l1, site 1 after l2 for a shared BN). Both engines' traces
    keep their rows in this order."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self._module_ids: list[int] = []
        self._site_ids: list[int] = []
        self._calls_this_step: dict[int, int] = {}

    def _log_call(self, idx: int) -> None:
        site = self._calls_this_step.get(idx, 0)
        self._calls_this_step[idx] = site + 1
        self._module_ids.append(idx)
        self._site_ids.append(site)

    def end_step(self) -> None:
        self._calls_this_step.clear()

    def _call_arrays(self) -> dict[str, np.ndarray]:
        return {"module": np.asarray(self._module_ids, dtype=np.int32),
                "site": np.asarray(self._site_ids, dtype=np.int32), "module_names": np.asarray(self.names)}


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
        self._rows.append(torch.stack([mean, var, module.running_mean[:k], module.running_var[:k]]))
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


# ------------------------------------------------------------------------------ training

@dataclass
class RunResult:
    config: RunConfig
    history: list[EpochRecord]
    model: torch.nn.Module | None
    run_dir: Path | None
    bn_trace: dict[str, np.ndarray] | None = None


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # fused Adam runs one kernel for all parameters on CPU and CUDA alike.
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_eps, fused=True)


def _can_call_fused_kernel(optimizer: torch.optim.Optimizer) -> bool:
    if not (isinstance(optimizer, torch.optim.Adam) and hasattr(torch, "_fused_adam_")
            and len(optimizer.param_groups) == 1):
        return False
    group = optimizer.param_groups[0]
    plain = group.get("fused") and not (group["amsgrad"] or group["maximize"] or group.get("differentiable"))
    return bool(plain) and isinstance(group["lr"], float) and all(
        p.grad is not None and not p.grad.is_sparse for p in group["params"])


def adam_step(optimizer: torch.optim.Optimizer, eps: float) -> None:
    """One step of ``torch.optim.Adam(fused=True)`` with this step's ``eps``.

    It calls the very kernel ``optimizer.step()`` calls, on the optimizer's own state, so
    the arithmetic (and every history) is bit-identical; what it skips is
    ``Optimizer.step``'s per-call Python bookkeeping, measured at about 0.8 ms a step here,
    8% of an epoch. Anything unusual (another optimizer, several groups, a missing
    gradient, a torch without the kernel) takes the ordinary ``optimizer.step()``.
    """
    group = optimizer.param_groups[0]
    group["eps"] = eps
    if not _can_call_fused_kernel(optimizer):
        optimizer.step()
        return
    params = group["params"]
    states = [optimizer.state[p] for p in params]
    for p, state in zip(params, states):
        if not state:  # the same initial state torch.optim.Adam creates for fused=True
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1)
    beta1, beta2 = group["betas"]
    torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                       [s["exp_avg_sq"] for s in states], [], steps, lr=group["lr"], beta1=beta1, beta2=beta2,
                       weight_decay=group["weight_decay"], eps=eps, amsgrad=False, maximize=False,
                       grad_scale=None, found_inf=None)


def chainer_style_eps(eps: float, beta2: float, step: int) -> float:
    """The torch.optim.Adam eps that reproduces Chainer/TF1's Adam at ``step`` (1-based).

    Chainer: p -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps).
    PyTorch: p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps').
    They agree exactly when eps' = eps / sqrt(1 - b2^t).
    """
    return eps / math.sqrt(1.0 - beta2 ** step)


def train(cfg: RunConfig, data=None, *, data_dir: str | os.PathLike | None = None,
          out_dir: str | os.PathLike | None = None, echo: Callable[[str], None] | None = print,
          initial_state: dict[str, torch.Tensor] | None = None) -> RunResult:
    """Train one run and return its history (and model); see RunRecorder for what is saved.

    ``initial_state`` replaces the seeded initial weights (used by the parity tests).
    Raises TrainingDiverged if the loss becomes NaN or infinite.
    """
    if cfg.train.engine == "chainer":
        from bnlab.chainer_engine import train_chainer

        return train_chainer(cfg, data, data_dir=data_dir, out_dir=out_dir, echo=echo,
                             initial_state=initial_state)
    if cfg.train.engine == "tensorflow":
        from bnlab.engines import tensorflow as tf_engine

        tf_engine.check_config(cfg)
        data = data if data is not None else load_data(cfg.dataset, data_dir)
        return tf_engine.run(cfg, data, out_dir=out_dir, echo=echo, initial_state=initial_state)
    tc = cfg.train
    device = resolve_device(tc.device)
    data = data if data is not None else load_data(cfg.dataset, data_dir)
    previous_threads = torch.get_num_threads()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    try:
        return _train_torch(cfg, data, device, out_dir, echo, initial_state)
    finally:
        torch.set_num_threads(previous_threads)


def _train_torch(cfg: RunConfig, data, device: torch.device, out_dir, echo, initial_state) -> RunResult:
    tc = cfg.train
    model = build_model(cfg.model, seed=tc.seed)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    check_supported(model)
    model.to(device).train()
    optimizer = make_optimizer(model, tc)
    check_minibatches(cfg, len(data.train_labels))
    x_train, y_train, x_val, y_val = device_tensors(data, device)
    trace = BNTrace(model, tc.trace_bn_channels) if tc.trace_bn_channels else None

    recorder = RunRecorder(cfg, out_dir, echo)
    recorder.start(environment(device, getattr(data, "sha256", None), getattr(data, "source", None)))
    step = 0
    try:
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
                raise TrainingDiverged(
                    f"Training of preset {cfg.preset!r} (seed {tc.seed}) diverged: the loss became "
                    f"{losses[bad].item()} at epoch {epoch}, batch {bad}. The run directory keeps the "
                    f"{epoch} finished epochs. Lower the learning rate (--lr, now {tc.lr}) or check the "
                    "input data for NaN or infinite values.")
            if trace:
                trace.end_epoch()
            recorder.epoch(EpochRecord(epoch, float(losses.mean()), summary[1], summary[0], summary[2],
                                       time.perf_counter() - started))
    except TrainingDiverged as err:
        recorder.diverged(str(err))
        if trace:
            trace.close()
        raise
    bn_trace = trace.close() if trace else None
    recorder.finish(model.state_dict(), bn_trace)
    return RunResult(cfg, recorder.history, model, recorder.out_dir, bn_trace)


def train_step(model: MLP, optimizer: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
               step: int, tc: TrainConfig, observe: NormObserver | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Adam step on one minibatch (``step`` is 1-based); returns the (loss, logits)
    that the epoch's train/loss and train/acc average, as detached device tensors.

    The gradients come from ``bnlab.backprop`` (the backward written out, the same
    numbers as autograd's), ``observe`` sees every BN call."""
    loss, logits = loss_and_gradients(model, xb, yb, observe)
    eps = chainer_style_eps(tc.adam_eps, tc.adam_beta2, step) if tc.adam_eps_mode == "chainer" else tc.adam_eps
    adam_step(optimizer, eps)
    if tc.train_metrics == "eval-after-step":
        return _eval_forward(model, xb, yb)
    return loss, logits


# On the CPU the 10,000-row evaluation runs about 20% faster as ten 1,000-row products
# (their operands stay in cache), and each row of the logits is the same bit for bit.
CPU_EVAL_ROWS = 1000


def _eval_forward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode (running statistics) loss and logits; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        rows = CPU_EVAL_ROWS if x.device.type == "cpu" else len(x)
        logits = torch.cat([model(chunk) for chunk in x.split(rows)])
        loss, _ = cross_entropy_and_grad(logits, y, with_grad=False)
    model.train(was_training)
    return loss, logits


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode (running statistics) loss and accuracy over the whole set, as device tensors."""
    loss, logits = _eval_forward(model, x, y)
    with torch.inference_mode():
        acc = (logits.argmax(1) == y).float().mean()
    return loss, acc
