"""Every row of ``bnlab conventions`` against the installed framework's real BN layer.

For each framework: the running-average argument exists under the stated name with the
stated default, eps has the stated default, and ONE training step of a real layer on a
batch whose statistics are known (mean 1, biased variance 1, unbiased variance 2, from
running mean 0 and running variance 1) moves the running mean by the stated rule (the rate
weighting the OLD or the NEW value) and the running variance towards the stated variance.
A framework that is not installed is skipped; every row of the table must be checked by
one test here (``test_every_row_has_a_behaviour_check``).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from bnlab.conventions import BIASED, CONVENTIONS, NEW, UNBIASED

# Two samples per channel, 0 and 2: mean 1, biased variance 1, unbiased variance 2.
BATCH = np.array([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]], dtype=np.float32)
RATE = 0.3  # a non-default rate whose two readings (0.3 vs 0.7 on the new value) differ


def expected_after_one_step(framework: str, rate: float) -> tuple[float, float]:
    """Running (mean, variance) after one step from (0, 1) on BATCH, as the table states it."""
    row = CONVENTIONS[framework]
    weight_new = rate if row.weights == NEW else 1.0 - rate
    batch_var = {BIASED: 1.0, UNBIASED: 2.0}[row.running_var]
    return weight_new * 1.0, (1.0 - weight_new) * 1.0 + weight_new * batch_var


def check_row(
    framework: str, signature: inspect.Signature, eps_name: str, mean_after: np.ndarray, var_after: np.ndarray
) -> None:
    row = CONVENTIONS[framework]
    params = signature.parameters
    assert row.parameter in params, f"{row.layer} has no argument {row.parameter!r}"
    assert params[row.parameter].default == pytest.approx(row.default), (framework, "rate default")
    assert params[eps_name].default == pytest.approx(row.eps_default), (framework, "eps default")
    mean, var = expected_after_one_step(framework, RATE)
    np.testing.assert_allclose(mean_after, mean, rtol=1e-6, err_msg=f"{framework}: running mean")
    np.testing.assert_allclose(var_after, var, rtol=1e-6, err_msg=f"{framework}: running variance")


def test_torch_row():
    import torch

    framework = "torch"
    bn = torch.nn.BatchNorm1d(3, momentum=RATE)
    bn.train()
    bn(torch.from_numpy(BATCH))
    check_row(
        framework, inspect.signature(torch.nn.BatchNorm1d), "eps", bn.running_mean.numpy(), bn.running_var.numpy()
    )


@pytest.mark.chainer
def test_chainer_row():
    chainer = pytest.importorskip("chainer")
    framework = "chainer"
    bn = chainer.links.BatchNormalization(3, decay=RATE)
    with chainer.using_config("train", True):
        bn(BATCH)
    check_row(framework, inspect.signature(chainer.links.BatchNormalization), "eps", bn.avg_mean, bn.avg_var)


def _tf():
    from bnlab.engines import tensorflow as tfe

    try:
        return tfe.import_tensorflow()
    except tfe.TensorFlowMissing as err:
        pytest.skip(str(err))


def _tf1_one_step(tf, batch: np.ndarray, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """One training step of tf.layers.batch_normalization in a TF1 graph; the moving statistics after."""
    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, batch.shape)
        layer = tf1.layers.BatchNormalization(**kwargs)
        layer(x, training=True)
        updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
        with tf1.Session(graph=graph) as sess:
            sess.run(tf1.global_variables_initializer())
            sess.run(updates, {x: batch})
            return sess.run(layer.moving_mean), sess.run(layer.moving_variance)


def test_tf1_row():
    tf = _tf()
    framework = "tf1"
    mean, var = _tf1_one_step(tf, BATCH, momentum=RATE)
    check_row(framework, inspect.signature(tf.compat.v1.layers.batch_normalization), "epsilon", mean, var)


def test_tf1_footnote_fused_4d_input_stores_the_unbiased_variance():
    """The table's footnote: 4-D input takes the fused kernel, which keeps Bessel's correction."""
    tf = _tf()
    assert "fused kernel" in CONVENTIONS["tf1"].note and "Bessel-corrected" in CONVENTIONS["tf1"].note
    mean, var = _tf1_one_step(tf, BATCH.reshape(2, 1, 1, 3), momentum=RATE)
    weight_new = 1.0 - RATE
    np.testing.assert_allclose(mean, weight_new * 1.0, rtol=1e-6)
    np.testing.assert_allclose(var, (1 - weight_new) + weight_new * 2.0, rtol=1e-6)


def test_keras_row():
    _tf()  # Keras 3's default backend is TensorFlow: import it the engine's way first
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3."):
        pytest.skip(f"the table's row is about Keras 3; Keras {keras.__version__} is installed")
    framework = "keras"
    layer = keras.layers.BatchNormalization(momentum=RATE)
    layer(BATCH, training=True)
    check_row(
        framework,
        inspect.signature(keras.layers.BatchNormalization),
        "epsilon",
        keras.ops.convert_to_numpy(layer.moving_mean),
        keras.ops.convert_to_numpy(layer.moving_variance),
    )


def test_flax_row():
    """Both of Flax's BatchNorms, nnx and linen (Flax is in the modern venv: no skip)."""
    import jax
    import jax.numpy as jnp
    from flax import linen, nnx

    framework = "flax"
    layer = nnx.BatchNorm(3, momentum=RATE, rngs=nnx.Rngs(0))
    layer.train()
    layer(jnp.asarray(BATCH))
    check_row(
        framework,
        inspect.signature(nnx.BatchNorm.__init__),
        "epsilon",
        np.asarray(layer.mean[...]),
        np.asarray(layer.var[...]),
    )
    bn = linen.BatchNorm(use_running_average=False, momentum=RATE)
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(BATCH))
    _, updated = bn.apply(variables, jnp.asarray(BATCH), mutable=["batch_stats"])
    stats = updated["batch_stats"]
    check_row(
        framework, inspect.signature(linen.BatchNorm), "epsilon", np.asarray(stats["mean"]), np.asarray(stats["var"])
    )


def test_every_row_has_a_behaviour_check():
    """A new row in the table needs a ``test_<framework>_row`` above."""
    defined = {name.removeprefix("test_").removesuffix("_row") for name in globals() if name.endswith("_row")}
    assert defined >= set(CONVENTIONS), f"rows without a behaviour test: {sorted(set(CONVENTIONS) - defined)}"
