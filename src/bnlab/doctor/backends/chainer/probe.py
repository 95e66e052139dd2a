"""Probe a Chainer model: forward passes on a copy, observed with a ``LinkHook``.

Chainer is imported here only; the rest of the doctor works without it. Train or eval
mode is Chainer's global ``config.train``, only ever changed through
``chainer.using_config`` so the user's setting is back in place afterwards.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import chainer
import chainer.links as L
import numpy as np
from chainer.backends import cuda

from bnlab.doctor import source_lines
from bnlab.doctor.backends.chainer import train as chainer_train
from bnlab.doctor.backends.chainer.common import as_input, from_torch, output_array
from bnlab.doctor.errors import a_type, forward_failed
from bnlab.doctor.locations import call_site
from bnlab.doctor.records import CallRecord, LayerInfo, ProbeResult, TrainLog
from bnlab.doctor.stats import channel_stats

_WITH_BIAS = (
    L.Linear,
    L.Convolution1D,
    L.Convolution2D,
    L.Convolution3D,
    L.ConvolutionND,
    L.Deconvolution2D,
    L.DeconvolutionND,
    L.DilatedConvolution2D,
)


def is_bn(link: chainer.Link) -> bool:
    """Chainer's stateful normalization: BatchNormalization and its subclasses."""
    return isinstance(link, L.BatchNormalization)


def dotted(name: str) -> str:
    """Chainer's ``/block/0/bn`` as the doctor's ``block.0.bn``."""
    return name.strip("/").replace("/", ".")


def named_links(model: chainer.Link) -> dict[str, chainer.Link]:
    """Each link once, under its first name (a shared link is listed under every name
    by Chainer; PyTorch's named_modules keeps the first, and so do we)."""
    seen: set[int] = set()
    links = {}
    for name, link in model.namedlinks():
        if id(link) not in seen:
            seen.add(id(link))
            links[dotted(name)] = link
    return links


def bn_links(model: chainer.Link) -> dict[str, chainer.Link]:
    return {path: link for path, link in named_links(model).items() if path and is_bn(link)}


def _numpy(array: Any) -> np.ndarray | None:
    if array is None:
        return None
    if isinstance(array, chainer.Variable):
        array = array.array
    return np.asarray(cuda.to_cpu(array), dtype=np.float64).copy()


def _params_frozen(link: chainer.Link) -> bool:
    rules = [p.update_rule for p in link.params()]
    return bool(rules) and all(rule is not None and not rule.enabled for rule in rules)


def layer_info(path: str, link: chainer.Link) -> LayerInfo:
    mean = _numpy(link.avg_mean)
    return LayerInfo(
        path=path,
        kind=type(link).__name__,
        framework="chainer",
        num_channels=int(mean.size) if mean is not None else 0,
        tracks_running_stats=True,
        is_batchnorm=True,
        eps=float(link.eps),
        rate=float(link.decay),
        rate_name="decay",
        running_mean=mean,
        running_var=_numpy(link.avg_var),
        num_batches_tracked=None,  # Chainer's N only counts fine-tuning passes
        training=bool(chainer.config.train),
        affine=link.gamma is not None or link.beta is not None,
        params_frozen=_params_frozen(link),
        weight=_numpy(getattr(link, "gamma", None)),
        bias=_numpy(getattr(link, "beta", None)),
    )


# -- keeping the user's model untouched -------------------------------------------


def _persistent_state(model: chainer.Link) -> list[tuple[chainer.Link, str, Any]]:
    state = []
    for link in named_links(model).values():
        for name in link._persistent:
            value = getattr(link, name)
            state.append((link, name, copy.deepcopy(value)))
    return state


@contextlib.contextmanager
def borrowed(model: chainer.Link) -> Iterator[chainer.Link]:
    """A deep copy of ``model``; or the model itself, restored in place afterwards."""
    try:
        work = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - any failure to copy means: fall back to restoring
        work = None
    if work is not None:
        yield work
        return
    params = [(p, p.array.copy() if p.array is not None else None) for p in model.params()]
    persistents = _persistent_state(model)
    decays = {link: link.decay for link in bn_links(model).values()}
    try:
        yield model
    finally:
        for param, array in params:
            if array is not None:
                param.array[...] = array
        for link, name, value in persistents:
            setattr(link, name, value)
        for link, decay in decays.items():
            link.decay = decay


