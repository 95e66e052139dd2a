"""What every engine shares: the data, its order and batching, the BN call log, the
divergence message and the environment record.

The order is made once, on the CPU, from the random seed: every engine (and every device) sees
the same minibatches for the same seed, which is what makes their parity testable.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnlab import __version__
from bnlab.config import EpochRecord, RunConfig
from bnlab.errors import TrainingDiverged, UsageError

if TYPE_CHECKING:
    import torch

    from bnlab.data import Dataset


@dataclass
class RunResult:
    """What ``bnlab.engines.train`` returns: the history and the trained model (a torch
    ``MLP`` whatever the engine, holding the trained state)."""

    config: RunConfig
    history: list[EpochRecord]
    model: Any
    run_dir: Path | None
    bn_trace: dict[str, np.ndarray] | None = None


def torch_result(
    cfg: RunConfig, recorder: Any, state: dict[str, Any], bn_trace: dict[str, np.ndarray] | None
) -> RunResult:
    """The RunResult of an engine that trained outside torch: its torch-keyed ``state`` in a
    torch ``MLP`` (so every caller gets the same kind of model, whatever the engine)."""
    from bnlab.models import build_model

    model = build_model(cfg.model, seed=0)  # every value is overwritten by the trained state
    model.load_state_dict(state)
    return RunResult(cfg, recorder.history, model, recorder.out_dir, bn_trace)


def load_data(dataset: str, data_dir: str | os.PathLike | None) -> Dataset:
    """The named data set, read and verified by bnlab.data."""
    from bnlab.data import load_dataset

    return load_dataset(dataset, data_dir)


def numpy_arrays(data: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Float32 images / 255 (the question's ``astype('float32') / 255``) and int32 labels,
    as the numpy-fed engines (Chainer, TensorFlow) take them; made once per run."""
    from bnlab.data import to_float

    return (
        to_float(data.train_images),
        np.asarray(data.train_labels, dtype=np.int32),
        to_float(data.test_images),
        np.asarray(data.test_labels, dtype=np.int32),
    )


def epoch_orders(seed: int, n: int, epochs: int) -> Iterator[torch.Tensor]:
    """The seeded permutation of the training set for each epoch, made on the CPU.

    Made on the CPU on every device so that CPU and CUDA runs (and the other engines)
    see the same minibatches for the same seed.
    """
    import torch

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
    import torch

    if batching == "slices":
        parts = torch.split(order, batch_size)
    else:
        parts = torch.tensor_split(order, max(1, len(order) // batch_size))
    if len({len(p) for p in parts}) == 1:  # equal parts: one sort of all rows, not one per batch
        return list(torch.sort(order.view(len(parts), -1), dim=1).values.unbind(0))
    return [torch.sort(p).values for p in parts]


def check_minibatches(cfg: RunConfig, n_train: int) -> None:
    """Refuse, before any training, a batch size larger than the training set (it would
    silently become the whole set) and a split that hands batch norm a one-sample
    minibatch (its batch variance is 0 and the unbiased running variance becomes NaN)."""
    tc = cfg.train
    if tc.batch_size > n_train:
        raise UsageError(
            f"--batch-size {tc.batch_size} is larger than the {n_train:,} training images of "
            f"{cfg.dataset}; choose at most {n_train}."
        )
    m = cfg.model
    if m.norm == "none" and not m.logits_norm:
        return
    if tc.batching == "slices":
        smallest = n_train % tc.batch_size or min(tc.batch_size, n_train)
    else:
        smallest = n_train // max(1, n_train // tc.batch_size)
    if smallest < 2:
        raise UsageError(
            f"batch_size {tc.batch_size} with batching {tc.batching!r} leaves a minibatch of {smallest} "
            f"sample out of {n_train}, and batch normalization needs at least 2 samples per minibatch "
            "in training. Choose a batch size that does not leave a remainder of 1, or use "
            "--set batching=array-split (near-equal minibatches)."
        )


def diverged(cfg: RunConfig, epoch: int, batch: int, value: float) -> TrainingDiverged:
    """The error for a loss that became NaN or infinite, naming where and what to try."""
    return TrainingDiverged(
        f"Training of preset {cfg.preset!r} (seed {cfg.train.seed}, {cfg.train.engine} engine) diverged: the "
        f"loss became {value} at epoch {epoch}, batch {batch}. The run directory keeps the {epoch} finished "
        f"epochs. Lower the learning rate (--lr, now {cfg.train.lr}) or check the input data for NaN or "
        "infinite values."
    )


def first_bad(losses: Any) -> int | None:
    """Index of the first non-finite value in ``losses`` (a sequence or array), or None."""
    finite = np.isfinite(np.asarray(losses, dtype=np.float64))
    return None if finite.all() else int(np.argmin(finite))


# The ISA extensions that decide which kernels MKL, OpenBLAS and PyTorch pick: two CPUs that
# differ in them round differently (measured: the 3-epoch history of the question differs in
# the 6th digit of the first epoch's loss between two machines of this project, bnlab and
# torch the same), so a history is reproducible on the same machine, not across machines.
_KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile")


def cpu_description(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU as far as rounding goes: vendor, family/model, name and the kernel-deciding
    ISA flags, e.g. "GenuineIntel 6/143 Intel(R) Xeon(R) Processor [avx2 fma avx512f ...]".
    Falls back to ``platform.processor()`` where there is no /proc/cpuinfo."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    first = text.split("\n\n", 1)[0]
    fields = dict(
        (key.strip(), value.strip()) for key, sep, value in (line.partition(":") for line in first.splitlines()) if sep
    )
    flags = set(fields.get("flags", "").split())
    kernels = " ".join(flag for flag in _KERNEL_FLAGS if flag in flags)
    vendor = fields.get("vendor_id", platform.machine())
    model = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
    return f"{vendor} {model} {fields.get('model name', '?')} [{kernels}]"


def environment(device: str, data: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a reader needs to reproduce or judge a run: versions, hardware, data identity."""
    env: dict[str, Any] = {
        "bnlab": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "data_source": getattr(data, "source", None),
        "data_sha256": getattr(data, "sha256", None),
    }
    env.update(extra or {})
    return env


class BNCallLog:
    """Which BN module each recorded call went to, and which call of that module within its
    step it was (site 0 after l1, site 1 after l2 for a shared BN). Every engine's trace
    keeps its rows in this order."""

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
        return {
            "module": np.asarray(self._module_ids, dtype=np.int32),
            "site": np.asarray(self._site_ids, dtype=np.int32),
            "module_names": np.asarray(self.names),
        }
