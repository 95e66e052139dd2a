"""Code sketches for the fixes, written in the user's framework.

Each function returns a few lines of code to show under a finding's ``fix``; they
are sketches to adapt, named after the user's own modules where we know them.
"""

from __future__ import annotations

from bnlab.doctor.records import CallRecord, LayerInfo


def _attr(path: str) -> str:
    return path.replace(".", "_")


def _constructor(layer: LayerInfo) -> str:
    if layer.framework == "chainer":
        return (
            f"L.BatchNormalization({layer.num_channels}, decay={layer.rate:g}, eps={layer.eps:g})"
        )
    kind = layer.kind if layer.kind.startswith(("BatchNorm", "SyncBatchNorm")) else "BatchNorm1d"
    momentum = "None" if layer.rate is None else f"{layer.rate:g}"
    return f"nn.{kind}({layer.num_channels}, eps={layer.eps:g}, momentum={momentum})"


def site_names(layer: LayerInfo, calls: list[CallRecord]) -> list[str]:
    """Attribute names for one BN per call site: ``bn_l1``, ``bn_l2`` (or ``bn_1``...)."""
    base = _attr(layer.path.rsplit(".", 1)[-1])
    names = []
    for call in calls:
        suffix = _attr(call.producer) if call.producer and call.via != "input" else str(call.index)
        name = f"{base}_{suffix}"
        names.append(name if name not in names else f"{name}_{call.index}")
    return names


def one_bn_per_site(layer: LayerInfo, calls: list[CallRecord]) -> str:
    names = site_names(layer, calls)
    lines = ["# __init__: one BN per call site, each with its own running statistics"]
    if layer.framework == "chainer":
        lines.append("with self.init_scope():")
        lines += [f"    self.{name} = {_constructor(layer)}" for name in names]
    else:
        lines += [f"self.{name} = {_constructor(layer)}" for name in names]
    lines.append("# forward: each call site uses its own BN")
    for name, call in zip(names, calls):
        if call.producer and call.via == "direct":
            lines.append(f"... self.{name}(self.{call.producer}(...)) ...")
        else:
            lines.append(f"... self.{name}(...)  # was call {call.index} of self.{layer.path}")
    return "\n".join(lines)


def recompute_stats(framework: str) -> str:
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
    if layer.framework == "chainer":
        return f"L.BatchNormalization({layer.num_channels}, decay={value:g}, eps={layer.eps:g})"
    return f"nn.{layer.kind}({layer.num_channels}, momentum={value:g})"


def no_bias(framework: str, kinds: list[str]) -> str:
    if framework == "chainer":
        return "L.Linear(n_in, n_out, nobias=True)  # likewise Convolution2D(..., nobias=True)"
    kind = kinds[0] if kinds else "Linear"
    return f"nn.{kind}(..., bias=False)  # the BN's beta plays the role of the bias"


def dropout_after_bn(framework: str) -> str:
    if framework == "chainer":
        return "h = F.dropout(F.relu(self.bn(self.l(h))), ratio=0.5)  # dropout after BN"
    return "h = self.drop(F.relu(self.bn(self.lin(h))))  # dropout after BN, not before"


def freeze_bn(framework: str) -> str:
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
    if framework == "chainer":
        return "iterator = chainer.iterators.SerialIterator(data, batch_size=32, repeat=True)"
    return "loader = DataLoader(data, batch_size=32, shuffle=True, drop_last=True)"
