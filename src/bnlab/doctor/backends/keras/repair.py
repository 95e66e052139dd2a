"""The cure on a Keras 3 model: split shared BatchNormalization layers, re-estimate the
moving statistics. Everything happens on a clone; the model given is never changed.

1. Every BatchNormalization called more than once per forward pass of a functional (or
   Sequential) model becomes one layer per call site, named after the layer feeding it
   (``bn`` called after ``l1`` and ``l2`` -> ``bn_l1``, ``bn_l2``), each starting from the
   shared layer's gamma, beta and moving statistics. ``keras.models.clone_model`` rebuilds
   the graph, its ``call_function`` swapping in the site's own layer at each call; nested
   functional models are cloned (and split) too.
2. Every trainable BatchNormalization's moving statistics are re-estimated as the
   cumulative average over the given batches (batch ``k`` weighted ``1/k``, through
   Keras's own update with ``momentum = (k - 1) / k``), in training mode, no gradient
   step. A BatchNormalization with ``trainable=False`` is kept: Keras runs it in inference
   mode by design (a frozen layer).

Subclassed models are refused with a message: their ``call`` is Python code, which the
repair does not rewrite. The interface is that of ``repair_torch`` and ``repair_chainer``
(:func:`repair`, :func:`evaluate`, :func:`split_shared`), for ``bnlab.doctor.repair``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import keras
import numpy as np

from bnlab.doctor.backends.keras import common
from bnlab.doctor.backends.keras import probe as keras_probe
from bnlab.doctor.errors import RepairError, quote_error
from bnlab.doctor.outputs import first_output

_BN = keras.layers.BatchNormalization
METHOD = "Keras's own update, momentum (k-1)/k at batch k"
LAYOUT = "functional clone, one layer per call site"
FROZEN = "trainable=False: Keras runs it in inference mode (frozen on purpose); left as it is"


def _graph_model(model: Any) -> bool:
    """Functional or Sequential (whose graph is known), not subclassed."""
    from keras.src.models.functional import Functional

    return isinstance(model, (Functional, keras.Sequential))


def check_repairable(model: Any) -> None:
    """RepairError, before any work, for a model this repair cannot take."""
    if not _graph_model(model):
        raise RepairError(
            f"--fix / repair works on functional and Sequential Keras models, whose graph says "
            f"where each layer is called; {type(model).__name__} is a subclassed keras.Model, and "
            "its call() is Python code that bnlab does not rewrite. Give each call site its own "
            "BatchNormalization in __init__ (self.bn_l1 = ..., self.bn_l2 = ..., as the doctor's "
            "fix shows) and use each once in call(), or build the same layers with the functional "
            "API (keras.Model(inputs, outputs)), which --fix repairs as it is. To re-estimate the "
            "moving statistics of a subclassed model you own, call "
            "bnlab.doctor.backends.keras.repair.reestimate(model, batches)."
        )
    if not model.built or not model.weights:
        raise RepairError(
            f"the Keras model {model.name!r} has no weights yet (it was never built): give it a "
            "keras.Input, or call it once on a batch, before repairing it."
        )


def _inputs(batch: Any) -> np.ndarray:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return common.as_array(x)


def _pairs(batches: Iterable[Any]) -> list[tuple[Any, Any]]:
    """``(inputs, labels)`` pairs (labels None for bare inputs)."""
    return [
        (item[0], item[1]) if isinstance(item, (tuple, list)) and len(item) == 2 else (item, None) for item in batches
    ]


# -- which BatchNormalization layers are shared -----------------------------------------------


def call_sites(model: Any, x: Any) -> dict[str, list[str]]:
    """Per BatchNormalization: the call sites of one inference-mode forward pass of a clone
    on ``x``, named as the doctor names them ("call 1 after l1")."""
    array = common.as_array(x)
    work = keras_probe.clone(model, array)
    recorder = keras_probe.Recorder(work, stats=False)
    with recorder:
        keras_probe.forward(work, array, False)
    sites: dict[str, list[str]] = {}
    for call in recorder.calls:
        sites.setdefault(call.path, []).append(f"call {call.index} {call.site}")
    return sites


# -- the split -------------------------------------------------------------------------------


def _producer(tensor: Any) -> str:
    history = getattr(tensor, "_keras_history", None)
    return history.operation.name if history is not None else "input"


def _as_functional(model: Any) -> Any:
    """A Sequential model's graph as a functional model over the same layers (Sequential
    models take no ``call_function``); the clone below never shares those layers."""
    if not isinstance(model, keras.Sequential):
        return model
    try:
        inputs, outputs = model.inputs, model.outputs
        return keras.Model(
            inputs[0] if len(inputs) == 1 else inputs, outputs[0] if len(outputs) == 1 else outputs, name=model.name
        )
    except Exception as err:  # a Sequential model without a known input
        raise RepairError(
            f"the Sequential model {model.name!r} cannot be rebuilt with one BatchNormalization "
            f"per call site ({quote_error(err)}); start it with keras.Input(shape)."
        ) from err


class _Splitter:
    """``clone_function`` and ``call_function`` of one ``clone_model`` run: every layer is
    rebuilt from its config (never shared with the original), and each call of a layer in
    ``split`` gets a fresh BatchNormalization of the same config."""

    def __init__(self, model: Any, split: dict[int, Any]) -> None:
        self.split = split  # id of an original BN -> the layer
        self.original: dict[int, Any] = {}  # id of a new layer -> the original it copies
        self.made: list[Any] = []  # every new layer, in the order made
        self.per_site: dict[int, list[Any]] = {key: [] for key in split}
        self.taken = {layer.name for layer in common.named_layers(model).values()}

    def clone_function(self, layer: Any) -> Any:
        new = layer.__class__.from_config(layer.get_config())
        self.original[id(new)] = layer
        self.made.append(new)
        return new

    def call_function(self, layer: Any, *args: Any, **kwargs: Any) -> Any:
        source = self.original.get(id(layer))
        if source is None or id(source) not in self.split:
            return layer(*args, **kwargs)
        name = f"{source.name}_{_producer(args[0]) if args else 'input'}"
        while name in self.taken:
            name += "_"
        self.taken.add(name)
        site = _BN.from_config({**source.get_config(), "name": name})
        self.original[id(site)] = source
        self.made.append(site)
        self.per_site[id(source)].append(site)
        return site(*args, **kwargs)


def _clone_error(model: Any, err: Exception) -> RepairError:
    return RepairError(
        f"the repair works on a clone, and keras.models.clone_model could not clone "
        f"{model.name!r} ({quote_error(err)}). Give every custom layer a get_config() "
        "that rebuilds it (Keras rebuilds each layer with from_config(get_config()))."
    )


def _split(model: Any, paths: Iterable[str]) -> tuple[Any, dict[str, list[str]], dict[str, str]]:
    """The clone with the BNs at ``paths`` split; per path the new layers' paths (in call
    order), and per BN path of the clone the BN path of ``model`` its weights came from."""
    layers = common.named_layers(model)
    wanted = {path: layers[path] for path in paths}
    splitter = _Splitter(model, {id(layer): layer for layer in wanted.values()})
    source = _as_functional(model) if wanted else model
    try:
        new = keras.models.clone_model(
            source,
            clone_function=splitter.clone_function,
            call_function=splitter.call_function if wanted else None,
            recursive=True,
        )
    except RepairError:
        raise
    except Exception as err:  # Keras's own refusal, worded for the user
        raise _clone_error(model, err) from err
    new_paths = {id(layer): path for path, layer in common.named_layers(new).items()}
    old_paths = {id(layer): path for path, layer in layers.items()}
    for layer in splitter.made:
        original = splitter.original[id(layer)]
        # a layer made but left out of the clone (the shared BN's own copy) is skipped
        if id(layer) in new_paths and original.weights:
            layer.set_weights(original.get_weights())
    _check_separate(model, new)
    into = {path: [new_paths[id(site)] for site in splitter.per_site[id(layer)]] for path, layer in wanted.items()}
    origin = {
        new_paths[layer_id]: old_paths[id(original)]
        for layer_id, original in splitter.original.items()
        if layer_id in new_paths and isinstance(original, _BN) and id(original) in old_paths
    }
    return new, into, origin


def _check_separate(model: Any, new: Any) -> None:
    """The clone must own every variable: re-estimating it must not move the user's model."""
    shared = {id(v) for v in model.variables} & {id(v) for v in new.variables}
    if shared:
        raise RepairError(
            f"cloning {model.name!r} left {len(shared)} variables shared with the original; the "
            "repair would change the model given, so it stops here."
        )


