"""Grid sweeps: parsing --grid, run naming, resume, locks, failures, the grid report and
the sharing study. Every run is a tiny real one (784-16-16-10, 1 epoch) on the vendored
MNIST files."""

import csv
import json
import struct

import pytest

from bnlab.cli import main
from bnlab.grid import GridAxis, check_axes, grid_points, parse_axis, point_label, point_name
from bnlab.rundir import RunLock, safe_name
from bnlab.sweep import InlineExecutor, plan_sweep, run_sweep

TINY = ["--epochs", "1", "--set", "widths=784,16,16,10"]


def status_of(run_dir):
    return json.loads((run_dir / "history.json").read_text())["status"]


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


# ---------------------------------------------------------------------------- parsing


def test_axes_take_every_spelling_set_takes_and_parse_to_the_field_type():
    assert parse_axis("model.bn_momentum=0.01,0.1,0.5") == GridAxis("model.bn_momentum", (0.01, 0.1, 0.5))
    assert parse_axis("bn-momentum=0.5") == GridAxis("model.bn_momentum", (0.5,))
    assert parse_axis("batch_size=100,1000").values == (100, 1000)
    assert parse_axis("norm=shared,per-layer").values == ("shared", "per-layer")
    assert parse_axis("widths=784,32,32,10;784,16,16,10").values == ((784, 32, 32, 10), (784, 16, 16, 10))
    assert parse_axis("bn_momentum=0.01,0.5").spans_decades and not parse_axis("lr=0.01,0.02").spans_decades
    assert not parse_axis("norm=shared,per-layer").spans_decades


@pytest.mark.parametrize(
    "text, message",
    [
        ("seed=0,1", "use --seeds"),
        ("threads=1,2", "cannot vary train.threads"),
        ("no_such_field=1,2", "unknown setting"),
        ("batch_size=100,abc", "expected a whole number"),
        ("lr=0.1,0.1", "lists a value twice"),
        ("lr=0.1,,0.2", "empty value"),
        ("lr", "FIELD=V1,V2"),
    ],
)
def test_bad_axes_are_usage_errors_naming_the_fix(text, message):
    with pytest.raises(ValueError, match=message):
        parse_axis(text)


def test_a_field_on_two_axes_or_also_in_set_is_refused():
    with pytest.raises(ValueError, match="more than once"):
        check_axes([parse_axis("lr=0.1"), parse_axis("train.lr=0.2")], {})
    with pytest.raises(ValueError, match="also varied by --grid"):
        check_axes([parse_axis("bn_momentum=0.1,0.5")], {"model.bn_momentum": "0.2"})


def test_points_are_the_product_first_axis_slowest_with_safe_readable_names():
    axes = [parse_axis("bn_momentum=0.01,0.5"), parse_axis("batch_size=100,1000")]
    points = grid_points(axes)
    assert [point_name(p) for p in points] == [
        "bn_momentum-0.01__batch_size-100",
        "bn_momentum-0.01__batch_size-1000",
        "bn_momentum-0.5__batch_size-100",
        "bn_momentum-0.5__batch_size-1000",
    ]
    assert point_label(points[1]) == "bn_momentum=0.01 batch_size=1000"
    odd = (("train.device", "cuda:0"), *grid_points([parse_axis("widths=784,16,16,10")])[0])
    assert point_name(odd) == "device-cuda_0__widths-784x16x16x10" == safe_name(point_name(odd))
    long = grid_points([parse_axis("widths=" + ",".join(["784"] + ["16"] * 30 + ["10"]))])[0]
    assert len(point_name(long)) <= 100 and safe_name(point_name(long))


