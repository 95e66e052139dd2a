"""What a run is: the model, how it is trained, on which data; and the one place a setting
from the command line (a flag or ``--set FIELD=VALUE``) is parsed and validated.

Plain frozen dataclasses (nanoGPT's lesson: config as plain values). Every choice is a
``Literal``; ``__post_init__`` validates once and raises ``UsageError`` naming the field.
A flag reaches an engine in two typed hops: argparse parses the text into a number, and
``apply_overrides`` puts it into the dataclass, whose ``__post_init__`` validates it.
No torch import here: ``bnlab presets`` and ``--help`` stay fast.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from bnlab.errors import UsageError

NormPlacement = Literal["none", "per-layer", "shared"]
Init = Literal["chainer-he-normal", "tf-glorot-uniform", "torch-default"]
RunningVar = Literal["unbiased", "biased"]
EngineName = Literal["torch", "chainer", "tensorflow"]
AdamEpsMode = Literal["chainer", "torch"]
TrainMetrics = Literal["train-forward", "eval-after-step"]
Batching = Literal["slices", "array-split"]
DatasetName = Literal["mnist", "fashion-mnist"]

NORM_PLACEMENTS: tuple[str, ...] = typing.get_args(NormPlacement)
INITS: tuple[str, ...] = typing.get_args(Init)
RUNNING_VARS: tuple[str, ...] = typing.get_args(RunningVar)
ENGINES: tuple[str, ...] = typing.get_args(EngineName)
ADAM_EPS_MODES: tuple[str, ...] = typing.get_args(AdamEpsMode)
TRAIN_METRICS: tuple[str, ...] = typing.get_args(TrainMetrics)
BATCHINGS: tuple[str, ...] = typing.get_args(Batching)
DATASETS: tuple[str, ...] = typing.get_args(DatasetName)

# Both data sets are 28x28 images of 10 classes.
INPUT_WIDTH, N_CLASSES = 784, 10
# torch.manual_seed and numpy's generators take seeds below 2**63 (and >= 0).
MAX_SEED = 2**63 - 1


def _require(checks: list[tuple[bool, str]]) -> None:
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise UsageError("; ".join(problems) + ".")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _one_of(value: str, name: str, choices: tuple[str, ...]) -> tuple[bool, str]:
    return value in choices, f"{name} must be one of {', '.join(choices)}; got {value!r}"


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides the network's shape and initial weights.

    ``bn_momentum`` is in PyTorch's convention (weight of the NEW batch statistic):
    use ``bnlab.conventions.to_torch_momentum`` to state Chainer's ``decay`` or Keras'
    ``momentum``. ``running_var="biased"`` reproduces TF1's non-fused batch norm (and
    Keras 3), which stores the biased batch variance in its moving average.
    """

    widths: tuple[int, ...] = (784, 100, 100, 10)
    norm: NormPlacement = "per-layer"
    logits_norm: bool = False
    init: Init = "chainer-he-normal"
    bn_momentum: float = 0.1
    bn_eps: float = 1e-3
    running_var: RunningVar = "unbiased"

    def __post_init__(self) -> None:
        widths = self.widths
        _require(
            [
                (
                    len(widths) >= 2 and all(isinstance(w, int) and w >= 1 for w in widths),
                    f"model.widths must hold at least two positive sizes; got {widths!r}",
                ),
                _one_of(self.norm, "model.norm", NORM_PLACEMENTS),
                _one_of(self.init, "model.init", INITS),
                _one_of(self.running_var, "model.running_var", RUNNING_VARS),
                (
                    _finite(self.bn_momentum) and 0.0 <= self.bn_momentum <= 1.0,
                    f"model.bn_momentum (PyTorch convention: the weight of the new batch value) must lie in "
                    f"[0, 1]; got {self.bn_momentum} (a Chainer decay or Keras momentum d is 1 - d here)",
                ),
                (
                    _finite(self.bn_eps) and self.bn_eps > 0,
                    f"model.bn_eps must be a positive number; got {self.bn_eps}",
                ),
            ]
        )
        if self.norm == "shared" and len(set(widths[1:-1])) > 1:
            raise UsageError(
                "model.norm=shared applies one BatchNorm after every hidden layer, "
                f"so all hidden widths must be equal; got {widths[1:-1]}."
            )


