"""``bnlab.load_run``: the public way back from a run directory to a model, and the one safe
reader of PyTorch files (``bnlab.safeload``) under it: nothing in a file runs, and every
damaged file is one paragraph (exit 2 on the command line), never a traceback."""

import os
import pickle

import pytest
import torch

import bnlab
from bnlab.config import apply_overrides
from bnlab.engines import train
from bnlab.errors import InputError, quote_error
from bnlab.presets import get_preset


def _tiny(engine: str = "torch"):
    return apply_overrides(get_preset("answer").config, {"epochs": "1", "widths": "784,16,16,10", "engine": engine})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("runs") / "answer"
    train(_tiny(), mnist, out_dir=out, echo=None)
    return out


def test_load_run_gives_the_trained_model_in_eval_mode_and_its_config(run_dir, mnist):
    model, cfg = bnlab.load_run(run_dir)
    assert cfg.model.widths == (784, 16, 16, 10) and not model.training
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    x = torch.as_tensor(mnist.test_images[:500], dtype=torch.float32).reshape(500, -1) / 255
    accuracy = (model(x).argmax(1).numpy() == mnist.test_labels[:500]).mean()
    assert accuracy > 0.5  # one epoch of the answer: far above chance


def test_load_run_on_a_tensorflow_run(tmp_path, mnist):
    from bnlab.engines import tensorflow as tfe

    if tfe._missing("tensorflow"):  # importorskip itself would import TF before the engine sets it up
        pytest.importorskip("tensorflow")
    out = tmp_path / "tf"
    train(_tiny("tensorflow"), mnist, out_dir=out, echo=None)
    model, cfg = bnlab.load_run(out)
    assert cfg.train.engine == "tensorflow" and len(model.state_dict()) > 0


def test_a_folder_that_is_not_a_finished_run(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        bnlab.load_run(tmp_path / "nowhere")
    with pytest.raises(InputError, match="no checkpoint.pt .*no history.json"):
        bnlab.load_run(tmp_path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("damage", ["empty", "truncated", "text", "code", "foreign"])
def test_a_damaged_checkpoint_is_one_paragraph_and_runs_nothing(run_dir, tmp_path, damage, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "run"
    bad.mkdir()
    good = (run_dir / "checkpoint.pt").read_bytes()
    payload = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "text": b"not a checkpoint\nsecond line\n",
        "code": pickle.dumps({"model": _RunsCode()}),
        "foreign": pickle.dumps({"model": 1}, protocol=4),  # a plain pickle, not torch.save's zip
    }[damage]
    if damage == "code":
        torch.save({"model": _RunsCode(), "config": {}}, bad / "checkpoint.pt")
    else:
        (bad / "checkpoint.pt").write_bytes(payload)
    with pytest.raises(InputError) as caught:
        bnlab.load_run(bad)
    message = str(caught.value)
    assert "checkpoint.pt" in message and "\n" not in message
    expected = {"empty": "is empty (0 bytes)", "code": "refused: loading it would run code"}
    assert expected.get(damage, "is not a readable PyTorch file") in message
    assert not (tmp_path / "PWNED").exists()
    assert "In PyTorch 2.6" not in message  # torch's preamble is not the reason


@pytest.mark.parametrize(
    ("err", "quoted"),
    [
        (EOFError(), "EOFError"),
        (ValueError("\n\n  first real line\nsecond"), "ValueError: first real line; second"),
        (RuntimeError("word " * 100), "RuntimeError: " + ("word " * 40).strip() + " ..."),
    ],
)
def test_a_quoted_framework_error_survives_empty_and_multiline_messages(err, quoted):
    assert quote_error(err) == quoted
