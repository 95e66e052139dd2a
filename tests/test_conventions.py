"""bnlab.conventions: the facts table, convert() across every pair, and `bnlab conventions/convert`."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnlab import cli
from bnlab.conventions import (
    CONVENTIONS,
    FRAMEWORKS,
    convert,
    format_conventions_table,
    format_rate,
    from_torch_momentum,
    parameter_name,
    to_torch_momentum,
)

PAIRS = list(itertools.product(FRAMEWORKS, repeat=2))
rates = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


# ------------------------------------------------------------------------------ the data


def test_the_five_frameworks_and_their_checked_facts():
    assert set(FRAMEWORKS) == {"chainer", "torch", "keras", "tf1", "flax"}
    facts = {k: (c.parameter, c.weights, c.default, c.eps_default, c.running_var) for k, c in CONVENTIONS.items()}
    assert facts == {
        "chainer": ("decay", "old", 0.9, 2e-5, "unbiased"),
        "torch": ("momentum", "new", 0.1, 1e-5, "unbiased"),
        "keras": ("momentum", "old", 0.99, 1e-3, "biased"),
        "tf1": ("momentum", "old", 0.99, 1e-3, "biased"),
        "flax": ("momentum", "old", 0.99, 1e-5, "biased"),
    }
    assert all(c.eval_switch and c.checked_in and c.update for c in CONVENTIONS.values())


def test_facts_match_the_installed_torch():
    import torch

    bn = torch.nn.BatchNorm1d(3)
    assert (bn.momentum, bn.eps) == (CONVENTIONS["torch"].default, CONVENTIONS["torch"].eps_default)


@pytest.mark.chainer
def test_facts_match_the_installed_chainer():
    chainer = pytest.importorskip("chainer")
    import numpy as np

    bn = chainer.links.BatchNormalization(3)
    assert (bn.decay, bn.eps) == (CONVENTIONS["chainer"].default, CONVENTIONS["chainer"].eps_default)
    # decay weights the OLD value, and the running variance is the unbiased one.
    x = np.array([[0.0, 0, 0], [2.0, 2, 2]], dtype=np.float32)  # batch mean 1, biased var 1, unbiased 2
    with chainer.using_config("train", True):
        bn(x)
    assert np.allclose(bn.avg_mean, 0.9 * 0 + 0.1 * 1) and np.allclose(bn.avg_var, 0.9 * 1 + 0.1 * 2)


def test_parameter_name():
    assert parameter_name("chainer") == "decay"
    assert [parameter_name(f) for f in ("torch", "keras", "tf1", "flax")] == ["momentum"] * 4
    with pytest.raises(ValueError, match="unknown framework 'jax'"):
        parameter_name("jax")


def test_table_lists_every_framework_with_its_facts():
    table = format_conventions_table()
    for c in CONVENTIONS.values():
        row = next(line for line in table.splitlines() if line.startswith(c.name))
        for text in (c.layer, c.parameter, f"{c.weights} value", c.running_var, c.eval_switch):
            assert text in row, (c.framework, text)
    keras = next(line for line in table.splitlines() if line.startswith("Keras"))
    assert "  0.99  " in keras and "  0.01  " in keras  # default and its torch momentum, no float noise
    assert "0.0100000" not in table and "0.0999999" not in table


# ------------------------------------------------------------------------------ convert


@pytest.mark.parametrize(
    "source, value, target, expected",
    [
        ("chainer", 0.9, "torch", 0.1),
        ("torch", 0.1, "chainer", 0.9),
        ("keras", 0.99, "torch", 0.01),
        ("chainer", 0.9, "tf1", 0.9),
        ("flax", 0.99, "keras", 0.99),
        ("torch", 0.3, "torch", 0.3),
    ],
)
def test_convert_examples(source, value, target, expected):
    assert convert(value, source, target) == pytest.approx(expected, abs=1e-15)


@given(rates, st.sampled_from(PAIRS))
def test_convert_round_trips_for_every_pair(value, pair):
    source, target = pair
    there = convert(value, source, target)
    assert 0.0 <= there <= 1.0
    assert math.isclose(convert(there, target, source), value, rel_tol=0, abs_tol=2**-53)


@given(rates, st.sampled_from(FRAMEWORKS), st.sampled_from(FRAMEWORKS), st.sampled_from(FRAMEWORKS))
def test_convert_composes_through_any_framework(value, a, b, c):
    direct = convert(value, a, c)
    assert math.isclose(convert(convert(value, a, b), b, c), direct, rel_tol=0, abs_tol=2**-52)


@given(rates, st.sampled_from(FRAMEWORKS))
def test_convert_agrees_with_the_torch_momentum_helpers(value, framework):
    assert convert(value, framework, "torch") == to_torch_momentum(framework, value)
    assert convert(value, "torch", framework) == from_torch_momentum(framework, value)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_convert_rejects_rates_outside_0_1(value):
    with pytest.raises(ValueError, match="must lie in"):
        convert(value, "chainer", "torch")


@pytest.mark.parametrize(
    "value, text",
    [
        (1 - 0.9, "0.1"),
        (1 - 0.99, "0.01"),
        (0.0, "0.0"),
        (1.0, "1.0"),
        (0.999, "0.999"),
        (1e-5, "1e-05"),
        (0.123456789, "0.123456789"),
    ],
)
def test_format_rate(value, text):
    assert format_rate(value) == text


# ---------------------------------------------------------------------------------- CLI


@pytest.fixture
def only_ours(monkeypatch):
    """The parser with just these two subcommands: others' modules may be mid-edit."""
    monkeypatch.setattr(cli, "PARSER_BUILDERS", [cli.add_conventions_parser, cli.add_convert_parser])


