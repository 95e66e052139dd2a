"""Real ``model.fit`` runs with ``BNDoctorCallback`` on the Keras backend named by
KERAS_BACKEND; prints one JSON line of what happened (run by test_doctor_keras_fit.py,
once per backend, in a subprocess: Keras reads KERAS_BACKEND at its first import).

    KERAS_BACKEND=tensorflow python tests/doctor/keras_fit_scenarios.py MNIST_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import answer_keras  # noqa: E402
import question_keras  # noqa: E402

from bnlab.data import load_mnist, to_float  # noqa: E402
from bnlab.doctor.keras import BNDoctorCallback  # noqa: E402


def fit(model, data, callback=None, epochs=2):
    (x, y), validation = data
    keras.utils.set_random_seed(1)
    history = model.fit(
        x,
        y,
        batch_size=100,
        epochs=epochs,
        verbose=0,
        validation_data=validation,
        callbacks=[] if callback is None else [callback],
    )
    return history.history


def built(make):
    keras.utils.set_random_seed(0)
    model = make()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def summary(report):
    shared = report.by_check("shared-bn")
    return {
        "findings": [[f.check, f.severity, f.where, f.sites] for f in report.findings],
        "steps": report.probe["watched_steps"],
        "passes": report.probe["watched_passes"],
        "source": report.probe["source"],
        "updates_per_step": shared[0].data["updates_per_step"] if shared else None,
    }


def wrapped(model) -> list[str]:
    """Attributes the watch put on the model or its layers (none once fit is over)."""
    left = [layer.name for layer in model._flatten_layers() if "call" in vars(layer)]
    function = vars(model).get("train_function")
    return left + (["train_function"] if hasattr(function, "__bnlab_original__") else [])


def main(mnist_dir: str) -> None:
    mnist = load_mnist(mnist_dir)
    x, y = to_float(mnist.train_images), np.asarray(mnist.train_labels).astype("int64")
    data = ((x[:2000], y[:2000]), (x[2000:2500], y[2000:2500]))
    out: dict = {"backend": keras.backend.backend()}

    shared = built(question_keras.functional_model)
    callback = BNDoctorCallback(echo=None)
    history = fit(shared, data, callback)
    out["shared"] = summary(callback.report)
    plain = built(question_keras.functional_model)
    plain_history = fit(plain, data)  # the same fit without the callback
    out["same_weights"] = all(
        np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
        for a, b in zip(plain.variables, shared.variables, strict=True)
    )
    out["same_history"] = plain_history == history
    again = BNDoctorCallback(echo=None)  # a second fit reuses fit's compiled step
    fit(shared, data, again, epochs=1)
    out["shared_again"] = summary(again.report)
    out["wrapped"] = wrapped(shared)

    per_layer = built(answer_keras.functional_model)
    callback = BNDoctorCallback(echo=None)
    fit(per_layer, data, callback)
    out["per_layer"] = summary(callback.report)

    subclassed = built(question_keras.MyModel)
    callback = BNDoctorCallback(echo=None)
    fit(subclassed, data, callback, epochs=1)
    out["subclassed"] = summary(callback.report)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
