"""Real data, checkpoints and run directories on the doctor's command line.

``--data FILE.py:NAME`` (batches from the user's code, a DataLoader included),
``--checkpoint PATH`` (a state dict, weights_only) and a bnlab run directory as the
target; every bad input is exit 2 with one paragraph naming the problem.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from trained_runs import train_preset

from bnlab.doctor.command import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
QUESTION = f"{EXAMPLES / 'question_torch.py'}:MyModel"
ANSWER = f"{EXAMPLES / 'answer_torch.py'}:MyModel"

DATA_FILE = """
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from bnlab.data import load_mnist, to_float


def loader():
    data = load_mnist()
    x = torch.from_numpy(to_float(data.train_images)[:6000])
    y = torch.from_numpy(np.asarray(data.train_labels[:6000]).astype(np.int64))
    return DataLoader(TensorDataset(x, y), batch_size=500)


def with_nan():
    x = np.zeros((10, 784), np.float32)
    x[3, 5] = np.nan
    return [(x, np.zeros(10, np.int64))] * 3


def empty():
    return iter([])


def bare_inputs():
    return [np.zeros((10, 784), np.float32)] * 3


def short_labels():
    return [(np.zeros((10, 784), np.float32), np.zeros(9, np.int64))] * 3


def float_labels():
    return [(np.zeros((10, 784), np.float32), np.zeros(10, np.float32))] * 3


def shapes_change():
    return [(np.zeros((10, 784), np.float32), np.zeros(10, np.int64)),
            (np.zeros((10, 28, 28), np.float32), np.zeros(10, np.int64))]


def raises():
    raise RuntimeError("no data today")


