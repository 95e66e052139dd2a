"""Probe a Flax model (nnx or linen) on a copy: what every BatchNorm received, per call.

nnx: the calls are observed by replacing ``__call__`` of the model's module classes for
the length of a pass; the replacement records only calls on the copy's own modules
(looked up by identity), every other instance passes straight through. linen: the same
recorder runs as a method interceptor (``flax.linen.intercept_methods``). For the probe's
two passes the BatchNorm mode is forced at each call (``use_running_average``), whatever
the model's own flags say: batch statistics in the train-mode pass, running statistics in
the eval-mode pass; the running statistics are left as they were.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from bnlab.doctor.errors import forward_failed
from bnlab.doctor.flax_backend import common
from bnlab.doctor.flax_backend.common import Linen
from bnlab.doctor.records import CallRecord, LayerInfo, ProbeResult, TrainLog
from bnlab.doctor.stats import channel_stats

Invoke = Callable[[tuple, dict], Any]


class Recorder:
    """Which layer produced each array, and what every BatchNorm received.

    ``force``: the BatchNorm mode imposed on every call (True: batch statistics, False:
    running statistics), None to leave each call as the model makes it (training steps:
    the calls are then recorded while jax traces the step, without statistics).
    """

    def __init__(self, stats: bool = True, force: bool | None = None) -> None:
        self.stats = stats
        self.force = force
        self.calls: list[CallRecord] = []
        self.counts: Counter[str] = Counter()
        self.paths: dict[int, str] = {}  # nnx: id(module) -> dotted path
        self.modules: list[Any] = []  # keeps registered modules alive: ids stay unique
        self.bn_modules: dict[str, Any] = {}  # path -> the BN module seen (linen: bound)
        self.produced: dict[int, tuple[str, Any]] = {}
        self.pinned: list[Any] = []
        self.last_leaf: tuple[str, Any] | None = None
        self.stack: list[bool] = []  # per open call: has a child call happened
        self.on_root_call: Callable[[tuple], None] | None = None

    def register(self, model: nnx.Module) -> None:
        """Record calls of the modules of ``model`` (an nnx graph) under their paths."""
        for path, module in nnx.iter_modules(model):
            self.paths.setdefault(id(module), common.dotted(path))
            self.modules.append(module)

    def new_pass(self) -> None:
        """Call numbers and producers restart with every forward pass."""
        self.counts = Counter()
        self.produced.clear()
        self.pinned = []
        self.last_leaf = None

    # -- one call of a layer ----------------------------------------------------------

    def layer_call(self, path: str, module: Any, args: tuple, kwargs: dict, invoke: Invoke) -> Any:
        if path == "" and not self.stack:
            self.new_pass()
            if self.on_root_call is not None:
                self.on_root_call(args)
        cleared: bool | None = None  # a linen BN's own use_running_average, set aside
        if common.is_batchnorm(module) and args:
            args, kwargs, training = self._mode(module, args, kwargs)
            self._bn_call(path, module, args[0], training)
            cleared = self._clear_linen_mode(module)
        self.stack.append(False)
        try:
            out = invoke(args, kwargs)
        finally:
            if cleared is not None:
                object.__setattr__(module, "use_running_average", cleared)
            had_child = self.stack.pop()
            if self.stack:
                self.stack[-1] = True
        if not had_child:
            self.last_leaf = (path, module)
        if id(out) not in self.produced:
            self.produced[id(out)] = (path, module)
            self.pinned.append(out)
        return out

    def _mode(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
        """The call's arguments with the forced mode, and whether it uses batch statistics."""
        if self.force is not None:
            if len(args) > 1:  # use_running_average given positionally
                return (args[0], not self.force, *args[2:]), kwargs, self.force
            return args, {**kwargs, "use_running_average": not self.force}, self.force
        given = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
        if given is None:
            given = module.use_running_average
        return args, kwargs, not bool(given)

    def _clear_linen_mode(self, module: Any) -> bool | None:
        """linen refuses ``use_running_average`` at call time when the constructor set it
        (``merge_param``): to force the mode, the bound module's own attribute (a copy
        made for this ``apply``) is set aside for the call."""
        own = getattr(module, "use_running_average", None)
        if self.force is None or not isinstance(module, linen.BatchNorm) or own is None:
            return None
        object.__setattr__(module, "use_running_average", None)
        return bool(own)

    def _producer(self, x: Any) -> tuple[str | None, str | None, str, bool, bool]:
        """(producer path, kind, via, producer has bias, producer is dropout)."""
        found = self.produced.get(id(x))
        if found is not None:
            path, module = found
            kind, has_bias, dropout = common.producer_facts(module)
            return path, kind, "direct", has_bias, dropout
        if self.last_leaf is None:
            return None, None, "input", False, False
        path, module = self.last_leaf
        return path, type(module).__name__, "ops", False, False

    def _bn_call(self, path: str, module: Any, x: Any, training: bool) -> None:
        self.counts[path] += 1
        self.bn_modules.setdefault(path, module)
        shape = tuple(int(d) for d in x.shape)
        axis = module.axis if isinstance(module.axis, int) else module.axis[0]
        axis = axis if axis >= 0 else len(shape) + axis
        channels = shape[axis]
        values = int(np.prod(shape)) // max(channels, 1)
        if self.stats:
            array = np.asarray(x, dtype=np.float64)
            mean, var = channel_stats(np.moveaxis(array, axis, 0).reshape(channels, -1))
        else:
            mean = var = np.zeros(0)
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
                batch_size=shape[0] if shape else 0,
                values_per_channel=values,
                mean=mean,
                var=var,
                training=training,
            )
        )

    # -- linen ---------------------------------------------------------------------------

    def intercept(self, next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
        """A ``flax.linen.intercept_methods`` interceptor: every module's ``__call__``."""
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = common.dotted(context.module.path)
        return self.layer_call(path, context.module, args, kwargs, lambda a, k: next_fun(*a, **k))


# -- nnx: replacing __call__ of the model's classes -----------------------------------


def _calls_itself(cls: type) -> bool:
    return any("__call__" in vars(klass) for klass in cls.__mro__ if klass is not object)


def _recording(original: Callable[..., Any], recorder: Recorder) -> Callable[..., Any]:
    @functools.wraps(original)  # keeps the signature: mode arguments are read from it
    def recorded_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        path = recorder.paths.get(id(self))
        if path is None:  # another model's module: not ours to record
            return original(self, *args, **kwargs)
        return recorder.layer_call(path, self, args, kwargs, lambda a, k: original(self, *a, **k))

    return recorded_call


@contextlib.contextmanager
def nnx_hooks(model: nnx.Module, recorder: Recorder) -> Iterator[Recorder]:
    """Record the calls of ``model``'s modules while the block runs (see the module docs)."""
    classes = [cls for cls in dict.fromkeys(type(m) for _, m in nnx.iter_modules(model)) if _calls_itself(cls)]
    originals = {cls: cls.__call__ for cls in classes}  # resolved before any is replaced
    own = {cls: "__call__" in vars(cls) for cls in classes}
    recorder.register(model)
    try:
        for cls in classes:
            setattr(cls, "__call__", _recording(originals[cls], recorder))
        yield recorder
    finally:
        for cls in classes:
            if own[cls]:
                setattr(cls, "__call__", originals[cls])
            elif "__call__" in vars(cls):
                delattr(cls, "__call__")


# -- layers ------------------------------------------------------------------------------


def _aliases(model: nnx.Module) -> dict[int, list[str]]:
    """id(module) -> every attribute path that reaches it (a module placed twice)."""
    found: dict[int, list[str]] = defaultdict(list)

    def walk(module: Any, prefix: tuple, above: frozenset[int]) -> None:
        for key, child in nnx.iter_children(module):
            if not isinstance(child, nnx.Module):
                continue
            path = (*prefix, key)
            found[id(child)].append(common.dotted(path))
            if id(child) not in above:
                walk(child, path, above | {id(child)})

    walk(model, (), frozenset({id(model)}))
    return found


def nnx_layers(model: nnx.Module) -> dict[str, Any]:
    """path -> nnx.BatchNorm, each instance once (under its first path)."""
    return {common.dotted(p): m for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)}


