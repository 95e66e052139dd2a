"""The training loop: the question's table, real-data learning, determinism, run directory, NaN."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from bnlab.config import EpochRecord, apply_overrides
from bnlab.engines import train
from bnlab.engines.common import split_batches
from bnlab.engines.torch_step import chainer_style_eps
from bnlab.errors import TrainingDiverged
from bnlab.models import build_model
from bnlab.presets import get_preset
from bnlab.rundir import load_checkpoint, read_run
from bnlab.table import TABLE_HEADER, format_row


def quick(preset: str, **overrides):
    return apply_overrides(get_preset(preset).config, {k: str(v) for k, v in overrides.items()})


def test_table_format_is_the_seeds():
    assert TABLE_HEADER == "epoch  train/loss  val/loss  train/acc   val/acc"
    rec = EpochRecord(7, 0.123456, 1.5, 0.98765, 0.5, 0.734)
    assert format_row(rec) == "   7     0.1235     1.5000     0.9877     0.5000"
    # Extra information goes in a trailing column only.
    assert format_row(rec, seconds=True) == format_row(rec) + "     0.73s"


def test_two_epochs_of_answer_learn_mnist(mnist, tmp_path, capsys):
    result = train(quick("answer", epochs=2), mnist, out_dir=tmp_path / "run")
    assert len(result.history) == 2
    assert result.history[-1].val_acc >= 0.95
    assert result.history[-1].train_loss < result.history[0].train_loss
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(TABLE_HEADER) and printed[1].startswith("   0 ")


def test_same_seed_same_history_and_other_seed_differs(mnist):
    def history(seed):
        cfg = quick("question", epochs=1, seed=seed, widths="784,64,64,10")
        return [(r.train_loss, r.val_loss, r.train_acc, r.val_acc) for r in train(cfg, mnist, echo=None).history]

    first = history(3)
    assert history(3) == first
    assert history(4) != first


def test_tracing_bn_does_not_change_the_history(mnist):
    def history(trace):
        cfg = quick("question", epochs=1, widths="784,64,64,10", trace_bn_channels=trace)
        result = train(cfg, mnist, echo=None)
        return [(r.train_loss, r.val_loss, r.train_acc, r.val_acc) for r in result.history], result.bn_trace

    plain, no_trace = history(0)
    traced, trace = history(4)
    assert traced == plain and no_trace is None
    assert trace["values"].shape == (120, 4, 4)  # 60 steps x 2 call sites of the shared BN


def test_run_directory_is_complete_and_checkpoint_loads_safely(mnist, tmp_path):
    out = tmp_path / "run"
    result = train(
        quick("tensorflow", epochs=1, widths="784,32,32,10", trace_bn_channels=3), mnist, out_dir=out, echo=None
    )
    assert sorted(p.name for p in out.iterdir() if p.name != ".bnlab.lock") == sorted(
        ["config.json", "environment.json", "history.json", "history.csv", "checkpoint.pt", "bn_trace.npz"]
    )
    saved = read_run(out)
    assert saved.status == "complete" and len(saved.history) == 1
    assert saved.history[0].val_acc == result.history[0].val_acc
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["val_loss"]) == pytest.approx(result.history[0].val_loss)
    env = json.loads((out / "environment.json").read_text())
    assert env["data_sha256"]["train-images-idx3-ubyte.gz"].startswith("440fcabf")
    assert env["torch"] == torch.__version__
    torch.load(out / "checkpoint.pt", weights_only=True)  # no arbitrary unpickling needed
    model, cfg = load_checkpoint(out / "checkpoint.pt")
    assert cfg == result.config
    x = torch.from_numpy(mnist.test_images[:64].reshape(64, -1).astype(np.float32) / 255)
    model.eval(), result.model.eval()
    torch.testing.assert_close(model(x), result.model(x), rtol=0, atol=0)
    trace = np.load(out / "bn_trace.npz")
    # tensorflow preset: bn1, bn2 and bn_logits each called once per step, 60 steps.
    assert trace["values"].shape == (3 * 60, 4, 3)
    assert list(trace["module_names"]) == ["bn1", "bn2", "bn_logits"]


def test_shared_bn_trace_records_two_call_sites(mnist):
    result = train(quick("question", epochs=1, widths="784,16,16,10", trace_bn_channels=2), mnist, echo=None)
    trace = result.bn_trace
    assert list(trace["module_names"]) == ["bn"]
    assert trace["site"].tolist() == [0, 1] * 60
    values = trace["values"]
    # The running mean recorded after each call is the lerp of the previous one with that
    # call's batch mean: the two sites feed one average.
    prev, new = values[:-1, 2], values[1:, 2]
    torch.testing.assert_close(
        torch.from_numpy(new), torch.from_numpy(0.9 * prev + 0.1 * values[1:, 0]), rtol=1e-5, atol=1e-6
    )


def test_nan_loss_stops_with_epoch_and_batch_and_leaves_valid_files(mnist, tmp_path):
    cfg = quick("answer", epochs=2)
    state = build_model(cfg.model, seed=0).state_dict()
    state["l3.weight"][0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="epoch 0, batch 0"):
        train(cfg, mnist, out_dir=tmp_path / "run", echo=None, initial_state=state)
    saved = read_run(tmp_path / "run")
    assert saved.status == "diverged" and saved.history == []
    assert "epoch 0, batch 0" in saved.message
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert not list((tmp_path / "run").glob(".*tmp"))


def test_batching_modes():
    order = torch.arange(10)
    assert [len(b) for b in split_batches(order, 4, "slices")] == [4, 4, 2]
    assert [len(b) for b in split_batches(order, 4, "array-split")] == [5, 5]  # np.array_split(.., 10 // 4)


def test_chainer_style_eps_reproduces_chainer_adam_exactly():
    # Chainer/TF1: p -= alpha * sqrt(1-b2^t) / (1-b1^t) * m / (sqrt(v) + eps), in float64.
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(20, 5)) * 1e-4  # small gradients make eps matter
    alpha, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    p_ref = np.ones(5)
    m = v = np.zeros(5)
    param = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = torch.optim.Adam([param], lr=alpha, betas=(b1, b2), eps=eps)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p_ref = p_ref - alpha * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
        param.grad = torch.from_numpy(g.copy())
        opt.param_groups[0]["eps"] = chainer_style_eps(eps, b2, t)
        opt.step()
    np.testing.assert_allclose(param.detach().numpy(), p_ref, rtol=1e-12)
    # The plain torch placement differs measurably: the conversion is not a no-op.
    plain = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = torch.optim.Adam([plain], lr=alpha, betas=(b1, b2), eps=eps)
    for g in grads:
        plain.grad = torch.from_numpy(g.copy())
        opt.step()
    assert np.abs(plain.detach().numpy() - p_ref).max() > 1e-6


def test_adam_step_is_bit_identical_to_optimizer_step():
    from bnlab.config import TrainConfig
    from bnlab.engines.torch_step import adam_step, make_optimizer
    from bnlab.models import ModelConfig

    torch.manual_seed(0)
    fast, slow = (
        build_model(ModelConfig(widths=(20, 8, 8, 3)), seed=1),
        build_model(ModelConfig(widths=(20, 8, 8, 3)), seed=1),
    )
    tc = TrainConfig()
    opt_fast, opt_slow = make_optimizer(fast, tc), make_optimizer(slow, tc)
    for step in range(1, 8):
        x, y = torch.randn(16, 20), torch.randint(0, 3, (16,))
        for model, opt in ((fast, opt_fast), (slow, opt_slow)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
        eps = chainer_style_eps(1e-8, 0.999, step)
        adam_step(opt_fast, eps)
        opt_slow.param_groups[0]["eps"] = eps
        opt_slow.step()
        for a, b in zip(fast.parameters(), slow.parameters()):
            assert torch.equal(a, b)
    for pa, pb in zip(fast.parameters(), slow.parameters()):
        sa, sb = opt_fast.state[pa], opt_slow.state[pb]
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"]) and torch.equal(sa["step"], sb["step"])
    assert opt_fast.state_dict()["state"].keys() == opt_slow.state_dict()["state"].keys()


def test_adam_step_falls_back_to_optimizer_step_for_other_optimizers():
    from bnlab.engines.torch_step import adam_step

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.5)
    opt.param_groups[0]["eps"] = 0.0  # adam_step records eps on the group whatever the optimizer
    w.grad = torch.ones(3)
    adam_step(opt, 1e-8)
    assert torch.equal(w.detach(), torch.full((3,), 0.5))


def test_chunked_evaluation_gives_the_whole_set_logits_bit_for_bit(mnist):
    from bnlab.engines.torch_step import eval_forward

    result = train(quick("answer", epochs=1), mnist, echo=None)
    x = torch.from_numpy(mnist.test_images.reshape(len(mnist.test_images), -1).astype(np.float32) / 255)
    y = torch.from_numpy(mnist.test_labels.astype(np.int64))
    model = result.model
    loss, logits = eval_forward(model, x, y)
    assert model.training  # _eval_forward restores the caller's mode
    model.eval()
    with torch.inference_mode():
        whole = model(x)  # all 10,000 rows in one product
    assert torch.equal(logits, whole)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(whole, y).item(), rel=1e-6)


def test_host_reads_happen_per_epoch_not_per_step(mnist, monkeypatch):
    """On CUDA every read of a tensor's value by the host waits for the device. The loop
    reads a fixed handful per epoch, however many steps the epoch has (checked here on
    the CPU by counting the calls that would synchronise)."""
    reads = []
    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads_for(batch_size, epochs):
        reads.clear()
        train(quick("answer", epochs=epochs, batch_size=batch_size, widths="784,16,16,10"), mnist, echo=None)
        return len(reads)

    per_epoch = reads_for(1000, 1)
    assert 0 < per_epoch <= 10
    assert reads_for(500, 1) == per_epoch  # twice the steps, the same reads
    assert reads_for(1000, 2) == 2 * per_epoch


@pytest.mark.parametrize("engine", ["torch", pytest.param("chainer", marks=pytest.mark.chainer)])
def test_a_one_sample_minibatch_is_refused_before_training(mnist, tmp_path, engine):
    if engine == "chainer":
        pytest.importorskip("chainer")
    cfg = quick("answer", epochs=1, batch_size=59999, engine=engine)  # 60,000 = 59,999 + 1
    with pytest.raises(ValueError, match="minibatch of 1 sample out of 60000.*array-split"):
        train(cfg, mnist, out_dir=tmp_path / "run", echo=None)
    assert not (tmp_path / "run").exists()
    # Without BN, or split into near-equal parts, the same size trains.
    for overrides in ({"norm": "none"}, {"batching": "array-split"}):
        ok = apply_overrides(cfg, {"epochs": "1", **overrides, "widths": "784,8,8,10"})
        assert len(train(ok, mnist, echo=None).history) == 1
