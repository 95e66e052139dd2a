"""The chainer engine: the question's Chainer program, run with real Chainer (7.8.1) links,
on the CPU with numpy.

``bnlab.engines.train(cfg)`` with ``cfg.train.engine == "chainer"`` lands here. Everything around the
network is bnlab's own, shared with the torch engine: the data (``bnlab.data``), the
minibatch order (``epoch_orders`` + ``split_batches``), the table and the run directory
(``RunRecorder``). The checkpoint is a torch state_dict with the torch ``MLP``'s keys, so
``load_checkpoint`` and every torch tool read a Chainer run like a torch one.

What the network does is Chainer's: ``L.Linear`` with ``HeNormal``, ONE
``L.BatchNormalization`` link called after every hidden layer for ``norm="shared"`` (the
question's bug) or one per layer, and ``optimizers.Adam``. Conventions are mapped
explicitly: bnlab's ``bn_momentum`` (PyTorch's, weight of the new value) becomes Chainer's
``decay = 1 - momentum``; ``adam_eps`` is Chainer's eps as is (added to sqrt(v) before the
bias correction, which is bnlab's ``adam_eps_mode="chainer"``).

Threads: Chainer on the CPU computes with numpy, whose matrix products run in the BLAS
numpy was built with. ``threads=N`` (N >= 1) sets the number of OpenBLAS threads for the
run through OpenBLAS's own ``openblas_set_num_threads`` and restores it afterwards;
``threads=0`` leaves it alone. With another BLAS (MKL, Accelerate) bnlab cannot set it
and says so once in environment.json; set ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``
before starting Python instead. Element-wise numpy work is single-threaded either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from bnlab.config import EpochRecord, ModelConfig, RunConfig, TrainConfig
from bnlab.conventions import convert
from bnlab.engines.common import (
    BNCallLog,
    RunResult,
    diverged,
    environment,
    epoch_orders,
    first_bad,
    numpy_arrays,
    split_batches,
    torch_result,
)
from bnlab.errors import MissingExtra, UsageError, chainer_missing_text
from bnlab.models import build_model
from bnlab.rundir import RunRecorder


class ChainerMissing(MissingExtra):
    """Chainer cannot be imported (one paragraph, exit 2)."""


def _missing(err: BaseException) -> str:
    return chainer_missing_text("The chainer engine", err) + " Or train with --engine torch."


def import_chainer() -> ModuleType:
    """Chainer, imported on first use so that bnlab works without the extra."""
    try:
        import chainer
        import chainer.functions  # noqa: F401 - submodules used through the chainer name
        import chainer.links  # noqa: F401
        import chainer.optimizers  # noqa: F401
    except ImportError as err:
        raise ChainerMissing(_missing(err)) from err
    return chainer


def require_chainer_installed() -> None:
    """Raise ChainerMissing when no Chainer is installed, without importing it (a sweep asks
    this once, in the parent, before starting workers; importing Chainer takes seconds)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("chainer") is not None
    except (ImportError, ValueError) as err:  # ValueError: a stub module without a spec
        raise ChainerMissing(_missing(err)) from err
    if not found:
        raise ChainerMissing(_missing(ModuleNotFoundError("No module named 'chainer'")))


# ------------------------------------------------------------------ what the engine can do


def check_config(cfg: RunConfig) -> None:
    """Raise UsageError, naming the field and the fix, for settings Chainer cannot run.

    These are the TensorFlow program's semantics (and PyTorch's Adam): real Chainer has no
    biased running variance, no extra BN on the logits here, no Glorot init in the question's
    program, only the eps-before-correction Adam, and the Chainer program's train metrics.
    """
    m, t = cfg.model, cfg.train
    fix = "train this preset with --engine torch, which implements it"
    problems = [
        (
            m.running_var != "unbiased",
            f"model.running_var={m.running_var!r}: Chainer's BatchNormalization always averages the "
            "unbiased (n/(n-1)) batch variance; --set running_var=unbiased or " + fix,
        ),
        (
            m.logits_norm,
            "model.logits_norm=True: the Chainer program has no BatchNormalization on the logits; "
            "--set logits_norm=false or " + fix,
        ),
        (
            m.init != "chainer-he-normal",
            f"model.init={m.init!r}: the chainer engine initializes with chainer.initializers.HeNormal "
            "as the question's program does; --set init=chainer-he-normal or " + fix,
        ),
        (
            t.adam_eps_mode != "chainer",
            f"train.adam_eps_mode={t.adam_eps_mode!r}: Chainer's Adam adds eps to sqrt(v) before the "
            "bias correction, which is adam_eps_mode='chainer'; --set adam_eps_mode=chainer or " + fix,
        ),
        (
            t.train_metrics != "train-forward",
            f"train.train_metrics={t.train_metrics!r}: the Chainer program averages the metrics of the "
            "training forward pass; --set train_metrics=train-forward or " + fix,
        ),
        (
            t.device not in ("auto", "cpu"),
            f"train.device={t.device!r}: the chainer engine runs on the CPU with numpy (no CuPy); "
            "use --device cpu (or auto), or --engine torch for a GPU",
        ),
    ]
    messages = [msg for bad, msg in problems if bad]
    if messages:
        raise UsageError(f"Preset {cfg.preset!r} cannot run with --engine chainer: " + "; ".join(messages) + ".")
    require_chainer_installed()


