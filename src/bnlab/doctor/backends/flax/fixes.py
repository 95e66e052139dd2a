"""Code sketches for the doctor's fixes, in Flax (see :class:`bnlab.doctor.backend.Fixes`).

Written for ``flax.nnx`` (``from flax import nnx``), with the linen form where it differs.
"""

from __future__ import annotations

from bnlab.doctor.backends import sketch
from bnlab.doctor.findings import number
from bnlab.doctor.records import CallRecord, LayerInfo

LINEN_LAYERS = {"Dense", "DenseGeneral"}  # layer kinds only linen has (nnx: Linear, LinearGeneral)


def _linen(layer: LayerInfo) -> bool:
    return layer.kind.startswith("linen.")  # the probe names linen layers so


def _constructor(layer: LayerInfo, momentum: float | None = None) -> str:
    rate = layer.rate if momentum is None else momentum
    if _linen(layer):
        return f"nn.BatchNorm(momentum={number(rate)}, epsilon={number(layer.eps)})"
    return f"nnx.BatchNorm({layer.num_channels}, momentum={number(rate)}, epsilon={number(layer.eps)}, rngs=rngs)"


class FlaxFixes:
    def one_bn_per_site(self, layer: LayerInfo, calls: list[CallRecord]) -> str:
        header = ["# (linen: in setup(); each gets its own batch_stats entry)"] if _linen(layer) else []
        # nnx: a list of layers is an nnx.List; linen names list items convs_0, not convs.0
        many = None if _linen(layer) else "nnx.List([{bn} for _ in {items}])"
        return sketch.per_site_layers(layer, calls, _constructor(layer), many, header)

    def recompute_stats(self) -> str:
        return "\n".join(
            [
                "# re-estimate the running statistics on training data (weights unchanged):",
                "# a cumulative average: batch k gets weight 1/k (Flax's momentum weights the OLD value)",
                "bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]",
                "model.train()",
                "for k, (x, _) in enumerate(train_batches, start=1):",
                "    for bn in bns:",
                "        bn.momentum = (k - 1) / k",
                "    model(x)  # updates mean / var",
                "for bn in bns:",
                "    bn.momentum = 0.99  # or your own value",
                "model.eval()",
                "# or: bnlab.doctor.repair(model, batches) returns a repaired copy",
            ]
        )

    def reset_stats(self) -> str:
        return "\n".join(
            [
                "# linen: keep the batch_stats that apply returns, every training step",
                "out, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x,",
                "                           train=True, mutable=['batch_stats'])",
                "batch_stats = updates['batch_stats']  # dropped, the statistics stay 0/1",
                "# save and load 'batch_stats' with the params; to mend a trained model:",
                self.recompute_stats(),
            ]
        )

    def train_mode_during_training(self) -> str:
        return "\n".join(
            [
                "model.train()  # nnx: use_running_average=False, the statistics are updated",
                "loss, grads = nnx.value_and_grad(loss_fn)(model); optimizer.update(model, grads)",
                "model.eval()  # only for validation / inference",
                "# linen: model.apply(variables, x, train=True, mutable=['batch_stats'])",
            ]
        )

    def train_mode_advice(self) -> str:
        return (
            "Call model.train() before the training steps (linen: apply with train=True and "
            "mutable=['batch_stats']); don't pass use_running_average=True at a call site that "
            "runs during training unless the layer is meant to be frozen."
        )

    def rate_code(self, layer: LayerInfo, value: float) -> str:
        return (
            f"{_constructor(layer, value)}\n"
            f"# or, on the built model: {sketch.attribute(layer.path, 'model')}.momentum = {number(value)}"
        )

    def no_decay_on_norms(self) -> str:
        return "\n".join(
            [
                "# decay only the kernels: a mask over the parameters",
                "mask = jax.tree.map(lambda p: p.ndim > 1, nnx.state(model, nnx.Param))",
                "tx = optax.adamw(1e-3, weight_decay=1e-4, mask=mask)",
            ]
        )

    def checkpoint_without_bn_updates(self) -> str:
        return "\n".join(
            [
                "# keep BatchNorm outside the rematerialized function:",
                "h = nnx.remat(block_without_bn)(x)",
                "h = self.bn(h)",
            ]
        )

    def no_bias(self, kinds: list[str]) -> str:
        kind = kinds[0] if kinds else "Linear"
        if kind in LINEN_LAYERS:
            return f"nn.{kind}(..., use_bias=False)  # the BN's bias (beta) plays the role of the bias"
        return f"nnx.{kind}(..., use_bias=False, rngs=rngs)  # the BN's bias (beta) plays the role of the bias"

    def dropout_after_bn(self) -> str:
        return "h = self.dropout(nnx.relu(self.bn(self.linear(h))))  # dropout after BN, not before"

    def freeze_bn(self) -> str:
        return "\n".join(
            [
                "model.train()",
                "model.set_attributes(nnx.BatchNorm, use_running_average=True)  # frozen statistics",
                "optimizer = nnx.Optimizer(model, tx, wrt=nnx.All(nnx.Param, nnx.Not(nnx.PathContains('bn'))))",
            ]
        )

    def sync_bn(self) -> str:
        return "nnx.BatchNorm(..., axis_name='batch')  # under jax.pmap / shard_map: statistics over all devices"

    def bigger_batches(self) -> str:
        return "batch_size = 32  # or more per device: BN's statistics come from the batch"
