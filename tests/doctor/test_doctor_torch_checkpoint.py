"""``--checkpoint FILE.pt`` for a PyTorch model: the doctor takes exactly the state dicts
``model.load_state_dict(state, strict=True)`` takes, and reads the keys of a model saved
inside DistributedDataParallel (``module.``) or torch.compile (``_orig_mod.``) without
the wrapper's prefix, saying so in the report's notes.

Every file is written by ``torch.save`` from a real model (the answer's MLP, with two
BatchNorm1d); the DDP one inside a real one-process gloo group on 127.0.0.1.
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ddp_jobs import free_port
from torch.nn.parallel import DistributedDataParallel

from bnlab.doctor.command import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ANSWER = f"{EXAMPLES / 'answer_torch.py'}:MyModel"
QUESTION = f"{EXAMPLES / 'question_torch.py'}:MyModel"


def _example(name: str) -> torch.nn.Module:
    sys.path.insert(0, str(EXAMPLES))
    try:
        module = __import__(name)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module.MyModel()


def _trained_looking() -> torch.nn.Module:
    """The answer's model with a running mean of 3.0 in bn1: visible in the report."""
    model = _example("answer_torch")
    with torch.no_grad():
        model.bn1.running_mean.fill_(3.0)
    return model


def _doctor(path: Path, capsys, target: str = ANSWER) -> tuple[int, dict | None, str]:
    code = main([target, "--checkpoint", str(path), "--input-shape", "64,784", "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def _bn1_mean_seen(report: dict) -> bool:
    return any(f["check"] == "stale-stats" and f["where"] == "bn1" for f in report["findings"])


def _pytorch_takes(state: dict) -> bool:
    try:
        _example("answer_torch").load_state_dict(state, strict=True)
    except RuntimeError:
        return False
    return True


# -- what PyTorch takes, the doctor takes ----------------------------------------------------


def test_checkpoint_verdict_is_pytorchs_on_a_missing_num_batches_tracked(tmp_path: Path, capsys) -> None:
    """A state without ``num_batches_tracked`` (saved as a plain dict: no BN version in its
    metadata) loads in PyTorch, which fills the counter in: the doctor loads it too. Kept
    in an OrderedDict whose metadata says BN version 2, PyTorch refuses it: so does the doctor."""
    saved = _trained_looking().state_dict()
    plain = {k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}
    versioned = OrderedDict(plain)
    versioned._metadata = saved._metadata  # type: ignore[attr-defined]
    for state, name in ((plain, "plain.pt"), (versioned, "versioned.pt")):
        torch.save(state, tmp_path / name)
        loaded = torch.load(tmp_path / name, weights_only=True)
        code, report, err = _doctor(tmp_path / name, capsys)
        if _pytorch_takes(loaded):
            assert name == "plain.pt"
            assert code in (0, 1) and report is not None and _bn1_mean_seen(report), err
        else:
            assert name == "versioned.pt"
            assert code == 2 and "missing keys: bn1.num_batches_tracked, bn2.num_batches_tracked" in err


def test_checkpoint_missing_a_weight_is_refused_naming_only_it(tmp_path: Path, capsys) -> None:
    """bn1.weight is missing for PyTorch too; the counters PyTorch fills in are not named."""
    state = {k: v for k, v in _trained_looking().state_dict().items() if not k.endswith("num_batches_tracked")}
    del state["bn1.weight"]
    torch.save(state, tmp_path / "no_weight.pt")
    code, report, err = _doctor(tmp_path / "no_weight.pt", capsys)
    assert code == 2 and report is None
    assert "does not fit MyModel: missing keys: bn1.weight." in err
    assert "num_batches_tracked" not in err and "Traceback" not in err


def test_checkpoint_with_a_wrong_shape_names_both_shapes(tmp_path: Path, capsys) -> None:
    state = _trained_looking().state_dict()
    state["bn1.running_mean"] = torch.zeros(50)
    state["extra"] = torch.zeros(1)
    torch.save({k: v for k, v in state.items() if k != "l3.bias"}, tmp_path / "shapes.pt")
    code, _, err = _doctor(tmp_path / "shapes.pt", capsys)
    assert code == 2
    assert "missing keys: l3.bias; unexpected keys: extra; shapes differ (checkpoint vs model): " in err
    assert "bn1.running_mean (50,) vs (100,)" in err and "size mismatch" not in err  # bnlab's words, not PyTorch's


# -- states saved from a wrapped model -------------------------------------------------------


@pytest.fixture
def one_process_group() -> Iterator[None]:
    """A real gloo group of one rank on 127.0.0.1: enough for DistributedDataParallel."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=timedelta(seconds=60)
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_checkpoint_saved_from_ddp_loads_without_module_prefix(one_process_group, tmp_path: Path, capsys) -> None:
    state = DistributedDataParallel(_trained_looking()).state_dict()
    assert all(key.startswith("module.") for key in state)
    torch.save(state, tmp_path / "ddp.pt")
    code, report, err = _doctor(tmp_path / "ddp.pt", capsys)
    assert code in (0, 1) and report is not None, err
    assert _bn1_mean_seen(report)  # the weights really loaded
    assert (
        "read ddp.pt without its `module.` prefix (saved from a model wrapped in "
        "DistributedDataParallel or DataParallel)" in report["notes"]
    )


def test_checkpoint_saved_from_compiled_ddp_loads_without_both_prefixes(
    one_process_group, tmp_path: Path, capsys
) -> None:
    # torch.compile compiles at the first call only: its state_dict is immediate
    state = torch.compile(DistributedDataParallel(_trained_looking())).state_dict()
    torch.save(state, tmp_path / "both.pt")
    code, report, err = _doctor(tmp_path / "both.pt", capsys)
    assert code in (0, 1) and report is not None, err
    assert _bn1_mean_seen(report)
    assert any(
        "without its `_orig_mod.module.` prefix" in note and "then torch.compile" in note for note in report["notes"]
    )


def test_checkpoint_saved_from_compiled_model_loads_without_orig_mod_prefix(tmp_path: Path, capsys) -> None:
    state = torch.compile(_trained_looking()).state_dict()
    assert all(key.startswith("_orig_mod.") for key in state)
    torch.save(state, tmp_path / "compiled.pt")
    code, report, err = _doctor(tmp_path / "compiled.pt", capsys)
    assert code in (0, 1) and report is not None, err
    assert _bn1_mean_seen(report)
    assert (
        "read compiled.pt without its `_orig_mod.` prefix (saved from a model wrapped in torch.compile)"
        in (report["notes"])
    )


def test_checkpoint_of_another_wrapped_model_names_the_prefix_tried(tmp_path: Path, capsys) -> None:
    state = torch.compile(_example("question_torch")).state_dict()  # one shared BN: no bn1, bn2
    torch.save(state, tmp_path / "other.pt")
    code, report, err = _doctor(tmp_path / "other.pt", capsys)
    assert code == 2 and report is None
    assert "does not fit MyModel, even read without the `_orig_mod.` prefix of a model wrapped in torch.compile" in err
    assert "missing keys: bn1.weight" in err and "unexpected keys: bn.weight" in err
    assert "Traceback" not in err


def test_a_model_owning_a_module_attribute_reads_its_keys_as_saved(tmp_path: Path, capsys) -> None:
    """Keys that fit as saved are never stripped, even where they all start with `module.`."""
    model_file = tmp_path / "holder.py"
    model_file.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(EXAMPLES)!r})\n"
        "import torch\n"
        "from answer_torch import MyModel\n\n"
        "class Holder(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.module = MyModel()\n\n"
        "    def forward(self, x):\n"
        "        return self.module(x)\n"
    )
    holder = torch.nn.Module()
    holder.module = _trained_looking()
    torch.save(holder.state_dict(), tmp_path / "holder.pt")
    code, report, err = _doctor(tmp_path / "holder.pt", capsys, target=f"{model_file}:Holder")
    assert code in (0, 1) and report is not None, err
    assert not any("prefix" in note for note in report["notes"])
    assert any(f["check"] == "stale-stats" and f["where"] == "module.bn1" for f in report["findings"])
