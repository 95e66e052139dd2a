"""The doctor inside Keras's ``model.fit``: ``callbacks=[BNDoctorCallback()]``.

    KERAS_BACKEND=torch PYTHONPATH=src python examples/keras_fit_callback.py [--shared]
    KERAS_BACKEND=tensorflow PYTHONPATH=src python examples/keras_fit_callback.py [--shared]

Trains the question's MLP (784-100-100-10, ``examples/answer_keras.py``; with ``--shared``
the question's bug, ``examples/question_keras.py``: one BatchNormalization after both
hidden layers) for 2 epochs on 6,000 real MNIST images (batch 200), with the callback.
At the end of fit the callback prints the doctor's report; ``fail_on="error"`` turns an
error into ``BNDoctorFailed`` once fit is over. Exit status: the report's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import answer_keras  # noqa: E402
import question_keras  # noqa: E402

from bnlab.data import load_mnist, to_float  # noqa: E402
from bnlab.doctor.keras import BNDoctorCallback, BNDoctorFailed  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", action="store_true", help="one BN after both layers (the question's bug)")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    data = load_mnist()
    x, y = to_float(data.train_images)[:6000], np.asarray(data.train_labels)[:6000].astype("int64")
    model = (question_keras if args.shared else answer_keras).functional_model()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    doctor = BNDoctorCallback(fail_on="error")  # prints the report when fit ends
    try:
        model.fit(x, y, batch_size=200, epochs=2, validation_split=0.1, verbose=0, callbacks=[doctor])
    except BNDoctorFailed as failed:
        print(f"fit ended with: {failed}")
    assert doctor.report is not None
    return doctor.report.exit_code


if __name__ == "__main__":
    sys.exit(main())
