"""Code sketches for the fixes, written in the user's framework.

Each function returns a few lines of code to show under a finding's ``fix``; they
are sketches to adapt, named after the user's own modules where we know them.
"""

from __future__ import annotations

import keyword
import re

from bnlab.doctor.findings import number
from bnlab.doctor.records import CallRecord, LayerInfo


def _identifier(text: str) -> str:
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


def _keras_constructor(layer: LayerInfo, name: str | None = None) -> str:
    named = f", name={name!r}" if name else ""
    return f"keras.layers.BatchNormalization(momentum={number(layer.rate)}, epsilon={number(layer.eps)}{named})"


def _constructor(layer: LayerInfo) -> str:
    if layer.framework == "keras":
        return _keras_constructor(layer)
    if layer.framework == "chainer":
        return f"L.BatchNormalization({layer.num_channels}, decay={number(layer.rate)}, eps={number(layer.eps)})"
    kind = layer.kind if layer.kind.startswith(("BatchNorm", "SyncBatchNorm")) else "BatchNorm1d"
    return f"nn.{kind}({layer.num_channels}, eps={number(layer.eps)}, momentum={number(layer.rate)})"


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
        name = _identifier(f"{base}_{suffix}")
        names.append(name if name not in names else f"{name}_{call.index}")
    return names


def _in_container(path: str) -> bool:
    """The layer is a numbered child (of a Sequential or ModuleList)."""
    return any(part.isdigit() for part in path.split("."))


def _keras_per_site(layer: LayerInfo, calls: list[CallRecord]) -> str:
    names = site_names(layer, calls)
    lines = ["# one BatchNormalization per call site, each with its own moving statistics"]
    lines += [f"{name} = {_keras_constructor(layer, name)}" for name in names]
    lines.append("# subclassed: self.<name> = ... in __init__; functional: use each once")
    for name, call in zip(names, calls, strict=True):
        if call.producer and call.via == "direct" and call.producer != layer.path:
            lines.append(f"h = {name}({_identifier(call.producer)}_output)  # was {layer.path}(...)")
        else:
            lines.append(f"h = {name}(...)  # was call {call.index} of {layer.path}")
    return "\n".join(lines)


def one_bn_per_site(layer: LayerInfo, calls: list[CallRecord]) -> str:
    if layer.framework == "keras":
        return _keras_per_site(layer, calls)
    if layer.framework != "chainer" and layer.aliases:
        # The same object registered twice (placed twice in a Sequential): replace the
        # second and later places by new layers.
        lines = ["# give every place its own BN (the same object is registered several times)"]
        lines += [
            f"{attribute(alias, 'model')} = {_constructor(layer)}  # was {attribute(layer.path, 'model')}"
            for alias in layer.aliases
        ]
        return "\n".join(lines)
    names = site_names(layer, calls)
    lines = ["# __init__: one BN per call site, each with its own running statistics"]
    if layer.framework == "chainer":
        lines.append("with self.init_scope():")
        lines += [f"    self.{name} = {_constructor(layer)}" for name in names]
    else:
        lines += [f"self.{name} = {_constructor(layer)}" for name in names]
    lines.append("# forward: each call site uses its own BN")
    for name, call in zip(names, calls):
        if call.producer == layer.path:
            lines.append(f"... self.{name}(...)  # or drop this second normalization")
        elif call.producer and call.via == "direct":
            lines.append(f"... self.{name}({attribute(call.producer)}(...)) ...")
        else:
            lines.append(f"... self.{name}(...)  # was call {call.index} of {attribute(layer.path)}")
    return "\n".join(lines)


def recompute_stats(framework: str) -> str:
    if framework == "keras":
        return "\n".join(
            [
                "# re-estimate the moving statistics on training data (weights unchanged):",
                "# a cumulative average: batch k gets weight 1/k",
                "bns = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]",
                "for k, x in enumerate(train_batches, start=1):",
                "    for bn in bns:",
                "        bn.momentum = (k - 1) / k",
                "    model(x, training=True)  # updates moving_mean / moving_variance",
                "for bn in bns:",
                "    bn.momentum = 0.99  # or your own value",
            ]
        )
    if framework == "chainer":
        return "\n".join(
            [
                "# re-estimate the running statistics on training data",
                "for link in model.links():",
                "    if isinstance(link, L.BatchNormalization):",
                "        link.avg_mean[...] = 0; link.avg_var[...] = 1",
                "with chainer.using_config('train', True), chainer.no_backprop_mode():",
                "    for x in train_batches:",
                "        model(x)",
            ]
        )
    return "\n".join(
        [
            "# re-estimate the running statistics on training data",
            "for m in model.modules():",
            "    if isinstance(m, nn.modules.batchnorm._BatchNorm):",
            "        m.reset_running_stats(); m.momentum = None  # cumulative average",
            "model.train()",
            "with torch.no_grad():",
            "    for x, _ in train_loader:",
            "        model(x)",
            "model.eval()",
        ]
    )