@contextlib.contextmanager
def frozen_statistics(model: chainer.Link) -> Iterator[None]:
    """Train-mode passes that leave avg_mean / avg_var / N as they were."""
    links = list(bn_links(model).values())
    saved = [(link, link.decay, copy.deepcopy(link.avg_mean), copy.deepcopy(link.avg_var), link.N) for link in links]
    for link in links:
        link.decay = 1.0  # avg = 1 * avg + 0 * batch
    try:
        yield
    finally:
        for link, decay, mean, var, count in saved:
            link.decay, link.avg_mean, link.avg_var, link.N = decay, mean, var, count


@contextlib.contextmanager
def numpy_rng_kept() -> Iterator[None]:
    """Chainer's dropout and initializers draw from numpy's global RNG: give it back."""
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)


# -- observing a forward pass ---------------------------------------------------------


class Recorder(chainer.LinkHook):
    """Which link produced each variable, and what every BN link received."""

    name = "bnlab_doctor_recorder"

    def __init__(
        self,
        model: chainer.Link,
        stats: bool = True,
        on_pass_start: Callable[[tuple], None] | None = None,
    ) -> None:
        self.model = model
        self.stats = stats
        self.on_pass_start = on_pass_start  # watch: settles the previous pass first
        self.paths = {id(link): path for path, link in named_links(model).items()}
        self.calls: list[CallRecord] = []
        self.counts: Counter[str] = Counter()
        self.hooked: list[chainer.Link] = []
        self.produced: dict[int, tuple[str, chainer.Link]] = {}
        self.pinned: list[Any] = []
        self.inputs: set[int] = set()
        self.last_leaf: tuple[str, chainer.Link] | None = None

    def attach(self) -> Recorder:
        try:
            for link in named_links(self.model).values():
                link.add_hook(self)
                self.hooked.append(link)
        except Exception:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        for link in self.hooked:
            link.delete_hook(self.name)
        self.hooked.clear()
        self.pinned.clear()

    def __enter__(self) -> Recorder:  # a per-link hook, not Chainer's global registration
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def forward_preprocess(self, args: Any) -> None:
        if args.link is self.model:
            if self.on_pass_start is not None:
                self.on_pass_start(tuple(args.args))
            self.counts = Counter()  # call numbers restart with every forward pass
            self.produced.clear()
            self.last_leaf = None
            self.inputs = {id(value) for value in args.args}
            self.pinned = list(args.args)
        elif is_bn(args.link) and args.args:
            self._bn_call(args.link, args.args[0])

    def forward_postprocess(self, args: Any) -> None:
        if args.link is self.model:
            # The producer map is only needed during the pass: release the activations.
            self.produced.clear()
            self.pinned = []
            self.last_leaf = None
            return
        path = self.paths.get(id(args.link), "?")
        if next(iter(args.link.children()), None) is None:
            self.last_leaf = (path, args.link)
        out = args.out[0] if isinstance(args.out, (tuple, list)) and args.out else args.out
        if id(out) not in self.produced:
            self.produced[id(out)] = (path, args.link)
            self.pinned.append(out)

    def _producer(self, x: Any) -> tuple[str | None, str | None, str, bool, bool]:
        """(producer path, kind, via, producer has bias, producer is dropout)."""
        found = self.produced.get(id(x))
        if found is not None:
            path, link = found
            has_bias = isinstance(link, _WITH_BIAS) and getattr(link, "b", None) is not None
            return path, type(link).__name__, "direct", has_bias, False
        creator = getattr(x, "creator", None)
        if creator is not None and type(creator).__name__ == "Dropout":
            leaf = self.last_leaf[0] if self.last_leaf else None
            return leaf, "F.dropout", "direct", False, True
        if id(x) in self.inputs:
            return None, None, "input", False, False
        if self.last_leaf is not None:
            return self.last_leaf[0], type(self.last_leaf[1]).__name__, "ops", False, False
        return None, None, "input", False, False

    def _bn_call(self, link: chainer.Link, x: Any) -> None:
        path = self.paths.get(id(link), "?")
        self.counts[path] += 1
        array = np.asarray(cuda.to_cpu(x.array if isinstance(x, chainer.Variable) else x))
        if link.axis is None:
            # Chainer's default: normalize over the batch and every axis after the channels.
            keep_dims = 1 if link.avg_mean is None else link.avg_mean.ndim
            reduce = (0,) + tuple(range(1 + keep_dims, array.ndim))
        else:
            reduce = tuple(link.axis)
        keep = tuple(d for d in range(array.ndim) if d not in reduce)
        channels = int(np.prod([array.shape[d] for d in keep]))
        flat = array.transpose(keep + reduce).reshape(channels, -1)
        if self.stats:
            mean, var = channel_stats(flat)
        else:
            mean = var = np.zeros(channels)
        producer, kind, via, has_bias, dropout = self._producer(x)
        self.calls.append(
            CallRecord(
                path=path,
                index=self.counts[path],
                producer=producer,
                producer_kind=kind,
                via=via,
                producer_has_bias=has_bias,
                producer_is_dropout=dropout,
                batch_size=int(array.shape[0]),
                values_per_channel=int(flat.shape[1]),
                mean=mean,
                var=var,
                training=bool(chainer.config.train),
                location=call_site(),
            )
        )