def chainer_decay(model_cfg: ModelConfig) -> float:
    """Chainer's ``decay`` (weight of the OLD value) for bnlab's PyTorch-style ``bn_momentum``."""
    return convert(model_cfg.bn_momentum, "torch", "chainer")


# ------------------------------------------------------------------------------ the model

_CHAIN_CLASS: type | None = None


def _chain_class() -> type:
    """The Chain subclass, defined once Chainer is imported (it cannot exist before)."""
    global _CHAIN_CLASS
    if _CHAIN_CLASS is None:
        _CHAIN_CLASS = _define_chain_class(import_chainer())
    return _CHAIN_CLASS


def _define_chain_class(chainer: ModuleType) -> type:
    F, L = chainer.functions, chainer.links

    class ChainerMLP(chainer.Chain):  # type: ignore[name-defined]
        """The question's MyModel, generalised to bnlab's widths and placements.

        Child names match the torch ``MLP`` (l1.., bn1.. or the shared bn) so state_dict keys
        map one to one. ``bn_calls`` counts training-mode calls per BN link: it is the torch
        ``num_batches_tracked`` (2 per step for the shared link), which Chainer does not keep.
        """

        def __init__(self, cfg: ModelConfig, rng: np.random.RandomState | None) -> None:
            super().__init__()
            self.cfg = cfg
            widths = cfg.widths
            self.n_layers = len(widths) - 1
            decay = chainer_decay(cfg)
            with self.init_scope():
                for i in range(self.n_layers):
                    init = (
                        chainer.initializers.HeNormal(rng=rng) if rng is not None else chainer.initializers.HeNormal()
                    )
                    setattr(self, f"l{i + 1}", L.Linear(widths[i], widths[i + 1], initialW=init))
                if cfg.norm == "per-layer":
                    for i in range(1, self.n_layers):
                        setattr(self, f"bn{i}", L.BatchNormalization(widths[i], decay=decay, eps=cfg.bn_eps))
                elif cfg.norm == "shared" and self.n_layers > 1:
                    self.bn = L.BatchNormalization(widths[1], decay=decay, eps=cfg.bn_eps)
            self.norm_names = [self._norm_name(i) for i in range(1, self.n_layers)]
            self.bn_calls = {name: 0 for name in dict.fromkeys(n for n in self.norm_names if n)}
            self.trace: ChainerBNTrace | None = None

        def _norm_name(self, i: int) -> str | None:
            if self.cfg.norm == "per-layer":
                return f"bn{i}"
            return "bn" if self.cfg.norm == "shared" else None

        def forward(self, x):
            h = x
            for i, name in enumerate(self.norm_names, start=1):
                h = getattr(self, f"l{i}")(h)
                if name is not None:
                    h = self._normalize(name, h)
                h = F.relu(h)
            return getattr(self, f"l{self.n_layers}")(h)

        def _normalize(self, name: str, h):
            link = getattr(self, name)
            out = link(h)
            if chainer.config.train:
                self.bn_calls[name] += 1
                if self.trace is not None:
                    self.trace.record(name, h.array, link)
            return out

    return ChainerMLP


def build_chainer_model(
    model_cfg: ModelConfig,
    seed: int | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: np.dtype | type = np.float32,
) -> Any:
    """The Chainer model on the CPU (numpy arrays of ``dtype``; training uses float32).

    With ``state_dict`` (a torch ``MLP`` state_dict) its parameters, running statistics and
    call counts are copied in, for parity with the torch engine. Otherwise the weights are
    Chainer's ``HeNormal`` drawn from ``numpy.random.RandomState(seed)`` (the global numpy
    generator when ``seed`` is None), so they differ from the torch engine's for one seed.
    """
    chainer = import_chainer()
    if model_cfg.logits_norm:
        raise ValueError("model.logits_norm=True has no Chainer counterpart in bnlab; use --engine torch.")
    rng = np.random.RandomState(seed) if seed is not None else None
    # Links take their parameters' dtype from chainer.config.dtype when they are built.
    with chainer.using_config("dtype", np.dtype(dtype)):
        chain = _chain_class()(model_cfg, rng)
    chain.to_device("@numpy")
    if state_dict is not None:
        load_torch_state(chain, state_dict)
    return chain