def _values(variable: Any) -> np.ndarray | None:
    return None if variable is None else common.numpy64(variable[...])


def nnx_layer_info(path: str, bn: nnx.BatchNorm, aliases: list[str]) -> LayerInfo:
    weight, bias = _values(bn.scale), _values(bn.bias)
    return LayerInfo(
        path=path,
        kind=type(bn).__name__,
        framework="flax",
        num_channels=int(bn.num_features),
        tracks_running_stats=True,
        is_batchnorm=True,
        eps=float(bn.epsilon),
        rate=float(bn.momentum),
        rate_name="momentum",
        running_mean=_values(bn.mean),
        running_var=_values(bn.var),
        num_batches_tracked=None,  # Flax keeps no update counter
        training=not bool(bn.use_running_average),
        affine=weight is not None or bias is not None,
        params_frozen=False,  # what optax trains is not the model's to say
        weight=weight,
        bias=bias,
        aliases=[a for a in aliases if a != path],
    )


def nnx_layer_infos(model: nnx.Module) -> dict[str, LayerInfo]:
    aliases = _aliases(model)
    return {path: nnx_layer_info(path, bn, aliases.get(id(bn), [])) for path, bn in nnx_layers(model).items()}


def _collection_entry(tree: Any, path: str) -> Any:
    for part in path.split(".") if path else []:
        if not isinstance(tree, dict) and not hasattr(tree, "get"):
            return None
        tree = tree.get(part)
        if tree is None:
            return None
    return tree


