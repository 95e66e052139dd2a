"""What a probe saw, in framework-neutral form: the input of the checks.

The PyTorch and Chainer probes both fill a :class:`ProbeResult`; the checks in
:mod:`bnlab.doctor.checks` only ever read these records, never a live model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LayerInfo:
    """A normalization layer as found in the model (statistics as of the probe)."""

    path: str  # dotted module path ("bn", "layer1.0.bn2")
    kind: str  # class name ("BatchNorm1d", "BatchNormalization")
    framework: str  # "torch" | "chainer"
    num_channels: int
    tracks_running_stats: bool
    is_batchnorm: bool  # a batch norm proper (checks 2, 4, 6 only apply to these)
    eps: float
    rate: float | None  # momentum (torch) or decay (chainer), in the layer's own convention
    rate_name: str  # "momentum" | "decay"
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    num_batches_tracked: int | None  # torch only; None where the framework has no counter
    training: bool  # the layer's mode in the user's model
    affine: bool
    params_frozen: bool  # affine parameters exist and none of them is trained

    @property
    def at_init(self) -> bool:
        """Running statistics still at their initial values (mean 0, variance 1)."""
        if self.running_mean is None or self.running_var is None:
            return True  # lazily initialised, never run
        return bool(np.all(self.running_mean == 0) and np.all(self.running_var == 1))


@dataclass
class CallRecord:
    """One call of a normalization layer during a forward pass."""

    path: str
    index: int  # 1-based call number of this layer within the pass
    producer: str | None  # module path that produced the input ("l1"), None if unknown
    producer_kind: str | None  # class name of that module
    via: str  # "direct" | "view" (reshaped) | "ops" (functional ops after producer) | "input"
    producer_has_bias: bool
    producer_is_dropout: bool
    batch_size: int
    values_per_channel: int
    mean: np.ndarray  # per channel, float64
    var: np.ndarray  # per channel, unbiased
    training: bool  # the layer's mode during this call

    @property
    def site(self) -> str:
        """The call site, named by the layer that produced its input."""
        if self.via == "input":
            return "on the model input"
        if self.producer is None:
            return f"call {self.index}"
        suffix = " (+ops)" if self.via == "ops" else ""
        return f"after {self.producer}{suffix}"


@dataclass
class TrainLog:
    """Training steps before the probe: the doctor's own on a copy, or the user's (watch)."""

    steps: int
    where: str = "on a copy of the model"  # or "in your training loop" (watch)
    loss_first: float | None = None
    loss_last: float | None = None
    eval_mode_steps: dict[str, int] = field(default_factory=dict)  # layer -> steps in eval

    def add_loss(self, step: int, value: float) -> None:
        """Note the loss of training step ``step`` (counted from 0): first and latest."""
        if step == 0:
            self.loss_first = value
        self.loss_last = value


@dataclass
class ParallelInfo:
    """A DataParallel / DistributedDataParallel wrapper around plain BN layers."""

    wrapper: str
    devices: int
    per_device_batch: int
    plain_bn: list[str]


@dataclass
class ProbeResult:
    framework: str
    model_name: str
    input_shape: tuple[int, ...]
    layers: dict[str, LayerInfo]
    calls: list[CallRecord]  # train-mode pass (batch statistics)
    eval_calls: dict[str, int]  # calls per layer in the eval-mode pass
    train_pred: np.ndarray | None = None  # predicted classes, train-mode BN
    eval_pred: np.ndarray | None = None
    labels: np.ndarray | None = None
    output_diff: float | None = None  # relative output change when outputs aren't classes
    train_log: TrainLog | None = None
    parallel: ParallelInfo | None = None
    notes: list[str] = field(default_factory=list)

    def calls_of(self, path: str) -> list[CallRecord]:
        return [call for call in self.calls if call.path == path]

    @property
    def trained(self) -> bool:
        return self.train_log is not None and self.train_log.steps > 0
