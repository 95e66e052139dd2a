"""Probe a PyTorch model: forward passes on a copy, observed with hooks.

The user's model is never run or changed: everything happens on a deep copy (or, for
models that cannot be deep-copied, on the model itself with every parameter, buffer,
mode and momentum restored afterwards). Hooks are removed in ``finally`` blocks.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from bnlab.doctor import source_lines
from bnlab.doctor.backends.torch import train as torch_train
from bnlab.doctor.backends.torch.common import (
    as_args,
    check_supported,
    classes,
    first_tensor,
    float_dtype,
    is_norm,
    lazy_memo,
    model_device,
    norm_paths,
    output_tensor,
)
from bnlab.doctor.errors import ProbeError, UnsupportedModel, a_type, forward_failed, quote_error
from bnlab.doctor.locations import call_site
from bnlab.doctor.records import (
    CallRecord,
    LayerInfo,
    ParallelInfo,
    ProbeResult,
    TrainLog,
)

_DROPOUT = (nn.modules.dropout._DropoutNd,)
_WITH_BIAS = (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear)


# -- what counts as what --------------------------------------------------------


def _params_frozen(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def _to_numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().to("cpu", torch.float64).numpy().copy()


def layer_info(path: str, module: Any, training: bool | None = None, aliases: list[str] | None = None) -> LayerInfo:
    """A norm layer's settings and statistics, copied out of the module."""
    tracked = module.num_batches_tracked if module.track_running_stats else None
    affine = bool(module.affine) and module.weight is not None
    return LayerInfo(
        path=path,
        kind=type(module).__name__,
        framework="torch",
        num_channels=int(module.num_features),
        tracks_running_stats=bool(module.track_running_stats),
        is_batchnorm=isinstance(module, _BatchNorm),
        eps=float(module.eps),
        rate=None if module.momentum is None else float(module.momentum),
        rate_name="momentum",
        running_mean=_to_numpy(module.running_mean),
        running_var=_to_numpy(module.running_var),
        num_batches_tracked=None if tracked is None else int(tracked),
        training=module.training if training is None else training,
        affine=bool(module.affine),
        params_frozen=_params_frozen(module),
        weight=_to_numpy(module.weight) if affine else None,
        bias=_to_numpy(module.bias) if affine else None,
        aliases=list(aliases or []),
    )


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and is_norm(m)}


def layer_infos(model: nn.Module, modes: dict[str, bool]) -> dict[str, LayerInfo]:
    paths = norm_paths(model)
    return {
        name: layer_info(name, m, modes.get(name), paths.get(id(m), [name])[1:])
        for name, m in norm_layers(model).items()
    }


# -- keeping the user's model untouched ---------------------------------------


@contextlib.contextmanager
def borrowed(model: nn.Module) -> Iterator[nn.Module]:
    """A copy of ``model`` to run freely; the original if it can't be deep-copied.

    In the second case every tensor of the state dict, every ``training`` flag and
    every norm's ``momentum`` is put back on exit, in place.
    """
    try:
        work = copy.deepcopy(model, lazy_memo(model))
    except Exception:  # noqa: BLE001 - any failure to copy means: fall back to restoring
        work = None
    if work is None and lazy_memo(model):
        raise UnsupportedModel(
            "the model has Lazy modules (LazyLinear, LazyBatchNorm...) whose shapes are not "
            "known yet, and it cannot be copied; bnlab doctor never runs your own model. Run "
            "one forward pass on a batch first (that fixes the shapes), then check it."
        )
    if work is not None:
        yield work
        return
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    grads = {p: None if p.grad is None else p.grad.detach().clone() for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    rates = {m: m.momentum for m in model.modules() if is_norm(m)}
    try:
        yield model
    finally:
        with torch.no_grad():
            for key, value in model.state_dict(keep_vars=True).items():
                value.copy_(state[key])
        for param, grad in grads.items():
            param.grad = grad
        for module, mode in modes.items():
            module.training = mode
        for module, rate in rates.items():
            module.momentum = rate


@contextlib.contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Run forward passes in train mode without moving any running statistics."""
    rates: dict[Any, Any] = {m: m.momentum for m in model.modules() if is_norm(m)}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    for module in rates:
        module.momentum = 0.0  # running = 1 * running + 0 * batch: unchanged
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)  # num_batches_tracked, and NaN-safe
        for module, rate in rates.items():
            module.momentum = rate


def tensor_channel_stats(flat: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and unbiased variance of (channels, values), computed where the
    activations live (only 2 x channels numbers travel to the CPU)."""
    flat = flat.double()
    mean = flat.mean(dim=1)
    var = flat.var(dim=1) if flat.shape[1] > 1 else torch.zeros_like(mean)
    return mean.cpu().numpy(), var.cpu().numpy()


def _rng_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})


