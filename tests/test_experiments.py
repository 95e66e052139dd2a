"""Presets against the question's and the answer's programs, and the parsers for overrides and seed lists."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnlab.config import apply_overrides, parse_seeds
from bnlab.presets import ALL_PRESETS, PRESETS, get_preset, in_band, parse_presets


def test_every_program_of_the_question_and_answer_is_a_preset():
    assert set(ALL_PRESETS) == {
        "question",
        "question-first-snippet",
        "answer",
        "no-bn",
        "tensorflow",
        "tensorflow-no-bn",
    }
    for p in PRESETS.values():
        assert p.config.train.epochs == 100 and p.config.train.batch_size == 1000
        assert p.config.model.widths == (784, 100, 100, 10)


@pytest.mark.parametrize(
    "name, norm, momentum, lr, init",
    [
        ("question", "shared", 0.1, 0.01, "chainer-he-normal"),  # decay=0.9, Adam(alpha=0.01)
        ("question-first-snippet", "shared", 0.01, 0.001, "chainer-he-normal"),  # decay=0.99, Adam()
        ("answer", "per-layer", 0.1, 0.01, "chainer-he-normal"),
        ("no-bn", "none", None, 0.01, "chainer-he-normal"),
        ("tensorflow", "per-layer", 0.1, 0.01, "tf-glorot-uniform"),  # momentum=0.9 (old value)
        ("tensorflow-no-bn", "none", None, 0.01, "tf-glorot-uniform"),
    ],
)
def test_presets_match_the_question_and_answer_programs(name, norm, momentum, lr, init):
    cfg = get_preset(name).config
    assert cfg.model.norm == norm
    assert cfg.train.lr == lr
    assert cfg.model.init == init
    if momentum is not None:
        assert cfg.model.bn_momentum == pytest.approx(momentum)
        assert cfg.model.bn_eps == 1e-3
    assert cfg.train.adam_eps == 1e-8 and cfg.train.adam_eps_mode == "chainer"


def test_tensorflow_preset_semantics():
    cfg = get_preset("tensorflow").config
    assert cfg.model.logits_norm and cfg.model.running_var == "biased"
    assert cfg.train.train_metrics == "eval-after-step" and cfg.train.batching == "array-split"
    assert not get_preset("tensorflow-no-bn").config.model.logits_norm


def test_accept_bands_follow_the_issue():
    assert get_preset("answer").accept == (0.978, 1.0)
    assert get_preset("no-bn").accept == (0.970, 0.986)
    assert get_preset("question").accept[1] == 0.90
    assert get_preset("question-first-snippet").accept[1] == 0.80
    assert in_band(get_preset("answer"), 0.981) and not in_band(get_preset("answer"), 0.97)


def test_overrides_change_only_what_is_named():
    base = get_preset("answer").config
    cfg = apply_overrides(
        base,
        {"lr": "0.001", "model.norm": "shared", "widths": "784,50,50,10", "train.epochs": "3", "logits-norm": "true"},
    )
    assert (cfg.train.lr, cfg.model.norm, cfg.model.widths, cfg.train.epochs) == (0.001, "shared", (784, 50, 50, 10), 3)
    assert cfg.model.logits_norm is True
    assert cfg.train.batch_size == base.train.batch_size and cfg.model.bn_eps == base.model.bn_eps


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"nope": "1"}, "unknown setting"),
        ({"model.lr": "1"}, "unknown setting"),
        ({"lr": "fast"}, "bad value for lr"),
        ({"logits_norm": "maybe"}, "bad value"),
        ({"norm": "batch"}, "norm must be one of"),
        ({"epochs": "0"}, r"epochs \(--epochs\) must be"),
    ],
)
def test_bad_overrides_are_rejected_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_preset("answer").config, overrides)


@given(st.lists(st.integers(0, 500), min_size=1, max_size=20))
def test_parse_seeds_round_trips_lists(seeds):
    assert parse_seeds(",".join(map(str, seeds))) == list(dict.fromkeys(seeds))


@given(st.integers(0, 1000), st.integers(0, 50))
def test_parse_seeds_ranges(start, length):
    assert parse_seeds(f"{start}-{start + length}") == list(range(start, start + length + 1))


@pytest.mark.parametrize("text", ["", "1,,2", "4-2", "a", "-1", "0-99999"])
def test_parse_seeds_rejects_bad_lists(text):
    with pytest.raises(ValueError):
        parse_seeds(text)


def test_parse_presets():
    assert parse_presets("answer, question,answer") == ["answer", "question"]
    assert parse_presets("all") == list(ALL_PRESETS)
    with pytest.raises(ValueError, match="unknown preset"):
        parse_presets("answer,nope")
