"""The `tensorflow` preset against TF1's formulas, written out in numpy (TF 1.14 is not installable here).

The TF program of the seed: ``tf.layers.dense`` (Glorot uniform kernel, zero bias), then
``tf.layers.batch_normalization(training=training, momentum=0.9)`` (eps 1e-3; 2-D input, so
the non-fused path: ``tf.nn.moments`` gives the BIASED variance, and the update op is
``moving -= (moving - batch) * (1 - momentum)``) after both hidden layers and on the logits;
``tf.train.AdamOptimizer(0.01)``; metrics via ``loss.eval`` with ``training`` left at its
default False, i.e. inference mode after the step; ``np.array_split`` batching.
See docs/conventions.md for the derivations.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from bnlab.conventions import convert
from bnlab.engines.common import split_batches
from bnlab.engines.torch_step import make_optimizer, train_step
from bnlab.models import BiasedVarBatchNorm1d, build_model
from bnlab.presets import PRESETS

TF = PRESETS["tensorflow"].config
TF_MOMENTUM, TF_EPS = 0.9, 1e-3


# ------------------------------------------------------------------------ TF1 in numpy


def tf_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tf.nn.moments(x, axes=[0]): mean and the biased (divide by n) variance."""
    mean = x.mean(axis=0)
    return mean, ((x - mean) ** 2).mean(axis=0)


def tf_batch_norm(x, mean, var, gamma, beta, eps=TF_EPS):
    """tf.nn.batch_normalization: (x - mean) * gamma / sqrt(var + eps) + beta."""
    return (x - mean) * (gamma / np.sqrt(var + eps)) + beta


def tf_assign_moving_average(moving: np.ndarray, value: np.ndarray, momentum: float = TF_MOMENTUM) -> np.ndarray:
    """The update op tf.layers.batch_normalization adds to UPDATE_OPS (non-fused path)."""
    return moving - (moving - value) * (1.0 - momentum)


class TFGraph:
    """The question's TF graph in numpy, from a bnlab model's weights (float64)."""

    def __init__(self, model: torch.nn.Module) -> None:
        sd = {k: v.detach().double().numpy().copy() for k, v in model.state_dict().items()}
        self.dense = [(sd[f"l{i}.weight"].T, sd[f"l{i}.bias"]) for i in (1, 2, 3)]
        self.bn = {
            name: {
                "gamma": sd[f"{name}.weight"],
                "beta": sd[f"{name}.bias"],
                "moving_mean": sd[f"{name}.running_mean"],
                "moving_variance": sd[f"{name}.running_var"],
            }
            for name in ("bn1", "bn2", "bn_logits")
        }

    def _bn(self, name: str, h: np.ndarray, training: bool) -> np.ndarray:
        p = self.bn[name]
        if not training:
            return tf_batch_norm(h, p["moving_mean"], p["moving_variance"], p["gamma"], p["beta"])
        mean, var = tf_moments(h)
        # sess.run([training_op, extra_update_ops]): the moving averages take this batch's moments.
        p["moving_mean"] = tf_assign_moving_average(p["moving_mean"], mean)
        p["moving_variance"] = tf_assign_moving_average(p["moving_variance"], var)
        return tf_batch_norm(h, mean, var, p["gamma"], p["beta"])

    def logits(self, x: np.ndarray, training: bool) -> np.ndarray:
        h = x
        for (w, b), name in zip(self.dense[:2], ("bn1", "bn2")):
            h = np.maximum(self._bn(name, h @ w + b, training), 0.0)
        w, b = self.dense[2]
        return self._bn("bn_logits", h @ w + b, training)


def tf_adam(param, grad, m, v, t, lr=0.01, b1=0.9, b2=0.999, eps=1e-8):
    """tf.train.AdamOptimizer's documented update ("epsilon hat", before the correction)."""
    lr_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    return param - lr_t * m / (np.sqrt(v) + eps), m, v


# ------------------------------------------------------------------------------ the tests


def test_preset_states_the_tf_program():
    m, t = TF.model, TF.train
    assert m.norm == "per-layer" and m.logits_norm and m.init == "tf-glorot-uniform"
    assert m.bn_eps == TF_EPS and m.running_var == "biased"
    assert m.bn_momentum == pytest.approx(convert(TF_MOMENTUM, "tf1", "torch"))  # 0.1: TF weights the old value
    assert (t.lr, t.batch_size, t.adam_eps, t.adam_eps_mode) == (0.01, 1000, 1e-8, "chainer")
    assert (t.train_metrics, t.batching) == ("eval-after-step", "array-split")