def linen_layer_info(path: str, bn: linen.BatchNorm, variables: dict[str, Any]) -> LayerInfo:
    stats = _collection_entry(variables.get("batch_stats", {}), path) or {}
    params = _collection_entry(variables.get("params", {}), path) or {}
    mean, var = stats.get("mean"), stats.get("var")
    weight = None if params.get("scale") is None else common.numpy64(params["scale"])
    bias = None if params.get("bias") is None else common.numpy64(params["bias"])
    return LayerInfo(
        path=path,
        kind=type(bn).__name__,
        framework="flax",
        num_channels=0 if mean is None else int(np.size(mean)),
        tracks_running_stats=True,
        is_batchnorm=True,
        eps=float(bn.epsilon),
        rate=float(bn.momentum),
        rate_name="momentum",
        running_mean=None if mean is None else common.numpy64(mean),
        running_var=None if var is None else common.numpy64(var),
        num_batches_tracked=None,
        training=bn.use_running_average is not True,  # None: decided per call
        affine=bool(bn.use_scale or bn.use_bias),
        params_frozen=False,
        weight=weight,
        bias=bias,
    )


# -- observations ---------------------------------------------------------------------------


def _result(
    x: np.ndarray,
    labels: Any,
    layers: dict[str, LayerInfo],
    recorder: Recorder,
    counter: Recorder,
    outputs: tuple[Any, Any],
) -> ProbeResult:
    (train_out, note), (eval_out, _) = (common.first_output(out) for out in outputs)
    train_array, eval_array = np.asarray(train_out, dtype=np.float64), np.asarray(eval_out, dtype=np.float64)
    train_pred, eval_pred = common.classes(train_array), common.classes(eval_array)
    diff = None
    if train_pred is None and train_array.shape == eval_array.shape:
        diff = float(np.linalg.norm(train_array - eval_array) / (np.linalg.norm(eval_array) + 1e-12))
    return ProbeResult(
        framework="flax",
        model_name="",
        input_shape=tuple(int(d) for d in np.shape(x)),
        layers=layers,
        calls=recorder.calls,
        eval_calls=dict(counter.counts),
        train_pred=train_pred,
        eval_pred=eval_pred,
        labels=None if labels is None else np.asarray(common.as_array(labels)).reshape(-1),
        output_diff=diff,
        output_finite=bool(np.all(np.isfinite(train_array)) and np.all(np.isfinite(eval_array))),
        output_note=note,
    )


