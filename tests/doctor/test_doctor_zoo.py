"""The zoo: no false errors on healthy models, every planted problem found, model untouched."""

from __future__ import annotations

import pytest
import torch
from doctor_zoo import CASES, Case, SharedBN, SharedConvBN

from bnlab import doctor


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": {name: m.training for name, m in model.named_modules()},
        "grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "momentum": {name: getattr(m, "momentum", None) for name, m in model.named_modules()},
    }


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        same = torch.equal(after["state"][key], value) or (  # NaN == NaN here
            value.is_floating_point()
            and bool(torch.isclose(after["state"][key], value, rtol=0, atol=0, equal_nan=True).all())
        )
        assert same, key
    assert after["modes"] == before["modes"]
    assert after["grad"] == before["grad"]
    assert after["momentum"] == before["momentum"]
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def run_case(case: Case) -> tuple[torch.nn.Module, doctor.Report, dict]:
    torch.manual_seed(0)
    model = case.build()
    x = case.inputs(torch.Generator().manual_seed(0))
    before = snapshot(model)
    rng = torch.get_rng_state()
    options = case.options(model) if case.options else {}
    report = doctor.check(model, x, train_steps=case.train_steps, **options)
    assert torch.equal(torch.get_rng_state(), rng), "the user's RNG stream must not move"
    return model, report, before


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_zoo_case(case: Case) -> None:
    model, report, before = run_case(case)
    assert_untouched(model, before)
    found = {(f.check, f.severity) for f in report.findings}
    for check, severity in case.expect.items():
        assert (check, severity) in found, f"{case.name}: expected {check}/{severity}\n{report}"
    expected_errors = {c for c, s in case.expect.items() if s == "error"}
    for finding in report.errors:
        assert finding.check in expected_errors, f"{case.name}: false error\n{report}"
    if case.healthy:
        assert not report.warnings, f"{case.name}: false warning\n{report}"
    assert report.exit_code == (1 if expected_errors else 0)


# Checks planted by other tests: they need the user's own loop (watch); the rank checks
# need a real multi-process DDP job (tests/doctor/test_doctor_ddp.py), not one process.
PLANTED_IN_WATCH_TESTS = {"eval-mode-training", "rank-divergent-stats", "small-batch-per-rank"}


def test_zoo_plants_every_registered_check() -> None:
    from bnlab.doctor.registry import check_ids

    assert len({c.build for c in CASES}) >= 15
    planted = {check for case in CASES for check in case.expect}
    assert planted <= set(check_ids()), "the zoo expects a check that is not registered"
    missing = set(check_ids()) - planted - PLANTED_IN_WATCH_TESTS
    assert not missing, f"registered checks with no zoo model that triggers them: {missing}"


def test_shared_bn_names_each_call_site_by_its_producer() -> None:
    report = doctor.check(SharedBN(), torch.randn(64, 20), train_steps=20)
    (finding,) = report.by_check("shared-bn")
    assert finding.where == "bn"
    assert finding.sites == ["call 1 after l1", "call 2 after l2"]
    sites = finding.data["sites"]
    assert [s["producer"] for s in sites] == ["l1", "l2"]
    assert all(s["mean_shift"] >= 0 for s in sites)
    assert finding.data["between_sites"]["mean_shift"] > 0.25
    assert "self.bn_l1 = nn.BatchNorm1d(32" in finding.fix_code


def test_shared_conv_bn_sites_inside_a_modulelist() -> None:
    report = doctor.check(SharedConvBN(), torch.randn(16, 3, 8, 8))
    (finding,) = report.by_check("shared-bn")
    assert finding.sites == ["call 1 after convs.0", "call 2 after convs.1"]


def test_conv_relu_bn_bias_is_not_called_redundant() -> None:
    from doctor_zoo import ConvReluBN

    report = doctor.check(ConvReluBN(), torch.randn(8, 3, 8, 8))
    assert not report.by_check("bias-before-bn")


def test_model_in_eval_mode_with_mixed_modes_is_left_as_it_was() -> None:
    from doctor_zoo import DropoutBeforeBN

    model = DropoutBeforeBN().eval()
    model.drop.train()  # odd on purpose: every flag must survive as it is
    before = snapshot(model)
    doctor.check(model, torch.randn(32, 20), train_steps=3)
    assert_untouched(model, before)


def test_model_that_cannot_be_deep_copied_is_restored() -> None:
    import threading

    from doctor_zoo import MLP

    model = MLP()
    model.lock = threading.Lock()  # deepcopy fails: the doctor works in place and restores
    before = snapshot(model)
    report = doctor.check(model, torch.randn(32, 20), train_steps=5)
    assert_untouched(model, before)
    assert report.probe["train_steps"] == 5


def test_labels_give_accuracy_in_both_modes() -> None:
    from doctor_zoo import MLP

    x = torch.randn(64, 20)
    y = (x[:, 0] > 0).long()
    report = doctor.check(MLP(), x, labels=y, train_steps=30)
    agreement = report.summary["train_eval"]
    assert 0.0 <= agreement["acc_train"] <= 1.0 and 0.0 <= agreement["acc_eval"] <= 1.0


def test_custom_loss_and_optimizer() -> None:
    from functools import partial

    from doctor_zoo import SharedBN

    calls = []

    def loss_fn(out, y):
        calls.append(1)
        return torch.nn.functional.cross_entropy(out, y)

    report = doctor.check(
        SharedBN(),
        torch.randn(32, 20),
        labels=torch.randint(0, 4, (32,)),
        train_steps=4,
        loss_fn=loss_fn,
        optimizer_factory=partial(torch.optim.SGD, lr=0.1),
    )
    assert len(calls) == 4
    assert report.exit_code == 1