def _chainer_slot(key: str) -> tuple[str, str]:
    """(link name, attribute) holding the torch state_dict entry ``key``."""
    link, _, field = key.rpartition(".")
    is_linear = not link.startswith("bn")
    table = {
        "weight": "W" if is_linear else "gamma",
        "bias": "b" if is_linear else "beta",
        "running_mean": "avg_mean",
        "running_var": "avg_var",
        "num_batches_tracked": "bn_calls",
    }
    if field not in table:
        raise KeyError(f"state_dict key {key!r} has no Chainer counterpart")
    return link, table[field]


def _torch_keys(model_cfg: ModelConfig) -> list[str]:
    # The torch MLP itself is the single source of truth for key names and their order;
    # a seed keeps the caller's global torch RNG untouched.
    return list(build_model(model_cfg, seed=0).state_dict().keys())


def load_torch_state(chain: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a torch ``MLP`` state_dict into ``chain`` in place (shapes must match exactly)."""
    expected = set(_torch_keys(chain.cfg))
    if set(state_dict) != expected:
        missing, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        raise ValueError(f"state_dict does not fit this model: missing {missing}, unexpected {extra}")
    for key, tensor in state_dict.items():
        link_name, attr = _chainer_slot(key)
        if attr == "bn_calls":
            chain.bn_calls[link_name] = int(tensor)
            continue
        target = getattr(getattr(chain, link_name), attr)
        array = target.array if hasattr(target, "array") else target
        value = tensor.detach().cpu().numpy()
        if array.shape != value.shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit Chainer's {array.shape}")
        array[...] = value


def chainer_state_dict(chain: Any) -> dict[str, torch.Tensor]:
    """The Chainer model's state as a torch ``MLP`` state_dict (same keys, same order)."""
    state: dict[str, torch.Tensor] = {}
    for key in _torch_keys(chain.cfg):
        link_name, attr = _chainer_slot(key)
        if attr == "bn_calls":
            state[key] = torch.tensor(chain.bn_calls[link_name], dtype=torch.long)
            continue
        target = getattr(getattr(chain, link_name), attr)
        array = target.array if hasattr(target, "array") else target
        state[key] = torch.from_numpy(np.array(array, copy=True))
    return state


# --------------------------------------------------------------------------- one step


def make_chainer_optimizer(chain: Any, tc: TrainConfig) -> Any:
    """Chainer's Adam with the run's hyper-parameters (eps before bias correction, by design)."""
    chainer = import_chainer()
    optimizer = chainer.optimizers.Adam(alpha=tc.lr, beta1=tc.adam_beta1, beta2=tc.adam_beta2, eps=tc.adam_eps)
    optimizer.setup(chain)
    return optimizer


def chainer_train_step(chain: Any, optimizer: Any, xb: np.ndarray, yb: np.ndarray) -> tuple[float, np.ndarray]:
    """One Adam step on one minibatch, as the question's loop does it; returns (loss, logits).

    ``xb`` float32 (n, 784), ``yb`` int32 labels. The step count lives in the optimizer
    (``optimizer.t``), so unlike the torch ``train_step`` no step number is passed.
    """
    chainer = import_chainer()
    with chainer.using_config("train", True), chainer.using_config("enable_backprop", True):
        logits = chain(xb)
        loss = chainer.functions.softmax_cross_entropy(logits, yb)
        chain.cleargrads()
        loss.backward()
        optimizer.update()
    return float(loss.array), logits.array


def chainer_evaluate(chain: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Loss and accuracy with the running statistics, as the question's evaluation does."""
    chainer = import_chainer()
    F = chainer.functions
    with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
        logits = chain(x)
        return float(F.softmax_cross_entropy(logits, y).array), float(F.accuracy(logits, y).array)


# ------------------------------------------------------------------------------ tracing


class ChainerBNTrace(BNCallLog):
    """The torch engine's BN trace, recorded from the Chainer model (same output format)."""

    def __init__(self, names: list[str], channels: int) -> None:
        super().__init__(names)
        self.channels = channels
        self._rows: list[np.ndarray] = []

    def record(self, name: str, x: np.ndarray, link: Any) -> None:
        k = min(self.channels, x.shape[1])
        xs = x[:, :k]
        self._rows.append(np.stack([xs.mean(0), xs.var(0), link.avg_mean[:k], link.avg_var[:k]]).astype(np.float32))
        self._log_call(self.names.index(name))

    def close(self) -> dict[str, np.ndarray]:
        values = np.stack(self._rows) if self._rows else np.zeros((0, 4, self.channels), np.float32)
        return {"values": values, **self._call_arrays()}


# ------------------------------------------------------------------------------ threads


def _openblas_setters() -> Iterator[tuple[Callable, Callable]]:
    """(set, get) thread functions of every OpenBLAS this process has loaded."""
    maps = Path("/proc/self/maps")
    paths: list[str] = []
    if maps.exists():
        for line in maps.read_text().splitlines():
            path = line.split()[-1] if "/" in line else ""
            if "openblas" in os.path.basename(path).lower() and path not in paths:
                paths.append(path)
    for path in paths:
        try:
            lib = ctypes.CDLL(path)  # already loaded: this returns the same library
        except OSError:
            continue
        for suffix in ("", "64_", "_64"):
            for prefix in ("", "scipy_"):
                setter = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    setter.argtypes, getter.restype = [ctypes.c_int], ctypes.c_int
                    yield setter, getter
                    break


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[str]:
    """Run the block with ``n`` OpenBLAS threads (0: unchanged); yields what was done."""
    if n <= 0:
        yield "unchanged (threads=0)"
        return
    found = list(_openblas_setters())
    previous = [getter() for _, getter in found]
    for setter, _ in found:
        setter(n)
    try:
        yield (
            f"OpenBLAS threads set to {n}"
            if found
            else (
                f"threads={n} not applied: numpy's BLAS is not an OpenBLAS bnlab can reach; "
                "set OMP_NUM_THREADS before starting Python"
            )
        )
    finally:
        for (setter, _), count in zip(found, previous):
            setter(count)


# ------------------------------------------------------------------------------ training


def run(
    cfg: RunConfig, data: Any, recorder: RunRecorder, *, initial_state: dict[str, torch.Tensor] | None = None
) -> RunResult:
    """Train one run with real Chainer links, through the same run directory as torch.

    The returned ``RunResult.model`` is a torch ``MLP`` holding the trained Chainer state.
    """
    check_config(cfg)
    chainer = import_chainer()
    with (
        blas_threads(cfg.train.threads) as threads_note,
        chainer.using_config("use_ideep", "never"),
        chainer.using_config("dtype", np.dtype(np.float32)),
    ):
        state, bn_trace = _train_loop(cfg, data, recorder, initial_state, chainer, threads_note)
    return torch_result(cfg, recorder, state, bn_trace)


def _train_loop(
    cfg: RunConfig,
    data: Any,
    recorder: RunRecorder,
    initial_state: dict[str, torch.Tensor] | None,
    chainer: ModuleType,
    threads_note: str,
) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray] | None]:
    tc = cfg.train
    chain = build_chainer_model(cfg.model, seed=tc.seed, state_dict=initial_state)
    optimizer = make_chainer_optimizer(chain, tc)
    x_train, y_train, x_val, y_val = numpy_arrays(data)
    trace = None
    if tc.trace_bn_channels:
        trace = chain.trace = ChainerBNTrace(list(chain.bn_calls), tc.trace_bn_channels)

    extra = {"engine": "chainer", "chainer": chainer.__version__, "blas_threads": threads_note}
    recorder.start(environment("cpu", data, extra))
    for epoch, order in enumerate(epoch_orders(tc.seed, len(x_train), tc.epochs)):
        started = time.perf_counter()
        losses, accs = [], []
        for idx in split_batches(order, tc.batch_size, tc.batching):
            idx_np = idx.numpy()
            yb = y_train[idx_np]
            loss, logits = chainer_train_step(chain, optimizer, x_train[idx_np], yb)
            if trace:
                trace.end_step()
            losses.append(loss)
            accs.append(float((logits.argmax(1) == yb).mean()))
        bad = first_bad(losses)
        if bad is not None:
            raise diverged(cfg, epoch, bad, losses[bad])
        val_loss, val_acc = chainer_evaluate(chain, x_val, y_val)
        recorder.epoch(
            EpochRecord(
                epoch, float(np.mean(losses)), val_loss, float(np.mean(accs)), val_acc, time.perf_counter() - started
            )
        )
    bn_trace = trace.close() if trace else None
    state = chainer_state_dict(chain)
    recorder.finish(state, bn_trace)
    return state, bn_trace
