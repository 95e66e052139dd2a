"""Code sketches for the doctor's fixes, in Keras 3 (see :class:`bnlab.doctor.backend.Fixes`)."""

from __future__ import annotations

from bnlab.doctor.backends import sketch
from bnlab.doctor.findings import number
from bnlab.doctor.records import CallRecord, LayerInfo


def _constructor(layer: LayerInfo, name: str | None = None) -> str:
    named = f", name={name!r}" if name else ""
    return f"keras.layers.BatchNormalization(momentum={number(layer.rate)}, epsilon={number(layer.eps)}{named})"


class KerasFixes:
    def one_bn_per_site(self, layer: LayerInfo, calls: list[CallRecord]) -> str:
        names = sketch.site_names(layer, calls)
        lines = ["# one BatchNormalization per call site, each with its own moving statistics"]
        lines += [f"{name} = {_constructor(layer, name)}" for name in names]
        lines.append("# subclassed: self.<name> = ... in __init__; functional: use each once")
        for name, call in zip(names, calls, strict=True):
            if call.producer and call.via == "direct" and call.producer != layer.path:
                lines.append(f"h = {name}({sketch.identifier(call.producer)}_output)  # was {layer.path}(...)")
            else:
                lines.append(f"h = {name}(...)  # was call {call.index} of {layer.path}")
        return "\n".join(lines)

    def recompute_stats(self) -> str:
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

    def reset_stats(self) -> str:
        return self.recompute_stats()

    def train_mode_during_training(self) -> str:
        return "\n".join(
            [
                "model.fit(x, y)  # fit() calls the model with training=True",
                "# a custom loop: out = model(x, training=True) in the training step,",
                "# model(x, training=False) only for validation / inference",
            ]
        )

    def train_mode_advice(self) -> str:
        return (
            "Call the model with training=True in the training step (fit() does), or freeze "
            "the layers with layer.trainable = False if intended."
        )

    def rate_code(self, layer: LayerInfo, value: float) -> str:
        return (
            f"keras.layers.BatchNormalization(momentum={number(value)}, "
            f"epsilon={number(layer.eps)})\n"
            f"# or, on the built model: the layer {layer.path!r}.momentum = {number(value)}"
        )

    def no_decay_on_norms(self) -> str:
        return "\n".join(
            [
                "optimizer = keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=1e-4)",
                'optimizer.exclude_from_weight_decay(var_names=["gamma", "beta"])  # before fit',
                "model.compile(optimizer=optimizer, loss=...)",
            ]
        )

    def checkpoint_without_bn_updates(self) -> str:
        return sketch.checkpoint_without_bn_updates()

    def no_bias(self, kinds: list[str]) -> str:
        kind = kinds[0] if kinds else "Dense"
        return f"keras.layers.{kind}(..., use_bias=False)  # the BN's beta plays the role of the bias"

    def dropout_after_bn(self) -> str:
        return "h = keras.layers.Dropout(0.5)(keras.ops.relu(bn(dense(h))))  # dropout after BN"

    def freeze_bn(self) -> str:
        return "bn.trainable = False  # Keras then runs the layer in inference mode, stats kept"

    def sync_bn(self) -> str:
        return sketch.sync_bn()

    def bigger_batches(self) -> str:
        return "model.fit(x, y, batch_size=32)  # or a tf.data / PyDataset with bigger batches"
