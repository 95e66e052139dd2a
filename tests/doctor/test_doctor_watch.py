"""``watch`` around a user's own training loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from doctor_zoo import MLP, SharedBN

from bnlab import doctor


def data(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    return x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()


def train(model, x, y, *, epochs=3, batch=50, eval_mode=False, validate=False, lr=0.01):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.eval() if eval_mode else model.train()
        for start in range(0, len(x), batch):
            loss = F.cross_entropy(model(x[start : start + batch]), y[start : start + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if validate:
            model.eval()
            with torch.no_grad():
                model(x[:100])


def test_healthy_loop_with_validation_passes() -> None:
    torch.manual_seed(0)
    model, (x, y) = MLP(), data()
    with doctor.watch(model) as w:
        train(model, x, y, epochs=6, validate=True)
    report = w.report()
    assert w.steps == 24 and w.passes == 30  # validation passes are not training steps
    assert not report.errors and not report.warnings, report
    assert report.probe["watched_steps"] == 24
    assert report.probe["input_shape"] == [50, 20]


def test_watch_does_not_change_training() -> None:
    x, y = data()
    torch.manual_seed(0)
    plain = MLP()
    torch.manual_seed(0)
    watched = MLP()
    torch.manual_seed(1)
    train(plain, x, y)
    torch.manual_seed(1)
    with doctor.watch(watched):
        train(watched, x, y)
    for (key, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), key
    for module in watched.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_training_in_eval_mode_is_an_error() -> None:
    torch.manual_seed(0)
    model, (x, y) = MLP(), data()
    with doctor.watch(model) as w:
        train(model, x, y, eval_mode=True)
    report = w.report()
    errors = report.by_check("stats-never-updated")
    assert {f.where for f in errors} == {"bn1", "bn2"}
    assert all(f.severity == "error" for f in errors)
    assert "in eval mode in 12 of 12 steps" in " ".join(errors[0].evidence)
    assert "in your training loop" in report.to_text()
    assert report.exit_code == 1


def test_pretrained_bn_left_in_eval_mode_is_a_warning() -> None:
    torch.manual_seed(0)
    model, (x, y) = MLP(), data()
    train(model, x, y)  # pretraining, unwatched
    with doctor.watch(model) as w:
        train(model, x, y, epochs=1, eval_mode=True)
    report = w.report()
    (finding,) = report.by_check("eval-mode-training")
    assert finding.where == "bn1, bn2" and finding.data["eval_mode_steps"] == {"bn1": 4, "bn2": 4}
    assert not report.errors


def test_shared_bn_in_the_loop() -> None:
    torch.manual_seed(0)
    model, (x, y) = SharedBN(), data()
    with doctor.watch(model) as w:
        train(model, x, y)
    (finding,) = w.report().by_check("shared-bn")
    assert finding.severity == "error"
    assert finding.sites == ["call 1 after l1", "call 2 after l2"]


def test_small_final_batch_is_seen() -> None:
    torch.manual_seed(0)
    model, (x, y) = MLP(), data(n=203)  # batches of 50, then 3
    with doctor.watch(model) as w:
        train(model, x, y)
    (finding,) = [f for f in w.report().by_check("small-batch") if f.where == "bn1"]
    assert finding.severity == "warning"
    assert finding.data["values_per_channel"] == 3
    assert "3 train-mode pass(es)" in finding.evidence[0]


def test_batch_of_one_crashes_the_loop_but_the_report_explains() -> None:
    torch.manual_seed(0)
    model, (x, y) = MLP(), data(n=201)  # last batch: 1 sample -> PyTorch refuses
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        with doctor.watch(model) as w:
            train(model, x, y)
    finding = w.report().by_check("small-batch")[0]
    assert finding.severity == "error" and finding.data["values_per_channel"] == 1
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_report_only_after_the_block() -> None:
    model = MLP()
    with doctor.watch(model) as w, pytest.raises(RuntimeError, match="once the"):
        w.report()


def test_watch_rejects_non_torch_models() -> None:
    with pytest.raises(TypeError):
        doctor.watch(object())


def test_checkpoint_recomputation_updates_counted_per_step() -> None:
    from doctor_zoo import CheckpointedBN, CheckpointedNoBN

    x, y = data()
    for model_class, expect in ((CheckpointedBN, True), (CheckpointedNoBN, False)):
        torch.manual_seed(0)
        model = model_class()
        with doctor.watch(model) as w:
            train(model, x, y, epochs=15)  # 60 steps
        assert w.steps == 60
        assert int(model.bn.num_batches_tracked) == (120 if expect else 60)
        found = w.report().by_check("extra-stat-updates")
        assert bool(found) == expect, w.report()
        if expect:
            assert found[0].data["updates"] == 120 and found[0].data["forward_calls"] == 60


def test_functional_batch_norm_from_elsewhere_is_seen() -> None:
    from doctor_zoo import FunctionalBN

    torch.manual_seed(0)
    model, (x, y) = FunctionalBN(), data()
    with doctor.watch(model) as w:
        train(model, x, y)
    report = w.report()
    (finding,) = report.by_check("stats-updated-outside")
    assert finding.where == "bn"
    assert not report.by_check("unused-bn")


def test_unused_bn_is_not_updated_from_elsewhere() -> None:
    from doctor_zoo import QuestionWithSpareBN

    torch.manual_seed(0)
    model, (x, y) = QuestionWithSpareBN(), data()
    with doctor.watch(model) as w:
        train(model, x, y)
    assert not w.report().by_check("stats-updated-outside")


def test_weight_decay_on_bn_with_the_optimizer() -> None:
    torch.manual_seed(0)
    model, (x, y) = MLP(), data()
    decayed = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=1e-4)
    with doctor.watch(model, optimizer=decayed) as w:
        for start in range(0, 200, 50):
            loss = F.cross_entropy(model(x[start : start + 50]), y[start : start + 50])
            decayed.zero_grad()
            loss.backward()
            decayed.step()
    (finding,) = w.report().by_check("bn-weight-decay")
    assert finding.data["weight_decay"] == {"bn1": 1e-4, "bn2": 1e-4}
    assert finding.data["optimizer"] == "SGD"

    norm = [p for m in (model.bn1, model.bn2) for p in m.parameters()]
    other = [p for p in model.parameters() if all(p is not q for q in norm)]
    clean = torch.optim.SGD([{"params": other, "weight_decay": 1e-4}, {"params": norm, "weight_decay": 0.0}], lr=0.05)
    with doctor.watch(model) as w:  # found without optimizer=: it steps the model
        for start in range(0, 200, 50):
            loss = F.cross_entropy(model(x[start : start + 50]), y[start : start + 50])
            clean.zero_grad()
            loss.backward()
            clean.step()
    assert w.steps == 4
    assert not w.report().by_check("bn-weight-decay")


def test_steps_counted_without_a_checksum_of_the_parameters() -> None:
    """Hand-written updates under no_grad bump the version counters: still steps."""
    torch.manual_seed(0)
    model, (x, y) = MLP(), data()
    with doctor.watch(model) as w:
        for start in range(0, 200, 50):
            loss = F.cross_entropy(model(x[start : start + 50]), y[start : start + 50])
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
    assert w.steps == 4 and w.passes == 4


def test_conv_bn_on_two_images_warns() -> None:
    from doctor_zoo import ConvNet

    torch.manual_seed(0)
    model = ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with doctor.watch(model) as w:
        for _ in range(3):
            loss = F.cross_entropy(model(torch.randn(2, 3, 31, 31)), torch.tensor([0, 1]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    found = w.report().by_check("small-batch")
    assert found and all(f.severity == "warning" for f in found)
    assert found[0].data["batch_size"] == 2 and found[0].data["values_per_channel"] > 100