def _split_checked(model: Any, calls: dict[str, int]) -> tuple[Any, dict[str, list[str]], dict[str, str]]:
    """:func:`_split`, after checking that ``calls`` names BNs of ``model`` and that each
    was split into as many layers as it has call sites."""
    check_repairable(model)
    bns = common.bn_layers(model)
    unknown = sorted(set(calls) - set(bns))
    if unknown:
        raise RepairError(f"no BatchNormalization layer {', '.join(map(repr, unknown))} in {model.name!r}.")
    new, into, origin = _split(model, calls)
    for path, count in calls.items():
        if len(into[path]) != int(count):
            raise RepairError(
                f"{path} was split into {len(into[path])} layers, not {count}: only calls in the "
                "graph of a functional model can be split (a BatchNormalization inside a "
                "Sequential or subclassed sub-model, or in a sub-model called several times, "
                "cannot); give each call site its own layer in the model's code."
            )
    return new, into, origin


def split_shared(model: Any, calls: dict[str, int]) -> Any:
    """A clone of ``model`` (weights copied) in which each BatchNormalization named in
    ``calls`` (path -> call sites, as in ``RepairResult.splits``) has one layer per call."""
    return _split_checked(model, calls)[0]


# -- re-estimating the moving statistics -------------------------------------------------------


