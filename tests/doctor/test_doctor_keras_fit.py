"""``BNDoctorCallback`` in real Keras 3 ``model.fit`` runs on real MNIST: in-process on the
backend keras_import picks (torch; ``make test`` runs this file again on TensorFlow), and
keras_fit_scenarios.py in a subprocess per backend (torch, TensorFlow, JAX); ``watch``
around a custom Keras loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from keras_import import import_keras

from bnlab import doctor

REPO = Path(__file__).resolve().parents[2]
keras = import_keras()
layers = keras.layers

from bnlab.doctor.keras import BNDoctorCallback, BNDoctorFailed  # noqa: E402


@pytest.fixture(scope="module")
def mnist_fit(mnist_arrays):
    train_x, train_y = mnist_arrays[0][:2000], mnist_arrays[1][:2000]
    return train_x, train_y


def mlp(shared: bool, frozen: bool = False) -> keras.Model:
    """The question's MLP, narrower: one BN after both Dense layers, or one BN each."""
    x = keras.Input((784,))
    first = layers.BatchNormalization(momentum=0.9, name="bn1")
    second = first if shared else layers.BatchNormalization(momentum=0.9, name="bn2")
    first.trainable = second.trainable = not frozen
    h = layers.Activation("relu")(first(layers.Dense(64, use_bias=False, name="l1")(x)))
    h = layers.Activation("relu")(second(layers.Dense(64, use_bias=False, name="l2")(h)))
    return keras.Model(x, layers.Dense(10, name="out")(h))


def fit(model, data, callback, optimizer=None, batch_size=100) -> None:
    keras.utils.set_random_seed(0)
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(*data, batch_size=batch_size, epochs=1, verbose=0, callbacks=[callback])


def wrappers_left(model) -> list[str]:
    found = [layer.name for layer in model._flatten_layers() if "call" in vars(layer)]
    return found + (["model.call"] if "call" in vars(model) else [])


@pytest.mark.parametrize("backend", ["torch", "tensorflow", "jax"])
def test_fit_on_each_backend_in_a_subprocess(backend, mnist_dir) -> None:
    """Shared BN -> error naming both sites, 2 updates per step; per-layer BN -> no error;
    the same fit without the callback gives the same weights and history."""
    if keras.backend.backend() != "torch":
        pytest.skip("run once, with the torch suite (each backend in its own subprocess)")
    if backend != "torch":
        pytest.importorskip(backend)
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(REPO / "src"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    script = Path(__file__).with_name("keras_fit_scenarios.py")
    done = subprocess.run(
        [sys.executable, str(script), mnist_dir], capture_output=True, text=True, env=env, timeout=500, check=False
    )
    line = next((row for row in done.stdout.splitlines() if row.startswith("RESULT ")), None)
    assert line is not None, done.stdout + done.stderr
    result = json.loads(line[len("RESULT ") :])
    assert result["backend"] == backend
    for case, steps in (("shared", 40), ("shared_again", 20), ("subclassed", 20)):
        seen = result[case]
        errors = [f for f in seen["findings"] if f[1] == "error"]
        assert errors == [["shared-bn", "error", "bn", ["call 1 after l1", "call 2 after l2"]]], (case, seen)
        assert seen["steps"] == steps and seen["updates_per_step"] == 2.0, (case, seen)
    assert not [f for f in result["per_layer"]["findings"] if f[1] in ("error", "warning")]
    assert result["per_layer"]["steps"] == 40
    assert result["same_weights"] and result["same_history"]
    assert result["wrapped"] == []
    sources = {
        "torch": "(last training batch seen by watch)",  # eager steps: the model sees the data
        "jax": "(last training batch of fit)",  # compiled steps: the batch fit's step took
        "tensorflow": "(a batch of fit's training data, read after training)",  # from fit's dataset
    }
    assert result["shared"]["source"] == sources[backend]


def test_fail_on_error_raises_after_fit_and_removes_the_wrappers(mnist_fit, capsys) -> None:
    keras.utils.set_random_seed(0)
    model = mlp(shared=True)
    callback = BNDoctorCallback(fail_on="error")
    with pytest.raises(BNDoctorFailed, match=r"\[shared-bn\]"):
        fit(model, mnist_fit, callback)
    assert "ERROR [shared-bn]" in capsys.readouterr().out  # printed before raising
    report = callback.report
    assert report.exit_code == 1 and report.probe["watched_steps"] == 20
    (finding,) = report.by_check("shared-bn")
    assert finding.sites == ["call 1 after l1", "call 2 after l2"]
    assert "40 train-mode calls in 20 training steps" in " ".join(finding.evidence)
    assert wrappers_left(model) == []
    assert not hasattr(vars(model).get("train_function"), "__bnlab_original__")


def test_per_layer_bn_passes_and_small_last_batch_is_seen(mnist_fit) -> None:
    keras.utils.set_random_seed(0)
    model = mlp(shared=False)
    callback = BNDoctorCallback(fail_on="error", echo=None)
    x, y = mnist_fit
    fit(model, (x[:1003], y[:1003]), callback)  # 10 batches of 100, then 3 images
    report = callback.report
    assert not report.errors, report.to_text()
    assert report.probe["watched_steps"] == 11
    small = report.by_check("small-batch")
    if keras.backend.backend() != "torch":  # the step traced for any batch size shows no sizes
        assert not small
        return
    assert {f.where for f in small} == {"bn1", "bn2"}
    assert all(f.data["batch_size"] == 3 and f.severity == "warning" for f in small)


def test_weight_decay_seen_in_the_compiled_optimizer(mnist_fit) -> None:
    keras.utils.set_random_seed(0)
    callback = BNDoctorCallback(echo=None)
    fit(mlp(shared=False), mnist_fit, callback, optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-3))
    (finding,) = callback.report.by_check("bn-weight-decay")
    assert finding.data["weight_decay"] == {"bn1": 1e-3, "bn2": 1e-3}
    assert "exclude_from_weight_decay" in finding.fix_code

    clean = keras.optimizers.AdamW(1e-3, weight_decay=1e-3)
    clean.exclude_from_weight_decay(var_names=["gamma", "beta"])
    callback = BNDoctorCallback(echo=None)
    fit(mlp(shared=False), mnist_fit, callback, optimizer=clean)
    assert not callback.report.by_check("bn-weight-decay")