def test_plan_gives_each_point_preset_and_seed_its_directory_and_full_config(tmp_path):
    axes = [parse_axis("bn_momentum=0.01,0.5"), parse_axis("batch_size=100,1000")]
    specs = plan_sweep(["question", "answer"], [0, 3], tmp_path, {"epochs": "1"}, grid=axes)
    assert len(specs) == 2 * 4 * 2 == len({s.run_dir for s in specs})
    spec = specs[5]  # question, bn_momentum 0.5, batch 100, seed 3
    assert spec.run_dir == tmp_path / "runs" / "question" / "bn_momentum-0.5__batch_size-100" / "seed3"
    assert spec.grid == (("model.bn_momentum", 0.5), ("train.batch_size", 100))
    assert (spec.config.model.bn_momentum, spec.config.train.batch_size, spec.config.train.seed) == (0.5, 100, 3)
    assert spec.config.model.norm == "shared" and spec.config.train.epochs == 1
    assert spec.label == "question bn_momentum=0.5 batch_size=100 seed 3"
    # Without a grid the layout is as before.
    assert plan_sweep(["answer"], [0], tmp_path)[0].run_dir == tmp_path / "runs" / "answer" / "seed0"
    with pytest.raises(ValueError, match="model.bn_momentum"):
        plan_sweep(["answer"], [0], tmp_path, grid=[parse_axis("bn_momentum=0.5,2")])  # validated by the config


# ------------------------------------------------------------------ compare with a grid