@dataclass(frozen=True)
class TrainConfig:
    """How the model is trained. Defaults are the question's: batch 1000, 100 epochs, Adam.

    ``adam_eps_mode="chainer"`` adds eps to sqrt(v) before the bias correction, as
    Chainer's and TF1's Adam do; ``"torch"`` adds it after, as ``torch.optim.Adam`` does.
    ``train_metrics="train-forward"`` averages the loss/accuracy of the training forward
    pass (the Chainer program); ``"eval-after-step"`` re-evaluates each batch in eval mode
    after the update (the TensorFlow program's ``loss.eval`` without ``training=True``).
    ``batching="slices"`` cuts the permutation every ``batch_size`` (Chainer program);
    ``"array-split"`` splits it into ``n // batch_size`` near-equal parts (TF program).
    ``threads`` is part of what identifies a run: a matrix product's sums may be split
    differently with another thread count, so the last bits of a history can differ.
    """

    epochs: int = 100
    batch_size: int = 1000
    lr: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    adam_eps_mode: AdamEpsMode = "chainer"
    train_metrics: TrainMetrics = "train-forward"
    batching: Batching = "slices"
    seed: int = 0
    device: str = "auto"
    threads: int = 1
    engine: EngineName = "torch"
    trace_bn_channels: int = 0

    def __post_init__(self) -> None:
        _require(
            [
                (self.epochs >= 1, f"train.epochs (--epochs) must be >= 1; got {self.epochs}"),
                (self.batch_size >= 1, f"train.batch_size (--batch-size) must be >= 1; got {self.batch_size}"),
                (_finite(self.lr) and self.lr > 0, f"train.lr (--lr) must be a positive number; got {self.lr}"),
                (
                    _finite(self.adam_beta1)
                    and _finite(self.adam_beta2)
                    and 0 <= self.adam_beta1 < 1
                    and 0 <= self.adam_beta2 < 1,
                    f"train.adam_beta1 and adam_beta2 must lie in [0, 1); got {self.adam_beta1}, {self.adam_beta2}",
                ),
                (_finite(self.adam_eps) and self.adam_eps >= 0, f"train.adam_eps must be >= 0; got {self.adam_eps}"),
                _one_of(self.adam_eps_mode, "train.adam_eps_mode", ADAM_EPS_MODES),
                _one_of(self.train_metrics, "train.train_metrics", TRAIN_METRICS),
                _one_of(self.batching, "train.batching", BATCHINGS),
                (0 <= self.seed <= MAX_SEED, f"train.seed (--seed) must lie in [0, 2**63 - 1]; got {self.seed}"),
                (
                    self.device in ("auto", "cpu", "cuda")
                    or (self.device.startswith("cuda:") and self.device[5:].isdigit()),
                    f"train.device (--device) must be auto, cpu, cuda or cuda:N; got {self.device!r}",
                ),
                (
                    0 <= self.threads <= 1024,
                    f"train.threads (--threads) must lie in [0, 1024] (0 keeps the default); got {self.threads}",
                ),
                _one_of(self.engine, "train.engine (--engine)", ENGINES),
                (
                    0 <= self.trace_bn_channels <= 100_000,
                    f"train.trace_bn_channels must be >= 0; got {self.trace_bn_channels}",
                ),
            ]
        )