# -- the probe -------------------------------------------------------------------------


def _read(output: Any) -> np.ndarray | None:
    """The part of the output the probe reads (:func:`output_array`), as float64 numpy."""
    return _numpy(output_array(output)[0])


def classes(output: Any) -> np.ndarray | None:
    array = _read(output)
    if array is None or array.ndim < 2 or array.shape[1] < 2 or not np.all(np.isfinite(array)):
        return None
    return array.argmax(axis=1).reshape(-1)


def _forward(model: chainer.Link, x: Any) -> Any:
    try:
        return model(x)
    except (Exception, SystemExit) as err:  # noqa: BLE001 - a probe failure, for the user
        raise forward_failed(err) from err


_GLOBAL_TRAIN_SWITCH = (
    "Chainer has one global train/eval switch, so dropout is active in the train-mode pass "
    "of the train/eval comparison."
)


def observe(
    work: chainer.Link,
    x: Any,
    labels: Any,
    user_layers: dict[str, LayerInfo],
    modes: dict[str, bool],
) -> ProbeResult:
    """One round of observations of ``work`` (statistics left as they were)."""
    layers = {path: layer_info(path, link) for path, link in bn_links(work).items()}
    for path, layer in layers.items():  # the mode is the user's, not ours
        if path in user_layers:
            layer.training = user_layers[path].training
        layer.training = modes.get(path, layer.training)
    with frozen_statistics(work):
        recorder = Recorder(work)
        with chainer.using_config("train", True), recorder:
            train_out = _forward(work, x)
        counter = Recorder(work, stats=False)
        with chainer.using_config("train", False), chainer.no_backprop_mode(), counter:
            eval_out = _forward(work, x)
    train_pred, eval_pred = classes(train_out), classes(eval_out)
    a, b = _read(train_out), _read(eval_out)
    diff = None
    if train_pred is None and a is not None and b is not None and a.shape == b.shape:
        diff = float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12))
    finite = None
    if a is not None and b is not None:
        finite = bool(np.all(np.isfinite(a)) and np.all(np.isfinite(b)))
    where = output_array(train_out)[1]
    note = f"the model returns {a_type(train_out)}; the doctor reads output{where}" if where else ""
    notes = [note] if note else []
    if any(c.producer_is_dropout for c in recorder.calls):
        notes.append(_GLOBAL_TRAIN_SWITCH)
    return ProbeResult(
        framework="chainer",
        model_name="",
        input_shape=tuple(int(d) for d in np.shape(x)),
        layers=layers,
        calls=recorder.calls,
        eval_calls=dict(counter.counts),
        train_pred=train_pred,
        eval_pred=eval_pred,
        labels=None if labels is None else np.asarray(from_torch(labels)).reshape(-1),
        output_diff=diff,
        output_finite=finite,
        notes=notes,
        output_note=note,
    )


def probe(
    model: chainer.Link,
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
    """Everything the checks need, measured on a copy of the Chainer ``model``.

    With ``train_steps`` the copy is observed as handed over (``result.given``), then
    trained and observed again. ``modes`` overrides the train/eval mode reported per
    layer (see torch_probe.probe).
    """
    x = as_input(model, inputs)
    user_layers = {path: layer_info(path, link) for path, link in bn_links(model).items()}
    with numpy_rng_kept(), borrowed(model) as work:
        result = observe(work, x, labels, user_layers, modes or {})
        log = TrainLog(steps=0)
        if train_steps > 0:
            given = result
            log = chainer_train.train(
                work,
                x,
                labels,
                train_steps,
                loss_fn=loss_fn,
                optimizer_factory=optimizer_factory,
                batches=train_batches,
                lr=lr,
            )
            result = observe(work, x, labels, user_layers, modes or {})
            result.given = given
    result.model_name = type(model).__name__
    result.train_log = log
    source_lines.attach(result, bn_links(model))
    return result
