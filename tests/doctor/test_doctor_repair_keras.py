"""The cure on Keras 3 models: ``bnlab.doctor.repair`` and ``bnlab doctor ... --fix OUT``.

The question's functional model (examples/question_keras.py: one BatchNormalization after
both hidden Dense layers) is trained briefly on real MNIST (100 Adam steps at lr 0.01,
batch 1000), saved with ``save_weights`` and given to the command line with
``--checkpoint``. The repair re-estimates over one pass of the MNIST training set and is
evaluated on the whole test set. Keras runs on its torch backend (keras_import.py).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from examples_import import EXAMPLES, import_example
from keras_import import import_keras

keras = import_keras()

from bnlab.doctor import check, sources
from bnlab.doctor.backends import load
from bnlab.doctor.backends.keras import repair as keras_repair
from bnlab.doctor.command import main
from bnlab.doctor.errors import UsageError
from bnlab.doctor.repair import repair, repair_report, split_shared

QUESTION = f"{EXAMPLES / 'question_keras.py'}:functional_model"
STEPS = 100


def _state(model) -> list[np.ndarray]:
    """Every variable of the model (weights and moving statistics), as numpy copies."""
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.variables]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _accuracy(model, batches) -> float:
    """Plain inference-mode accuracy, computed here (not by the code under test)."""
    hits = total = 0
    for x, y in batches:
        pred = keras.ops.convert_to_numpy(model(x, training=False)).argmax(axis=1)
        hits, total = hits + int((pred == y).sum()), total + len(y)
    return hits / total


@pytest.fixture(scope="module")
def mnist_source():
    return sources.builtin_source(
        "mnist", import_example("question_keras").functional_model(), load("keras"), None, 1000, 0
    )


@pytest.fixture(scope="module")
def trained(mnist_source):
    """The question's functional model after STEPS Adam steps on MNIST training batches."""
    keras.utils.set_random_seed(0)
    model = import_example("question_keras").functional_model()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    for x, y in itertools.islice(mnist_source.train_batches, STEPS):
        model.train_on_batch(x, y)
    return model


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keras") / "question.weights.h5"
    trained.save_weights(path)
    return path


def test_repair_splits_the_shared_bn_and_restores_inference_accuracy(trained, mnist_source) -> None:
    model = trained
    state, layer_ids = _state(model), [id(layer) for layer in model.layers]
    fixed = repair_report(model, mnist_source.fit_batches(), mnist_source.held_out)
    # the model given is unchanged: same layers (still one shared "bn"), same variables
    assert _same(state, _state(model)) and [id(layer) for layer in model.layers] == layer_ids
    assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)] == ["bn"]
    assert fixed.framework == "keras" and fixed.splits == {"bn": 2}
    assert [c for c in fixed.changes if c["change"] == "split"] == [
        {
            "change": "split",
            "where": "bn",
            "calls": 2,
            "sites": ["call 1 after l1", "call 2 after l2"],
            "into": ["bn_l1", "bn_l2"],
            "layout": keras_repair.LAYOUT,
        }
    ]
    reestimated = [c for c in fixed.changes if c["change"] == "re-estimated"]
    assert [(c["where"], c["from"], c["batches"]) for c in reestimated] == [("bn_l1", "bn", 60), ("bn_l2", "bn", 60)]
    before, after = fixed.before, fixed.after
    assert before["samples"] == after["samples"] == 10000
    assert before["val_acc"] == pytest.approx(_accuracy(model, mnist_source.held_out), abs=1e-12)
    assert after["val_acc"] == pytest.approx(_accuracy(fixed.model, mnist_source.held_out), abs=1e-12)
    assert after["val_acc"] > before["val_acc"] + 0.02
    assert after["val_loss"] < before["val_loss"]
    assert after["train_eval_agreement"] > 0.97 > before["train_eval_agreement"]
    # no weight was trained: kernels, gamma and beta are the trained model's
    new = fixed.model
    assert np.array_equal(new.get_layer("l2").get_weights()[0], model.get_layer("l2").get_weights()[0])
    for site in ("bn_l1", "bn_l2"):
        assert _same(new.get_layer(site).get_weights()[:2], model.get_layer("bn").get_weights()[:2])
    # bn_l2's moving mean is the plain average of its input's batch means
    feed = keras.Model(new.inputs[0], new.get_layer("l2").output)
    means = [keras.ops.convert_to_numpy(feed(x, training=True)).mean(axis=0) for x, _ in mnist_source.fit_batches()]
    got = keras.ops.convert_to_numpy(new.get_layer("bn_l2").moving_mean)
    np.testing.assert_allclose(got, np.mean(means, axis=0), rtol=1e-4, atol=1e-4)
    x, y = mnist_source.held_out[0]
    assert "shared-bn" not in {f.check for f in check(new, x, labels=y).findings}


