"""The doctor on JAX/Flax models (nnx and linen), with real JAX on the CPU and real MNIST.

The question's MLP (examples/question_flax.py, answer_flax.py) in both Flax APIs, a CNN
and a siamese encoder that must not raise an error, the traps Flax users meet (statistics
never updated, batch_stats dropped by a linen loop, PyTorch's momentum 0.1), the cure
(--fix / repair), watch on an nnx loop, msgpack checkpoints and the Equinox refusal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")  # the modern venv has Flax; the Chainer venv collects nothing here

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from examples_import import import_example  # noqa: E402
from flax import linen, nnx, serialization  # noqa: E402

from bnlab.doctor import check, repair, watch  # noqa: E402
from bnlab.doctor.backends import detect  # noqa: E402
from bnlab.doctor.command import main  # noqa: E402
from bnlab.doctor.errors import UnsupportedModel  # noqa: E402
from bnlab.doctor.sources import fit_shape  # noqa: E402

QUESTION = import_example("question_flax")
ANSWER = import_example("answer_flax")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HE = QUESTION.HE


@pytest.fixture(scope="module")
def data(mnist_arrays):
    """(train batches of 500, probe x, probe y) from real MNIST."""
    train_x, train_y, test_x, test_y = mnist_arrays
    train_x, test_x = train_x.reshape(-1, 784), test_x.reshape(-1, 784)
    batches = [(train_x[i : i + 500], train_y[i : i + 500]) for i in range(0, 10_000, 500)]
    return batches, test_x[:500], test_y[:500]


def _by_check(report, name):
    return [f for f in report.findings if f.check == name]


def _cli(capsys, *argv):
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip() else None)


# -- the question's model ------------------------------------------------------------------


def test_question_nnx_on_the_command_line_exit_1_naming_both_sites(capsys, mnist_dir):
    code, report = _cli(
        capsys, f"{EXAMPLES}/question_flax.py:MyModel", "--data", "mnist", "--data-dir", mnist_dir, "--train-steps", "5"
    )
    assert code == 1
    assert report["framework"] == "flax"
    shared = [f for f in report["findings"] if f["check"] == "shared-bn"]
    assert len(shared) == 1 and shared[0]["severity"] == "error" and shared[0]["where"] == "bn"
    assert shared[0]["sites"] == ["call 1 after l1", "call 2 after l2"]
    assert "nnx.BatchNorm(100, momentum=0.9, epsilon=0.001" in shared[0]["fix_code"]


@pytest.mark.parametrize("api", ["MyModel", "LinenModel"])
def test_question_shared_bn_is_an_error_and_the_answer_is_clean(api, data):
    batches, x, y = data
    shared = check(getattr(QUESTION, api)(), x, labels=y, train_steps=2, train_batches=batches)
    assert shared.exit_code == 1
    (finding,) = _by_check(shared, "shared-bn")
    assert finding.severity == "error"
    assert finding.sites == ["call 1 after l1", "call 2 after l2"]
    assert finding.data["between_sites"]["mean_shift"] > 0.3  # the sites differ, measured
    sketch = (
        "self.bn_l1 = nn.BatchNorm(momentum=0.9"
        if api == "LinenModel"
        else "self.bn_l1 = nnx.BatchNorm(100, momentum=0.9"
    )
    assert sketch in finding.fix_code  # in the API the model is written in
    fixed = check(getattr(ANSWER, api)(), x, labels=y, train_steps=2, train_batches=batches)
    assert fixed.exit_code == 0
    assert not _by_check(fixed, "shared-bn")
    assert len(fixed.summary["layers"]) == 2 and all(layer["calls"] == 1 for layer in fixed.summary["layers"])


def test_the_doctor_never_changes_the_users_nnx_model(data):
    batches, x, y = data
    model = QUESTION.MyModel()
    before = jax.tree.map(np.asarray, nnx.state(model).to_pure_dict())
    check(model, x, labels=y, train_steps=3, train_batches=batches)
    after = jax.tree.map(np.asarray, nnx.state(model).to_pure_dict())
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))


# -- models that must not raise an error ------------------------------------------------------


class FlaxCNN(nnx.Module):
    """A small channels-last CNN, one BatchNorm per convolution."""

    def __init__(self, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.conv1 = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = nnx.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean(axis=(1, 2)))


class Siamese(nnx.Module):
    """One encoder (with its BatchNorm) applied to two views of the same images."""

    def __init__(self, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.enc = nnx.Linear(784, 64, use_bias=False, kernel_init=HE, rngs=rngs)
        self.bn = nnx.BatchNorm(64, rngs=rngs)
        self.head = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        view = x[:, ::-1] * 0 + x + 0.01 * jnp.sin(x)  # a slightly perturbed copy: an alike view
        a, b = nnx.relu(self.bn(self.enc(x))), nnx.relu(self.bn(self.enc(view)))
        return self.head(jnp.concatenate([a, b], axis=1))


def test_flax_cnn_has_no_error(data):
    _, x, y = data
    report = check(FlaxCNN(), x[:128].reshape(-1, 28, 28, 1), labels=y[:128])
    assert report.exit_code == 0, report.to_text()
    assert [layer["path"] for layer in report.summary["layers"]] == ["bn1", "bn2"]
    # --data mnist finds the channels-last shape a Flax CNN takes
    assert fit_shape(FlaxCNN(), detect(FlaxCNN()), x[:2]) == (28, 28, 1)


def test_siamese_encoder_on_alike_views_is_a_warning_not_an_error(data):
    _, x, y = data
    report = check(Siamese(), x, labels=y)
    assert report.exit_code == 0
    (finding,) = _by_check(report, "shared-bn")
    assert finding.severity == "warning"
    assert finding.sites == ["call 1 after enc", "call 2 after enc"]


# -- Flax users' own traps -------------------------------------------------------------------------


class FrozenAtCallSite(nnx.Module):
    """use_running_average=True written at the call site: model.train() cannot undo it."""

    def __init__(self, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.l1 = nnx.Linear(784, 100, use_bias=False, kernel_init=HE, rngs=rngs)
        self.bn = nnx.BatchNorm(100, rngs=rngs)
        self.l2 = nnx.Linear(100, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.bn(self.l1(x), use_running_average=True)))


def test_statistics_never_updated_by_training_are_an_error(data):
    batches, x, y = data
    report = check(FrozenAtCallSite(), x, labels=y, train_steps=3, train_batches=batches)
    (finding,) = _by_check(report, "stats-never-updated")
    assert finding.severity == "error" and finding.where == "bn"
    assert report.exit_code == 1


def test_batch_stats_dropped_by_a_linen_loop_are_found(data):
    """The linen trap: apply(..., mutable=['batch_stats']) returns the new statistics and
    the loop drops them, so the trained model normalizes with 0/1 in eval mode."""
    batches, x, y = data
    module = ANSWER.LinenModel()
    variables = module.init(jax.random.key(0), jnp.asarray(x[:2]))
    tx = optax.adam(0.01)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, bx, by):
        def loss_fn(p):
            out, _dropped = module.apply({"params": p, "batch_stats": stats}, bx, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(out, by).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for bx, by in batches:
        params, opt_state = step(params, opt_state, jnp.asarray(bx), jnp.asarray(by))
    report = check((module, {"params": params, "batch_stats": stats}), x, labels=y)
    (finding,) = _by_check(report, "stats-reset")
    assert finding.severity == "error"
    assert set(finding.data["layers"]) == {"BatchNorm_0", "BatchNorm_1"}
    assert report.exit_code == 1


class TorchMomentum(nnx.Module):
    def __init__(self, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.l1 = nnx.Linear(784, 32, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(32, momentum=0.1, rngs=rngs)  # PyTorch's 0.1, typed into Flax
        self.l2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.bn(self.l1(x))))


def test_pytorchs_momentum_in_flax_is_named_with_flaxs_convention(data):
    _, x, y = data
    report = check(TorchMomentum(), x, labels=y)
    (finding,) = _by_check(report, "momentum-convention")
    assert finding.data == {"momentum": 0.1, "torch_momentum": 0.9, "suggested": 0.9}
    assert "weights the OLD value" in finding.fix
    assert "nnx.BatchNorm(32, momentum=0.9" in finding.fix_code


def test_stale_statistics_are_a_warning_on_the_layer_that_has_them(data):
    batches, x, y = data
    model = repair(ANSWER.MyModel(), batches[:4])  # nothing shared: statistics re-estimated only
    assert check(model, x, labels=y).exit_code == 0
    model.bn1.mean[...] = model.bn1.mean[...] + 3.0 * jnp.sqrt(model.bn1.var[...])  # from other data
    report = check(model, x, labels=y)
    assert [f.where for f in _by_check(report, "stale-stats")] == ["bn1"]


def test_small_batches_are_counted_in_samples(data):
    _, x, _ = data
    report = check(ANSWER.MyModel(), x[:2])
    assert {f.where for f in _by_check(report, "small-batch")} == {"bn1", "bn2"}


# -- the cure ----------------------------------------------------------------------------------------


def _trained_question(batches, steps=1):
    model = QUESTION.MyModel()
    optimizer = nnx.Optimizer(model, optax.adam(0.01), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, bx, by):
        loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(bx), by).mean()  # noqa: E731
        optimizer.update(model, nnx.grad(loss_fn)(model))

    model.train()
    for _ in range(steps):
        for bx, by in batches:
            step(model, optimizer, jnp.asarray(bx), jnp.asarray(by))
    return model


def test_repair_splits_the_shared_bn_and_re_estimates_each_site(data):
    batches, x, _ = data
    model = _trained_question(batches)
    before = jax.tree.map(np.asarray, nnx.state(model).to_pure_dict())
    fixed = repair(model, batches)
    assert jax.tree.all(jax.tree.map(np.array_equal, before, jax.tree.map(np.asarray, nnx.state(model).to_pure_dict())))
    site1, site2 = fixed.bn.sites
    np.testing.assert_array_equal(site1.scale[...], model.bn.scale[...])  # affine copied
    np.testing.assert_array_equal(site2.bias[...], model.bn.bias[...])
    # Each site's running mean is the plain average of its batch means (cumulative average).
    feed1 = [np.asarray(model.l1(jnp.asarray(bx))).mean(axis=0) for bx, _ in batches]
    np.testing.assert_allclose(site1.mean[...], np.mean(feed1, axis=0), rtol=1e-4, atol=1e-4)
    assert not np.allclose(site1.mean[...], site2.mean[...], atol=1e-2)
    fixed.eval()
    model.eval()
    agree_fixed = np.mean(np.argmax(fixed(jnp.asarray(x)), 1) == _train_mode_pred(fixed, x))
    agree_given = np.mean(np.argmax(model(jnp.asarray(x)), 1) == _train_mode_pred(model, x))
    assert agree_fixed > agree_given


def _train_mode_pred(model, x):
    work = nnx.clone(model)
    work.train()
    return np.argmax(work(jnp.asarray(x)), 1)


def test_fix_on_the_command_line_writes_a_model_that_loads_back(tmp_path, capsys, data, mnist_dir):
    batches, _, _ = data
    state = tmp_path / "question.msgpack"
    state.write_bytes(serialization.msgpack_serialize(nnx.state(_trained_question(batches[:4])).to_pure_dict()))
    out = tmp_path / "fixed"
    code, report = _cli(
        capsys,
        f"{EXAMPLES}/question_flax.py:MyModel",
        "--checkpoint",
        str(state),
        "--data",
        "mnist",
        "--data-dir",
        mnist_dir,
        "--fix",
        str(out),
    )
    assert code == 1
    assert report["probe"]["train_steps"] == 0  # a trained model is judged as handed over
    changes = report["repair"]["changes"]
    assert changes[0]["change"] == "split" and changes[0]["into"] == ["bn.sites.0", "bn.sites.1"]
    assert report["repair"]["after"]["train_eval_agreement"] > report["repair"]["before"]["train_eval_agreement"]
    how_to = (out / "HOW_TO_LOAD.txt").read_text()
    assert "split_shared(model, {'bn': 2})" in how_to and "msgpack_restore" in how_to
    from bnlab.doctor.repair import split_shared

    reloaded = split_shared(QUESTION.MyModel(), {"bn": 2})
    restored = nnx.state(reloaded)
    nnx.replace_by_pure_dict(restored, serialization.msgpack_restore((out / "model.msgpack").read_bytes()))
    nnx.update(reloaded, restored)
    assert float(reloaded.bn.sites[1].mean[...].sum()) != 0.0


def test_checkpoint_that_does_not_fit_is_a_usage_error(tmp_path, capsys, mnist_dir):
    state = tmp_path / "answer.msgpack"
    state.write_bytes(serialization.msgpack_serialize(nnx.state(ANSWER.MyModel()).to_pure_dict()))
    code = main([f"{EXAMPLES}/question_flax.py:MyModel", "--checkpoint", str(state), "--input-shape", "8,784"])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not fit MyModel" in err and "unexpected keys: bn1" in err
    garbage = tmp_path / "garbage.msgpack"
    garbage.write_bytes(b"not msgpack at all")
    assert main([f"{EXAMPLES}/question_flax.py:MyModel", "--checkpoint", str(garbage), "--input-shape", "8,784"]) == 2
    assert "not a Flax msgpack state" in capsys.readouterr().err


# -- watch ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jitted", [True, False])
def test_watch_counts_two_statistic_updates_per_step_on_the_shared_bn(jitted, data):
    batches, _, _ = data
    model = QUESTION.MyModel()
    optimizer = nnx.Optimizer(model, optax.adam(0.01), wrt=nnx.Param)

    def step(model, optimizer, bx, by):
        loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(bx), by).mean()  # noqa: E731
        optimizer.update(model, nnx.grad(loss_fn)(model))

    step = nnx.jit(step) if jitted else step
    steps = 4 if jitted else 2  # eager steps are slow: each operation is compiled on its own
    with watch(model, optimizer=optimizer) as watched:
        model.train()
        for bx, by in batches[:steps]:
            step(model, optimizer, jnp.asarray(bx), jnp.asarray(by))
    report = watched.report()
    assert report.probe["watched_steps"] == steps and report.probe["watched_passes"] == steps
    (finding,) = _by_check(report, "shared-bn")
    assert finding.severity == "error" and finding.sites == ["call 1 after l1", "call 2 after l2"]
    updates = watched._watcher.updates()
    assert updates["bn"].forward_calls == 2 * steps and updates["bn"].changed


def test_watch_sees_a_loop_that_never_calls_train(data):
    batches, _, _ = data
    model = ANSWER.MyModel()
    model.eval()  # the statistics are never updated
    optimizer = nnx.Optimizer(model, optax.adam(0.01), wrt=nnx.Param)
    with watch(model) as watched:
        for bx, by in batches[:2]:
            grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(bx), by).mean())(model)  # noqa: B023
            optimizer.update(model, grads)
    report = watched.report()
    assert {f.where for f in _by_check(report, "stats-never-updated")} == {"bn1", "bn2"}
    assert report.exit_code == 1


# -- what is refused --------------------------------------------------------------------------------------


def test_equinox_models_are_refused_with_a_message():
    # Equinox is not installed here: a class from an `equinox` module stands for eqx.Module
    # (the refusal reads class modules only, never imports Equinox).
    module = type("Module", (), {"__module__": "equinox._module"})
    model = type("MyEquinoxNet", (module,), {"__module__": "user_model"})()
    with pytest.raises(UnsupportedModel, match="Equinox models .* not supported yet"):
        detect(model)


def test_linen_pair_of_a_trained_model_is_recognised():
    module = linen.Dense(3)
    variables = module.init(jax.random.key(0), jnp.ones((1, 4)))
    assert detect((module, variables)).NAME == "flax"
    assert detect(module).NAME == "flax"
