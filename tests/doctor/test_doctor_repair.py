"""The cure: ``bnlab.doctor.repair`` and ``bnlab doctor ... --fix OUT`` on PyTorch models.

Shared BNs are split per call site and running statistics re-estimated over real MNIST
training batches; the numbers before and after are eval-mode accuracy and loss on the
MNIST test set. Models are trained briefly (1-2 epochs), not the question's 100.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from trained_runs import train_preset

import bnlab.doctor
from bnlab.doctor import sources
from bnlab.doctor.backends import load
from bnlab.doctor.backends.torch import repair as repair_torch
from bnlab.doctor.command import main
from bnlab.doctor.repair import repair_report, split_shared
from bnlab.models import MLP, ModelConfig, build_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    """The question's program (one shared BN), 2 epochs, with its run directory."""
    out = tmp_path_factory.mktemp("runs") / "question-seed0"
    return train_preset("question", 2, out), out


@pytest.fixture(scope="module")
def mnist_source(question):
    result, _ = question
    return sources.builtin_source("mnist", result.model, load("torch"), None, 1000, 0)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_repair_splits_the_shared_bn_and_restores_eval_accuracy(question, mnist_source) -> None:
    result, _ = question
    model = result.model
    state = _state(model)
    fixed = repair_report(model, mnist_source.fit_batches(), mnist_source.held_out)
    assert _same_state(state, _state(model)) and isinstance(model.bn, nn.BatchNorm1d)
    assert isinstance(fixed.model, MLP) and fixed.model.cfg.norm == "per-layer"
    split = [c for c in fixed.changes if c["change"] == "split"]
    assert split == [
        {
            "change": "split",
            "where": "bn",
            "calls": 2,
            "sites": ["call 1 after l1", "call 2 after l2"],
            "into": ["bn1", "bn2"],
            "layout": "per-layer MLP",
        }
    ]
    before, after = fixed.before, fixed.after
    # before: the run's own final val acc (same model, same 10,000 test images)
    assert before["val_acc"] == pytest.approx(result.history[-1].val_acc, abs=1e-4)
    assert after["val_acc"] > before["val_acc"] + 0.02
    assert after["val_loss"] < before["val_loss"]
    assert after["train_eval_agreement"] > 0.97 > before["train_eval_agreement"]
    # the weights are the question's: only running statistics changed
    for key in ("l1.weight", "l2.weight", "l3.bias"):
        assert torch.equal(fixed.model.state_dict()[key], state[key])
    assert torch.equal(fixed.model.bn1.weight, model.bn.weight)
    assert torch.equal(fixed.model.bn2.bias, model.bn.bias)


def test_repair_returns_only_the_model(question, mnist_source) -> None:
    model = question[0].model
    fixed = bnlab.doctor.repair(model, mnist_source.fit_batches())
    assert isinstance(fixed, MLP) and fixed is not model and hasattr(fixed, "bn2")


