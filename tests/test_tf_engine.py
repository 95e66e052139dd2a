"""The tensorflow engine's API: lazy import, what it refuses, init, determinism, the run directory."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from bnlab.config import apply_overrides
from bnlab.engines import tensorflow as tfe
from bnlab.engines import train
from bnlab.errors import MissingExtra, UsageError
from bnlab.models import build_model
from bnlab.presets import PRESETS
from bnlab.rundir import load_checkpoint

RUNNABLE_PRESETS = ["tensorflow", "tensorflow-no-bn", "question", "question-first-snippet", "answer", "no-bn"]


def test_bnlab_and_its_help_do_not_import_tensorflow():
    code = (
        "import sys, contextlib, io\n"
        "import bnlab, bnlab.cli, bnlab.engines, bnlab.engines.tensorflow\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    bnlab.cli.main(['--help'])\n"
        "print('tensorflow' in sys.modules, 'tf_keras' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("where", ["import", "check_config"])
def test_missing_tensorflow_names_both_install_commands(monkeypatch, where):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` raise ImportError
    with pytest.raises(tfe.TensorFlowMissing) as err:
        if where == "import":
            tfe.import_tensorflow()
        else:
            tfe.check_config(apply_overrides(PRESETS["tensorflow"].config, {"engine": "tensorflow"}))
    message = str(err.value)
    assert 'pip install "tensorflow-cpu==2.21.0"' in message
    assert "pip install --no-deps tf_keras==2.21.0" in message
    assert isinstance(err.value, MissingExtra) and err.value.exit_code == 2


def test_missing_tensorflow_on_the_command_line_is_one_paragraph_and_exit_2(monkeypatch, capsys, tmp_path):
    from bnlab import cli

    monkeypatch.setitem(sys.modules, "tensorflow", None)
    monkeypatch.setattr(cli, "PARSER_BUILDERS", [cli.add_train_parser])
    code = cli.main(["train", "--preset", "tensorflow", "--engine", "tensorflow", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "tensorflow-cpu==2.21.0" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing half-written


@pytest.mark.parametrize("preset", RUNNABLE_PRESETS)
def test_every_question_and_answer_preset_is_accepted(preset):
    cfg = apply_overrides(PRESETS[preset].config, {"engine": "tensorflow"})
    tfe.check_config(cfg)


@pytest.mark.parametrize(
    "override, field",
    [
        ({"init": "torch-default"}, "model.init"),
        ({"adam_eps_mode": "torch"}, "train.adam_eps_mode"),
        ({"device": "cuda"}, "train.device"),
    ],
)
def test_what_tf1_cannot_express_is_refused_naming_the_field_and_fix(override, field):
    cfg = apply_overrides(PRESETS["tensorflow"].config, {"engine": "tensorflow", **override})
    with pytest.raises(UsageError, match="cannot run with --engine tensorflow") as err:
        tfe.check_config(cfg)
    message = str(err.value)
    assert field in message and ("--set" in message or "--device cpu" in message)


@pytest.fixture(scope="module")
def tf():
    try:
        return tfe.import_tensorflow()
    except tfe.TensorFlowMissing as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("preset, init", [("tensorflow", "glorot"), ("answer", "he")])
def test_initial_weights_are_tfs_initializers_seeded_by_the_run(tf, preset, init):
    cfg = PRESETS[preset].config
    states = []
    for seed in (0, 0, 1):
        program = tfe.build_program(cfg.model, dataclasses.replace(cfg.train, seed=seed))
        states.append(tfe.tf_state_dict(program))
        program.close()
    assert list(states[0]) == list(build_model(cfg.model).state_dict())  # torch keys, torch order
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # same seed, same weights
    assert not torch.equal(states[0]["l1.weight"], states[2]["l1.weight"])
    w = states[0]["l1.weight"].double()
    assert w.shape == (100, 784) and torch.count_nonzero(states[0]["l1.bias"]) == 0
    if init == "glorot":  # U(+-sqrt(6 / (fan_in + fan_out)))
        limit = (6 / (784 + 100)) ** 0.5
        assert w.abs().max() <= limit and w.abs().max() > 0.99 * limit
        assert float(w.std()) == pytest.approx(limit / 3**0.5, rel=0.02)
    else:  # Chainer's HeNormal: N(0, 2 / fan_in)
        assert float(w.std()) == pytest.approx((2 / 784) ** 0.5, rel=0.02)
        assert w.abs().max() > 3 * (2 / 784) ** 0.5  # not truncated


def test_state_dict_round_trip(tf):
    cfg = PRESETS["tensorflow"].config
    state = build_model(cfg.model, seed=3).state_dict()
    state["bn1.running_var"].fill_(2.5)
    state["bn2.num_batches_tracked"].fill_(7)
    program = tfe.build_program(cfg.model, cfg.train)
    tfe.load_torch_state(program, state)
    back = tfe.tf_state_dict(program)
    with pytest.raises(ValueError, match="does not fit this model"):
        tfe.load_torch_state(program, {k: v for k, v in state.items() if k != "l1.bias"})
    program.close()
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)


def _one_epoch(preset: str, **overrides):
    return apply_overrides(PRESETS[preset].config, {"engine": "tensorflow", "epochs": 1, **overrides})


def _strip_seconds(history):
    return [dataclasses.replace(r, seconds=0.0) for r in history]


def test_same_seed_same_history_shared_bn_run_directory_and_trace(tf, mnist, tmp_path):
    """The question's shared BN on TF (reuse=True): two runs of one seed are identical, the
    run directory is complete and loads as a torch model, the trace has the torch layout."""
    cfg = _one_epoch("question", trace_bn_channels=3)
    first = train(cfg, mnist, out_dir=tmp_path / "a", echo=None)
    second = train(cfg, mnist, out_dir=tmp_path / "b", echo=None)
    assert _strip_seconds(first.history) == _strip_seconds(second.history)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key

    run_dir = tmp_path / "a"
    history = json.loads((run_dir / "history.json").read_text())
    assert history["status"] == "complete" and len(history["history"]) == 1
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["engine"] == "tensorflow" and env["tensorflow"] == tf.__version__
    assert env["tf_threads"] == {"intra_op": 1, "inter_op": 1} and "biased" in env["bn_moving_variance"]
    model, loaded = load_checkpoint(run_dir / "checkpoint.pt")  # weights_only=True inside
    assert loaded.train.engine == "tensorflow"
    assert int(model.state_dict()["bn.num_batches_tracked"]) == 2 * 60  # one BN, two calls a step
    trace = first.bn_trace
    assert list(trace["module_names"]) == ["bn"] and trace["values"].shape == (120, 4, 3)
    np.testing.assert_array_equal(trace["site"], [0, 1] * 60)
    # The second site's moving mean, recorded right after its update, is the first site's
    # value moved towards the second site's batch mean: the calls update in order.
    decay = tfe.as_tf_float32(0.1)
    site0, site1 = trace["values"][0], trace["values"][1]
    np.testing.assert_allclose(site1[2], site0[2] + decay * (site1[0] - site0[2]), rtol=1e-4, atol=1e-6)
    assert first.history[-1].val_acc > 0.5


def test_tensorflow_preset_one_epoch_through_train(tf, mnist, tmp_path):
    cfg = _one_epoch("tensorflow", trace_bn_channels=2)
    result = train(cfg, mnist, out_dir=tmp_path / "run", echo=None)
    assert list(result.bn_trace["module_names"]) == ["bn1", "bn2", "bn_logits"]
    np.testing.assert_array_equal(result.bn_trace["module"], [0, 1, 2] * 60)  # array_split: 60 batches
    assert result.history[-1].val_acc > 0.9
    model, _ = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert {k: int(v) for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")} == {
        "bn1.num_batches_tracked": 60,
        "bn2.num_batches_tracked": 60,
        "bn_logits.num_batches_tracked": 60,
    }
