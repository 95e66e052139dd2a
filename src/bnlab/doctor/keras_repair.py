"""Cure a Keras 3 model's batch norm without retraining: a NEW model, the given one untouched.

1. Every BatchNormalization called at more than one place of a functional model becomes
   one layer per call site (``bn`` called after ``l1`` and ``l2`` -> ``bn_l1``, ``bn_l2``),
   each starting from the shared layer's gamma, beta and moving statistics;
2. every BatchNormalization's moving statistics are re-estimated as the cumulative
   average over the given batches (batch ``k`` weighted ``1/k``, through Keras's own
   update with ``momentum = (k - 1) / k``), in training mode, no gradient step.

Functional models only: their graph says where each layer is called. A subclassed
model's ``call`` is Python code; the doctor's fix sketch says what to change there.
Meant as the Keras side of ``bnlab.doctor.repair`` (doc2's design: split, then
re-estimate).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import keras
import numpy as np

from bnlab.doctor.errors import UsageError

_BN = keras.layers.BatchNormalization


def _functional(model: Any) -> bool:
    """Functional or Sequential (whose graph is known), not subclassed."""
    from keras.src.models.functional import Functional

    return isinstance(model, (Functional, keras.Sequential))


def shared_layers(model: Any) -> dict[str, list[str]]:
    """Shared BatchNormalization layers of a functional model -> the layers feeding
    each of their call sites, in call order."""
    shared = {}
    for layer in model.layers:
        nodes = [n for n in layer._inbound_nodes if n.parent_nodes]
        if isinstance(layer, _BN) and len(nodes) > 1:
            shared[layer.name] = [n.parent_nodes[0].operation.name for n in nodes]
    return shared


def _producer(tensor: Any) -> str:
    history = getattr(tensor, "_keras_history", None)
    return history.operation.name if history is not None else "input"


def split_shared(model: Any) -> tuple[Any, list[dict[str, Any]]]:
    """A clone of the functional ``model`` with one BN per call site (weights copied),
    and the list of changes made."""
    if not _functional(model):
        raise UsageError(
            f"repairing a Keras model needs a functional or Sequential model; "
            f"{type(model).__name__} is subclassed. Give each call site its own "
            "BatchNormalization in its __init__ (see the doctor's fix), then re-estimate."
        )
    shared = shared_layers(model)
    origin: dict[str, str] = {}  # new layer name -> the layer its weights come from
    changes: list[dict[str, Any]] = []

    def call_function(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if layer.name not in shared:
            return layer(*args, **kwargs)
        name = f"{layer.name}_{_producer(args[0])}"
        while name in origin or name in {lay.name for lay in model.layers}:
            name += "_"
        site = _BN.from_config({**layer.get_config(), "name": name})
        origin[name] = layer.name
        changes.append({"layer": layer.name, "new": name, "after": _producer(args[0])})
        return site(*args, **kwargs)

    if shared:
        new = keras.models.clone_model(model, call_function=call_function)
    else:  # Sequential models take no call_function; nothing to split anyway
        new = keras.models.clone_model(model)
    for layer in new.layers:
        if layer.weights:  # the clone's input layer is renamed, and holds no weights
            layer.set_weights(model.get_layer(origin.get(layer.name, layer.name)).get_weights())
    return new, changes


def reestimate(model: Any, batches: Iterable[Any]) -> int:
    """Moving statistics of every BN of ``model`` re-estimated in place (a model the
    caller owns) as the cumulative average over ``batches``; returns the batch count."""
    bns = [lay for lay in model._flatten_layers(include_self=False) if isinstance(lay, _BN)]
    momenta = [bn.momentum for bn in bns]
    count = 0
    try:
        for count, batch in enumerate(batches, start=1):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for bn in bns:
                bn.momentum = (count - 1) / count  # the first batch replaces the old value
            model(np.asarray(x, dtype=np.float32), training=True)
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
    if count == 0:
        raise UsageError("re-estimating the moving statistics needs at least one batch")
    return count


def repair(model: Any, batches: Iterable[Any]) -> tuple[Any, list[dict[str, Any]]]:
    """A NEW model: shared BNs split per call site, all moving statistics re-estimated."""
    new, changes = split_shared(model)
    used = reestimate(new, batches)
    for layer in new.layers:
        if isinstance(layer, _BN):
            changes.append({"layer": layer.name, "reestimated_on": used})
    return new, changes