def test_grid_compare_trains_every_run_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "grid"
    argv = [
        "compare",
        "--presets",
        "question,answer",
        "--grid",
        "bn_momentum=0.01,0.5",
        "--grid",
        "batch_size=1000,2000",
        "--seeds",
        "0-1",
        *TINY,
        "--out",
        str(out),
        "--workers",
        "2",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    run_dirs = sorted(out.glob("runs/*/*/seed*"))
    assert len(run_dirs) == 16 and all(status_of(d) == "complete" for d in run_dirs)
    cfg = json.loads((out / "runs/answer/bn_momentum-0.5__batch_size-2000/seed1/config.json").read_text())
    assert (cfg["preset"], cfg["model"]["bn_momentum"], cfg["train"]["batch_size"], cfg["train"]["seed"]) == (
        "answer",
        0.5,
        2000,
        1,
    )
    assert cfg["model"]["widths"] == [784, 16, 16, 10] and cfg["model"]["norm"] == "per-layer"
    assert "answer bn_momentum=0.5 batch_size=2000 seed 1: complete" in text
    assert "| question | 0.01 | 1000 | 2 |" in text  # the statistics table per grid point

    report = out / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert [a["field"] for a in summary["axes"]] == ["model.bn_momentum", "train.batch_size"]
    assert len(summary["cells"]) == 8 and all(c["metrics"]["final_val_acc"]["n"] == 2 for c in summary["cells"])
    cell = next(
        c
        for c in summary["cells"]
        if c["series"] == "answer" and c["point"] == {"model.bn_momentum": 0.5, "train.batch_size": 2000}
    )
    on_disk = [
        json.loads((out / f"runs/answer/bn_momentum-0.5__batch_size-2000/seed{s}/history.json").read_text())["history"][
            -1
        ]["val_acc"]
        for s in (0, 1)
    ]
    assert cell["per_seed"]["final_val_acc"] == {"0": on_disk[0], "1": on_disk[1]}
    assert cell["metrics"]["final_val_acc"]["mean"] == pytest.approx(sum(on_disk) / 2)
    rows = list(csv.DictReader((report / "summary.csv").open()))
    assert len(rows) == 8 and {r["train.batch_size"] for r in rows} == {"1000", "2000"}
    assert len(list(csv.DictReader((report / "runs.csv").open()))) == 16
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "Statistics per grid point" in html
    width, height = png_size(report / "grid_axes.png")
    assert width > 600 and height > 400
    assert png_size(report / "grid_heatmap.png")[0] > 400

    # Resume: nothing is trained again; a run lost mid-way is the only one redone.
    before = {d: (d / "history.json").stat().st_mtime_ns for d in run_dirs}
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished earlier") == 16
    assert {d: (d / "history.json").stat().st_mtime_ns for d in run_dirs} == before
    lost = out / "runs/question/bn_momentum-0.5__batch_size-1000/seed0"
    (lost / "history.json").write_text(
        json.dumps({"preset": "question", "seed": 0, "status": "running", "history": []})
    )
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished earlier") == 15
    assert status_of(lost) == "complete"
    assert all((d / "history.json").stat().st_mtime_ns == t for d, t in before.items() if d != lost)


def test_a_grid_sweep_reports_failed_points_and_respects_the_lock(tmp_path, capsys):
    out = tmp_path / "grid"
    argv = [
        "compare",
        "--presets",
        "no-bn",
        "--grid",
        "lr=0.01,1e30",
        "--seeds",
        "0",
        *TINY,
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    with RunLock(out, "sweep directory"):
        assert main(argv) == 2
    assert "in use by another bnlab process" in capsys.readouterr().err
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "no-bn lr=1e+30 seed 0 diverged" in captured.err
    assert status_of(out / "runs/no-bn/lr-0.01/seed0") == "complete"
    assert status_of(out / "runs/no-bn/lr-1e_30/seed0") == "diverged"
    html = (out / "report" / "report.html").read_text()
    assert "Runs that did not complete" in html and "diverged" in html
    assert "exactly two axes" in html and not (out / "report" / "grid_heatmap.png").exists()
    assert (out / "report" / "grid_axes.png").exists()
    # Conflicting flags are usage errors before anything trains.
    conflict = ["compare", "--presets", "no-bn", "--grid", "lr=0.1,0.2", "--lr", "0.3", "--out", str(tmp_path / "x")]
    assert main(conflict) == 2
    assert "also varied by --grid" in capsys.readouterr().err
    assert not (tmp_path / "x" / "runs").exists()


def test_grid_histories_do_not_depend_on_the_executor_process(tmp_path):
    """The same grid spec trained in this process and in a worker gives the same history."""
    axes = [parse_axis("bn_momentum=0.01,0.5")]
    overrides = {"epochs": "1", "widths": "784,16,16,10", "threads": 1}
    here = run_sweep(plan_sweep(["question"], [0], tmp_path / "a", overrides, grid=axes), InlineExecutor())
    from bnlab.sweep import LocalProcessExecutor

    there = run_sweep(plan_sweep(["question"], [0], tmp_path / "b", overrides, grid=axes), LocalProcessExecutor(1))
    strip = [[(r.epoch, r.train_loss, r.val_loss, r.train_acc, r.val_acc) for r in o.history] for o in here]
    assert strip == [[(r.epoch, r.train_loss, r.val_loss, r.train_acc, r.val_acc) for r in o.history] for o in there]
    # BN momentum changes only the running statistics: training itself is the same.
    assert here[0].history[0].train_loss == here[1].history[0].train_loss
    assert here[0].history[0].val_acc != here[1].history[0].val_acc


# ------------------------------------------------------------------------- the study


def test_sharing_study_puts_the_doctors_repair_beside_each_shared_run(tmp_path, capsys):
    out = tmp_path / "study"
    argv = [
        "study",
        "sharing",
        "--momenta",
        "0.1,0.01",
        "--batch-sizes",
        "1000",
        "--seeds",
        "0",
        *TINY,
        "--out",
        str(out),
        "--workers",
        "2",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| shared BN (question) | shared, repaired by the doctor | per-layer BN (answer) |" in text
    summary = json.loads((out / "report" / "summary.json").read_text())
    repaired = [c for c in summary["cells"] if c["series"] == "question, repaired by the doctor"]
    assert len(repaired) == 2
    for point in ("bn_momentum-0.1__batch_size-1000", "bn_momentum-0.01__batch_size-1000"):
        saved = json.loads((out / "repairs" / "question" / point / "seed0.json").read_text())
        final = json.loads((out / "runs" / "question" / point / "seed0" / "history.json").read_text())
        # The doctor evaluates the model as trained on the same 10,000 test images first.
        assert saved["before"]["val_acc"] == pytest.approx(final["history"][-1]["val_acc"], abs=5e-4)
        assert [c["change"] for c in saved["changes"]].count("split") == 1
    accs = [c["metrics"]["final_val_acc"]["mean"] for c in repaired]
    # Same seed and batch size: the same weights whatever the momentum, and the repair
    # re-estimates the statistics from scratch, so the repaired models agree.
    assert accs[0] == accs[1]
    assert max(accs) > max(c["metrics"]["final_val_acc"]["mean"] for c in summary["cells"] if c["series"] == "question")
    # Resuming reuses the runs and the cached repairs.
    cache = out / "repairs" / "question" / "bn_momentum-0.1__batch_size-1000" / "seed0.json"
    stamp = cache.stat().st_mtime_ns
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished earlier") == 4
    assert cache.stat().st_mtime_ns == stamp
