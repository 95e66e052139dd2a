"""The doctor's own training steps on a copy of a Flax model: optax (Adam by default),
one ``jax.jit``-compiled step.

nnx: the copy is split into its parameters and the rest (``nnx.BatchStat``, rng counts)
and merged again inside the step, in the mode ``model.train()`` sets. linen: the step
applies the module with ``mutable=['batch_stats']`` and keeps the updated statistics, as
a correct linen loop does. The BatchNorm calls of a step are recorded while jax traces it
(the compiled step runs exactly those calls, each step), so the counts cost nothing per
step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen, nnx

from bnlab.doctor.backends.flax import common
from bnlab.doctor.backends.flax.common import Linen, Recorder, nnx_hooks, nnx_layers
from bnlab.doctor.batching import cycle
from bnlab.doctor.errors import UsageError, training_step_failed
from bnlab.doctor.outputs import first_output
from bnlab.doctor.records import OptimizerInfo, StatUpdates, TrainLog

LossFn = Callable[[Any, Any], Any]


def pseudo_labels(scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """Random class labels shaped like the model's output (N, C): training without labels."""
    if scores.ndim < 2 or scores.shape[1] < 2:
        raise UsageError("train_steps needs labels when the model's output is not class scores")
    rng = np.random.RandomState(seed)
    return rng.randint(0, scores.shape[1], size=scores.shape[:1]).astype(np.int32)


def loss_value(loss_fn: LossFn | None, output: Any, labels: Any) -> Any:
    """``loss_fn(output, labels)``, by default softmax cross-entropy on the logits."""
    scores = first_output(output)[0]
    if loss_fn is not None:
        return loss_fn(scores, labels)
    return optax.softmax_cross_entropy_with_integer_labels(scores, labels).mean()


def _batches(
    batches: Iterable[tuple[Any, Any]] | None, x: np.ndarray, labels: Any, scores: Callable[[], np.ndarray], seed: int
) -> Iterable[tuple[Any, Any]]:
    if batches is not None:
        return batches
    return [(x, pseudo_labels(scores(), seed) if labels is None else labels)]


def _arrays(bx: Any, by: Any) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(common.as_array(bx)), jnp.asarray(np.asarray(common.as_array(by)).astype(np.int32))


def optimizer_info(tx: Any) -> OptimizerInfo:
    # An optax transformation carries no class name; weight decay on BN parameters is
    # not read from its masks (not checked for Flax yet).
    return OptimizerInfo(kind="optax")


def _log(steps: int, calls: Recorder, changed: dict[str, bool], tx: Any) -> TrainLog:
    """The training log from the calls of ONE traced step (the compiled step repeats them)."""
    per_step = {path: sum(1 for c in calls.calls if c.path == path and c.training) for path in changed}
    eval_paths = {c.path for c in calls.calls if not c.training}
    log = TrainLog(steps=steps, optimizer=optimizer_info(tx))
    log.eval_mode_steps = {path: steps for path in eval_paths}
    log.updates = {
        path: StatUpdates(forward_calls=per_step[path] * steps, extra_calls=0, counter_delta=None, changed=moved)
        for path, moved in changed.items()
    }
    return log


def _run(
    step: Callable[[Any, Any, Any], Any], batches: Iterable[tuple[Any, Any]], steps: int
) -> tuple[float | None, float | None]:
    """``steps`` calls of ``step(x, y, key) -> loss``; the first and the last loss."""
    first = last = None
    key = jax.random.key(0)
    loss: Any = None
    for index, (bx, by) in zip(range(steps), cycle(batches), strict=False):
        key, sub = jax.random.split(key)
        try:
            loss = step(*_arrays(bx, by), sub)
            if index == 0:
                first = float(loss)
        except Exception as err:  # reported as a probe failure
            raise training_step_failed(index, err) from err
    if loss is not None:
        last = float(loss)
    return first, last


def _stats(values: dict[str, Any]) -> dict[str, np.ndarray]:
    return {path: np.concatenate([np.asarray(m).ravel(), np.asarray(v).ravel()]) for path, (m, v) in values.items()}


