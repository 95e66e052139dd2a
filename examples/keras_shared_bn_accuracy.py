"""Measure the question's bug in Keras 3: eval accuracy of the shared-BN MLP vs one BN per site.

Trains ``functional_model()`` of examples/question_keras.py and of
examples/answer_keras.py with model.fit (Adam 0.01, batch 1000, real MNIST, as the
question's program) and prints the test accuracy with moving statistics
(``training=False``) and with batch statistics (``training=True``).

    KERAS_BACKEND=torch python examples/keras_shared_bn_accuracy.py --epochs 20 --seeds 0

With ``--save DIR`` each trained model's weights go to DIR/{question,answer}-seedS.weights.h5,
for ``bnlab doctor examples/question_keras.py:functional_model --checkpoint
DIR/question-seed0.weights.h5 --data mnist --fix OUT``.
"""

import argparse
import sys
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from answer_keras import functional_model as answer
from question_keras import functional_model as question

from bnlab.data import load_mnist, to_float


def accuracy(model, x, y, training):
    hits = 0
    for start in range(0, len(x), 1000):
        out = keras.ops.convert_to_numpy(model(x[start : start + 1000], training=training))
        hits += int((out.argmax(axis=1) == y[start : start + 1000]).sum())
    return hits / len(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--save", type=Path, default=None, help="folder for the trained weights (.weights.h5)")
    args = parser.parse_args()
    data = load_mnist()
    train_x = to_float(data.train_images).reshape(-1, 784)
    train_y = np.asarray(data.train_labels).astype(np.int64)
    test_x = to_float(data.test_images).reshape(-1, 784)
    test_y = np.asarray(data.test_labels).astype(np.int64)
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, {args.epochs} epochs")
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, build, stem in (("shared BN", question, "question"), ("BN per site", answer, "answer")):
            keras.utils.set_random_seed(seed)
            model = build()
            model.compile(
                optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            )
            model.fit(train_x, train_y, batch_size=1000, epochs=args.epochs, shuffle=True, verbose=0)
            if args.save is not None:  # before the batch-statistics pass, which moves the moving statistics
                args.save.mkdir(parents=True, exist_ok=True)
                model.save_weights(args.save / f"{stem}-seed{seed}.weights.h5")
            print(
                f"seed {seed} {name:12s} eval accuracy (moving stats) "
                f"{accuracy(model, test_x, test_y, False):.3f}, batch stats "
                f"{accuracy(model, test_x, test_y, True):.3f}"
            )


if __name__ == "__main__":
    main()
