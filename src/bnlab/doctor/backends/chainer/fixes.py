"""Code sketches for the doctor's fixes, in Chainer (see :class:`bnlab.doctor.backend.Fixes`)."""

from __future__ import annotations

from bnlab.doctor.backends import sketch
from bnlab.doctor.findings import number
from bnlab.doctor.records import CallRecord, LayerInfo


def _constructor(layer: LayerInfo) -> str:
    return f"L.BatchNormalization({layer.num_channels}, decay={number(layer.rate)}, eps={number(layer.eps)})"


class ChainerFixes:
    def one_bn_per_site(self, layer: LayerInfo, calls: list[CallRecord]) -> str:
        many = "chainer.ChainList(*({bn} for _ in {items}))"
        return sketch.per_site_layers(layer, calls, _constructor(layer), many, ["with self.init_scope():"], "    ")

    def recompute_stats(self) -> str:
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

    def reset_stats(self) -> str:
        return self.recompute_stats()

    def train_mode_during_training(self) -> str:
        return "\n".join(
            [
                "with chainer.using_config('train', True):  # BN uses and updates batch stats",
                "    loss = F.softmax_cross_entropy(model(x), t)",
            ]
        )

    def train_mode_advice(self) -> str:
        return (
            "Train under chainer.using_config('train', True) (the default), or freeze the "
            "layers completely (disable_update()) if intended."
        )

    def rate_code(self, layer: LayerInfo, value: float) -> str:
        return f"L.BatchNormalization({layer.num_channels}, decay={number(value)}, eps={number(layer.eps)})"

    def no_decay_on_norms(self) -> str:
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

    def checkpoint_without_bn_updates(self) -> str:
        return sketch.checkpoint_without_bn_updates()

    def no_bias(self, kinds: list[str]) -> str:
        return "L.Linear(n_in, n_out, nobias=True)  # likewise Convolution2D(..., nobias=True)"

    def dropout_after_bn(self) -> str:
        return "h = F.dropout(F.relu(self.bn(self.l(h))), ratio=0.5)  # dropout after BN"

    def freeze_bn(self) -> str:
        return "\n".join(
            [
                "# Chainer updates avg_mean/avg_var whenever config.train is True;",
                "# for frozen statistics call the frozen BN under using_config('train', False)",
            ]
        )

    def sync_bn(self) -> str:
        return sketch.sync_bn()

    def bigger_batches(self) -> str:
        return "iterator = chainer.iterators.SerialIterator(data, batch_size=32, repeat=True)"