def train_mode_during_training(framework: str) -> str:
    if framework == "keras":
        return "\n".join(
            [
                "model.fit(x, y)  # fit() calls the model with training=True",
                "# a custom loop: out = model(x, training=True) in the training step,",
                "# model(x, training=False) only for validation / inference",
            ]
        )
    if framework == "chainer":
        return "\n".join(
            [
                "with chainer.using_config('train', True):  # BN uses and updates batch stats",
                "    loss = F.softmax_cross_entropy(model(x), t)",
            ]
        )
    return "\n".join(
        [
            "for x, y in train_loader:",
            "    model.train()  # BN: batch statistics, running statistics updated",
            "    loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()",
            "model.eval()  # only for validation / inference",
        ]
    )


def rate_code(layer: LayerInfo, value: float) -> str:
    if layer.framework == "keras":
        return (
            f"keras.layers.BatchNormalization(momentum={number(value)}, "
            f"epsilon={number(layer.eps)})\n"
            f"# or, on the built model: the layer {layer.path!r}.momentum = {number(value)}"
        )
    if layer.framework == "chainer":
        return f"L.BatchNormalization({layer.num_channels}, decay={number(value)}, eps={number(layer.eps)})"
    return (
        f"nn.{layer.kind}({layer.num_channels}, momentum={number(value)})\n"
        f"# or, on the built model: {attribute(layer.path, 'model')}.momentum = {number(value)}"
    )


def reestimate_stats() -> str:
    """Re-estimate reset or stale running statistics (a cumulative average in train mode)."""
    return "\n".join(
        [
            "from torch.optim.swa_utils import update_bn",
            "update_bn(train_loader, model)  # cumulative average over one pass, train mode",
            "model.eval()",
            "# or: bnlab.doctor.repair(model, batches) returns a repaired copy",
        ]
    )


def no_decay_on_norms(framework: str = "torch") -> str:
    if framework == "keras":
        return "\n".join(
            [
                "optimizer = keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=1e-4)",
                'optimizer.exclude_from_weight_decay(var_names=["gamma", "beta"])  # before fit',
                "model.compile(optimizer=optimizer, loss=...)",
            ]
        )
    if framework == "chainer":
        return "\n".join(
            [
                "# instead of optimizer.add_hook(WeightDecay(1e-4)), which decays every parameter:",
                "norm = {id(p) for link in model.links() if isinstance(link, L.BatchNormalization)",
                "        for p in link.params()}",
                "for param in model.params():",
                "    if id(param) not in norm:",
                "        param.update_rule.add_hook(chainer.optimizer_hooks.WeightDecay(1e-4))",
            ]
        )
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


def no_bias(framework: str, kinds: list[str]) -> str:
    if framework == "keras":
        kind = kinds[0] if kinds else "Dense"
        return f"keras.layers.{kind}(..., use_bias=False)  # the BN's beta plays the role of the bias"
    if framework == "chainer":
        return "L.Linear(n_in, n_out, nobias=True)  # likewise Convolution2D(..., nobias=True)"
    kind = kinds[0] if kinds else "Linear"
    return f"nn.{kind}(..., bias=False)  # the BN's beta plays the role of the bias"


def dropout_after_bn(framework: str) -> str:
    if framework == "keras":
        return "h = keras.layers.Dropout(0.5)(keras.ops.relu(bn(dense(h))))  # dropout after BN"
    if framework == "chainer":
        return "h = F.dropout(F.relu(self.bn(self.l(h))), ratio=0.5)  # dropout after BN"
    return "h = self.drop(F.relu(self.bn(self.lin(h))))  # dropout after BN, not before"


def freeze_bn(framework: str) -> str:
    if framework == "keras":
        return "bn.trainable = False  # Keras then runs the layer in inference mode, stats kept"
    if framework == "chainer":
        return "\n".join(
            [
                "# Chainer updates avg_mean/avg_var whenever config.train is True;",
                "# for frozen statistics call the frozen BN under using_config('train', False)",
            ]
        )
    return "\n".join(
        [
            "def train(self, mode=True):",
            "    super().train(mode)",
            "    for m in self.frozen_bns:  # frozen BN: use (and keep) the running statistics",
            "        m.eval()",
            "    return self",
        ]
    )


def sync_bn() -> str:
    return "model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # before wrapping in DDP"


def bigger_batches(framework: str) -> str:
    if framework == "keras":
        return "model.fit(x, y, batch_size=32)  # or a tf.data / PyDataset with bigger batches"
    if framework == "chainer":
        return "iterator = chainer.iterators.SerialIterator(data, batch_size=32, repeat=True)"
    return "loader = DataLoader(data, batch_size=32, shuffle=True, drop_last=True)"