def test_fix_writes_a_loadable_state_dict(question, tmp_path: Path, capsys) -> None:
    _, run = question
    out = tmp_path / "fixed"
    code = main([str(run), "--data", "mnist", "--fix", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1  # the model given has a shared BN: the report's exit code stands
    assert report["data"]["evaluation (--fix)"] == "the whole MNIST test set (10000 images)"
    assert report["data"]["re-estimation (--fix)"].startswith("one pass over the MNIST training set")
    repair = report["repair"]
    assert repair["after"]["val_acc"] > repair["before"]["val_acc"]
    assert repair["after"]["val_loss"] < repair["before"]["val_loss"]
    assert sorted(p.name for p in out.iterdir()) == ["HOW_TO_LOAD.txt", "model.pt", "repair.json"]
    state = torch.load(out / "model.pt", weights_only=True)
    cfg = dataclasses.replace(question[0].config.model, norm="per-layer")
    model = build_model(cfg)
    model.load_state_dict(state)  # the answer's layout
    test = sources.builtin_source("mnist", model, load("torch"), None, 1000, 0).held_out
    assert repair_torch.evaluate(model, test)["val_acc"] == pytest.approx(repair["after"]["val_acc"], abs=1e-9)
    record = json.loads((out / "repair.json").read_text())
    assert record["repair"]["after"] == repair["after"] and record["weights"] == "model.pt"
    assert "norm': 'per-layer'" in (out / "HOW_TO_LOAD.txt").read_text()


def test_fix_refuses_to_overwrite(question, tmp_path: Path, capsys) -> None:
    _, run = question
    out = tmp_path / "fixed"
    out.mkdir()
    (out / "model.pt").write_bytes(b"mine")
    assert main([str(run), "--fix", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err
    assert (out / "model.pt").read_bytes() == b"mine" and len(list(out.iterdir())) == 1
    assert main([str(run), "--fix", str(out), "--overwrite"]) == 1
    assert torch.load(out / "model.pt", weights_only=True)["bn1.running_mean"].shape == (100,)


def test_fix_needs_real_data(tmp_path: Path, capsys) -> None:
    target = f"{EXAMPLES / 'question_torch.py'}:MyModel"
    assert main([target, "--input-shape", "32,784", "--fix", str(tmp_path / "o")]) == 2
    assert "--fix re-estimates running statistics on real training data" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fix_without_checkpoint_says_it_repaired_the_factory_weights(tmp_path: Path, capsys) -> None:
    """The checks train a copy; --fix repairs the model NAME built, untrained unless NAME
    loads weights itself: the text and repair.json say so, and point at --checkpoint."""
    target = f"{EXAMPLES / 'question_torch.py'}:MyModel"
    out = tmp_path / "fixed"
    main([target, "--data", "mnist", "--train-steps", "2", "--fix", str(out)])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    note = "the repair was applied to the weights MyModel returned, not to the copy the checks trained for 2 steps"
    assert note in text and "give --checkpoint PATH" in text
    assert text.index(note) < text.index("val acc (eval mode)")  # read before the numbers
    (recorded,) = json.loads((out / "repair.json").read_text())["repair"]["notes"]
    assert recorded.startswith(note) and "--checkpoint" in recorded


def test_fix_with_checkpoint_has_no_factory_note_and_records_the_real_exit(tmp_path: Path, capsys) -> None:
    """With --checkpoint the weights repaired are the trained ones: no note. --fail-on never:
    the report in repair.json states exit 0, as the process and the summary line do."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import question_torch
    finally:
        sys.path.remove(str(EXAMPLES))
    checkpoint = tmp_path / "weights.pt"
    torch.save(question_torch.MyModel().state_dict(), checkpoint)
    out = tmp_path / "fixed"
    target = f"{EXAMPLES / 'question_torch.py'}:MyModel"
    args = [target, "--checkpoint", str(checkpoint), "--data", "mnist", "--fix", str(out), "--fail-on", "never"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "1 error, " in text and "-> exit 0" in text and "note:" not in text
    record = json.loads((out / "repair.json").read_text())
    assert (record["doctor"]["fail_on"], record["doctor"]["exit_code"]) == ("never", 0)
    assert record["repair"]["notes"] == []


# -- an arbitrary model: one module that dispatches by call order -----------------------------


def _question_torch_trained(mnist_source, steps: int = 40) -> nn.Module:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import question_torch
    finally:
        sys.path.remove(str(EXAMPLES))
    torch.manual_seed(0)
    model = question_torch.MyModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for x, y in itertools.islice(mnist_source.train_batches, steps):
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_arbitrary_model_gets_one_bn_per_call_site(mnist_source) -> None:
    model = _question_torch_trained(mnist_source)
    state = _state(model)
    fixed = repair_report(model, mnist_source.fit_batches(), mnist_source.held_out[:3])
    assert _same_state(state, _state(model))
    assert isinstance(fixed.model.bn, repair_torch.PerCallNorm)
    assert fixed.splits == {"bn": 2}
    assert fixed.after["train_eval_agreement"] > fixed.before["train_eval_agreement"]
    assert fixed.after["train_eval_agreement"] > 0.97
    # the two copies hold each call site's own statistics
    first, second = fixed.model.bn.per_call
    assert not torch.allclose(first.running_mean, second.running_mean)
    # the architecture rebuilt from the user's class loads the saved weights exactly
    rebuilt = split_shared(type(model)(), fixed.splits)
    rebuilt.load_state_dict(torch.load(_saved(fixed.model), weights_only=True))
    x = torch.from_numpy(mnist_source.probe_x)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), fixed.model.eval()(x))
        assert torch.equal(rebuilt(x), rebuilt(x))  # every pass starts at call site 1


def _saved(model: nn.Module):
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    return buffer


def test_reestimation_cures_reset_statistics(tmp_path: Path, mnist_source) -> None:
    answer = train_preset("answer", 1, tmp_path / "answer").model
    trained = repair_torch.evaluate(answer, mnist_source.held_out)["val_acc"]
    broken = copy.deepcopy(answer)
    for bn in (broken.bn1, broken.bn2):
        bn.reset_running_stats()  # e.g. a checkpoint loaded without its BN buffers
    fixed = repair_report(broken, mnist_source.fit_batches(), mnist_source.held_out)
    assert not fixed.splits
    assert fixed.before["val_acc"] < trained - 0.05
    assert fixed.after["val_acc"] == pytest.approx(trained, abs=0.01)
    assert torch.equal(broken.bn1.running_mean, torch.zeros(100))  # the broken copy is as given


def test_update_bn_and_the_hook_path_agree(mnist_source) -> None:
    model = build_model(ModelConfig(norm="per-layer"), seed=1)
    batches = list(mnist_source.fit_batches())[:5]
    by_update_bn, by_hooks = copy.deepcopy(model), copy.deepcopy(model)
    assert repair_torch.reestimate(by_update_bn, batches)["method"].endswith("update_bn")
    inputs = [(torch.from_numpy(x),) for x, _ in batches]
    with torch.no_grad():
        by_hooks.train()
        repair_torch._cumulative_by_hooks(by_hooks, [by_hooks.bn1, by_hooks.bn2], inputs)
    for name in ("bn1", "bn2"):
        a, b = getattr(by_update_bn, name), getattr(by_hooks, name)
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
    # the cumulative average of the five batches' statistics, by hand
    with torch.no_grad():
        h = [model.l1(x[0]) for x in inputs]
    expected = torch.stack([v.mean(0) for v in h]).mean(0)
    torch.testing.assert_close(by_update_bn.bn1.running_mean, expected)


def test_biased_variance_bn_is_reestimated_by_hooks(mnist_source) -> None:
    model = build_model(ModelConfig(norm="per-layer", running_var="biased"), seed=1)
    batches = list(mnist_source.fit_batches())[:3]
    new, changes = repair_torch.repair(model, batches)
    methods = {c["method"] for c in changes if c["change"] == "re-estimated"}
    assert methods == {"per-call momentum 1/k (cumulative average)"}
    with torch.no_grad():
        h = [model.l1(torch.from_numpy(x)) for x, _ in batches]
    expected = torch.stack([v.var(0, correction=0) for v in h]).mean(0)
    torch.testing.assert_close(new.bn1.running_var, expected)


class KeepsBnFrozen(nn.Module):
    """A model whose train() keeps its first BN in eval mode (a frozen, pretrained BN)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.bn1 = nn.Linear(784, 16), nn.BatchNorm1d(16)
        self.l2, self.bn2 = nn.Linear(16, 16), nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 10)
        with torch.no_grad():
            self.bn1.running_mean.fill_(0.5)

    def train(self, mode: bool = True) -> KeepsBnFrozen:
        super().train(mode)
        self.bn1.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn2(self.l2(torch.relu(self.bn1(self.l1(x)))))))


def test_frozen_bn_is_kept(mnist_source) -> None:
    model = KeepsBnFrozen()
    new, changes = repair_torch.repair(model, list(mnist_source.fit_batches())[:2])
    assert {
        "change": "kept",
        "where": "bn1",
        "why": "kept in eval mode by the model's train(): frozen on purpose",
    } in changes
    assert torch.equal(new.bn1.running_mean, torch.full((16,), 0.5))
    assert not np.allclose(new.bn2.running_mean.numpy(), 0.0)