def _all_bns(model: Any) -> list[Any]:
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, _BN)]


def reestimate(model: Any, batches: Iterable[Any]) -> int:
    """Moving statistics of every BN of ``model`` re-estimated in place (a model the
    caller owns) as the cumulative average over ``batches``; returns the batch count.
    ``batches``: inputs, or ``(inputs, labels)`` pairs."""
    bns = _all_bns(model)
    momenta = [bn.momentum for bn in bns]
    count = 0
    try:
        for count, batch in enumerate(batches, start=1):
            for bn in bns:
                bn.momentum = (count - 1) / count  # the first batch replaces the old value
            model(_inputs(batch), training=True)
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
    if count == 0:
        raise RepairError("re-estimating the moving statistics needs at least one batch")
    return count


# -- the repair ----------------------------------------------------------------------------------


def _stats(layer: Any) -> tuple[np.ndarray, np.ndarray]:
    return common.numpy(layer.moving_mean), common.numpy(layer.moving_variance)


def repair(model: Any, batches: Iterable[Any], split: Iterable[str] | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """The repaired clone of ``model`` and the list of what changed where (the records of
    ``bnlab.doctor.repair``). ``batches``: inputs or ``(inputs, labels)`` pairs; ``split``:
    BN paths to split (default: every BN called more than once per forward pass)."""
    from bnlab.doctor.stats import distance

    pairs = _pairs(batches)
    if not pairs:
        raise RepairError("repair needs at least one batch of training inputs.")
    check_repairable(model)
    sites = call_sites(model, _inputs(pairs[0]))
    shared = {path: s for path, s in sites.items() if len(s) > 1}
    wanted = set(shared) if split is None else set(split)
    if wanted - set(shared):
        raise RepairError(
            f"cannot split {', '.join(sorted(wanted - set(shared)))}: not a BatchNormalization "
            "called more than once per forward pass."
        )
    new, into, origin = _split_checked(model, {path: len(shared[path]) for path in sorted(wanted)})
    changes: list[dict[str, Any]] = [
        {
            "change": "split",
            "where": path,
            "calls": len(shared[path]),
            "sites": shared[path],
            "into": into[path],
            "layout": LAYOUT,
        }
        for path in sorted(wanted)
    ]
    old = common.bn_layers(model)
    before = {path: _stats(layer) for path, layer in old.items()}
    count = reestimate(new, pairs)
    for path, layer in common.bn_layers(new).items():
        source = origin.get(path, path)
        if not layer.trainable:
            changes.append({"change": "kept", "where": path, "why": FROZEN})
            continue
        (old_mean, old_var), (mean, var) = before[source], _stats(layer)
        changes.append(
            {
                "change": "re-estimated",
                "where": path,
                "from": source,
                "batches": count,
                "method": METHOD,
                "old_vs_new": distance(old_mean, old_var, mean, var, float(layer.epsilon)).as_dict(),
            }
        )
    return new, changes


# -- evaluation --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _bn_in_training(model: Any) -> Iterator[None]:
    """BatchNormalization layers use batch statistics in a ``training=False`` pass (the
    rest of the model, dropout included, stays in inference mode): the train-mode BN of
    ``repair_torch.evaluate``. Moving statistics are put back after each pass by the caller."""
    layers = list(common.bn_layers(model).values())

    def forced(call: Callable[..., Any]) -> Callable[..., Any]:
        def call_in_training(inputs: Any, *args: Any, training: Any = None, **kwargs: Any) -> Any:
            return call(inputs, *args, training=True, **kwargs)

        return call_in_training

    own = {id(layer): vars(layer).get("call") for layer in layers}  # a per-instance call of the user's
    for layer in layers:
        object.__setattr__(layer, "call", forced(layer.call))
    try:
        yield
    finally:
        for layer in layers:
            if own[id(layer)] is None:
                vars(layer).pop("call", None)
            else:
                object.__setattr__(layer, "call", own[id(layer)])


def _scores(out: Any) -> np.ndarray:
    return common.numpy(first_output(out)[0])


def _cross_entropy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Summed cross-entropy of class scores: logits, or probabilities if the model ends in
    a softmax (as the doctor's training loss decides)."""
    rows = np.arange(len(labels))
    probabilities = bool(np.all(scores >= 0)) and bool(np.allclose(scores.sum(axis=1), 1.0, atol=1e-4))
    if probabilities:
        return float(-np.log(np.clip(scores[rows, labels], 1e-12, None)).sum())
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_p[rows, labels].sum())


_NOTHING = {"val_acc": None, "val_loss": None, "train_eval_agreement": None, "samples": 0}


def evaluate(model: Any, batches: Iterable[Any]) -> dict[str, Any]:
    """Inference-mode accuracy and loss over labelled ``batches``, and the share of
    predictions that batch-statistics BN (the rest in inference mode) and inference mode
    agree on. A clone runs (the model itself, restored, if it cannot be cloned)."""
    pairs = _pairs(batches)
    if not pairs or any(y is None for _, y in pairs):
        return dict(_NOTHING)
    counts: Counter[str] = Counter()
    loss_sum = 0.0
    with keras_probe.borrowed(model, _inputs(pairs[0]), need_copy=False) as work:
        for x, y in pairs:
            array, labels = common.as_array(x), np.asarray(y).reshape(-1).astype(np.int64)
            scores = _scores(work(array, training=False))
            with keras_probe.frozen_statistics(work), _bn_in_training(work):
                train_scores = _scores(work(array, training=False))
            pred, train_pred = keras_probe.classes(scores), keras_probe.classes(train_scores)
            if pred is None or train_pred is None or len(pred) != len(labels):
                return dict(_NOTHING)
            counts.update(total=len(pred), correct=int((pred == labels).sum()), agree=int((pred == train_pred).sum()))
            loss_sum += _cross_entropy(scores, labels)
    total = counts["total"]
    return {
        "val_acc": counts["correct"] / total,
        "val_loss": loss_sum / total,
        "train_eval_agreement": counts["agree"] / total,
        "samples": total,
    }
