"""Code sketches for the doctor's fixes, in PyTorch (see :class:`bnlab.doctor.backend.Fixes`)."""

from __future__ import annotations

from bnlab.doctor.backends import sketch
from bnlab.doctor.findings import number
from bnlab.doctor.records import CallRecord, LayerInfo


def _constructor(layer: LayerInfo) -> str:
    kind = layer.kind if layer.kind.startswith(("BatchNorm", "SyncBatchNorm")) else "BatchNorm1d"
    return f"nn.{kind}({layer.num_channels}, eps={number(layer.eps)}, momentum={number(layer.rate)})"


class TorchFixes:
    def one_bn_per_site(self, layer: LayerInfo, calls: list[CallRecord]) -> str:
        if layer.aliases:
            # The same object registered twice (placed twice in a Sequential): replace the
            # second and later places by new layers.
            lines = ["# give every place its own BN (the same object is registered several times)"]
            lines += [
                f"{sketch.attribute(alias, 'model')} = {_constructor(layer)}  # was {sketch.attribute(layer.path, 'model')}"
                for alias in layer.aliases
            ]
            return "\n".join(lines)
        return sketch.per_site_layers(layer, calls, _constructor(layer), many="nn.ModuleList({bn} for _ in {items})")

    def recompute_stats(self) -> str:
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

    def reset_stats(self) -> str:
        """Re-estimate reset or stale running statistics (a cumulative average in train mode)."""
        return "\n".join(
            [
                "from torch.optim.swa_utils import update_bn",
                "update_bn(train_loader, model)  # cumulative average over one pass, train mode",
                "model.eval()",
                "# or: bnlab.doctor.repair(model, batches) returns a repaired copy",
            ]
        )

    def train_mode_during_training(self) -> str:
        return "\n".join(
            [
                "for x, y in train_loader:",
                "    model.train()  # BN: batch statistics, running statistics updated",
                "    loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()",
                "model.eval()  # only for validation / inference",
            ]
        )

    def train_mode_advice(self) -> str:
        return (
            "Call model.train() before each training step (after validation), or freeze "
            "the layers completely (requires_grad=False) if intended."
        )

    def rate_code(self, layer: LayerInfo, value: float) -> str:
        return (
            f"nn.{layer.kind}({layer.num_channels}, momentum={number(value)})\n"
            f"# or, on the built model: {sketch.attribute(layer.path, 'model')}.momentum = {number(value)}"
        )

    def no_decay_on_norms(self) -> str:
        return sketch.no_decay_on_norms()

    def checkpoint_without_bn_updates(self) -> str:
        return sketch.checkpoint_without_bn_updates()

    def no_bias(self, kinds: list[str]) -> str:
        kind = kinds[0] if kinds else "Linear"
        return f"nn.{kind}(..., bias=False)  # the BN's beta plays the role of the bias"

    def dropout_after_bn(self) -> str:
        return "h = self.drop(F.relu(self.bn(self.lin(h))))  # dropout after BN, not before"

    def freeze_bn(self) -> str:
        return "\n".join(
            [
                "def train(self, mode=True):",
                "    super().train(mode)",
                "    for m in self.frozen_bns:  # frozen BN: use (and keep) the running statistics",
                "        m.eval()",
                "    return self",
            ]
        )

    def sync_bn(self) -> str:
        return sketch.sync_bn()

    def bigger_batches(self) -> str:
        return "loader = DataLoader(data, batch_size=32, shuffle=True, drop_last=True)"