def test_repair_returns_only_the_model_and_split_shared_rebuilds_it(trained, mnist_source) -> None:
    fixed = repair(trained, list(mnist_source.fit_batches())[:3])
    assert isinstance(fixed, keras.Model) and fixed is not trained
    rebuilt = split_shared(trained, {"bn": 2})  # the repaired layout, statistics as given
    assert [layer.name for layer in rebuilt.layers][1:] == [layer.name for layer in fixed.layers][1:]
    assert _same(rebuilt.get_layer("bn_l1").get_weights(), trained.get_layer("bn").get_weights())


def test_fix_writes_a_loadable_keras_model(trained, checkpoint, mnist_source, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fixed"
    code = main([QUESTION, "--checkpoint", str(checkpoint), "--data", "mnist", "--fix", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1  # the model given has a shared BN: the report's exit code stands
    assert report["framework"] == "keras" and report["probe"]["train_steps"] == 0  # judged as trained
    repair_ = report["repair"]
    assert repair_["framework"] == "keras"
    # the checkpoint is the fixture's model: "before" is its accuracy on the test set
    assert repair_["before"]["val_acc"] == pytest.approx(_accuracy(trained, mnist_source.held_out), abs=1e-12)
    assert repair_["after"]["val_acc"] > repair_["before"]["val_acc"] + 0.02
    assert repair_["after"]["val_loss"] < repair_["before"]["val_loss"]
    assert sorted(p.name for p in out.iterdir()) == ["HOW_TO_LOAD.txt", "model.keras", "repair.json"]
    loaded = keras.models.load_model(out / "model.keras")  # safe_mode=True, the default
    names = [layer.name for layer in loaded.layers]
    assert "bn_l1" in names and "bn_l2" in names and "bn" not in names
    assert _accuracy(loaded, mnist_source.held_out) == pytest.approx(repair_["after"]["val_acc"], abs=1e-12)
    assert keras_repair.evaluate(loaded, mnist_source.held_out) == pytest.approx(repair_["after"], abs=1e-9)
    record = json.loads((out / "repair.json").read_text())
    assert record["weights"] == "model.keras" and record["repair"]["after"] == repair_["after"]
    how_to = (out / "HOW_TO_LOAD.txt").read_text()
    assert f"keras.models.load_model({str(out / 'model.keras')!r})" in how_to
    assert "bn -> bn_l1, bn_l2." in how_to


def test_fix_refuses_to_overwrite(checkpoint, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fixed"
    out.mkdir()
    (out / "model.keras").write_bytes(b"mine")
    args = [QUESTION, "--checkpoint", str(checkpoint), "--data", "mnist", "--fix", str(out)]
    assert main(args) == 2
    assert "model.keras already exist" in capsys.readouterr().err
    assert (out / "model.keras").read_bytes() == b"mine" and len(list(out.iterdir())) == 1
    assert main([*args, "--overwrite"]) == 1
    assert "wrote" in capsys.readouterr().out
    assert "bn_l2" in [layer.name for layer in keras.models.load_model(out / "model.keras").layers]


def test_subclassed_model_is_refused_before_any_work(mnist_source, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fixed"
    target = f"{EXAMPLES / 'question_keras.py'}:MyModel"
    assert main([target, "--data", "mnist", "--train-steps", "0", "--fix", str(out)]) == 2
    captured = capsys.readouterr()
    assert "MyModel is a subclassed keras.Model" in captured.err
    assert "its own BatchNormalization in __init__" in captured.err
    assert captured.out == "" and not out.exists()
    with pytest.raises(UsageError, match="functional API"):
        repair(import_example("question_keras").MyModel(), list(mnist_source.fit_batches())[:1])


def test_keras_checkpoint_of_another_kind_is_an_input_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"not keras")
    assert main([QUESTION, "--checkpoint", str(path), "--data", "mnist"]) == 2
    assert ".weights.h5" in capsys.readouterr().err


def test_answer_is_only_reestimated(mnist_source) -> None:
    model = import_example("answer_keras").functional_model()
    new, changes = keras_repair.repair(model, list(mnist_source.fit_batches())[:2])
    assert [(c["change"], c["where"], c["from"]) for c in changes] == [
        ("re-estimated", "bn1", "bn1"),
        ("re-estimated", "bn2", "bn2"),
    ]
    assert np.allclose(keras.ops.convert_to_numpy(model.get_layer("bn1").moving_mean), 0.0)
    assert not np.allclose(keras.ops.convert_to_numpy(new.get_layer("bn1").moving_mean), 0.0)


def test_frozen_bn_is_kept(mnist_source) -> None:
    model = import_example("answer_keras").functional_model()
    model.get_layer("bn1").trainable = False  # a frozen, pretrained BN
    new, changes = keras_repair.repair(model, list(mnist_source.fit_batches())[:2])
    assert {"change": "kept", "where": "bn1", "why": keras_repair.FROZEN} in changes
    assert np.allclose(keras.ops.convert_to_numpy(new.get_layer("bn1").moving_mean), 0.0)
    assert not np.allclose(keras.ops.convert_to_numpy(new.get_layer("bn2").moving_mean), 0.0)


def test_sequential_and_nested_functional_models_are_split(mnist_source) -> None:
    layers = keras.layers
    batches = list(mnist_source.fit_batches())[:2]
    bn = layers.BatchNormalization(name="bn")
    sequential = keras.Sequential(
        [keras.Input((784,)), layers.Dense(16, name="a"), bn, layers.Dense(16, name="b"), bn, layers.Dense(10)]
    )
    new, changes = keras_repair.repair(sequential, batches)
    assert [c["into"] for c in changes if c["change"] == "split"] == [["bn_a", "bn_b"]]
    assert len(bn._inbound_nodes) == 2  # the given model's shared layer is as it was
    inner_in = keras.Input((16,))
    shared = layers.BatchNormalization(name="bn")
    h = shared(layers.Dense(16, name="a")(inner_in))
    inner = keras.Model(inner_in, shared(layers.Dense(16, name="b")(h)), name="inner")
    x = keras.Input((784,))
    nested = keras.Model(x, layers.Dense(10)(inner(layers.Dense(16, name="stem")(x))))
    new, changes = keras_repair.repair(nested, batches)
    split = next(c for c in changes if c["change"] == "split")
    assert split["where"] == "inner.bn" and split["into"] == ["inner.bn_a", "inner.bn_b"]
    assert split["sites"] == ["call 1 after inner.a", "call 2 after inner.b"]


def test_a_sub_model_called_twice_is_refused(mnist_source) -> None:
    layers = keras.layers
    inner_in = keras.Input((16,))
    block = keras.Model(inner_in, layers.BatchNormalization(name="bn")(layers.Dense(16)(inner_in)), name="block")
    x = keras.Input((784,))
    model = keras.Model(x, layers.Dense(10)(block(block(layers.Dense(16)(x)))))
    with pytest.raises(UsageError, match="block.bn was split into 1 layers, not 2"):
        keras_repair.repair(model, list(mnist_source.fit_batches())[:1])


def test_fix_on_the_tensorflow_backend_in_a_subprocess(checkpoint, mnist_source, tmp_path: Path) -> None:
    """The same command on Keras's TensorFlow backend; its model.keras loads here (torch)."""
    pytest.importorskip("tensorflow")
    out = tmp_path / "fixed-tf"
    script = (
        "import json, sys\n"
        "import keras\n"
        "from bnlab.doctor import sources\nfrom bnlab.doctor.backends import load\nfrom bnlab.doctor.backends.keras import repair as keras_repair\n"
        "from bnlab.doctor.command import main\n"
        "assert keras.backend.backend() == 'tensorflow'\n"
        "code = main([sys.argv[1], '--checkpoint', sys.argv[2], '--data', 'mnist', '--fix', sys.argv[3], '--json'])\n"
        "model = keras.models.load_model(sys.argv[3] + '/model.keras')\n"
        "held = sources.builtin_source('mnist', model, load('keras'), None, 1000, 0).held_out\n"
        "print('LOADED', json.dumps({'code': code, 'after': keras_repair.evaluate(model, held)}))\n"
    )
    env = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "PYTHONPATH": str(EXAMPLES.parent / "src"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CUDA_VISIBLE_DEVICES": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", script, QUESTION, str(checkpoint), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert "LOADED" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    report_text, _, loaded_text = result.stdout.rpartition("LOADED")
    report, loaded = json.loads(report_text), json.loads(loaded_text)
    assert loaded["code"] == 1 and report["repair"]["framework"] == "keras"
    after, before = report["repair"]["after"], report["repair"]["before"]
    assert after["val_acc"] > before["val_acc"] + 0.02
    assert loaded["after"] == pytest.approx(after, abs=1e-9)  # written and read back on TensorFlow
    # the archive is backend-neutral: on torch it gives the same predictions but for rounding
    assert _accuracy(keras.models.load_model(out / "model.keras"), mnist_source.held_out) == pytest.approx(
        after["val_acc"], abs=3e-4
    )