# -- observing a forward pass ---------------------------------------------------


def _storage(tensor: torch.Tensor) -> int:
    """Address of the memory behind ``tensor`` (shared by all its views); 0 if none."""
    try:
        return tensor.untyped_storage().data_ptr() if tensor.numel() else 0
    except (RuntimeError, NotImplementedError):  # sparse / meta tensors have no storage
        return 0


class _FunctionalBatchNorm(TorchFunctionMode):
    """Hands every ``F.batch_norm`` call of a forward pass to ``seen(args, kwargs)``.

    ``nn.BatchNorm*`` calls ``F.batch_norm`` itself, so the mode also sees the calls the
    module hooks see; the Recorder tells them apart. Every torch function of the pass
    goes through ``__torch_function__`` while the mode is active: a probe-only cost.
    """

    def __init__(self, seen: Callable[[tuple, dict], None]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            self.seen(args, kwargs)
        return func(*args, **kwargs)


def compiled(model: nn.Module) -> bool:
    """Whether ``model`` or one of its modules is ``torch.compile``d (an OptimizedModule,
    or ``module.compile()`` in place): dynamo cannot trace through a Python function mode."""
    return any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def _batch_norm_args(args: tuple, kwargs: dict) -> tuple[Any, Any, bool]:
    """(input, running_mean, training) of an ``F.batch_norm`` call, however it was spelled."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training")
    given = dict(zip(names, args, strict=False)) | kwargs
    return given.get("input"), given.get("running_mean"), bool(given.get("training", False))


class Recorder:
    """Forward hooks on every module of one model: who produced each tensor, and
    what every norm layer received.

    Producers are tracked by tensor identity (pinned, so ids stay unique for the
    pass), with the tensor's version counter to notice in-place edits, and by
    storage to recognise views (reshapes, slices) of a module's output or of the
    model's input.

    With ``functional`` the pass also runs under a torch function mode that sees
    ``F.batch_norm`` calls given a norm layer's running statistics from outside that
    layer's own forward (``F.batch_norm(h, bn.running_mean, ...)``): each is recorded
    as one more call of the layer whose buffers it updates.
    """

    def __init__(
        self,
        model: nn.Module,
        stats: bool = True,
        on_pass_start: Callable[[tuple], None] | None = None,
        functional: bool = False,
    ) -> None:
        self.model = model
        self.stats = stats
        self.on_pass_start = on_pass_start  # watch: settles the previous pass first
        self.names = {id(m): name for name, m in model.named_modules()}
        self.functional = functional
        self.mode: _FunctionalBatchNorm | None = None
        self.owners: dict[int, nn.Module] = {}  # id(running_mean) -> its norm layer
        self.inside: set[int] = set()  # norm layers whose own forward is running
        self.handles: list[Any] = []
        self.calls: list[CallRecord] = []
        self.counts: Counter[str] = Counter()
        self.reset()

    def reset(self) -> None:
        self.produced: dict[int, tuple[str, nn.Module, int]] = {}
        self.by_storage: dict[int, tuple[str, nn.Module]] = {}
        self.pinned: list[torch.Tensor] = []
        self.inputs: set[int] = set()
        self.input_storages: set[int] = set()
        self.last_leaf: tuple[str, nn.Module] | None = None

    def attach(self) -> Recorder:
        try:
            self.handles.append(self.model.register_forward_pre_hook(self._root_start))
            self.handles.append(self.model.register_forward_hook(self._root_done))
            for name, module in self.model.named_modules():
                if not name:
                    continue
                if is_norm(module):
                    self.handles.append(module.register_forward_pre_hook(self._norm_call))
                self.handles.append(module.register_forward_hook(self._module_done))
            if self.functional:
                self._watch_functional()
        except Exception:
            self.detach()
            raise
        return self

    def _watch_functional(self) -> None:
        self.owners = {
            id(m.running_mean): m
            for m in self.model.modules()
            if is_norm(m) and isinstance(getattr(m, "running_mean", None), torch.Tensor)
        }
        self.mode = _FunctionalBatchNorm(self._functional_call)
        self.mode.__enter__()

    def detach(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.pinned.clear()
        self.inside.clear()

    def __enter__(self) -> Recorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # hooks ----------------------------------------------------------------
    def _root_start(self, module: nn.Module, args: tuple) -> None:
        if self.on_pass_start is not None:
            self.on_pass_start(args)
        self.reset()
        self.counts = Counter()  # call numbers restart with every forward pass
        for value in args:
            if isinstance(value, torch.Tensor):
                self.inputs.add(id(value))
                self.pinned.append(value)
                if _storage(value):
                    self.input_storages.add(_storage(value))

    def _root_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        # The producer map is only needed during the pass; don't keep activations alive
        # through the user's backward pass and optimizer step.
        self.reset()

    def _module_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.inside.discard(id(module))
        name = self.names.get(id(module), "?")
        leaf = next(module.children(), None) is None
        if leaf:
            self.last_leaf = (name, module)
        tensor = first_tensor(output)
        if tensor is None:
            return
        # A leaf may hand back its input edited in place (ReLU(inplace=True)): it is
        # then the producer. A container returning its last leaf's tensor is not.
        if leaf or id(tensor) not in self.produced:
            self.produced[id(tensor)] = (name, module, tensor._version)
            self.pinned.append(tensor)
            if _storage(tensor):
                self.by_storage.setdefault(_storage(tensor), (name, module))

    def _producer(self, x: torch.Tensor) -> tuple[str | None, nn.Module | None, str]:
        found = self.produced.get(id(x))
        if found is not None:
            name, module, version = found
            return name, module, "direct" if x._version == version else "ops"
        if id(x) in self.inputs:
            return None, None, "input"
        storage = _storage(x)
        if storage and storage in self.by_storage:
            name, module = self.by_storage[storage]
            return name, module, "view"
        if storage and storage in self.input_storages:
            return None, None, "input"
        if self.last_leaf is not None:
            return self.last_leaf[0], self.last_leaf[1], "ops"
        return None, None, "input"

    def _norm_call(self, module: nn.Module, args: tuple) -> None:
        if self.functional:
            self.inside.add(id(module))
        self._record(module, args[0] if args else None, bool(module.training))

    def _functional_call(self, args: tuple, kwargs: dict) -> None:
        """An ``F.batch_norm`` call: recorded if it uses a norm layer's statistics from
        outside that layer's own forward (the layer's own calls are recorded by its hook)."""
        x, running_mean, training = _batch_norm_args(args, kwargs)
        owner = self.owners.get(id(running_mean))
        if owner is not None and id(owner) not in self.inside:
            self._record(owner, x, training)

    def _record(self, module: nn.Module, x: Any, training: bool) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return
        path = self.names.get(id(module), "?")
        self.counts[path] += 1
        producer, source, via = self._producer(x)
        channels = x.shape[1]
        values = x.numel() // max(channels, 1)
        if self.stats:
            with torch.no_grad():
                flat = x.detach().transpose(0, 1).reshape(channels, -1)
                mean, var = tensor_channel_stats(flat)
        else:  # counting only (the eval pass): no copy of the activations
            mean = var = np.zeros(channels)
        self.calls.append(
            CallRecord(
                path=path,
                index=self.counts[path],
                producer=producer,
                producer_kind=type(source).__name__ if source is not None else None,
                via=via,
                producer_has_bias=isinstance(source, _WITH_BIAS) and source.bias is not None,
                producer_is_dropout=isinstance(source, _DROPOUT) and via != "ops",
                batch_size=int(x.shape[0]),
                values_per_channel=int(values),
                mean=mean,
                var=var,
                training=training,
                location=call_site(),
            )
        )


# -- the probe --------------------------------------------------------------------


def _relative_diff(a: Any, b: Any) -> float | None:
    (ta, _), (tb, _) = output_tensor(a), output_tensor(b)
    if ta is None or tb is None or ta.shape != tb.shape:
        return None
    ta, tb = ta.detach().double(), tb.detach().double()
    return float((ta - tb).norm() / (tb.norm() + 1e-12))


_ONE_VALUE = "Expected more than 1 value per channel"


def _forward(model: nn.Module, args: tuple, notes: list[str], what: str) -> Any:
    """One forward pass without gradient; None (with a note) when BN refuses a tiny batch."""
    try:
        with torch.no_grad():
            return model(*args)
    except ValueError as err:
        if _ONE_VALUE in str(err):
            notes.append(f"the {what} forward pass failed: {err}")
            return None
        raise forward_failed(err) from err
    except (Exception, SystemExit) as err:  # noqa: BLE001 - a probe failure, for the user
        raise forward_failed(err) from err


def _finite(output: Any) -> bool | None:
    tensor, _ = output_tensor(output)
    if tensor is None or not tensor.is_floating_point():
        return None
    return bool(torch.isfinite(tensor.detach()).all())


def materialize_lazy(model: nn.Module, args: tuple) -> bool:
    """Give a copy's Lazy modules (LazyLinear, LazyBatchNorm2d...) their shapes.

    One eval-mode forward without gradient: lazy parameters and buffers take their
    shapes from the input, and eval mode leaves running statistics at their initial
    values. Returns whether there was anything to materialize.
    """
    lazy = [
        m for m in model.modules() if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()
    ]
    if not lazy:
        return False
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(*args)
    except (Exception, SystemExit) as err:  # noqa: BLE001 - a probe failure, for the user
        raise ProbeError(
            "the model has Lazy modules (LazyLinear, LazyBatchNorm...), and the forward pass "
            f"that gives them their shapes failed on the probe input: "
            f"{quote_error(err)}",
            "Check that the input matches the model (--input-shape, or --data).",
        ) from err
    finally:
        for module, mode in modes.items():
            module.training = mode
    return True


def _set_bn_only_train(model: nn.Module) -> None:
    """Train-mode BN (batch statistics) with everything else, dropout included, in eval.

    ``model.train()`` first, so that a model which overrides ``train()`` to keep some
    BN layers frozen is probed the way it trains.
    """
    model.train()
    for module in model.modules():
        if not is_norm(module):
            module.training = False


def parallel_info(model: nn.Module, batch_size: int) -> ParallelInfo | None:
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    for name, module in model.named_modules():
        if isinstance(module, wrappers):
            devices = max(1, len(getattr(module, "device_ids", None) or []))
            if isinstance(module, nn.parallel.DistributedDataParallel):
                devices = 1  # each process sees its own batch: the probe batch
            plain = [
                (f"{name}." if name else "") + sub
                for sub, m in module.named_modules()
                if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
            ]
            return ParallelInfo(type(module).__name__, devices, batch_size // devices, plain)
    return None


def observe(work: nn.Module, args: tuple, labels: Any, modes: dict[str, bool], notes: list[str]) -> ProbeResult:
    """One round of observations of ``work`` (statistics left as they were): its norm
    layers, a train-mode pass with every norm call recorded, the train-mode (BN only)
    and eval-mode predictions."""
    batch = first_tensor(args)
    assert batch is not None
    layers = layer_infos(work, modes)
    functional = not compiled(work)
    recorder = Recorder(work, functional=functional)
    with frozen_buffers(work):
        work.train()
        with recorder:
            _forward(work, args, notes, "train-mode")
        _set_bn_only_train(work)
        train_out = _forward(work, args, notes, "train-mode (BN only)")
        work.eval()
        counter = Recorder(work, stats=False, functional=functional)
        with counter:
            eval_out = _forward(work, args, notes, "eval-mode")
    outputs = [out for out in (train_out, eval_out) if out is not None]
    finite = [_finite(out) for out in outputs]
    train_pred = classes(train_out) if train_out is not None else None
    eval_pred = classes(eval_out) if eval_out is not None else None
    where = output_tensor(outputs[0])[1] if outputs else ""
    return ProbeResult(
        framework="torch",
        model_name="",
        input_shape=tuple(int(d) for d in batch.shape),
        layers=layers,
        calls=recorder.calls,
        eval_calls=dict(counter.counts),
        train_pred=train_pred,
        eval_pred=eval_pred,
        labels=None if labels is None else np.asarray(_labels_numpy(labels)).reshape(-1),
        output_diff=None if train_pred is not None else _relative_diff(train_out, eval_out),
        output_finite=None if None in finite or not finite else all(finite),
        output_note=(f"the model returns {a_type(outputs[0])}; the doctor reads output{where}") if where else "",
    )


def probe(
    model: nn.Module,
    inputs: Any,
    *,
    labels: Any = None,
    train_steps: int = 0,
    loss_fn: Any = None,
    optimizer_factory: Any = None,
    train_batches: Iterable[tuple[Any, Any]] | None = None,
    lr: float = 0.01,
    modes: dict[str, bool] | None = None,
) -> ProbeResult:
    """Everything the checks need, measured on a copy of ``model``.

    With ``train_steps`` the copy is observed as handed over (``result.given``), then
    trained, then observed again. ``modes`` overrides the train/eval mode reported for
    each norm layer (``watch`` passes the modes seen during training, not those at the
    end of the loop).
    """
    check_supported(model)
    user_modes = {name: m.training for name, m in norm_layers(model).items()}
    user_modes.update(modes or {})
    notes: list[str] = []
    with torch.random.fork_rng(devices=_rng_devices(model)), borrowed(model) as work:
        device = model_device(work)
        args = as_args(inputs, device, float_dtype(work))
        batch = first_tensor(args)
        if batch is None:
            raise ProbeError(
                "the probe input must be a tensor (or a tuple of tensors)",
                "Check that the input matches the model (--input-shape).",
            )
        if materialize_lazy(work, args):
            notes.append("Lazy modules were given their shapes by one eval-mode forward pass on the doctor's copy")
        result = observe(work, args, labels, user_modes, notes)
        log = TrainLog(steps=0)
        if train_steps > 0:
            given = result
            log = torch_train.train(
                work,
                args,
                labels,
                train_steps,
                loss_fn=loss_fn,
                optimizer_factory=optimizer_factory,
                batches=train_batches,
                lr=lr,
            )
            result = observe(work, args, labels, user_modes, notes)
            result.given = given
    result.model_name = type(model).__name__
    result.train_log = log
    result.parallel = parallel_info(model, int(batch.shape[0]))
    result.notes = list(dict.fromkeys(notes + ([result.output_note] if result.output_note else [])))
    source_lines.attach(result, norm_layers(model))
    return result


def _labels_numpy(labels: Any) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy()
    return np.asarray(labels)
