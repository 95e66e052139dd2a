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

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from bnlab.doctor import source_lines
from bnlab.doctor.backends.flax import common
from bnlab.doctor.backends.flax.common import Linen, Recorder, nnx_hooks, nnx_layers
from bnlab.doctor.errors import forward_failed
from bnlab.doctor.outputs import classes, first_output, relative_change
from bnlab.doctor.records import LayerInfo, ProbeResult, TrainLog

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


def linen_layer_info(path: str, bn: linen.BatchNorm, variables: dict[str, Any]) -> LayerInfo:
    stats = common.collection_entry(variables.get("batch_stats", {}), path) or {}
    params = common.collection_entry(variables.get("params", {}), path) or {}
    mean, var = stats.get("mean"), stats.get("var")
    weight = None if params.get("scale") is None else common.numpy64(params["scale"])
    bias = None if params.get("bias") is None else common.numpy64(params["bias"])
    return LayerInfo(
        path=path,
        kind=f"linen.{type(bn).__name__}",  # the fix sketches are written in linen's API for these
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
    (train_out, note), (eval_out, _) = (first_output(out) for out in outputs)
    train_array, eval_array = np.asarray(train_out, dtype=np.float64), np.asarray(eval_out, dtype=np.float64)
    train_pred, eval_pred = classes(train_array), classes(eval_array)
    diff = relative_change(train_array, eval_array) if train_pred is None else None
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


def _nnx_pass(work: nnx.Module, x: Any, train: bool, recorder: Recorder) -> Any:
    """One forward pass of a copy of ``work`` made inside ``jax.jit`` (one compilation
    instead of one per operation); ``work`` itself, statistics included, is untouched."""
    graphdef, state = nnx.split(work)

    def run(state: Any, x: Any) -> tuple[Any, list[Any]]:
        model = nnx.merge(graphdef, state)
        recorder.register_copy(model)
        out = common.call_nnx(model, x, train)
        return out, recorder.inputs

    with nnx_hooks(work, recorder):
        out, inputs = jax.jit(run)(state, x)
    recorder.fill(inputs)
    return out


def _linen_pass(model: Linen, x: Any, train: bool, recorder: Recorder) -> Any:
    """One forward pass of a linen model inside ``jax.jit`` (its variables are not written)."""

    def run(variables: Any, x: Any) -> tuple[Any, list[Any]]:
        out, _ = common.linen_apply(Linen(model.module, variables), x, train, mutable=True)
        return out, recorder.inputs

    with linen.intercept_methods(recorder.intercept):
        out, inputs = jax.jit(run)(model.variables, x)
    recorder.fill(inputs)
    return out


def observe_nnx(
    work: nnx.Module, x: np.ndarray, labels: Any, user: dict[str, LayerInfo], modes: dict[str, bool]
) -> ProbeResult:
    """One round of observations of the nnx copy ``work`` (statistics left as they were)."""
    layers = nnx_layer_infos(work)
    _modes(layers, user, modes)
    inputs = jnp.asarray(x)
    recorder, counter = Recorder(stats=True, force=True), Recorder(stats=False, force=False)
    try:
        train_out = _nnx_pass(work, inputs, True, recorder)
        eval_out = _nnx_pass(work, inputs, False, counter)
    except Exception as err:  # the user's forward pass on the probe input
        raise forward_failed(err) from err
    return _result(x, labels, layers, recorder, counter, (train_out, eval_out))


def observe_linen(model: Linen, x: np.ndarray, labels: Any, modes: dict[str, bool]) -> ProbeResult:
    """One round of observations of a linen model (its variables are never written)."""
    assert model.variables is not None
    inputs = jnp.asarray(x)
    recorder, counter = Recorder(stats=True, force=True), Recorder(stats=False, force=False)
    try:
        train_out = _linen_pass(model, inputs, True, recorder)
        eval_out = _linen_pass(model, inputs, False, counter)
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
    from bnlab.doctor.backends.flax import train

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
    if common.is_nnx(model):  # linen builds its layers inside apply: no creation line to show
        source_lines.attach(result, nnx_layers(model))
    return result