def test_graph_forward_and_moving_averages_follow_tf1_for_several_steps(mnist):
    from bnlab.data import to_float

    model = build_model(TF.model, seed=0).double()
    with torch.no_grad():  # non-trivial gamma and beta, so they are checked too
        for name in ("bn1", "bn2", "bn_logits"):
            getattr(model, name).weight.uniform_(0.5, 1.5)
            getattr(model, name).bias.uniform_(-0.5, 0.5)
    assert all(isinstance(getattr(model, n), BiasedVarBatchNorm1d) for n in ("bn1", "bn2", "bn_logits"))
    graph = TFGraph(model)
    x = to_float(mnist.train_images[:4000]).astype(np.float64)
    model.train()
    for batch in np.array_split(x, 4):
        with torch.no_grad():
            ours = model(torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(ours, graph.logits(batch, training=True), rtol=1e-10, atol=1e-10)
        for name, p in graph.bn.items():
            bn = getattr(model, name)
            np.testing.assert_allclose(bn.running_mean.numpy(), p["moving_mean"], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(bn.running_var.numpy(), p["moving_variance"], rtol=1e-10, atol=1e-12)
    model.eval()
    with torch.no_grad():
        ours = model(torch.from_numpy(x[:500])).numpy()
    np.testing.assert_allclose(ours, graph.logits(x[:500], training=False), rtol=1e-10, atol=1e-10)


def test_pytorch_unbiased_running_variance_would_not_match_tf1(mnist):
    """The negative control: the same graph with nn.BatchNorm1d's unbiased running variance."""
    from bnlab.data import to_float

    unbiased = dataclasses.replace(TF.model, running_var="unbiased")
    model = build_model(unbiased, seed=0).double().train()
    graph = TFGraph(model)
    batch = to_float(mnist.train_images[:1000]).astype(np.float64)
    with torch.no_grad():
        model(torch.from_numpy(batch))
    graph.logits(batch, training=True)
    gap = np.abs(model.bn1.running_var.numpy() - graph.bn["bn1"]["moving_variance"])
    # (1 - momentum) * var * (n/(n-1) - 1): about 1e-4 * var for n = 1000, far above rounding.
    assert gap.max() > 1e-6


@pytest.mark.parametrize("layer, fan_in, fan_out", [("l1", 784, 100), ("l2", 100, 100), ("l3", 100, 10)])
def test_glorot_uniform_bounds_of_tf_layers_dense(layer, fan_in, fan_out):
    model = build_model(TF.model, seed=0)
    w = getattr(model, layer).weight.detach().numpy()
    limit = math.sqrt(6.0 / (fan_in + fan_out))  # glorot_uniform_initializer: U(-limit, limit)
    assert w.shape == (fan_out, fan_in)  # torch stores (out, in); TF's kernel is its transpose
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.95 * limit
    # U(-a, a) has variance a^2 / 3; with n draws the sample variance is within ~5/sqrt(n) relative.
    assert w.var() == pytest.approx(limit**2 / 3, rel=5 / math.sqrt(w.size) * 2)
    assert not getattr(model, layer).bias.detach().numpy().any()


def _adam_run(mode: str, eps: float, mnist, steps: int = 5):
    """bnlab's train_step on the TF graph (float64), and TF1's Adam replayed in numpy from
    the very gradients train_step computed."""
    from bnlab.data import to_float

    tc = dataclasses.replace(TF.train, adam_eps=eps, adam_eps_mode=mode)
    model = build_model(TF.model, seed=0).double().train()
    optimizer = make_optimizer(model, tc)
    params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    state = {n: (np.zeros_like(p), np.zeros_like(p)) for n, p in params.items()}
    x = to_float(mnist.train_images[: 200 * steps]).astype(np.float64)
    y = np.asarray(mnist.train_labels[: 200 * steps], dtype=np.int64)
    worst = 0.0
    for t in range(1, steps + 1):
        sl = slice(200 * (t - 1), 200 * t)
        train_step(model, optimizer, torch.from_numpy(x[sl]), torch.from_numpy(y[sl]), t, tc)
        for n, p in model.named_parameters():
            m, v = state[n]
            params[n], m, v = tf_adam(params[n], p.grad.numpy(), m, v, t, lr=tc.lr, eps=eps)  # TF's epsilon = adam_eps
            state[n] = (m, v)
            worst = max(worst, float(np.max(np.abs(p.detach().numpy() - params[n]))))
    return worst


def test_adam_step_is_tf1_adamoptimizer(mnist):
    # eps=1e-4, far above the default 1e-8, makes where eps enters visible in the parameters.
    assert _adam_run("chainer", 1e-4, mnist) < 1e-12
    assert _adam_run("chainer", 1e-8, mnist) < 1e-12


def test_torch_eps_placement_is_not_tf1(mnist):
    assert _adam_run("torch", 1e-4, mnist) > 1e-6


def test_train_metrics_are_inference_mode_after_the_step(mnist):
    """loss.eval(feed_dict={X, y}) runs after the update with training=False (its default)."""
    from bnlab.data import to_float

    xb = torch.from_numpy(to_float(mnist.train_images[:1000]).astype(np.float64))
    yb = torch.from_numpy(np.asarray(mnist.train_labels[:1000], dtype=np.int64))
    with torch.no_grad():  # what the Chainer program would report: the training forward's loss
        training_forward = torch.nn.functional.cross_entropy(build_model(TF.model, seed=0).double()(xb), yb).item()
    model = build_model(TF.model, seed=0).double().train()
    optimizer = make_optimizer(model, TF.train)
    loss, logits = train_step(model, optimizer, xb, yb, 1, TF.train)
    assert model.training  # back in training mode for the next step
    graph = TFGraph(model)  # the weights and moving averages AFTER the step
    expected_logits = graph.logits(xb.numpy(), training=False)
    np.testing.assert_allclose(logits.numpy(), expected_logits, rtol=1e-10, atol=1e-10)
    z = expected_logits - expected_logits.max(1, keepdims=True)
    expected_loss = float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(1000), yb.numpy()]))
    assert float(loss) == pytest.approx(expected_loss, rel=1e-10)
    assert abs(float(loss) - training_forward) > 1e-3  # not the training forward's loss


@pytest.mark.parametrize("n, batch_size", [(60000, 1000), (10500, 1000), (1234, 100)])
def test_array_split_batching_is_the_tf_programs(n, batch_size):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    ours = split_batches(order, batch_size, "array-split")
    theirs = np.array_split(order.numpy(), n // batch_size)  # shuffle_batch's n_batches = len(X) // batch_size
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        # The same partition; bnlab gathers each batch's rows in memory order (a mean does
        # not depend on the order of its terms, up to rounding).
        np.testing.assert_array_equal(np.sort(a.numpy()), np.sort(b))
