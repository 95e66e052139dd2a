"""The doctor's weights on disk and cure for flax.linen models, with real JAX and real MNIST.

``--checkpoint`` (msgpack variables read into the module's template, misfits named),
``--fix`` / ``repair`` (the shared BatchNorm split by bnlab's ``SiteSplit`` wrapper,
``batch_stats`` re-estimated on new variables) and the user's module and variables left as
they were. The question's linen model is trained here for a few jitted steps (seconds).
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
from flax import serialization  # noqa: E402

from bnlab.doctor import check, repair  # noqa: E402
from bnlab.doctor.backends import detect  # noqa: E402
from bnlab.doctor.command import main  # noqa: E402
from bnlab.doctor.errors import RepairError  # noqa: E402
from bnlab.doctor.repair import repair_report, split_shared  # noqa: E402

QUESTION = import_example("question_flax")
ANSWER = import_example("answer_flax")
TARGET = str(Path(__file__).resolve().parents[2] / "examples" / "question_flax.py") + ":LinenModel"


def _train(module, x, y, steps):
    """``steps`` Adam steps of batch 500, batch_stats kept as a correct linen loop keeps them."""
    variables = module.init(jax.random.key(0), jnp.asarray(x[:2]))
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(0.01)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state, bx, by):
        def loss_fn(p):
            out, updates = module.apply({"params": p, "batch_stats": stats}, bx, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(out, by).mean(), updates

        (_, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        moves, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, moves), updates["batch_stats"], opt_state

    for i in range(steps):
        rows = slice((i * 500) % len(x), (i * 500) % len(x) + 500)
        params, stats, opt_state = step(params, stats, opt_state, jnp.asarray(x[rows]), jnp.asarray(y[rows]))
    return {"params": params, "batch_stats": stats}


@pytest.fixture(scope="module")
def trained(mnist_arrays):
    """(module, variables) of the question's linen model after 60 steps on real MNIST."""
    train_x, train_y, _, _ = mnist_arrays
    module = QUESTION.LinenModel()
    return module, _train(module, train_x.reshape(-1, 784), train_y, 60)


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("linen") / "question.msgpack"
    path.write_bytes(serialization.to_bytes(trained[1]))
    return path


def _snapshot(variables):
    return jax.tree.map(np.array, variables)  # numpy copies, compared array by array


def _same(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _eval_accuracy(module, variables, x, y):
    scores = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, jnp.asarray(x))
    return float((np.asarray(scores).argmax(axis=1) == y).mean())


# -- --checkpoint ------------------------------------------------------------------------------------


def test_checkpoint_round_trip_into_the_unbound_module_and_into_a_pair(trained, saved, mnist_arrays):
    module, variables = trained
    backend = detect(module)
    probe_x = mnist_arrays[2][:4].reshape(-1, 784)
    from bnlab.doctor.backends.flax import common

    unbound = backend.load_checkpoint(QUESTION.LinenModel(), saved)
    restored = common.init_linen(unbound, probe_x).variables  # read into module.init's template
    assert _same(restored, _snapshot(variables))
    fresh = QUESTION.LinenModel()
    fresh_variables = fresh.init(jax.random.key(1), jnp.asarray(probe_x))
    before = _snapshot(fresh_variables)
    pair_module, pair_variables = backend.load_checkpoint((fresh, fresh_variables), saved)
    assert pair_module is fresh and _same(pair_variables, _snapshot(variables))
    assert _same(fresh_variables, before)  # the pair given is not written to


