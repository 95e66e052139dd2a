"""The bnlab command: train, presets, exit codes for bad flags and bad input."""

import json
import subprocess
import sys

import pytest

from bnlab.cli import main
from bnlab.table import TABLE_HEADER


def test_train_prints_the_table_and_writes_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--preset", "answer", "--epochs", "1", "--seed", "2", "--out", str(out),
                 "--set", "widths=784,32,32,10"])
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


@pytest.mark.parametrize("argv", [
    ["train"],                                               # --preset missing
    ["train", "--preset", "answer", "--epochs", "0"],
    ["train", "--preset", "answer", "--epochs", "ten"],
    ["train", "--preset", "answer", "--device", "tpu"],
    ["train", "--preset", "answer", "--set", "novalue"],
    ["nonsense-command"],
])
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


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--preset", "answer", "--set", "colour=blue"], "unknown setting 'colour'"),
    (["train", "--preset", "answer", "--set", "norm=batch"], "norm must be one of"),
])
def test_bad_values_exit_2_with_one_paragraph(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_missing_data_dir_exits_2_and_names_the_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["train", "--preset", "answer", "--epochs", "1", "--data-dir", str(empty), "--out", str(tmp_path / "r")])
    assert code == 2
    assert str(empty) in capsys.readouterr().err


def test_cuda_request_without_cuda_exits_2(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "--preset", "answer", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
