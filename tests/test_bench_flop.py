"""The FLOP counts behind bench/bench_epoch.py's arithmetic limit and the repro's floor,
checked against a count written out from the layer widths (issue 20 quotes both)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bnlab.presets import PRESETS

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_epoch.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_epoch", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _macs(widths, rows, backward):
    pairs = list(zip(widths[:-1], widths[1:]))
    forward = sum(a * b for a, b in pairs)
    # the weight gradient of every layer, the input gradient of every layer but the first
    return rows * (forward + (forward + sum(a * b for a, b in pairs[1:]) if backward else 0))


def test_the_answer_epoch_is_24_6_gflop():
    bench = _bench()
    widths = (784, 100, 100, 10)
    expected = 2 * (_macs(widths, 60000, backward=True) + _macs(widths, 10000, backward=False))
    assert bench.epoch_flop(widths) == expected == 24_564_000_000


def test_the_tensorflow_presets_pay_one_more_forward_a_step():
    bench = _bench()
    widths = (784, 100, 100, 10)
    assert bench.epoch_flop(widths, eval_after_step=True) - bench.epoch_flop(widths) == 2 * _macs(widths, 60000, False)


def test_the_repro_counts_every_preset_with_its_own_settings():
    bench = _bench()
    expected = 0
    for preset in PRESETS.values():
        model, train = preset.config.model, preset.config.train
        extra = _macs(model.widths, 60000, False) if train.train_metrics == "eval-after-step" else 0
        per_epoch = 2 * (_macs(model.widths, 60000, True) + extra + _macs(model.widths, 10000, False))
        expected += 5 * train.epochs * per_epoch
    assert bench.repro_flop() == expected
    assert round(expected / 1e12, 1) == 84.4  # four presets at 24.6 GFLOP an epoch, the two TF ones at 35.3
