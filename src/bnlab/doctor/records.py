"""What a probe saw, in framework-neutral form: the input of the checks.

The PyTorch and Chainer probes both fill a :class:`ProbeResult`; the checks in
:mod:`bnlab.doctor.checks` only ever read these records, never a live model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnlab.doctor.locations import SourceLocation


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
    weight: np.ndarray | None = None  # gamma, float64 (None without affine parameters)
    bias: np.ndarray | None = None  # beta
    aliases: list[str] = field(default_factory=list)  # other paths of the same layer object
    defined: SourceLocation | None = None  # where the layer was created (bnlab.doctor.locations)

    @property
    def stats_finite(self) -> bool:
        """No NaN or infinity in the running statistics."""
        return all(a is None or bool(np.all(np.isfinite(a))) for a in (self.running_mean, self.running_var))

    @property
    def affine_moved(self) -> bool:
        """gamma/beta look trained: they differ between channels.

        Any initialisation sets one value for every channel (1 and 0 by default, 0 for
        torchvision's ``zero_init_residual``); training moves each channel its own way.
        """
        spread = [float(np.ptp(a)) for a in (self.weight, self.bias) if a is not None and a.size > 1]
        return bool(spread) and max(spread) > 1e-3

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
    location: SourceLocation | None = None  # the line of the user's code that made this call

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
class SmallCall:
    """The smallest train-mode call of one norm layer seen over a training loop."""

    samples: int
    values: int  # values per channel
    site: str
    passes: int = 1  # train-mode passes that small


@dataclass
class StatUpdates:
    """How one norm layer's running statistics moved over the training steps.

    ``forward_calls`` are train-mode calls inside a forward pass of the model;
    ``extra_calls`` train-mode calls outside any forward pass (activation checkpointing
    recomputes the forward during backward); ``counter_delta`` how much the layer's own
    update counter (PyTorch's ``num_batches_tracked``) grew, None where there is none;
    ``changed`` whether the running statistics changed at all.
    """

    forward_calls: int
    extra_calls: int
    counter_delta: int | None
    changed: bool


@dataclass
class OptimizerInfo:
    """The optimizer of the training steps, as far as the checks need it."""

    kind: str  # class name ("SGD", "AdamW")
    norm_weight_decay: dict[str, float] = field(default_factory=dict)  # layer -> decay > 0


@dataclass
class TrainLog:
    """Training steps before the probe: the doctor's own on a copy, or the user's (watch)."""

    steps: int
    where: str = "on a copy of the model"  # or "in your training loop" (watch)
    loss_first: float | None = None
    loss_last: float | None = None
    eval_mode_steps: dict[str, int] = field(default_factory=dict)  # layer -> steps in eval
    watched: bool = False  # the user's own loop (watch), not the doctor's steps
    updates: dict[str, StatUpdates] = field(default_factory=dict)  # per norm layer
    smallest: dict[str, SmallCall] = field(default_factory=dict)  # watch: tiny batches seen
    optimizer: OptimizerInfo | None = None

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
class RankView:
    """What one rank of a multi-process (DDP) job saw inside its ``with watch`` block."""

    rank: int
    steps: int  # training steps
    passes: int  # forward passes
    batch: int  # samples of its largest training batch (-1: none seen)
    # Running mean/var per norm layer as its last synchronising training pass began
    # (after DDP's buffer broadcast, if any): equal on every rank of a healthy job.
    synced_stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # Channel averages of running mean/var at the end of the block (what a checkpoint keeps).
    final_stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    smallest: dict[str, SmallCall] = field(default_factory=dict)  # tiny train-mode batches
    raised: str = ""  # the exception that ended its ``with`` block ("" if none)


@dataclass
class RanksInfo:
    """The ranks of a multi-process job, compared at the end of ``watch``."""

    rank: int  # this process
    world_size: int  # ranks in the job's (DDP) process group
    views: list[RankView]  # every rank that answered, by rank (only this one on failure)
    plain_bn: list[str]  # BN layers computing batch statistics per rank (not SyncBatchNorm)
    problem: str = ""  # why the ranks could not be compared ("" when they were)


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
    ranks: RanksInfo | None = None  # watch inside a multi-process job: what every rank saw
    notes: list[str] = field(default_factory=list)
    output_finite: bool | None = None  # no NaN/inf in either mode's output (None: unknown)
    output_note: str = ""  # which part of a tuple/dict output was read ("output[0]")
    # The same observations on the model as handed over, when the doctor trained a copy
    # first: staleness and train/eval agreement are judged on this, not on the copy.
    given: ProbeResult | None = None

    def calls_of(self, path: str) -> list[CallRecord]:
        return [call for call in self.calls if call.path == path]

    @property
    def trained(self) -> bool:
        return self.train_log is not None and self.train_log.steps > 0

    @property
    def as_given(self) -> ProbeResult:
        """The observations of the user's model itself (before the doctor's training)."""
        return self.given if self.given is not None else self
