"""``BNDoctorCallback`` in a real ``lightning.Trainer.fit`` on real MNIST (CPU, a few dozen steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision_compat import import_torchvision  # noqa: E402

# lightning imports torchmetrics, which imports torchvision when it is installed: this
# venv's torchvision needs the test-only shim beside the CPU torch (DEVELOPERS.md).
try:
    import_torchvision()
except ImportError:
    pass  # no torchvision: lightning does not need it
lightning = pytest.importorskip("lightning")

from lightning_ddp_worker import MNISTClassifier, trainer  # noqa: E402

from bnlab.doctor.lightning import BNDoctorCallback, BNDoctorFailed  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def loader(mnist_arrays):
    train_x, train_y = mnist_arrays[0][:6400], mnist_arrays[1][:6400]
    data = TensorDataset(torch.as_tensor(train_x), torch.as_tensor(train_y))
    return DataLoader(data, batch_size=200, shuffle=True, generator=torch.Generator().manual_seed(0))


def fit(model, loader, callback, epochs: int = 1) -> lightning.Trainer:
    fitted = trainer([callback], devices=1, epochs=epochs)
    fitted.fit(model, loader)
    return fitted


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_shared_bn_is_an_error_per_layer_bn_is_not(loader) -> None:
    torch.manual_seed(0)
    shared, per_layer = MNISTClassifier(shared=True), MNISTClassifier(shared=False)
    shared_cb, per_layer_cb = BNDoctorCallback(echo=None), BNDoctorCallback(echo=None)
    fit(shared, loader, shared_cb)  # 32 steps of 200 real MNIST images
    fit(per_layer, loader, per_layer_cb)

    report = shared_cb.report
    assert report.probe["watched_steps"] == 32
    assert [(f.check, f.severity, f.where) for f in report.errors] == [("shared-bn", "error", "bn1")]
    assert not per_layer_cb.report.errors, per_layer_cb.report
    assert not per_layer_cb.report.by_check("shared-bn")
    assert no_hooks(shared) and no_hooks(per_layer)


def test_fail_on_error_raises_after_fit_and_keeps_the_report(loader, capsys) -> None:
    torch.manual_seed(0)
    model = MNISTClassifier(shared=True)
    callback = BNDoctorCallback(fail_on="error")
    with pytest.raises(BNDoctorFailed, match=r"\[shared-bn\]"):
        fit(model, loader, callback)
    assert "ERROR [shared-bn]" in capsys.readouterr().out  # printed before raising
    assert callback.report.exit_code == 1
    assert no_hooks(model)


def test_reports_every_epoch_and_removes_hooks_when_fit_fails(loader) -> None:
    torch.manual_seed(0)
    model = MNISTClassifier(shared=False)
    callback = BNDoctorCallback(every_n_epochs=1, echo=None)
    fit(model, loader, callback, epochs=2)
    assert [r.probe["watched_steps"] for r in callback.reports] == [32, 32]

    class Broken(MNISTClassifier):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("the user's own bug")
            return super().training_step(batch, batch_idx)

    broken = Broken(shared=False)
    with pytest.raises(RuntimeError, match="the user's own bug"):
        fit(broken, loader, BNDoctorCallback(echo=None))
    assert no_hooks(broken)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="fail_on"):
        BNDoctorCallback(fail_on="always")
    with pytest.raises(ValueError, match="every_n_epochs"):
        BNDoctorCallback(every_n_epochs=0)


def test_the_trainers_optimizer_is_handed_to_the_watch(loader) -> None:
    class Decayed(MNISTClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, weight_decay=5e-4)

    torch.manual_seed(0)
    callback = BNDoctorCallback(echo=None)
    fit(Decayed(shared=False), loader, callback)
    (finding,) = callback.report.by_check("bn-weight-decay")
    assert finding.where == "bn1, bn2"


def test_a_ddp_strategy_of_one_process_is_watched_as_one_process(loader, monkeypatch) -> None:
    # DDP wraps the module, but there is no other rank: the report keeps the module's names
    from ddp_jobs import free_port
    from lightning_ddp_worker import Decayed

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.manual_seed(0)
    callback = BNDoctorCallback(echo=None)
    try:
        trainer([callback], devices=1, strategy="ddp").fit(Decayed(shared=False), loader)
    finally:
        torch.distributed.destroy_process_group()
    (decay,) = callback.report.by_check("bn-weight-decay")
    assert decay.where == "bn1, bn2"
    assert not any("ranks" in note for note in callback.report.notes)


# -- under Lightning's DDP strategy: a real 2-process job (gloo, 127.0.0.1) ------------------
# tests/doctor/lightning_ddp_worker.py is one rank; it fits three times (see its docs).

DDP_LIMIT_S = 180  # the whole job, two Lightning processes starting on a busy machine included


@pytest.fixture(scope="module")
def ddp_job(tmp_path_factory) -> dict[int, dict]:
    from ddp_jobs import run_job  # only here: the one-process tests need none of it

    results = run_job(HERE / "lightning_ddp_worker.py", "fits", tmp_path_factory.mktemp("ddp"), DDP_LIMIT_S)
    assert set(results) == {0, 1}, results
    return results


def severe(report: dict) -> list[tuple[str, str]]:
    return [(f["check"], f["where"]) for f in report["findings"] if f["severity"] in ("error", "warning")]


def test_ddp_fit_compares_the_ranks_and_a_healthy_one_finds_nothing(ddp_job) -> None:
    for rank in (0, 1):
        report = ddp_job[rank]["watched"]
        assert any("compared the 2 ranks" in note for note in report["notes"]), report["notes"]
        assert severe(report) == [], report
    assert ddp_job[0]["output"].count("bnlab doctor: Decayed") == 1  # rank 0 prints (once) ...
    assert "bnlab doctor:" not in ddp_job[1]["output"]  # ... rank 1 keeps callback.report


def test_ddp_fit_weights_are_the_same_with_and_without_the_callback(ddp_job) -> None:
    assert ddp_job[0]["same_weights"] and ddp_job[1]["same_weights"]


def test_ddp_fit_names_layers_as_the_lightning_module_does(ddp_job) -> None:
    # the watch runs on Lightning's DDP model, whose own names start with "module."
    for rank in (0, 1):
        (decay,) = [f for f in ddp_job[rank]["watched"]["findings"] if f["check"] == "bn-weight-decay"]
        assert decay["where"] == "bn1, bn2"


def test_ddp_fit_without_buffer_broadcast_is_rank_divergent_stats(ddp_job) -> None:
    from ddp_jobs import assert_rank_divergent_stats

    # the same finding as watch(ddp_model) in test_doctor_ddp.py's no-broadcast job
    for rank in (0, 1):
        assert_rank_divergent_stats(ddp_job[rank]["apart"])
    assert "[rank-divergent-stats]" in ddp_job[0]["output"]


def test_ddp_fail_on_stops_every_rank_alike(ddp_job) -> None:
    # rank 0 has fail_on="error" (its report: warnings only), rank 1 fail_on="warning":
    # rank 1's report alone fails, and rank 0 raises with it instead of being left behind
    assert "[rank-divergent-stats]" in ddp_job[1]["apart_raised"]
    assert "rank(s) 1 of this job found" in ddp_job[0]["apart_raised"]
    assert ddp_job[0]["rc"] == ddp_job[1]["rc"] == 0  # both ranks went on to write their results


def test_ddp_fit_watching_a_submodule_says_the_ranks_were_not_compared(ddp_job) -> None:
    for rank in (0, 1):
        notes = ddp_job[rank]["nested"]["notes"]
        assert any("ranks of this DDP job were not compared: with module=" in note for note in notes), notes
        assert not any("compared the 2 ranks" in note for note in notes)