def train_nnx(
    work: nnx.Module,
    x: np.ndarray,
    labels: Any,
    steps: int,
    *,
    batches: Iterable[tuple[Any, Any]] | None = None,
    loss_fn: LossFn | None = None,
    optimizer_factory: Callable[[], Any] | None = None,
    lr: float = 0.01,
    seed: int = 0,
) -> TrainLog:
    """``steps`` optimizer steps on the nnx copy ``work`` in training mode (updated in place).

    ``optimizer_factory()`` returns an optax transformation (default ``optax.adam(lr)``).
    """

    def scores() -> np.ndarray:
        probe_copy = nnx.clone(work)
        return np.asarray(first_output(common.call_nnx(probe_copy, jnp.asarray(x[:8]), False))[0])

    data = _batches(batches, x, labels, scores, seed)
    tx = optimizer_factory() if optimizer_factory else optax.adam(lr)
    work.train()
    kwargs = common.mode_kwargs(type(work).__call__, True)
    before = _stats({p: (bn.mean[...], bn.var[...]) for p, bn in nnx_layers(work).items()})
    optimizer = nnx.Optimizer(work, tx, wrt=nnx.Param)
    recorder = Recorder(stats=False, force=None)

    @nnx.jit
    def jitted(model: nnx.Module, optimizer: nnx.Optimizer, bx: Any, by: Any) -> Any:
        def loss_of(model: nnx.Module) -> Any:
            recorder.calls = []  # this trace's calls: one step's
            recorder.register(model)  # the copy nnx traces (new objects)
            return loss_value(loss_fn, model(bx, **kwargs), by)

        loss, grads = nnx.value_and_grad(loss_of)(model)
        optimizer.update(model, grads)
        return loss

    with nnx_hooks(work, recorder):
        first, last = _run(lambda bx, by, key: jitted(work, optimizer, bx, by), data, steps)
    after = _stats({p: (bn.mean[...], bn.var[...]) for p, bn in nnx_layers(work).items()})
    log = _log(steps, recorder, {p: not np.array_equal(before[p], after[p]) for p in after}, tx)
    log.loss_first, log.loss_last = first, last
    return log


def _linen_stats(variables: dict[str, Any], paths: Iterable[str]) -> dict[str, np.ndarray]:
    found = {}
    for path in paths:
        entry = common.collection_entry(variables.get("batch_stats", {}), path) or {}
        if "mean" in entry and "var" in entry:
            found[path] = (entry["mean"], entry["var"])
    return _stats(found)


def train_linen(
    model: Linen,
    x: np.ndarray,
    labels: Any,
    steps: int,
    *,
    batches: Iterable[tuple[Any, Any]] | None = None,
    loss_fn: LossFn | None = None,
    optimizer_factory: Callable[[], Any] | None = None,
    lr: float = 0.01,
    seed: int = 0,
) -> tuple[Linen, TrainLog]:
    """``steps`` optimizer steps on a linen model; returns the trained model (new variables).

    Each step applies the module in training mode with ``mutable=['batch_stats']`` and
    keeps what it returns.
    """
    assert model.variables is not None

    def scores() -> np.ndarray:
        return np.asarray(first_output(common.linen_apply(model, jnp.asarray(x[:8]), False))[0])

    data = _batches(batches, x, labels, scores, seed)
    tx = optimizer_factory() if optimizer_factory else optax.adam(lr)
    params = model.variables["params"]
    state = {k: v for k, v in model.variables.items() if k != "params"}
    kwargs = common.mode_kwargs(model.module.__call__, True)
    recorder = Recorder(stats=False, force=None)

    def loss_of(params: Any, state: Any, bx: Any, by: Any, key: Any) -> tuple[Any, Any]:
        recorder.calls = []
        out, updates = model.module.apply(
            {"params": params, **state}, bx, rngs={"dropout": key}, mutable=["batch_stats"], **kwargs
        )
        return loss_value(loss_fn, out, by), {**state, **updates}

    @jax.jit
    def step(params: Any, state: Any, opt_state: Any, bx: Any, by: Any, key: Any) -> tuple:
        (loss, state), grads = jax.value_and_grad(loss_of, has_aux=True)(params, state, bx, by, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    carry = (params, state, tx.init(params))

    def one_step(bx: Any, by: Any, key: Any) -> Any:
        nonlocal carry
        *kept, loss = step(*carry, bx, by, key)
        carry = tuple(kept)
        return loss

    with linen.intercept_methods(recorder.intercept):
        first, last = _run(one_step, data, steps)
    params, state, _ = carry
    trained = Linen(model.module, {"params": params, **state})
    paths = sorted({c.path for c in recorder.calls})
    before, after = _linen_stats(model.variables, paths), _linen_stats(trained.variables or {}, paths)
    log = _log(steps, recorder, {p: p not in after or not np.array_equal(before[p], after[p]) for p in before}, tx)
    log.loss_first, log.loss_last = first, last
    return trained, log
