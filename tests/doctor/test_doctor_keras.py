"""The doctor on Keras 3 models: in-process on Keras's torch backend, one subprocess on
the TensorFlow backend. Skipped when keras is not installed.

Keras reads KERAS_BACKEND once, at its first import; the variable is set only around
that import (keras_import.import_keras) so that other tests' subprocesses do not inherit it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from keras_import import import_keras

from bnlab.doctor import check
from bnlab.doctor.command import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


keras = import_keras()


def test_keras_runs_on_the_backend_asked_for() -> None:
    """`make test` runs this file on torch and again on TensorFlow (BNLAB_TEST_KERAS_BACKEND)."""
    assert keras.backend.backend() == os.environ.get("BNLAB_TEST_KERAS_BACKEND", "torch")


layers = keras.layers


def _state(model) -> list[np.ndarray]:
    """Every variable of the model (weights and moving statistics), as numpy copies."""
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.variables]


def _mlp(bn_momentum: float = 0.9, shared: bool = True, width: int = 32) -> keras.Model:
    x = keras.Input((784,))
    shared_bn = layers.BatchNormalization(momentum=bn_momentum, name="bn")

    def bn(name: str):
        return shared_bn if shared else layers.BatchNormalization(momentum=bn_momentum, name=name)

    h = layers.Activation("relu")(bn("bn1")(layers.Dense(width, name="l1")(x)))
    h = layers.Activation("relu")(bn("bn2")(layers.Dense(width, name="l2")(h)))
    return keras.Model(x, layers.Dense(10, name="l3")(h))


@pytest.fixture(scope="module")
def probe_batch(mnist_arrays):
    train_x, train_y, test_x, test_y = mnist_arrays
    return test_x[:500], test_y[:500], [(train_x[i : i + 500], train_y[i : i + 500]) for i in range(0, 5000, 500)]


def test_shared_bn_cli_exit_1_names_both_call_sites(mnist_dir, capsys) -> None:
    target = f"{EXAMPLES / 'question_keras.py'}:functional_model"
    status = main([target, "--data", "mnist", "--data-dir", mnist_dir, "--train-steps", "15", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == 1
    assert report["framework"] == "keras"
    shared = [f for f in report["findings"] if f["check"] == "shared-bn"]
    assert len(shared) == 1 and shared[0]["severity"] == "error"
    assert shared[0]["sites"] == ["call 1 after l1", "call 2 after l2"]
    sites = shared[0]["data"]["sites"]
    assert [s["producer"] for s in sites] == ["l1", "l2"]
    assert all(s["mean_shift"] > 0 for s in sites)  # batch vs moving statistics per site
    assert shared[0]["data"]["train_eval"] is not None  # training=True vs training=False


def test_per_site_subclassed_cli_exit_0(mnist_dir, capsys) -> None:
    target = f"{EXAMPLES / 'answer_keras.py'}:MyModel"
    status = main([target, "--data", "mnist", "--data-dir", mnist_dir, "--train-steps", "15"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "MyModel (keras)" in out and "shared-bn" not in out
    assert "normalization layers: bn1, bn2 (each called once)" in out


def test_shared_subclassed_named_by_producer(probe_batch) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        from question_keras import MyModel
    finally:
        sys.path.remove(str(EXAMPLES))
    x, y, _ = probe_batch
    report = check(MyModel(), x, labels=y)
    shared = [f for f in report.findings if f.check == "shared-bn"]
    assert [f.severity for f in shared] == ["error"]
    assert shared[0].sites == ["call 1 after l1", "call 2 after l2"]
    assert "keras.layers.BatchNormalization(momentum=0.9" in shared[0].fix_code


def test_training_a_copy_leaves_the_model_unchanged(probe_batch) -> None:
    x, y, batches = probe_batch
    model = _mlp()
    model(x[:4], training=True)  # moving statistics no longer at their initial values
    before = _state(model)
    report = check(model, x, labels=y, train_steps=10, train_batches=batches)
    after = _state(model)
    assert len(before) == len(after)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert not model.compiled  # the doctor compiled its clone, not the user's model
    probe = report.probe
    assert probe["train_steps"] == 10 and probe["loss_last"] < probe["loss_first"]
    assert "train_eval_given" in report.summary  # the model as handed over was probed too


def test_training_steps_move_the_clones_statistics(probe_batch) -> None:
    from bnlab.doctor.backends.keras import probe as keras_probe

    x, y, batches = probe_batch
    result = keras_probe.probe(_mlp(shared=False), x, labels=y, train_steps=5, train_batches=batches)
    log = result.train_log
    assert log is not None and log.optimizer is not None and log.optimizer.kind == "Adam"
    assert {p: (u.forward_calls, u.changed) for p, u in log.updates.items()} == {"bn1": (5, True), "bn2": (5, True)}
    given, trained = result.given, result
    assert given is not None
    assert not np.array_equal(given.layers["bn1"].running_mean, trained.layers["bn1"].running_mean)


def test_momentum_convention_keras_weights_the_old_value(probe_batch) -> None:
    x, y, _ = probe_batch
    report = check(_mlp(bn_momentum=0.1, shared=False), x, labels=y)
    found = [f for f in report.findings if f.check == "momentum-convention"]
    assert sorted(f.where for f in found) == ["bn1", "bn2"]
    assert found[0].data["torch_momentum"] == 0.9 and found[0].data["suggested"] == 0.9
    assert "weights the OLD value" in found[0].fix and "momentum=0.9" in found[0].fix
    clean = check(_mlp(bn_momentum=0.99, shared=False), x, labels=y)
    assert not [f for f in clean.findings if f.check == "momentum-convention"]


def test_sequential_small_batch_and_frozen_layers() -> None:
    model = keras.Sequential([keras.Input((8,)), layers.Dense(16), layers.BatchNormalization(), layers.Dense(3)])
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    report = check(model, x)
    assert "small-batch" in {f.check for f in report.findings}
    assert report.framework == "keras"


def test_stats_reset_after_training(probe_batch) -> None:
    x, y, batches = probe_batch
    model = _mlp(shared=False)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    for bx, by in batches[:5]:
        model.train_on_batch(bx, by)
    for path in ("bn1", "bn2"):  # what a checkpoint loaded without the BN state looks like
        bn = model.get_layer(path)
        bn.moving_mean.assign(np.zeros(32, np.float32))
        bn.moving_variance.assign(np.ones(32, np.float32))
    report = check(model, x, labels=y)
    assert "stats-reset" in {f.check for f in report.findings}
    assert report.exit_code == 1


def _on_tensorflow(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -c script *args`` with Keras on its TensorFlow backend (CPU)."""
    env = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "PYTHONPATH": str(REPO / "src"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CUDA_VISIBLE_DEVICES": "",
    }
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_tensorflow_backend_in_a_subprocess(mnist_dir) -> None:
    """Keras on TensorFlow: shared BN -> 1, naming both sites; one BN per site -> 0."""
    pytest.importorskip("tensorflow")
    script = (
        "import sys\n"
        "from bnlab.doctor.command import main\n"
        "import keras\n"
        "assert keras.backend.backend() == 'tensorflow'\n"
        "codes = [main([sys.argv[1], '--data', 'mnist', '--data-dir', sys.argv[3], "
        "'--train-steps', '10']), main([sys.argv[2], '--data', 'mnist', '--data-dir', "
        "sys.argv[3], '--train-steps', '10'])]\n"
        "print('CODES', codes)\n"
    )
    result = _on_tensorflow(
        script,
        f"{EXAMPLES / 'question_keras.py'}:functional_model",
        f"{EXAMPLES / 'answer_keras.py'}:functional_model",
        mnist_dir,
    )
    assert "CODES [1, 0]" in result.stdout, result.stdout + result.stderr
    assert "call 1 after l1; call 2 after l2" in result.stdout
    assert "Traceback" not in result.stderr