NUMBER = 5
"""


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "mydata.py"
    path.write_text(textwrap.dedent(DATA_FILE))
    return path


def test_data_file_with_a_dataloader(data_file: Path, capsys) -> None:
    code = main([QUESTION, "--data", f"{data_file}:loader", "--train-steps", "20", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["findings"][0]["check"] == "shared-bn"
    assert report["probe"]["input_shape"] == [500, 784]
    uses = report["data"]
    assert uses["read"].startswith("12 batches")  # 6000 images in batches of 500
    assert uses["training steps"] == "batches 1-10 (cycled)"
    assert uses["probe"] == "batch 11 (held out)"
    assert not [use for use in uses if "--fix" in use]  # listed only when --fix uses them
    assert report["summary"]["train_eval"]["acc_train"] > 0.7  # real labels were learnt


@pytest.mark.parametrize(
    "name, words",
    [
        ("with_nan", "1 NaN or infinite values"),
        ("empty", "gave 0 batches"),
        ("bare_inputs", "not an (inputs, labels) pair"),
        ("short_labels", "have shape (9,)"),
        ("float_labels", "dtype float32"),
        ("shapes_change", "every batch must have the same sample shape"),
        ("raises", "RuntimeError: no data today"),
        ("NUMBER", "not an iterable of (inputs, labels) batches"),
        ("missing", "has no attribute 'missing'"),
    ],
)
def test_bad_data_is_exit_2_with_one_paragraph(data_file: Path, name: str, words: str, capsys) -> None:
    assert main([QUESTION, "--data", f"{data_file}:{name}", "--train-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("\n") == 1


def test_data_file_that_does_not_import(tmp_path: Path, capsys) -> None:
    path = tmp_path / "broken.py"
    path.write_text("import numpy as np\n1 / 0\n")
    assert main([QUESTION, "--data", f"{path}:loader"]) == 2
    err = capsys.readouterr().err
    assert "could not import" in err and "ZeroDivisionError" in err and "the data" in err


def test_data_value_must_name_a_source(capsys) -> None:
    assert main([QUESTION, "--data", "cifar"]) == 2
    assert "mnist or fashion-mnist or FILE.py:NAME" in capsys.readouterr().err


# -- --checkpoint -------------------------------------------------------------------------


def _answer_model():
    import sys

    sys.path.insert(0, str(EXAMPLES))
    try:
        import answer_torch
    finally:
        sys.path.remove(str(EXAMPLES))
    return answer_torch.MyModel()


def test_checkpoint_is_loaded(tmp_path: Path, capsys) -> None:
    model = _answer_model()
    with torch.no_grad():
        model.bn1.running_mean.fill_(3.0)  # visible in the report's layer statistics
    path = tmp_path / "answer.pt"
    torch.save(model.state_dict(), path)
    assert main([ANSWER, "--checkpoint", str(path), "--input-shape", "64,784", "--json"]) in (0, 1)
    report = json.loads(capsys.readouterr().out)
    assert report["probe"]["train_steps"] == 0  # a trained model is judged as handed over
    stale = [f for f in report["findings"] if f["check"] == "stale-stats" and f["where"] == "bn1"]
    assert stale, "the loaded running mean of 3.0 must show"


def test_corrupt_checkpoint(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.pt"
    torch.save(_answer_model().state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])  # truncated
    assert main([ANSWER, "--checkpoint", str(path), "--input-shape", "8,784"]) == 2
    assert "is not a readable PyTorch file" in capsys.readouterr().err


class Opaque:  # pickled by reference: weights_only refuses it
    pass


def test_checkpoint_needing_arbitrary_objects(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"model": _answer_model().state_dict(), "extra": Opaque()}, path)
    assert main([ANSWER, "--checkpoint", str(path), "--input-shape", "8,784"]) == 2
    err = capsys.readouterr().err
    assert "refused: loading it would run code" in err and "Opaque" in err


def test_checkpoint_with_wrong_keys(tmp_path: Path, capsys) -> None:
    state = _answer_model().state_dict()
    state["bn"] = state.pop("bn1.weight")  # one missing, one unexpected
    path = tmp_path / "keys.pt"
    torch.save(state, path)
    assert main([ANSWER, "--checkpoint", str(path), "--input-shape", "8,784"]) == 2
    err = capsys.readouterr().err
    assert "missing keys: bn1.weight" in err and "unexpected keys: bn" in err


# -- a bnlab run directory as the target ---------------------------------------------------


@pytest.fixture(scope="module")
def question_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "question-seed0"
    train_preset("question", 1, out)
    return out


def test_run_directory_target(question_run: Path, capsys) -> None:
    code = main([str(question_run), "--json"])  # --data defaults to the run's data set
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["findings"][0]["check"] == "shared-bn"
    assert "preset question, seed 0" in report["model"]
    assert report["probe"]["source"] == "(MNIST test images)"
    assert report["probe"]["train_steps"] == 0
    assert "training steps" not in report["data"]  # none were taken


def _copy_run(run: Path, to: Path) -> Path:
    to.mkdir()
    for name in ("config.json", "history.json", "checkpoint.pt"):
        (to / name).write_bytes((run / name).read_bytes())
    return to


@pytest.mark.parametrize(
    "damage, words",
    [
        ("config-json", "is not valid JSON"),
        ("config-field", "norm must be one of"),
        ("config-missing", "a folder without config.json"),
        ("checkpoint-missing", "no such file"),
        ("checkpoint-other-model", "was saved from another model"),
    ],
)
def test_damaged_run_directory(question_run: Path, tmp_path: Path, damage: str, words: str, capsys) -> None:
    run = _copy_run(question_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    if damage == "config-json":
        (run / "config.json").write_text("{not json")
    elif damage == "config-field":
        config["model"]["norm"] = "sometimes"
        (run / "config.json").write_text(json.dumps(config))
    elif damage == "config-missing":
        (run / "config.json").unlink()
    elif damage == "checkpoint-missing":
        (run / "checkpoint.pt").unlink()
    else:
        config["model"]["widths"] = [784, 50, 50, 10]
        (run / "config.json").write_text(json.dumps(config))
    assert main([str(run), "--data", "mnist"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
