"""What the Flax backend's modules share: the two model kinds, calling them in a mode,
reading their outputs, the :class:`Recorder` of BatchNorm calls (used by the probe, the
training steps, watch and the repair) and trial runs on a throwaway copy.

Two APIs are taken:

- ``flax.nnx``: a ``nnx.Module`` instance; state (``nnx.Param``, ``nnx.BatchStat``) lives
  in the objects and ``model.train()`` / ``model.eval()`` set ``use_running_average``.
- ``flax.linen``: an unbound ``linen.Module`` (the doctor initialises it from the probe's
  shape) or a pair ``(module, variables)`` of a trained one; ``batch_stats`` lives in the
  variables and is updated only where ``apply(..., mutable=['batch_stats'])`` asks.

Flax is imported here, so only once a Flax model is handled.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from bnlab.doctor.backends.flax.sites import mode_call, routed
from bnlab.doctor.errors import forward_failed
from bnlab.doctor.locations import call_site
from bnlab.doctor.outputs import first_output
from bnlab.doctor.records import CallRecord
from bnlab.doctor.stats import channel_stats

# Keyword arguments through which a model's __call__ commonly takes its mode; the value
# is what means "training" (``deterministic`` and ``use_running_average`` are negated).
MODE_ARGUMENTS: dict[str, bool] = {
    "train": True,
    "training": True,
    "is_training": True,
    "deterministic": False,
    "use_running_average": False,
}

# Layers whose bias a following BN makes redundant (nnx and linen names).
WITH_BIAS = {"Linear", "LinearGeneral", "Einsum", "Conv", "ConvTranspose", "Dense", "DenseGeneral"}


@dataclass
class Linen:
    """A linen model: the module and its variables (None until initialised).

    ``restore``: for an unbound module given with ``--checkpoint``, what makes its
    variables out of the module's own template (shapes from ``module.init`` at the probe's
    input): the checkpoint checked against the template and read into it (``io``)."""

    module: linen.Module
    variables: dict[str, Any] | None = None
    restore: Callable[[Any], dict[str, Any]] | None = None

    def copy(self) -> Linen:
        # jax arrays are immutable: a new mapping tree is a copy the doctor may replace into.
        variables = None if self.variables is None else jax.tree.map(lambda a: a, dict(self.variables))
        return Linen(self.module.clone(), variables, self.restore)


def is_linen_pair(model: Any) -> bool:
    return (
        isinstance(model, tuple)
        and len(model) == 2
        and isinstance(model[0], linen.Module)
        and isinstance(model[1], Mapping)
    )


def as_linen(model: Any) -> Linen:
    """The linen model in ``model``: an unbound module, a ``(module, variables)`` pair or
    a :class:`Linen` already."""
    if isinstance(model, Linen):
        return model
    if is_linen_pair(model):
        return Linen(model[0], dict(model[1]))
    return Linen(model)


def is_nnx(model: Any) -> bool:
    return isinstance(model, nnx.Module)


def dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in path)


def mode_kwargs(fn: Callable[..., Any], train: bool) -> dict[str, Any]:
    """The keyword that puts a model's ``__call__`` in training (or eval) mode, if it has one."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    for name, means_training in MODE_ARGUMENTS.items():
        if name in params:
            return {name: train if means_training else not train}
    return {}


def call_nnx(model: nnx.Module, x: Any, train: bool) -> Any:
    """``model(x)`` in nnx's own mode (``model.train()`` / ``model.eval()``) and with the
    mode argument its ``__call__`` takes, if any."""
    model.train() if train else model.eval()
    return model(x, **mode_kwargs(type(model).__call__, train))


def numpy64(value: Any) -> np.ndarray:
    return np.array(value, dtype=np.float64)


def as_array(inputs: Any) -> np.ndarray:
    """Probe input as numpy (torch tensors converted, float64 made float32)."""
    if hasattr(inputs, "detach") and hasattr(inputs, "numpy"):  # a torch tensor
        inputs = inputs.detach().cpu().numpy()
    array = np.asarray(inputs)
    return array.astype(np.float32) if array.dtype == np.float64 else array


def is_batchnorm(module: Any) -> bool:
    return isinstance(module, (nnx.BatchNorm, linen.BatchNorm))


def producer_facts(module: Any) -> tuple[str, bool, bool]:
    """(class name, has a bias a BN makes redundant, is dropout) of a layer."""
    kind = type(module).__name__
    if isinstance(module, nnx.Module):
        has_bias = kind in WITH_BIAS and getattr(module, "bias", None) is not None
    else:
        has_bias = kind in WITH_BIAS and bool(getattr(module, "use_bias", False))
    return kind, has_bias, isinstance(module, (nnx.Dropout, linen.Dropout))


def init_linen(model: Linen, x: np.ndarray, seed: int = 0) -> Linen:
    """``model`` with variables: initialised from two samples of ``x`` when it has none,
    or, with a checkpoint to restore, read into the template of that shape."""
    if model.variables is not None:
        return model
    kwargs = mode_kwargs(mode_call(model.module), False)
    init = functools.partial(model.module.init, jax.random.key(seed), jnp.asarray(x[:2]), **kwargs)
    try:  # the user's module on the probe's shape; shapes only when the values come from a file
        variables = jax.eval_shape(init) if model.restore is not None else init()
    except Exception as err:
        raise forward_failed(err) from err
    if model.restore is not None:
        return Linen(model.module, model.restore(variables))
    return Linen(model.module, dict(variables))


