"""Measure the question's bug in Flax (nnx or linen): eval accuracy of the shared-BN MLP vs
one BN per site, and of the shared one after ``bnlab.doctor.repair``.

Trains ``MyModel`` (``--api nnx``) or ``LinenModel`` (``--api linen``) of
examples/question_flax.py and of examples/answer_flax.py as the question's program does
(Adam 0.01, batch 1000, real MNIST, shuffled epochs; the usual loops: nnx's
``nnx.Optimizer`` + ``nnx.jit``, linen's jitted step keeping the ``batch_stats`` that
``apply(..., mutable=['batch_stats'])`` returns) and prints the test accuracy with running
statistics (eval mode) and with batch statistics (train mode). With ``--repair`` the
trained shared-BN model is also repaired by ``bnlab.doctor.repair`` (one BN per call site,
statistics re-estimated over one pass of the training set; no gradient step) and evaluated.

    python examples/flax_shared_bn_accuracy.py --epochs 20 --seeds 0,1,2 --repair
    python examples/flax_shared_bn_accuracy.py --api linen --epochs 20 --seeds 0,1,2 --repair

With ``--save DIR`` each trained model's weights go to DIR/{question,answer}-seedS.msgpack
(nnx: ``flax.serialization.msgpack_serialize(nnx.state(model).to_pure_dict())``; linen:
``flax.serialization.to_bytes(variables)``, as ``question-linen-seedS.msgpack``), for
``bnlab doctor examples/question_flax.py:MyModel --checkpoint DIR/question-seed0.msgpack
--data mnist --fix OUT`` (``:LinenModel`` with the linen file).
"""

import argparse
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from answer_flax import LinenModel as AnswerLinen
from answer_flax import MyModel as Answer
from question_flax import LinenModel as QuestionLinen
from question_flax import MyModel as Question

from bnlab.data import load_mnist, to_float


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model, x):
    return model(x).argmax(axis=1)


def accuracy(model, x, y, train_mode: bool) -> float:
    """Test accuracy with batch statistics (train mode) or running statistics (eval mode),
    in batches of 1000; the running statistics are put back after a train-mode pass."""
    saved = nnx.clone(nnx.state(model, nnx.BatchStat))
    model.train() if train_mode else model.eval()
    hits = sum(
        int((np.asarray(predict(model, x[i : i + 1000])) == y[i : i + 1000]).sum()) for i in range(0, len(x), 1000)
    )
    nnx.update(model, saved)
    return hits / len(x)


def train(build, seed: int, epochs: int, x: np.ndarray, y: np.ndarray):
    model = build(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(0.01), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x) - 999, 1000):
            idx = order[start : start + 1000]
            train_step(model, optimizer, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    return model


def train_linen(module, seed: int, epochs: int, x: np.ndarray, y: np.ndarray):
    """The variables of ``module`` after ``epochs`` epochs: a correct linen loop keeps the
    ``batch_stats`` that each training step's apply returns."""
    variables = module.init(jax.random.key(seed), jnp.asarray(x[:2]))
    tx = optax.adam(0.01)

    @jax.jit
    def step(variables, opt_state, bx, by):
        def loss_fn(params):
            out, updates = module.apply({**variables, "params": params}, bx, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(out, by).mean(), updates

        (_, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        moves, opt_state = tx.update(grads, opt_state, variables["params"])
        return {"params": optax.apply_updates(variables["params"], moves), **updates}, opt_state

    opt_state = tx.init(variables["params"])
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x) - 999, 1000):
            idx = order[start : start + 1000]
            variables, opt_state = step(variables, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    return module, variables


def linen_accuracy(model, x, y, train_mode: bool) -> float:
    """As :func:`accuracy` for a linen ``(module, variables)`` pair (train-mode updates dropped)."""
    module, variables = model
    predict_linen = jax.jit(lambda v, x: module.apply(v, x, train=train_mode, mutable=["batch_stats"])[0].argmax(1))
    hits = sum(
        int((np.asarray(predict_linen(variables, x[i : i + 1000])) == y[i : i + 1000]).sum())
        for i in range(0, len(x), 1000)
    )
    return hits / len(x)


# Per API: the two models, training, accuracy, the bytes of --save and the file name's tag.
APIS = {
    "nnx": (
        (("shared BN", Question, "question"), ("BN per site", Answer, "answer")),
        lambda build, seed, epochs, x, y: train(build, seed, epochs, x, y),
        accuracy,
        lambda model: flax.serialization.msgpack_serialize(nnx.state(model).to_pure_dict()),
        "",
    ),
    "linen": (
        (("shared BN", QuestionLinen, "question"), ("BN per site", AnswerLinen, "answer")),
        lambda build, seed, epochs, x, y: train_linen(build(), seed, epochs, x, y),
        linen_accuracy,
        lambda model: flax.serialization.to_bytes(model[1]),
        "-linen",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api", choices=sorted(APIS), default="nnx", help="which Flax API's models")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument(
        "--repair", action="store_true", help="also repair the shared-BN model with bnlab.doctor.repair"
    )
    parser.add_argument("--save", type=Path, default=None, help="folder for the trained states (.msgpack)")
    args = parser.parse_args()
    models, train_fn, accuracy_fn, to_bytes, tag = APIS[args.api]
    data = load_mnist()
    train_x = to_float(data.train_images).reshape(-1, 784)
    train_y = np.asarray(data.train_labels).astype(np.int32)
    test_x = to_float(data.test_images).reshape(-1, 784)
    test_y = np.asarray(data.test_labels).astype(np.int32)
    print(
        f"jax {jax.__version__}, flax {flax.__version__}, {jax.devices()[0].platform}, {args.api}, {args.epochs} epochs"
    )
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, build, stem in models:
            start = time.time()
            model = train_fn(build, seed, args.epochs, train_x, train_y)
            if args.save is not None:
                args.save.mkdir(parents=True, exist_ok=True)
                (args.save / f"{stem}{tag}-seed{seed}.msgpack").write_bytes(to_bytes(model))
            print(
                f"seed {seed} {name:12s} eval accuracy (running stats) "
                f"{accuracy_fn(model, test_x, test_y, False):.4f}, batch stats "
                f"{accuracy_fn(model, test_x, test_y, True):.4f} ({time.time() - start:.0f} s)",
                flush=True,
            )
            if args.repair and stem == "question":
                from bnlab.doctor import repair

                batches = ((train_x[i : i + 1000], train_y[i : i + 1000]) for i in range(0, len(train_x), 1000))
                fixed = repair(model, batches)
                print(
                    f"seed {seed} {'repaired':12s} eval accuracy (running stats) "
                    f"{accuracy_fn(fixed, test_x, test_y, False):.4f}, batch stats "
                    f"{accuracy_fn(fixed, test_x, test_y, True):.4f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