def test_both_subcommands_are_registered():
    assert cli.add_conventions_parser in cli.PARSER_BUILDERS and cli.add_convert_parser in cli.PARSER_BUILDERS


@pytest.mark.parametrize(
    "argv, printed",
    [
        (["--from", "chainer", "--decay", "0.9", "--to", "torch"], "momentum=0.1"),
        (["--from", "chainer", "--decay", "0.99", "--to", "torch"], "momentum=0.01"),
        (["--from", "torch", "--momentum", "0.1", "--to", "chainer"], "decay=0.9"),
        (["--from", "torch", "--momentum", "0.01", "--to", "keras"], "momentum=0.99"),
        (["--from", "keras", "--momentum", "0.99", "--to", "flax"], "momentum=0.99"),
        (["--from", "tf1", "--momentum", "0.9", "--to", "chainer"], "decay=0.9"),
        (["--from", "flax", "--momentum", "0.9", "--to", "torch"], "momentum=0.1"),
    ],
)
def test_convert_command_prints_the_target_parameter(only_ours, capsys, argv, printed):
    assert cli.main(["convert", *argv]) == 0
    assert capsys.readouterr().out == printed + "\n"


@pytest.mark.parametrize("source, target", PAIRS)
def test_convert_command_works_for_every_pair(only_ours, capsys, source, target):
    flag = "--decay" if source == "chainer" else "--momentum"
    assert cli.main(["convert", "--from", source, flag, "0.9", "--to", target]) == 0
    name, _, value = capsys.readouterr().out.strip().partition("=")
    assert name == parameter_name(target)
    assert float(value) == pytest.approx(convert(0.9, source, target), abs=1e-12)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--from", "torch", "--decay", "0.9", "--to", "chainer"], "its running-average rate is --momentum"),
        (["--from", "chainer", "--momentum", "0.1", "--to", "torch"], "its running-average rate is --decay"),
        (["--from", "keras", "--to", "torch"], "exactly one flag"),
        (["--from", "chainer", "--decay", "0.9", "--momentum", "0.1", "--to", "torch"], "exactly one flag"),
        (["--from", "chainer", "--decay", "1.5", "--to", "torch"], "must lie in [0, 1]"),
    ],
)
def test_convert_command_usage_errors_exit_2_with_one_paragraph(only_ours, capsys, argv, message):
    assert cli.main(["convert", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "--from", "caffe", "--momentum", "0.9", "--to", "torch"],
        ["convert", "--from", "torch", "--momentum", "x", "--to", "keras"],
        ["convert", "--momentum", "0.9", "--to", "keras"],
    ],
)
def test_convert_command_bad_flags_exit_2(only_ours, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


def test_conventions_command_prints_the_table(only_ours, capsys):
    assert cli.main(["conventions"]) == 0
    assert capsys.readouterr().out.strip() == format_conventions_table().strip()
    assert cli.main(["conventions", "--framework", "chainer"]) == 0
    out = capsys.readouterr().out
    assert "decay" in out and "unbiased" in out and "chainer.using_config('train', False)" in out