def test_frozen_bn_at_init_is_an_error(mnist_fit) -> None:
    """trainable=False runs BN in inference mode (Keras's freeze): statistics stay 0/1."""
    keras.utils.set_random_seed(0)
    callback = BNDoctorCallback(echo=None)
    fit(mlp(shared=False, frozen=True), mnist_fit, callback)
    errors = callback.report.by_check("stats-never-updated")
    assert {f.where for f in errors} == {"bn1", "bn2"}
    assert errors[0].data["eval_mode_steps"] == 20


def test_bad_fail_on_is_refused() -> None:
    with pytest.raises(ValueError, match="fail_on"):
        BNDoctorCallback(fail_on="always")


def test_watch_around_a_custom_keras_loop(mnist_fit) -> None:
    """Keras on torch, the documented custom loop: torch autograd, a Keras optimizer."""
    if keras.backend.backend() != "torch":
        pytest.skip("a custom loop written with torch autograd")
    import torch

    keras.utils.set_random_seed(0)
    model, (x, y) = mlp(shared=True), mnist_fit
    optimizer = keras.optimizers.SGD(0.05)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model(x[:2])
    optimizer.build(model.trainable_variables)
    with doctor.watch(model, optimizer=optimizer) as w:
        for start in range(0, 1000, 100):
            loss = loss_fn(y[start : start + 100], model(x[start : start + 100], training=True))
            model.zero_grad()
            loss.backward()
            grads = [v.value.grad for v in model.trainable_variables]
            with torch.no_grad():
                optimizer.apply(grads, model.trainable_variables)
            model(x[:100], training=False)  # validation: a pass, not a step
    assert w.steps == 10 and w.passes == 20
    report = w.report()
    (finding,) = report.by_check("shared-bn")
    assert finding.severity == "error" and finding.data["updates_per_step"] == 2.0
    assert wrappers_left(model) == []


def test_the_fit_example_runs(mnist_dir) -> None:
    """examples/keras_fit_callback.py as documented (torch backend): the answer passes,
    the question's shared BN fails after fit with the error naming both sites."""
    if keras.backend.backend() != "torch":
        pytest.skip("run once, with the torch suite")
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(REPO / "src")}
    script = REPO / "examples" / "keras_fit_callback.py"
    runs = {
        flag: subprocess.run(
            [sys.executable, str(script), *([flag] if flag else [])],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        for flag in ("", "--shared")
    }
    assert runs[""].returncode == 0, runs[""].stdout + runs[""].stderr
    assert "0 errors, 0 warnings" in runs[""].stdout
    shared = runs["--shared"]
    assert shared.returncode == 1, shared.stdout + shared.stderr
    assert "where: bn -- call 1 after l1; call 2 after l2" in shared.stdout
    assert "updated 2 times per step" in shared.stdout.replace("\n      ", " ")
    assert "fit ended with: bnlab doctor found 1 error(s)" in shared.stdout
    assert "Traceback" not in shared.stderr


def test_a_fit_that_raises_leaves_wrappers_the_next_fit_removes(mnist_fit) -> None:
    class Bug(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                raise RuntimeError("the user's own bug")

    keras.utils.set_random_seed(0)
    model, callback = mlp(shared=False), BNDoctorCallback(echo=None)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(RuntimeError, match="the user's own bug"):
        model.fit(*mnist_fit, batch_size=100, epochs=1, verbose=0, callbacks=[callback, Bug()])
    assert wrappers_left(model)  # Keras calls no callback when fit raises
    fit(model, mnist_fit, callback)
    assert wrappers_left(model) == []
    assert callback.report.probe["watched_steps"] == 20 and not callback.report.errors
