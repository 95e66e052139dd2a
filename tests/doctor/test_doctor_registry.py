"""The check registry: ids declared once, severities honoured, docs generated from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bnlab import doctor
from bnlab.doctor import registry
from bnlab.doctor.findings import SEVERITIES, Finding

DOC = Path(__file__).resolve().parents[2] / "docs" / "doctor-json.md"


def test_every_check_is_declared_once_with_a_valid_severity() -> None:
    specs = registry.all_checks()
    ids = [spec.id for spec in specs]
    assert len(ids) == len(set(ids)) >= 18
    assert all(spec.severity in SEVERITIES and spec.summary for spec in specs)
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", i) for i in ids)
    # one module per check
    modules = [spec.module for spec in specs]
    assert len(modules) == len(set(modules))


def test_docs_list_exactly_the_registered_checks() -> None:
    text = DOC.read_text()
    block = text.split("<!-- checks:begin -->")[1].split("<!-- checks:end -->")[0]
    assert block.strip() == registry.markdown_table()
    documented = set(re.findall(r"^\| `([a-z-]+)` \|", block, flags=re.MULTILINE))
    assert documented == set(registry.check_ids())


def test_findings_of_a_real_report_use_registered_ids() -> None:
    from doctor_zoo import SharedBN

    report = doctor.check(SharedBN(), torch.randn(64, 20), train_steps=5)
    assert report.findings
    assert {f.check for f in report.findings} <= set(registry.check_ids())


def test_a_check_may_not_report_above_its_severity_or_under_another_id() -> None:
    spec = registry.get("unused-bn")  # declared "info"
    loud = Finding(check="unused-bn", severity="error", title="t", where="x")
    other = Finding(check="shared-bn", severity="info", title="t", where="x")
    with pytest.raises(RuntimeError, match="at most info"):
        registry._validated(spec, [loud])
    with pytest.raises(RuntimeError, match="may report only"):
        registry._validated(spec, [other])


def test_a_new_check_registers_by_decorator_alone() -> None:
    @registry.register("test-only-check", "info", "a check made by this test")
    def check(ctx: registry.Context) -> list[Finding]:
        return [Finding(check="test-only-check", severity="info", title="seen", where=", ".join(ctx.probe.layers))]

    try:
        from doctor_zoo import MLP

        report = doctor.check(MLP(), torch.randn(16, 20))
        (finding,) = report.by_check("test-only-check")
        assert finding.where == "bn1, bn2"
    finally:
        registry._CHECKS.pop("test-only-check")
    with pytest.raises(ValueError, match="severity"):
        registry.register("x", "fatal", "bad")