def linen_apply(model: Linen, x: Any, train: bool, *, mutable: Any = False, rng: Any = None) -> Any:
    """``module.apply(variables, x, <mode>)``; with ``mutable``, (output, updates)."""
    assert model.variables is not None
    kwargs: dict[str, Any] = dict(mode_kwargs(mode_call(model.module), train))
    rngs = {"dropout": rng if rng is not None else jax.random.key(0)}
    return model.module.apply(model.variables, x, rngs=rngs, mutable=mutable, **kwargs)


# -- recording the calls of a forward pass ------------------------------------------------

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
        self.copies: list[Any] = []  # the latest transform copy's modules (register_copy)
        self.bn_modules: dict[str, Any] = {}  # path -> the BN module seen (linen: bound)
        self.produced: dict[int, tuple[str, Any]] = {}
        self.pinned: list[Any] = []
        self.last_leaf: tuple[str, Any] | None = None
        self.stack: list[bool] = []  # per open call: has a child call happened
        self.on_root_call: Callable[[tuple], None] | None = None
        self.before_bn: Callable[[str, Any], None] | None = None  # (path, BN) before each call
        self.adopt: Callable[[Any], bool] | None = None  # an unknown module to record from now on
        # stats while jax traces: each BN input is handed out of the compiled pass
        # (``inputs``) and measured afterwards (``fill``), in call order
        self.inputs: list[Any] = []
        self.pending: list[tuple[CallRecord, int]] = []  # (call, channel axis)

    def register(self, model: nnx.Module) -> None:
        """Record calls of the modules of ``model`` (an nnx graph) under their paths."""
        for path, module in nnx.iter_modules(model):
            self.paths.setdefault(id(module), dotted(path))
            self.modules.append(module)

    def register_copy(self, model: nnx.Module) -> None:
        """Record ``model`` (a transform's copy of the model) instead of the previous copy:
        a long loop makes a copy per step, and only the latest one's pass is running."""
        for module in self.copies:
            self.paths.pop(id(module), None)
        self.copies = [module for _, module in nnx.iter_modules(model)]
        for path, module in nnx.iter_modules(model):
            self.paths.setdefault(id(module), dotted(path))

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
        if is_batchnorm(module) and args:
            args, kwargs, training = self._mode(module, args, kwargs)
            self._bn_call(path, module, args[0], training)
            if self.before_bn is not None:
                self.before_bn(path, module)
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
            kind, has_bias, dropout = producer_facts(module)
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
                location=call_site(),  # traced once per pass: the user's line calling the layer
            )
        )
        if self.stats:
            self.inputs.append(x)
            self.pending.append((self.calls[-1], axis))

    def fill(self, inputs: list[Any]) -> None:
        """The per-channel statistics of every pending call, from its concrete input."""
        for (call, axis), x in zip(self.pending, inputs, strict=True):
            array = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0)
            call.mean, call.var = channel_stats(array.reshape(array.shape[0], -1))
        self.pending, self.inputs = [], []

    # -- linen ---------------------------------------------------------------------------

    def intercept(self, next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
        """A ``flax.linen.intercept_methods`` interceptor: every module's ``__call__``."""
        if context.method_name != "__call__" or routed(context.module):
            return next_fun(*args, **kwargs)
        path = dotted(context.module.path)
        return self.layer_call(path, context.module, args, kwargs, lambda a, k: next_fun(*a, **k))


# -- nnx: replacing __call__ of the model's classes -----------------------------------


def _calls_itself(cls: type) -> bool:
    return any("__call__" in vars(klass) for klass in cls.__mro__ if klass is not object)


def _recording(original: Callable[..., Any], recorder: Recorder) -> Callable[..., Any]:
    @functools.wraps(original)  # keeps the signature: mode arguments are read from it
    def recorded_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        path = recorder.paths.get(id(self))
        if path is None and recorder.adopt is not None and recorder.adopt(self):
            recorder.register_copy(self)  # a copy of the model that a transform (nnx.jit, nnx.grad) runs
            path = recorder.paths[id(self)]
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
            cls.__call__ = _recording(originals[cls], recorder)  # type: ignore[method-assign]
        yield recorder
    finally:
        for cls in classes:
            if own[cls]:
                cls.__call__ = originals[cls]  # type: ignore[method-assign]
            elif "__call__" in vars(cls):
                delattr(cls, "__call__")


def nnx_layers(model: nnx.Module) -> dict[str, Any]:
    """path -> nnx.BatchNorm, each instance once (under its first path)."""
    return {dotted(p): m for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)}


def collection_entry(tree: Any, path: str) -> Any:
    for part in path.split(".") if path else []:
        if not isinstance(tree, dict) and not hasattr(tree, "get"):
            return None
        tree = tree.get(part)
        if tree is None:
            return None
    return tree


# -- trial runs on a throwaway copy ------------------------------------------------------


def copy(model: Any) -> Any:
    """A copy to run trials on: ``nnx.clone`` of an nnx module, a :class:`Linen` otherwise."""
    return nnx.clone(model) if is_nnx(model) else as_linen(model).copy()


def eval_output(model: Any, x: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """The first output of a copy of ``model`` on ``x`` in eval mode (running statistics),
    in one ``jax.jit`` compilation; raises what the model raises."""
    if is_nnx(model):
        graphdef, state = nnx.split(model)

        def run(state: Any, x: Any) -> Any:
            return first_output(call_nnx(nnx.merge(graphdef, state), x, False))[0]

        return np.asarray(jax.jit(run)(state, jnp.asarray(x)))
    linen_model = init_linen(as_linen(model).copy(), x, seed)

    def apply(variables: Any, x: Any) -> Any:
        return first_output(linen_apply(Linen(linen_model.module, variables), x, False, mutable=True)[0])[0]

    return np.asarray(jax.jit(apply)(linen_model.variables, jnp.asarray(x)))