def _modes(layers: dict[str, LayerInfo], user: dict[str, LayerInfo], modes: dict[str, bool]) -> None:
    for path, layer in layers.items():
        if path in user:
            layer.training = user[path].training
        layer.training = modes.get(path, layer.training)


def observe_nnx(
    work: nnx.Module, x: np.ndarray, labels: Any, user: dict[str, LayerInfo], modes: dict[str, bool]
) -> ProbeResult:
    """One round of observations of the nnx copy ``work`` (statistics left as they were)."""
    layers = nnx_layer_infos(work)
    _modes(layers, user, modes)
    saved = nnx.clone(nnx.state(work, nnx.BatchStat))
    inputs = jnp.asarray(x)
    try:
        with nnx_hooks(work, Recorder(stats=True, force=True)) as recorder:
            train_out = common.call_nnx(work, inputs, True)
        nnx.update(work, saved)
        with nnx_hooks(work, Recorder(stats=False, force=False)) as counter:
            eval_out = common.call_nnx(work, inputs, False)
    except Exception as err:  # the user's forward pass on the probe input
        raise forward_failed(err) from err
    finally:
        nnx.update(work, saved)
    return _result(x, labels, layers, recorder, counter, (train_out, eval_out))


def observe_linen(model: Linen, x: np.ndarray, labels: Any, modes: dict[str, bool]) -> ProbeResult:
    """One round of observations of a linen model (its variables are never written)."""
    assert model.variables is not None
    inputs = jnp.asarray(x)
    recorder, counter = Recorder(stats=True, force=True), Recorder(stats=False, force=False)
    try:
        with linen.intercept_methods(recorder.intercept):
            train_out, _ = common.linen_apply(model, inputs, True, mutable=True)
        with linen.intercept_methods(counter.intercept):
            eval_out, _ = common.linen_apply(model, inputs, False, mutable=True)
    except Exception as err:  # the user's forward pass on the probe input
        raise forward_failed(err) from err
    layers = {path: linen_layer_info(path, bn, model.variables) for path, bn in recorder.bn_modules.items()}
    _modes(layers, {}, modes)
    return _result(x, labels, layers, recorder, counter, (train_out, eval_out))


def model_name(model: Any) -> str:
    if common.is_nnx(model):
        return type(model).__name__
    return type(common.as_linen(model).module).__name__


def probe(
    model: Any,
    inputs: Any,
    *,
    labels: Any = None,
    train_steps: int = 0,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    optimizer_factory: Callable[..., Any] | None = None,
    train_batches: Iterable[tuple[Any, Any]] | None = None,
    lr: float = 0.01,
    modes: dict[str, bool] | None = None,
    seed: int = 0,
) -> ProbeResult:
    """Everything the checks need, measured on a copy of the Flax ``model``.

    With ``train_steps`` the copy is observed as handed over (``result.given``), then
    trained (optax, jitted; see :mod:`.train`) and observed again.
    """
    from bnlab.doctor.flax_backend import train

    if isinstance(inputs, tuple):  # watch-style positional arguments
        inputs = inputs[0]
    x = common.as_array(inputs)
    options: dict[str, Any] = {"loss_fn": loss_fn, "optimizer_factory": optimizer_factory, "lr": lr, "seed": seed}
    log = TrainLog(steps=0)
    if common.is_nnx(model):
        work = nnx.clone(model)
        user = nnx_layer_infos(model)
        result = observe_nnx(work, x, labels, user, modes or {})
        if train_steps > 0:
            given = result
            log = train.train_nnx(work, x, labels, train_steps, batches=train_batches, **options)
            result = observe_nnx(work, x, labels, user, modes or {})
            result.given = given
    else:
        linen_model = common.init_linen(common.as_linen(model).copy(), x, seed)
        result = observe_linen(linen_model, x, labels, modes or {})
        if train_steps > 0:
            given = result
            linen_model, log = train.train_linen(linen_model, x, labels, train_steps, batches=train_batches, **options)
            result = observe_linen(linen_model, x, labels, modes or {})
            result.given = given
    result.model_name = model_name(model)
    result.train_log = log
    return result