@dataclass(frozen=True)
class RunConfig:
    """One run: a named preset's model and training settings, on a data set."""

    preset: str
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dataset: DatasetName = "mnist"

    def __post_init__(self) -> None:
        widths = self.model.widths
        _require(
            [
                _one_of(self.dataset, "dataset (--dataset)", DATASETS),
                (
                    widths[0] == INPUT_WIDTH and widths[-1] == N_CLASSES,
                    f"model.widths must start at {INPUT_WIDTH} (28x28 pixels) and end at {N_CLASSES} (classes) "
                    f"for {self.dataset}; got {','.join(map(str, widths))} (e.g. --set widths=784,256,256,10)",
                ),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> RunConfig:
        """Rebuild from ``to_dict``'s output (e.g. a run directory's config.json, which is
        untrusted: anything malformed is an InputError naming the field)."""
        try:
            model = dict(d["model"])
            model["widths"] = tuple(model["widths"])
            return cls(
                preset=str(d["preset"]),
                model=ModelConfig(**model),
                train=TrainConfig(**d["train"]),
                dataset=d.get("dataset", "mnist"),
            )
        except UsageError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            from bnlab.errors import InputError

            raise InputError(f"not a bnlab run configuration ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class EpochRecord:
    """One row of the question's table, plus the epoch's wall time."""

    epoch: int
    train_loss: float
    val_loss: float
    train_acc: float
    val_acc: float
    seconds: float


# ------------------------------------------------------------------------------ overrides


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


MODEL_FIELDS = _field_types(ModelConfig)
TRAIN_FIELDS = _field_types(TrainConfig)


def type_name(typ: Any) -> str:
    """How ``bnlab presets --fields`` names a field's type."""
    if typing.get_origin(typ) is Literal:
        return " | ".join(typing.get_args(typ))
    if typing.get_origin(typ) is tuple:
        return "comma-separated integers"
    return getattr(typ, "__name__", str(typ))


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def parse_value(text: str, typ: Any) -> Any:
    """Parse a command-line string into a config field's type (validation is the
    dataclass's job)."""
    text = text.strip()
    if typ is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if typ is int:
        return _parse_int(text)
    if typ is float:
        return _parse_float(text)
    if typing.get_origin(typ) is tuple:
        parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
        if not parts:
            raise ValueError("expected a comma-separated list of integers")
        return tuple(_parse_int(p.strip()) for p in parts)
    return text


def resolve_field(key: str) -> tuple[str, str, Any]:
    """(section, field name, type) of a --set key such as ``lr``, ``train.lr`` or ``bn-momentum``."""
    section, _, name = key.strip().rpartition(".")
    name = name.replace("-", "_")
    if section not in ("", "model", "train"):
        raise UsageError(
            f"unknown setting {key!r}: use a field name, optionally prefixed model. or train. "
            "(`bnlab presets --fields` lists them)."
        )
    if name in MODEL_FIELDS and section in ("", "model"):
        return "model", name, MODEL_FIELDS[name]
    if name in TRAIN_FIELDS and section in ("", "train"):
        return "train", name, TRAIN_FIELDS[name]
    known = ", ".join(sorted({*MODEL_FIELDS, *TRAIN_FIELDS}))
    raise UsageError(f"unknown setting {key!r}; settings are: {known} (`bnlab presets --fields`).")


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return ``cfg`` with fields replaced; keys are field names of ModelConfig or
    TrainConfig (optionally prefixed ``model.`` / ``train.``), values strings (parsed
    here) or already-typed values. Raises UsageError naming the setting."""
    changes: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for key, raw in overrides.items():
        section, name, typ = resolve_field(key)
        try:
            changes[section][name] = parse_value(raw, typ) if isinstance(raw, str) else raw
        except ValueError as err:
            raise UsageError(f"bad value for {key}: {err}.") from None
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, **changes["model"]),
        train=dataclasses.replace(cfg.train, **changes["train"]),
    )


def overrides_field(overrides: dict[str, Any], name: str) -> bool:
    """Whether ``overrides`` sets the field ``name`` (under any spelling)."""
    return any(key.rpartition(".")[2].replace("-", "_") == name for key in overrides)


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,3,7-8' -> [0, 3, 7, 8]; duplicates removed, order kept."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise UsageError(f"--seeds {text!r} has an empty item; write e.g. 0-4 or 0,3,7-9.")
        lo, sep, hi = part.partition("-")
        try:
            start = int(lo)
            stop = int(hi) if sep else start
        except ValueError:
            raise UsageError(
                f"--seeds {text!r}: {part!r} is not a seed or a range of seeds; "
                "write whole numbers, e.g. 0-4 or 0,3,7-9."
            ) from None
        if stop < start:
            raise UsageError(f"--seeds {text!r}: the range {part!r} runs backwards; write it as {stop}-{start}.")
        if stop - start > 10_000:
            raise UsageError(f"--seeds {text!r}: the range {part!r} holds more than 10,000 seeds.")
        seeds.extend(range(start, stop + 1))
    if any(s < 0 or s > MAX_SEED for s in seeds):
        raise UsageError(f"--seeds {text!r}: seeds must lie in [0, 2**63 - 1].")
    return list(dict.fromkeys(seeds))


def flat_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'norm': 'shared'}} -> {'model.norm': 'shared'}; tuples become lists."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(flat_dict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def config_differences(a: RunConfig, b: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of the fields whose values differ (except those in ``ignore``)."""
    fa, fb = flat_dict(a.to_dict()), flat_dict(b.to_dict())
    return sorted(k for k in fa.keys() | fb.keys() if k not in ignore and fa.get(k) != fb.get(k))
