"""Helpers for the backends' code sketches (``backends/<name>/fixes.py``): Python names
for a layer's call sites and the attribute path that reaches a layer.

Also the sketches that have one form so far (weight-decay groups, SyncBatchNorm,
activation checkpointing, written with PyTorch's API): a backend whose framework has no
form of its own returns these, as the doctor always has.
"""

from __future__ import annotations

import keyword
import re
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


def per_site_layers(layer: LayerInfo, calls: list[CallRecord], init_lines: list[str]) -> str:
    """One BN per call site of a shared ``layer``, in a model class: ``init_lines`` create
    them in the constructor (named by :func:`site_names`), then each call site uses its own."""
    names = site_names(layer, calls)
    lines = ["# __init__: one BN per call site, each with its own running statistics", *init_lines]
    lines.append("# forward: each call site uses its own BN")
    for name, call in zip(names, calls):
        if call.producer == layer.path:
            lines.append(f"... self.{name}(...)  # or drop this second normalization")
        elif call.producer and call.via == "direct":
            lines.append(f"... self.{name}({attribute(call.producer)}(...)) ...")
        else:
            lines.append(f"... self.{name}(...)  # was call {call.index} of {attribute(layer.path)}")
    return "\n".join(lines)


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
