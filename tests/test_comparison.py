"""``bnlab.compare``, the library call behind ``bnlab compare``: it lives in
``bnlab.comparison``, above the sweep and both reports, and does the whole job."""

import json

import bnlab
from bnlab import comparison
from bnlab.grid import parse_axis
from bnlab.sweep import InlineExecutor

TINY = {"epochs": "1", "widths": "784,16,16,10"}


def test_public_compare_is_the_comparison_module_s():
    assert bnlab.compare is comparison.compare


def test_compare_trains_and_reports_a_sweep(tmp_path):
    stages: list[str] = []
    outcomes, report = bnlab.compare(["answer"], [0], tmp_path, TINY, executor=InlineExecutor(), on_stage=stages.append)
    assert [(o.preset, o.seed, o.status) for o in outcomes] == [("answer", 0, "complete")]
    summary = json.loads(report.json.read_text())
    assert summary["presets"]["answer"]["metrics"]["final_val_acc"]["n"] == 1
    assert report.html.is_file() and "building the report" in stages


def test_compare_with_a_grid_writes_the_grid_report(tmp_path):
    axes = [parse_axis("bn_momentum=0.1,0.5")]
    outcomes, report = bnlab.compare(["answer"], [0], tmp_path, TINY, executor=InlineExecutor(), grid=axes)
    assert len(outcomes) == 2 and all(o.status == "complete" for o in outcomes)
    assert {dict(c.point)["model.bn_momentum"] for c in report.cells} == {0.1, 0.5}
    assert (tmp_path / "report" / "report.html").is_file()
