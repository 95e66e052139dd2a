"""The question's story on real MNIST: the shared BN is found, with evidence; the fix is clean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnlab import doctor


def batches(train_x, train_y, seed=0, size=1000):
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.choice(len(train_x), size, replace=False)
        yield train_x[idx], train_y[idx]


def run(model, mnist_arrays, steps=60):
    train_x, train_y, test_x, test_y = mnist_arrays
    return doctor.check(
        model, test_x[:1000], labels=test_y[:1000], train_steps=steps, train_batches=batches(train_x, train_y)
    )


def sites_of(report):
    (finding,) = report.by_check("shared-bn")
    return finding


def assert_seed_story(question, answer):
    shared = sites_of(question)
    assert shared.severity == "error" and question.exit_code == 1
    assert shared.sites == ["call 1 after l1", "call 2 after l2"]
    # Each site is further from the running statistics than any layer of the fixed model.
    answer_shift = max(site["mean_shift"] for layer in answer.summary["layers"] for site in layer["sites"])
    assert min(s["mean_shift"] for s in shared.data["sites"]) > 2 * answer_shift
    assert shared.data["between_sites"]["mean_shift"] > 0.5
    # Train and eval mode disagree far more often than for the fixed model.
    assert question.summary["train_eval"]["differ"] > 2 * answer.summary["train_eval"]["differ"]
    assert question.summary["train_eval"]["acc_eval"] < answer.summary["train_eval"]["acc_eval"]
    assert answer.exit_code == 0 and not answer.warnings


@pytest.fixture(scope="module")
def torch_reports(mnist_arrays, examples_on_path):
    from answer_torch import MyModel as Answer
    from question_torch import MyModel as Question

    torch.manual_seed(0)
    question = run(Question(), mnist_arrays)
    torch.manual_seed(0)
    answer = run(Answer(), mnist_arrays)
    return question, answer


def test_seed_torch(torch_reports):
    assert_seed_story(*torch_reports)


@pytest.mark.chainer
def test_seed_chainer(mnist_arrays, examples_on_path):
    pytest.importorskip("chainer")
    from answer_chainer import MyModel as Answer
    from question_chainer import MyModel as Question

    np.random.seed(0)
    question = run(Question(), mnist_arrays)
    np.random.seed(0)
    answer = run(Answer(), mnist_arrays)
    assert_seed_story(question, answer)
