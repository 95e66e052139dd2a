"""What ``bnlab.doctor.keras.BNDoctorCallback`` costs in ``model.fit``, measured side by side.

The question's shared-BN MLP (examples/question_keras.py, functional) fits one epoch of
12,000 real MNIST images (batch 200: 60 steps, Adam 1e-3) per round, with and without
the callback; rounds interleaved ABBA, the first pair left out as warm-up. The callback's
time is split: the steps (measured from its first to its last training batch, against
the same span of the plain fit) and the report at the end of fit (one probe on a copy).

    KERAS_BACKEND=torch PYTHONPATH=src python bench/bench_keras_callback.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import question_keras  # noqa: E402

from bnlab.data import load_mnist, to_float  # noqa: E402
from bnlab.doctor.keras import BNDoctorCallback  # noqa: E402


class StepClock(keras.callbacks.Callback):
    """Seconds from the end of the first training batch to the end of the last."""

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        self.first = getattr(self, "first", now)
        self.last, self.batches = now, batch

    def per_step(self) -> float:
        return (self.last - self.first) / self.batches


def one_fit(model, x, y, watched: bool) -> tuple[float, float]:
    clock = StepClock()
    callbacks = [clock, BNDoctorCallback(echo=None)] if watched else [clock]
    model.fit(x, y, batch_size=200, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    return clock.per_step(), time.perf_counter() - clock.last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    data = load_mnist()
    x, y = to_float(data.train_images)[:12000], np.asarray(data.train_labels)[:12000].astype("int64")
    models = {}
    for watched in (False, True):
        keras.utils.set_random_seed(0)
        models[watched] = question_keras.functional_model()
        models[watched].compile(
            optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
    steps: dict[bool, list[float]] = {False: [], True: []}
    ends: list[float] = []
    for round_ in range(args.rounds + 1):
        order = (False, True) if round_ % 2 == 0 else (True, False)
        for watched in order:
            per_step, end = one_fit(models[watched], x, y, watched)
            if round_:
                steps[watched].append(per_step)
                if watched:
                    ends.append(end)
    plain, watched_ = statistics.median(steps[False]), statistics.median(steps[True])
    print(
        f"backend {keras.backend.backend()}: {plain * 1e3:.2f} ms a step plain, {watched_ * 1e3:.2f} ms "
        f"with the callback: {watched_ / plain:.3f}x (median of {args.rounds} rounds); "
        f"report at the end of fit: {statistics.median(ends):.2f} s"
    )


if __name__ == "__main__":
    main()
