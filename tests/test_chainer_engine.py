"""The chainer engine's API: what it refuses, state_dict mapping, init, threads, the CLI path."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

from bnlab.config import apply_overrides
from bnlab.models import ModelConfig, build_model
from bnlab.presets import PRESETS

CHAINER_PRESETS = ["question", "question-first-snippet", "answer", "no-bn"]


def test_missing_chainer_is_a_clear_import_error(monkeypatch):
    from bnlab.engines import chainer as chainer_engine

    monkeypatch.setitem(sys.modules, "chainer", None)  # makes `import chainer` raise ImportError
    with pytest.raises(ImportError, match=r"make venv-chainer.*DEVELOPERS\.md"):
        chainer_engine.import_chainer()


def test_missing_chainer_on_the_command_line_is_one_paragraph_and_exit_2(monkeypatch, capsys, tmp_path):
    from bnlab import cli

    monkeypatch.setitem(sys.modules, "chainer", None)
    monkeypatch.setattr(cli, "PARSER_BUILDERS", [cli.add_train_parser])
    code = cli.main(["train", "--preset", "answer", "--engine", "chainer", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "DEVELOPERS.md" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "preset, fields",
    [
        ("tensorflow", ["model.running_var", "model.logits_norm", "model.init", "train.train_metrics"]),
        ("tensorflow-no-bn", ["model.init", "train.train_metrics"]),
    ],
)
def test_tensorflow_presets_are_refused_naming_each_field(preset, fields):
    from bnlab.engines.chainer import check_config as check_chainer_config

    cfg = apply_overrides(PRESETS[preset].config, {"engine": "chainer"})
    with pytest.raises(ValueError) as err:
        check_chainer_config(cfg)
    message = str(err.value)
    for field in fields:
        assert field in message
    assert "--engine torch" in message


@pytest.mark.parametrize(
    "override, field",
    [
        ({"adam_eps_mode": "torch"}, "train.adam_eps_mode"),
        ({"train_metrics": "eval-after-step"}, "train.train_metrics"),
        ({"running_var": "biased"}, "model.running_var"),
        ({"init": "torch-default"}, "model.init"),
        ({"device": "cuda"}, "train.device"),
    ],
)
def test_one_unsupported_field_is_named_with_its_fix(override, field):
    from bnlab.engines.chainer import check_config as check_chainer_config

    cfg = apply_overrides(PRESETS["answer"].config, override)
    with pytest.raises(ValueError, match=rf"{field}=.*--set|{field}=.*--device cpu"):
        check_chainer_config(cfg)


@pytest.mark.chainer
@pytest.mark.parametrize("preset", CHAINER_PRESETS)
def test_chainer_presets_are_accepted(preset):
    from bnlab.engines.chainer import check_config as check_chainer_config

    check_chainer_config(apply_overrides(PRESETS[preset].config, {"engine": "chainer"}))


# ------------------------------------------------------------------ needs Chainer itself


@pytest.fixture
def ce():
    pytest.importorskip("chainer")
    from bnlab.engines import chainer as chainer_engine

    return chainer_engine


@pytest.mark.chainer
@pytest.mark.parametrize("norm", ["none", "per-layer", "shared"])
def test_state_dict_round_trip_keeps_torch_keys_order_and_values(ce, norm):
    model = build_model(ModelConfig(norm=norm), seed=3)
    with torch.no_grad():  # non-trivial running statistics and counters
        for name, buf in model.named_buffers():
            buf.copy_(
                torch.arange(buf.numel()).reshape(buf.shape) + 7
                if "num_batches" in name
                else torch.rand(buf.shape) + 0.5
            )
    state = model.state_dict()
    chain = ce.build_chainer_model(model.cfg, state_dict=state)
    back = ce.chainer_state_dict(chain)
    assert list(back) == list(state)
    for key in state:
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key]), key
    if norm == "shared":
        assert chain.bn.avg_mean is not None and not hasattr(chain, "bn1")


@pytest.mark.chainer
def test_loading_a_state_dict_of_another_shape_is_refused(ce):
    chain = ce.build_chainer_model(ModelConfig(norm="per-layer"))
    with pytest.raises(ValueError, match="missing .*bn1.weight"):
        ce.load_torch_state(chain, build_model(ModelConfig(norm="shared")).state_dict())


@pytest.mark.chainer
def test_seeded_he_normal_init_is_chainers_and_reproducible(ce):
    state = np.random.get_state()
    a = ce.build_chainer_model(ModelConfig(widths=(784, 500, 500, 10)), seed=5)
    b = ce.build_chainer_model(ModelConfig(widths=(784, 500, 500, 10)), seed=5)
    c = ce.build_chainer_model(ModelConfig(widths=(784, 500, 500, 10)), seed=6)
    assert np.array_equal(a.l1.W.array, b.l1.W.array) and not np.array_equal(a.l1.W.array, c.l1.W.array)
    # HeNormal: N(0, 2 / fan_in), zero bias; 392000 draws pin the std to about 0.2 %.
    assert a.l1.W.array.std() == pytest.approx(np.sqrt(2 / 784), rel=0.01)
    assert a.l2.W.array.std() == pytest.approx(np.sqrt(2 / 500), rel=0.01)
    assert not a.l1.b.array.any() and a.l1.W.dtype == np.float32
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state()[1:], state[1:]))


@pytest.mark.chainer
def test_blas_threads_are_set_for_the_run_and_restored(ce):
    setters = list(ce._openblas_setters())
    if not setters:
        pytest.skip("numpy here is not linked to an OpenBLAS bnlab can reach")
    _, get = setters[0]
    before = get()
    with ce.blas_threads(1) as note:
        assert get() == 1 and "OpenBLAS threads set to 1" in note
    assert get() == before
    with ce.blas_threads(0) as note:
        assert get() == before and "unchanged" in note


@pytest.mark.chainer
def test_cli_trains_with_the_chainer_engine(ce, mnist, tmp_path, capsys, monkeypatch):
    from bnlab import cli

    # Only the train subcommand: other subcommands' modules may be work in progress.
    monkeypatch.setattr(cli, "PARSER_BUILDERS", [cli.add_train_parser])
    out = tmp_path / "run"
    code = cli.main(["train", "--preset", "answer", "--engine", "chainer", "--epochs", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "epoch  train/loss  val/loss  train/acc   val/acc" in printed
    assert (out / "checkpoint.pt").exists()
    final = float(printed.split("final val/acc ")[1].split(";")[0])
    assert final > 0.95  # one epoch of the answer's network learns MNIST


@pytest.mark.chainer
def test_cli_refuses_the_tensorflow_preset_with_exit_2(ce, capsys, monkeypatch, tmp_path):
    from bnlab import cli

    monkeypatch.setattr(cli, "PARSER_BUILDERS", [cli.add_train_parser])
    code = cli.main(
        ["train", "--preset", "tensorflow", "--engine", "chainer", "--epochs", "1", "--out", str(tmp_path / "tf")]
    )
    assert code == 2
    assert "model.running_var='biased'" in capsys.readouterr().err


@pytest.mark.chainer
def test_diverging_chainer_run_raises_and_marks_the_directory(ce, mnist, tmp_path):
    import json

    from bnlab.engines import train
    from bnlab.errors import TrainingDiverged

    cfg = PRESETS["no-bn"].config
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1, engine="chainer"))
    state = build_model(cfg.model, seed=0).state_dict()
    state["l3.bias"] = torch.full_like(state["l3.bias"], float("nan"))
    with pytest.raises(TrainingDiverged, match="epoch 0, batch 0"):
        train(cfg, mnist, echo=None, out_dir=tmp_path, initial_state=state)
    assert json.loads((tmp_path / "history.json").read_text())["status"] == "diverged"
