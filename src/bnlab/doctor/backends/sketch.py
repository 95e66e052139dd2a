"""Helpers for the backends' code sketches (``backends/<name>/fixes.py``): Python names
for a layer's call sites and the attribute path that reaches a layer.

Also the sketches that have one form so far (weight-decay groups, SyncBatchNorm,
activation checkpointing, written with PyTorch's API): a backend whose framework has no
form of its own returns these, as the doctor always has.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bnlab.doctor.records import CallRecord, LayerInfo


def identifier(text: str) -> str:
    """``features.0.0`` -> ``features_0_0``; never starts with a digit, never a keyword."""
    name = re.sub(r"\W+", "_", text).strip("_") or "bn"
    if name[0].isdigit() or keyword.iskeyword(name):
        name = f"bn_{name}"
    return name


def attribute(path: str, root: str = "self") -> str:
    """Python that reaches the module at ``path``: ``features.0.0`` ->
    ``self.features[0][0]``, ``layer1.0.conv2`` -> ``self.layer1[0].conv2`` (children of
    Sequential and ModuleList are indexed, not attributes)."""
    expr = root
    for part in path.split(".") if path else []:
        if part.isdigit():
            expr += f"[{part}]"
        elif part.isidentifier() and not keyword.iskeyword(part):
            expr += f".{part}"
        else:  # ModuleDict keys and other odd names
            expr += f"[{part!r}]"
    return expr


def site_names(layer: LayerInfo, calls: list[CallRecord]) -> list[str]:
    """Attribute names for one BN per call site: ``bn_l1``, ``bn_l2`` (or ``bn_1``...),
    always valid Python identifiers."""
    last = layer.path.rsplit(".", 1)[-1]
    base = last if last.isidentifier() and not keyword.iskeyword(last) else "bn"
    names: list[str] = []
    for call in calls:
        suffix = call.producer if call.producer and call.via != "input" else str(call.index)
        if call.producer == layer.path:  # bn(bn(x)): the second call
            suffix = "again"
        name = identifier(f"{base}_{suffix}")
        names.append(name if name not in names else f"{name}_{call.index}")
    return names


@dataclass(frozen=True)
class Loop:
    """Calls of a shared layer made by one line of code, each after the next item of one
    container (``convs.0``, ``convs.1``, ...): a loop over that container. ``rest`` is the
    path inside each item (``conv`` for ``blocks.0.conv``, empty for ``convs.0``)."""

    container: str
    rest: str
    calls: tuple[CallRecord, ...]


def _item_index(producer: str, container: str, rest: str) -> int | None:
    """``i`` when ``producer`` is ``<container>.<i>[.<rest>]``, else None."""
    head = f"{container}." if container else ""
    tail = f".{rest}" if rest else ""
    if not (producer.startswith(head) and producer.endswith(tail)):
        return None
    middle = producer[len(head) : len(producer) - len(tail)]
    return int(middle) if middle.isdigit() else None


def _as_loop(layer: LayerInfo, calls: list[CallRecord]) -> Loop | None:
    """A :class:`Loop` when ``calls`` (made by one line) came after items 0, 1, ... of one
    container, in that order; None when they did not (one call, other producers)."""
    producers = [c.producer for c in calls if c.producer and c.via == "direct" and c.producer != layer.path]
    if len(calls) < 2 or len(producers) != len(calls):
        return None
    parts = producers[0].split(".")
    for pos, part in enumerate(parts):
        if part != "0":
            continue
        container, rest = ".".join(parts[:pos]), ".".join(parts[pos + 1 :])
        if [_item_index(p, container, rest) for p in producers] == list(range(len(calls))):
            return Loop(container, rest, tuple(calls))
    return None


def site_plan(layer: LayerInfo, calls: list[CallRecord]) -> list[CallRecord | Loop]:
    """The call sites in call order, the calls that one line made in a loop over a
    container joined into one :class:`Loop` (placed at its first call)."""
    by_line: dict[tuple[str, int], list[CallRecord]] = {}
    for call in calls:
        if call.location is not None:
            by_line.setdefault((call.location.file, call.location.line), []).append(call)
    loops = {id(group[0]): loop for group in by_line.values() if (loop := _as_loop(layer, group))}
    looped = {id(call) for loop in loops.values() for call in loop.calls}
    plan: list[CallRecord | Loop] = []
    for call in calls:
        if id(call) in loops:
            plan.append(loops[id(call)])
        elif id(call) not in looped:
            plan.append(call)
    return plan


def _loop_names(layer: LayerInfo, loop: Loop, taken: list[str]) -> tuple[str, str]:
    """(attribute holding the loop's BNs, loop variable for the container's items):
    ``bn_convs`` and ``conv`` for ``convs``."""
    last = layer.path.rsplit(".", 1)[-1]
    base = last if last.isidentifier() and not keyword.iskeyword(last) else "bn"
    name = identifier(f"{base}_{loop.container or 'items'}")
    while name in taken:
        name += "_list"
    word = loop.container.rsplit(".", 1)[-1]
    item = word[:-1] if len(word) > 2 and word.endswith("s") else "layer"
    if not item.isidentifier() or keyword.iskeyword(item) or item in ("bn", "self"):
        item = "layer"
    return name, item


def per_site_layers(
    layer: LayerInfo,
    calls: list[CallRecord],
    bn: str,
    many: str | None = None,
    header: Sequence[str] = (),
    indent: str = "",
) -> str:
    """One BN per call site of a shared ``layer``, in a model class: ``bn`` constructs one
    (named by :func:`site_names`); ``many``, a template of ``{bn}`` and ``{items}`` (a
    Python expression for a container), constructs a list of them, one per item, for the
    calls a loop over that container makes (:func:`site_plan`; without ``many`` every call
    gets its own BN, as in an unrolled forward). Constructor lines follow ``header``,
    indented by ``indent``."""
    names = dict(zip((id(c) for c in calls), site_names(layer, calls), strict=True))
    plan: list[CallRecord | Loop] = site_plan(layer, calls) if many is not None else list(calls)
    init = ["# __init__: one BN per call site, each with its own running statistics", *header]
    forward = ["# forward: each call site uses its own BN"]
    for step in plan:
        if isinstance(step, Loop) and many is not None:
            name, item = _loop_names(layer, step, list(names.values()))
            items = attribute(step.container)
            where = step.calls[0].location
            init.append(f"{indent}self.{name} = {many.format(bn=bn, items=items)}")
            forward.append(f"for {item}, bn in zip({items}, self.{name}):  # the loop around {where}")
            forward.append(f"    ... bn({attribute(step.rest, item)}(...)) ...")
        elif isinstance(step, CallRecord):
            init.append(f"{indent}self.{names[id(step)]} = {bn}")
            forward.append(_site_line(layer, step, names[id(step)]))
    return "\n".join(init + forward)


def _site_line(layer: LayerInfo, call: CallRecord, name: str) -> str:
    if call.producer == layer.path:
        return f"... self.{name}(...)  # or drop this second normalization"
    if call.producer and call.via == "direct":
        return f"... self.{name}({attribute(call.producer)}(...)) ..."
    return f"... self.{name}(...)  # was call {call.index} of {attribute(layer.path)}"


def no_decay_on_norms() -> str:
    return "\n".join(
        [
            "norm_params = [p for m in model.modules()",
            "               if isinstance(m, nn.modules.batchnorm._NormBase) for p in m.parameters()]",
            "ids = {id(p) for p in norm_params}",
            "other = [p for p in model.parameters() if id(p) not in ids]",
            "opt = torch.optim.SGD([{'params': other, 'weight_decay': 1e-4},",
            "                       {'params': norm_params, 'weight_decay': 0.0}], lr=0.1)",
        ]
    )


def checkpoint_without_bn_updates() -> str:
    return "\n".join(
        [
            "# keep BN outside the checkpointed function, or stop the recomputation from",
            "# updating the statistics a second time:",
            "out = torch.utils.checkpoint.checkpoint(block_without_bn, x, use_reentrant=False)",
            "out = self.bn(out)",
        ]
    )


def sync_bn() -> str:
    return "model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # before wrapping in DDP"


def rebuild_and_load(changes: list[dict[str, Any]], target: str, framework_module: str, load_line: str) -> str:
    """HOW_TO_LOAD text for a model the user builds again (their own class): build it as
    for ``target``, apply the splits of ``changes`` with ``split_shared``, load the weights
    with ``load_line`` (which needs ``import <framework_module>``)."""
    splits = {c["where"]: c["calls"] for c in changes if c["change"] == "split"}
    build = f"model = ...  # your model, built as for {target}\n"
    if splits:
        build += f"    model = split_shared(model, {splits!r})  # one BN per call site\n"
    head = f"    import {framework_module}\n    from bnlab.doctor.repair import split_shared\n"
    note = (
        "Each shared BN is now one BN per call site (chosen by call order within a forward "
        "pass); give your own model class one BN per call site to drop the wrapper.\n\n"
        if splits
        else ""
    )
    return note + head + "    " + build + "    " + load_line + "\n"
