"""The bnlab command: train, presets, exit codes for bad flags and bad input."""

import json
import subprocess
import sys

import pytest

from bnlab.cli import main
from bnlab.table import TABLE_HEADER


def test_train_prints_the_table_and_writes_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--preset",
            "answer",
            "--epochs",
            "1",
            "--seed",
            "2",
            "--out",
            str(out),
            "--set",
            "widths=784,32,32,10",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(TABLE_HEADER) for line in lines)
    history = json.loads((out / "history.json").read_text())
    assert history["status"] == "complete" and history["seed"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["widths"] == [784, 32, 32, 10] and config["train"]["epochs"] == 1


def test_python_dash_m_entry_point_and_help():
    done = subprocess.run([sys.executable, "-m", "bnlab", "train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for flag in ("--preset", "--epochs", "--seed", "--device", "--data-dir", "--set", "--out"):
        assert flag in done.stdout


def test_presets_lists_every_preset_with_its_claim(capsys):
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    for name in ("question", "question-first-snippet", "answer", "no-bn", "tensorflow", "tensorflow-no-bn"):
        assert f"\n{name}\n" in f"\n{text}"
    assert "the question/answer says:" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["train"],  # --preset missing
        ["train", "--preset", "answer", "--epochs", "0"],
        ["train", "--preset", "answer", "--epochs", "ten"],
        ["train", "--preset", "answer", "--device", "tpu"],
        ["train", "--preset", "answer", "--set", "novalue"],
        ["nonsense-command"],
    ],
)
def test_bad_flags_exit_2(argv, capsys):
    # argparse rejects what it can parse (exit 2 via SystemExit); the config rejects values.
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err or err.startswith("bnlab: ")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--preset", "answer", "--set", "colour=blue"], "unknown setting 'colour'"),
        (["train", "--preset", "answer", "--set", "norm=batch"], "norm must be one of"),
    ],
)
def test_bad_values_exit_2_with_one_paragraph(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_missing_data_dir_exits_2_and_names_the_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(
        ["train", "--preset", "answer", "--epochs", "1", "--data-dir", str(empty), "--out", str(tmp_path / "r")]
    )
    assert code == 2
    assert str(empty) in capsys.readouterr().err


def test_cuda_request_without_cuda_exits_2(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "--preset", "answer", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


# --------------------------------------------------------------- help and --json outputs


def _subparsers():
    import argparse

    from bnlab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_help_has_examples_and_states_each_options_default():
    import argparse

    parser, commands = _subparsers()
    assert "examples:\n  bnlab " in parser.format_help()
    assert set(commands) >= {"train", "presets", "doctor", "conventions", "convert", "compare", "repro"}
    for name, sub in commands.items():
        text = sub.format_help()
        assert f"examples:\n  bnlab {name}" in text, name
        formatter = sub._get_formatter()
        for action in sub._actions:
            if (
                not action.option_strings
                or action.required
                or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction))
            ):
                continue
            said = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in said, (name, action.option_strings, said)
            assert said.count("(default") <= 1, said  # stated once, not once by the help and once by argparse


def test_help_wraps_the_description_to_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    _, commands = _subparsers()
    for name, sub in commands.items():
        # The usage block is argparse's (a long metavar cannot wrap); the rest must fit.
        text = sub.format_help().split("\n\n", 1)[1]
        assert max(len(line) for line in text.splitlines()) <= 80, name


def _json_stdout(capsys) -> tuple[object, str]:
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err  # stdout must be exactly one JSON document


def test_train_json_is_the_only_thing_on_stdout(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "answer",
                "--epochs",
                "2",
                "--out",
                str(out),
                "--json",
                "--set",
                "widths=784,16,16,10",
            ]
        )
        == 0
    )
    result, err = _json_stdout(capsys)
    assert result["run_dir"] == str(out) and len(result["history"]) == 2
    assert result["final"] == result["history"][-1] and result["config"]["train"]["epochs"] == 2
    # The table (with its epoch i/N and ETA columns) went to stderr.
    header = next(line for line in err.splitlines() if line.startswith(TABLE_HEADER))
    assert header.split()[-3:] == ["seconds", "epoch", "ETA"]
    rows = [line for line in err.splitlines() if line.startswith(("   0 ", "   1 "))]
    assert [row.split()[-2] for row in rows] == ["1/2", "2/2"] and rows[-1].split()[-1] == "0:00"


def test_compare_and_repro_json_on_stdout_progress_on_stderr(tmp_path, capsys):
    sweep = [
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--workers",
        "1",
        "--out",
        str(tmp_path / "sweep"),
        "--set",
        "widths=784,16,16,10",
        "--json",
    ]
    assert main(["compare", "--presets", "answer", *sweep]) == 0
    summary, err = _json_stdout(capsys)
    assert [(r["preset"], r["seed"], r["status"], r["cached"]) for r in summary["runs"]] == [
        ("answer", 0, "complete", False)
    ]
    assert summary["presets"]["answer"]["runs"] == 1 and summary["report"].endswith("report.html")
    for stage in (
        "checking the mnist files",
        "starting 1 worker process",
        "building the report",
        "report: figure 1 of",
        "report built in",
    ):
        assert stage in err, stage
    assert "answer seed 0: complete" in err  # the per-run line goes with the progress
    # repro on the same directory reuses the finished run: only the report is built again.
    assert main(["repro", "--presets", "answer", *sweep]) == 0
    summary, err = _json_stdout(capsys)
    assert [(r["preset"], r["cached"]) for r in summary["runs"]] == [("answer", True)]
    assert [v["preset"] for v in summary["verdicts"]] == ["answer"]
    assert "== answer seed 0 ==" in err and TABLE_HEADER in err
