"""Reports as data: JSON round trip, text rendering, exit codes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from doctor_zoo import SharedBN

from bnlab import doctor
from bnlab.doctor import Finding, Report
from bnlab.doctor.records import LayerInfo


@pytest.fixture(scope="module")
def shared_report() -> Report:
    torch.manual_seed(0)
    return doctor.check(SharedBN(), torch.randn(64, 20), labels=torch.randint(0, 4, (64,)), train_steps=20)


def test_json_round_trip(shared_report: Report) -> None:
    text = shared_report.to_json()
    data = json.loads(text)
    assert data["exit_code"] == 1
    assert data["findings"][0]["severity"] == "error"
    again = Report.from_json(text)
    assert again == shared_report
    assert again.to_json() == text
    assert Report.from_dict(shared_report.to_dict()) == shared_report


def test_text_has_the_parts_of_a_finding(shared_report: Report) -> None:
    text = str(shared_report)
    assert text == shared_report.to_text()
    assert "ERROR [shared-bn]" in text
    parts = ("where: bn -- call 1 after l1; call 2 after l2", "evidence:", "consequence:", "fix:")
    for part in parts:
        assert part in text
    assert "-> exit 1" in text


def test_findings_sorted_by_severity(shared_report: Report) -> None:
    order = [f.severity for f in shared_report.findings]
    assert order == sorted(order, key=["error", "warning", "info"].index)


def test_exit_code_follows_errors_only() -> None:
    info = Finding(check="x", severity="info", title="t", where="a")
    warning = Finding(check="y", severity="warning", title="t", where="b")
    error = Finding(check="z", severity="error", title="t", where="c")
    assert Report([info, warning]).exit_code == 0
    assert Report([info, error]).exit_code == 1
    assert "no batch-normalization problems found" in Report([]).to_text()


def test_numbers_are_cleaned_for_json() -> None:
    finding = Finding(
        check="x",
        severity="info",
        title="t",
        where="a",
        data={"a": np.float32(1.5), "b": float("nan"), "c": (1, np.int64(2)), 3: "k"},
    )
    assert finding.data == {"a": 1.5, "b": None, "c": [1, 2], "3": "k"}
    assert json.loads(Report([finding]).to_json())["findings"][0]["data"]["b"] is None
    assert not math.isnan(Report([finding]).findings[0].data["a"])


def test_bad_severity_rejected() -> None:
    with pytest.raises(ValueError):
        Finding(check="x", severity="fatal", title="t", where="a")


def test_report_renders_as_html_in_a_notebook(shared_report: Report) -> None:
    from html.parser import HTMLParser

    page = shared_report._repr_html_()
    assert "ERROR" in page and "[shared-bn]" in page and "<pre" in page
    assert "self.bn_l1 = nn.BatchNorm1d(32" in page
    assert "<script" not in page

    class Balanced(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.open: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.open.append(tag)

        def handle_endtag(self, tag):
            assert self.open.pop() == tag

    parser = Balanced()
    parser.feed(page)
    assert parser.open == []


def test_html_escapes_what_came_from_the_model() -> None:
    finding = Finding(check="x", severity="warning", title="<b>bad</b> & co", where="a<b")
    page = Report([finding], model="<script>alert(1)</script>")._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;bad" in page


def test_code_lines_name_layers_that_share_a_line_once_and_cap_the_list() -> None:
    from bnlab.doctor.listing import LONGEST, grouped_places

    built_by_a_library = [("app.py:7", f"bn{i} created") for i in range(52)]
    assert grouped_places(built_by_a_library) == [("app.py:7", "bn0, bn1, bn2, bn3 and 48 more created")]
    own_lines = [(f"net.py:{i}", f"bn{i} created") for i in range(LONGEST + 3)]
    shown = grouped_places(own_lines)
    assert shown[:-1] == own_lines[:4] and shown[-1] == ("...", f"and {LONGEST - 1} more lines (the JSON lists each)")
    assert grouped_places(own_lines[:LONGEST]) == own_lines[:LONGEST]


def test_code_line_of_a_library_says_so_once_and_counts_past_four_names() -> None:
    """torchvision's ResNet builds 8 BNs on one line: its name once, not 8 times, and the
    unwrapped code line stops at four names."""
    from bnlab.doctor.findings import code_places
    from bnlab.doctor.listing import grouped_places

    where = [f"layer{i}.{j}.bn1" for i in range(1, 5) for j in range(2)]
    file = "/venv/lib/python3.11/site-packages/torchvision/models/resnet.py"
    finding = Finding(
        check="untrained-stats",
        severity="info",
        title="t",
        where=", ".join(where),
        definitions=[{"layer": w, "file": file, "line": 82, "library": "torchvision"} for w in where],
    )
    assert grouped_places(code_places(finding)) == [
        (
            "torchvision/models/resnet.py:82",
            "layer1.0.bn1, layer1.1.bn1, layer2.0.bn1, layer2.1.bn1 and 4 more created "
            "(in torchvision, not your files)",
        )
    ]
    assert Report([finding]).to_text().count("not your files") == 1


def _bn(momentum: float, *, trained: bool) -> LayerInfo:
    """A BatchNorm1d of 4 channels as the probe records it: at its initial values, or trained."""
    spread = np.arange(4.0) if trained else np.zeros(4)
    return LayerInfo(
        path="bn",
        kind="BatchNorm1d",
        framework="torch",
        num_channels=4,
        tracks_running_stats=True,
        is_batchnorm=True,
        eps=1e-5,
        rate=momentum,
        rate_name="momentum",
        running_mean=spread,
        running_var=1.0 + spread,
        num_batches_tracked=None,
        training=True,
        affine=True,
        params_frozen=False,
        weight=1.0 + spread / 10,
        bias=spread / 10,
    )


def _divergence_after_training(momentum: float, steps: int = 60) -> Finding:
    """train-eval-divergence on an untrained model that the doctor trained for ``steps``
    steps, with train and eval mode disagreeing on half the probe and no BN cause."""
    from bnlab.doctor.checks.train_eval_divergence import check_divergence
    from bnlab.doctor.records import ProbeResult, TrainLog
    from bnlab.doctor.registry import Context

    def probe(trained: bool) -> ProbeResult:
        return ProbeResult(
            framework="torch",
            model_name="Net",
            input_shape=(8, 4),
            layers={"bn": _bn(momentum, trained=trained)},
            calls=[],
            eval_calls={"bn": 1},
            train_pred=np.array([0, 1, 2, 3, 0, 1, 2, 3]),
            eval_pred=np.array([0, 1, 2, 3, 1, 2, 3, 0]),
        )

    copy = probe(True)
    copy.train_log, copy.given = TrainLog(steps=steps), probe(False)
    (finding,) = check_divergence(Context(copy, fixes=None))  # type: ignore[arg-type]
    return finding


def test_divergence_after_the_doctors_training_says_what_the_steps_did_without_contradiction() -> None:
    """60 steps at momentum 0.1 move the statistics 99.8% of the way: not "at most 100% of
    the way ... they lag" but warmed up, and averaged over changing weights. At momentum 0.01
    (Keras's 0.99) they are 45% of the way: still warming up."""
    warmed = " ".join(_divergence_after_training(0.1).evidence)
    assert "100%" not in warmed and "at most" not in warmed
    assert "every BN layer's running statistics are 99.8% of the way from their initial values" in warmed
    assert "they trail the final weights" in warmed
    warming = " ".join(_divergence_after_training(0.01).evidence)
    assert "only 45% of the way from their initial values" in warming and "still warming up" in warming