def test_checkpoint_on_the_command_line_judges_the_trained_model(saved, capsys):
    code = main([TARGET, "--checkpoint", str(saved), "--input-shape", "64,784", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["probe"]["train_steps"] == 0  # trained: judged as handed over
    (shared,) = [f for f in report["findings"] if f["check"] == "shared-bn"]
    assert shared["severity"] == "error"


def _mangled(variables, how):
    tree = jax.tree.map(np.asarray, variables)
    tree = {k: dict(v) for k, v in tree.items()}
    if how == "mis-shaped":
        tree["params"]["l2"] = {**tree["params"]["l2"], "kernel": tree["params"]["l2"]["kernel"][:, :50]}
    elif how == "extra":
        tree["params"]["l4"] = {"kernel": np.zeros((10, 10), np.float32)}
    elif how == "missing":
        del tree["batch_stats"]
    return serialization.msgpack_serialize(tree)


@pytest.mark.parametrize(
    ("how", "named"),
    [
        ("empty", "is empty (0 bytes)"),
        ("truncated", "is not a Flax msgpack state"),
        ("mis-shaped", "shapes differ (checkpoint vs model): params.l2.kernel (100, 50) vs (100, 100)"),
        ("extra", "unexpected keys: params.l4.kernel"),
        ("missing", "missing keys: batch_stats.bn.mean, batch_stats.bn.var"),
    ],
)
def test_a_bad_checkpoint_is_one_paragraph_naming_the_entries(how, named, trained, saved, tmp_path, capsys):
    path = tmp_path / f"{how}.msgpack"
    data = {"empty": b"", "truncated": saved.read_bytes()[: saved.stat().st_size // 2]}
    path.write_bytes(data[how] if how in data else _mangled(trained[1], how))
    assert main([TARGET, "--checkpoint", str(path), "--input-shape", "8,784"]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    if how in ("mis-shaped", "extra"):
        assert "does not fit LinenModel" in err and "Give the state saved from this model class" in err


def test_a_checkpoint_with_other_keys_is_named_while_the_mnist_shape_is_sought(trained, tmp_path, capsys, mnist_dir):
    path = tmp_path / "extra.msgpack"
    path.write_bytes(_mangled(trained[1], "extra"))
    assert main([TARGET, "--checkpoint", str(path), "--data", "mnist", "--data-dir", mnist_dir]) == 2
    assert "unexpected keys: params.l4.kernel" in capsys.readouterr().err


# -- --fix / repair ---------------------------------------------------------------------------------


def test_fix_on_the_command_line_writes_the_repaired_variables_that_load_back(
    saved, tmp_path, capsys, mnist_dir, mnist_arrays
):
    out = tmp_path / "fixed"
    argv = [TARGET, "--checkpoint", str(saved), "--data", "mnist", "--data-dir", mnist_dir, "--fix", str(out)]
    code = main([*argv, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["HOW_TO_LOAD.txt", "model.msgpack", "repair.json"]  # no temp files
    result = report["repair"]
    split = result["changes"][0]
    assert split["change"] == "split" and split["into"] == ["bn_site0", "bn_site1"]
    assert split["sites"] == ["call 1 after l1", "call 2 after l2"]
    assert result["after"]["val_acc"] > result["before"]["val_acc"]
    assert result["after"]["train_eval_agreement"] > result["before"]["train_eval_agreement"]
    how_to = (out / "HOW_TO_LOAD.txt").read_text()
    assert "split_shared(model, {'bn': 2})" in how_to and "msgpack_restore" in how_to
    # HOW_TO_LOAD's recipe, followed: the same eval accuracy as the doctor measured
    module = split_shared(QUESTION.LinenModel(), {"bn": 2})
    variables = serialization.msgpack_restore((out / "model.msgpack").read_bytes())
    _, _, test_x, test_y = mnist_arrays
    accuracy = _eval_accuracy(module, variables, test_x.reshape(-1, 784), test_y)
    assert accuracy == pytest.approx(result["after"]["val_acc"], abs=1e-3)
    # a second run refuses to overwrite, and leaves the set as it was
    weights = (out / "model.msgpack").read_bytes()
    assert main(argv) == 2
    assert "already exist" in capsys.readouterr().err and (out / "model.msgpack").read_bytes() == weights


def test_repair_splits_the_shared_bn_and_each_site_gets_the_cumulative_average(trained, mnist_arrays):
    module, variables = trained
    train_x = mnist_arrays[0].reshape(-1, 784)
    batches = [train_x[i : i + 500] for i in range(0, 5000, 500)]
    new_module, new = repair((module, variables), batches)
    assert new_module is not module and set(new["batch_stats"]) == {"bn_site0", "bn_site1"}
    # site 0 sees l1's output: its mean is the average of the ten batch means, its
    # variance the average of the ten (biased) batch variances
    l1 = variables["params"]["l1"]
    h = [np.asarray(b, np.float64) @ np.asarray(l1["kernel"], np.float64) + np.asarray(l1["bias"]) for b in batches]
    np.testing.assert_allclose(new["batch_stats"]["bn_site0"]["mean"], np.mean([a.mean(0) for a in h], 0), atol=2e-4)
    np.testing.assert_allclose(new["batch_stats"]["bn_site0"]["var"], np.mean([a.var(0) for a in h], 0), rtol=2e-3)
    for site in ("bn_site0", "bn_site1"):  # the affine parameters copied from the shared layer
        assert _same(new["params"][site], variables["params"]["bn"])
    assert _same(new["params"]["inner"], {k: v for k, v in variables["params"].items() if k != "bn"})


def test_the_repaired_model_checked_again_has_no_error_and_only_the_sites(trained, mnist_arrays):
    train_x, _, test_x, test_y = mnist_arrays
    repaired = repair(trained, [train_x[i : i + 500].reshape(-1, 784) for i in range(0, 3000, 500)])
    report = check(repaired, test_x[:500].reshape(-1, 784), labels=test_y[:500])
    assert report.exit_code == 0 and not [f for f in report.findings if f.check == "shared-bn"]
    # the wrapped layer's own call never runs: only the sites are BatchNorm layers
    assert [(layer["path"], layer["calls"]) for layer in report.summary["layers"]] == [("bn_site0", 1), ("bn_site1", 1)]


def test_the_doctor_never_changes_the_users_linen_module_or_variables(trained, mnist_arrays):
    module, variables = trained
    before, fields = _snapshot(variables), (module.name, module.parent)
    train_x, train_y, test_x, test_y = mnist_arrays
    batches = [(train_x[i : i + 500].reshape(-1, 784), train_y[i : i + 500]) for i in range(0, 2000, 500)]
    check((module, variables), test_x[:200].reshape(-1, 784), labels=test_y[:200], train_steps=2)
    repair_report((module, variables), batches, batches[:1])
    assert _same(variables, before)
    assert (module.name, module.parent) == fields and module == QUESTION.LinenModel()


def test_repair_of_the_answer_splits_nothing_and_re_estimates_both_layers(mnist_arrays):
    module = ANSWER.LinenModel()
    x = mnist_arrays[0][:1000].reshape(-1, 784)
    (new_module, new) = repair(module, [x[:500], x[500:]])
    assert new_module == module  # no wrapper: nothing was shared
    assert set(new["batch_stats"]) == {"BatchNorm_0", "BatchNorm_1"}


def test_split_names_must_be_shared_layers(trained):
    with pytest.raises(RepairError, match="cannot split l1: not a BatchNorm called more than once"):
        repair(trained, [np.zeros((4, 784), np.float32)], split=["l1"])