def test_tensorflow_backend_input_shape_and_api_in_a_subprocess() -> None:
    """Keras on TensorFlow without --data: the shape trial and the class count of
    --input-shape run through the Keras backend (not torch's), and the API's check."""
    pytest.importorskip("tensorflow")
    script = (
        "import sys\n"
        "import keras, numpy as np\n"
        "from bnlab.doctor import check\n"
        "from bnlab.doctor.command import main\n"
        "assert keras.backend.backend() == 'tensorflow'\n"
        "code = main([sys.argv[1], '--input-shape', '64,784', '--train-steps', '3', '--json'])\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "import question_keras\n"
        "x = np.random.default_rng(0).standard_normal((64, 784), dtype=np.float32)\n"
        "report = check(question_keras.functional_model(), x)\n"
        "print('RESULT', code, report.framework, sorted({f.check for f in report.findings}))\n"
    )
    result = _on_tensorflow(script, f"{EXAMPLES / 'question_keras.py'}:functional_model", str(EXAMPLES))
    assert "RESULT 1 keras" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    assert "'shared-bn'" in result.stdout.rpartition("RESULT")[2]
    assert "Traceback" not in result.stderr


def test_detecting_a_torch_model_imports_no_keras() -> None:
    script = (
        "import sys, torch\n"
        "from bnlab.doctor.backends import detect\n"
        "print(detect(torch.nn.BatchNorm1d(3)).NAME, 'keras' in sys.modules, "
        "'tensorflow' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert result.stdout.split() == ["torch", "False", "False"], result.stderr


def test_repair_splits_the_shared_bn_and_reestimates(probe_batch) -> None:
    from bnlab.doctor.backends.keras import repair as keras_repair

    x, y, batches = probe_batch
    model = _mlp(width=64)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    for bx, by in batches * 3:
        model.train_on_batch(bx, by)
    before = _state(model)
    fixed, changes = keras_repair.repair(model, [bx for bx, _ in batches])
    assert all(np.array_equal(a, b) for a, b in zip(before, _state(model), strict=True))  # a NEW model
    assert [c["into"] for c in changes if c["change"] == "split"] == [["bn_l1", "bn_l2"]]
    # bn_l1's moving mean is the plain average of l1's batch means over the batches.
    l1 = fixed.get_layer("l1")
    means = [keras.ops.convert_to_numpy(l1(bx)).mean(axis=0) for bx, _ in batches]
    got = keras.ops.convert_to_numpy(fixed.get_layer("bn_l1").moving_mean)
    np.testing.assert_allclose(got, np.mean(means, axis=0), rtol=1e-4, atol=1e-4)

    def accuracy(m, training):
        return float((keras.ops.convert_to_numpy(m(x, training=training)).argmax(1) == y).mean())

    assert accuracy(fixed, False) > accuracy(model, False)
    assert "shared-bn" not in {f.check for f in check(fixed, x, labels=y).findings}


def test_tensorflow_logging_is_quieted_before_the_model_file_imports_keras(tmp_path: Path) -> None:
    """TF_CPP_MIN_LOG_LEVEL is read once, as TensorFlow is imported: by the user's file
    (``import keras``), so the Keras backend sets it before that file runs."""
    model_file = tmp_path / "seen.py"
    model_file.write_text(
        "import os\n"
        "LEVEL = os.environ.get('TF_CPP_MIN_LOG_LEVEL')\n"
        "import keras\n\n\n"
        "def build():\n"
        "    print('LEVEL AT IMPORT', LEVEL)\n"
        "    x = keras.Input((4,))\n"
        "    return keras.Model(x, keras.layers.Dense(2)(keras.layers.BatchNormalization()(x)))\n"
    )
    command = [sys.executable, "-m", "bnlab", "doctor", f"{model_file}:build", "--input-shape", "8,4"]
    base = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    for user_set, seen in (({}, "2"), ({"TF_CPP_MIN_LOG_LEVEL": "0"}, "0")):  # the user's own setting stands
        env = {**base, **user_set, "KERAS_BACKEND": "torch", "PYTHONPATH": str(REPO / "src")}
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
        assert f"LEVEL AT IMPORT {seen}" in result.stdout, result.stdout + result.stderr


def test_the_library_api_leaves_tensorflow_logging_alone() -> None:
    """Only the command line quiets TensorFlow: a notebook that calls bnlab.doctor.check
    (here on a torch model, which loads every backend to detect its framework) keeps its
    environment as it was."""
    script = (
        "import os, torch\n"
        "from bnlab.doctor import check\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))\n"
        "check(model, torch.randn(8, 4))\n"
        "print('LEVEL', os.environ.get('TF_CPP_MIN_LOG_LEVEL'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(REPO / "src")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "LEVEL None" in result.stdout, result.stdout + result.stderr
