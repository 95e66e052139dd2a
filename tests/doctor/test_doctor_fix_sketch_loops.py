"""The shared-bn fix sketch for a BN reused inside a loop over a container: one
nn.ModuleList of BNs iterated with the container, and the sketch, pasted into the model,
really fixes it."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from sketch_paste import forward_source, sections
from torch import nn

from bnlab import doctor

X = torch.randn(32, 1, 12, 12)


class LoopShared(nn.Module):
    """One BN after the stem and after each conv of a loop (the new user's CNN)."""

    def __init__(self, width: int = 8, blocks: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(blocks))
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        for conv in self.convs:
            x = F.relu(self.bn(conv(x)))
        return self.head(x.mean((2, 3)))


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)


class LoopOverBlocks(nn.Module):
    """The shared BN follows a layer inside each item: blocks.0.conv, blocks.1.conv."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(self.bn(block.conv(x)))
        return self.head(x.mean((2, 3)))


class Unrolled(LoopShared):
    """The same calls as LoopShared, each on its own line: no loop to propose."""

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.bn(self.convs[0](x)))
        x = F.relu(self.bn(self.convs[1](x)))
        x = F.relu(self.bn(self.convs[2](x)))
        return self.head(x.mean((2, 3)))


class SameLineTwoLayers(nn.Module):
    """Two calls on one line after layers that are no container's items."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(10, 16, bias=False)
        self.b = nn.Linear(10, 16, bias=False)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.a(x)) + self.bn(self.b(x))))


def _sketch(model: nn.Module, x: torch.Tensor) -> str:
    (finding,) = doctor.check(model, x).by_check("shared-bn")
    return finding.fix_code


def _pasted(model_cls: type[nn.Module], fix_code: str, tail: str, head: str = "pass") -> nn.Module:
    """``model_cls`` with the sketch pasted in (the shared BN removed), between the lines
    ``head`` and ``tail`` of the original forward."""
    namespace: dict[str, object] = {"F": F}
    exec(forward_source(fix_code, "forward", "F.relu", head, tail), namespace)  # noqa: S102 - the doctor's own sketch

    class Pasted(model_cls):  # type: ignore[valid-type,misc]
        def __init__(self):
            super().__init__()
            del self.bn
            exec("\n".join(sections(fix_code)[0]), {"nn": nn, "self": self})  # noqa: S102

        forward = namespace["forward"]

    return Pasted()


def test_loop_shared_bn_gets_one_modulelist_iterated_with_the_container() -> None:
    init, forward = sections(_sketch(LoopShared(), X))
    assert init == [
        "self.bn_stem = nn.BatchNorm2d(8, eps=1e-05, momentum=0.1)",
        "self.bn_convs = nn.ModuleList(nn.BatchNorm2d(8, eps=1e-05, momentum=0.1) for _ in self.convs)",
    ]
    assert forward == [
        "... self.bn_stem(self.stem(...)) ...",
        "for conv, bn in zip(self.convs, self.bn_convs):",
        "    ... bn(conv(...)) ...",
    ]


def test_loop_sketch_names_the_line_calling_the_bn_in_the_loop() -> None:
    source, first = inspect.getsourcelines(LoopShared.forward)
    line = first + next(i for i, text in enumerate(source) if "self.bn(conv(x))" in text)
    loop = next(text for text in _sketch(LoopShared(), X).splitlines() if text.startswith("for "))
    assert loop.endswith(f"test_doctor_fix_sketch_loops.py:{line}"), loop


def _same_in_train_mode(model: nn.Module, fixed: nn.Module) -> None:
    """The pasted model computes the original's training-time function (fresh BNs start
    as the shared one did), with one BN per call site."""
    missing, unexpected = fixed.load_state_dict(model.state_dict(), strict=False)
    assert unexpected == ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert all(".bn" in key or key.startswith("bn") for key in missing)
    torch.testing.assert_close(fixed.train()(X), model.train()(X))


def test_pasted_loop_sketch_fixes_the_model() -> None:
    model = LoopShared()
    fixed = _pasted(LoopShared, _sketch(model, X), "return self.head(x.mean((2, 3)))")
    assert len(fixed.bn_convs) == 3
    _same_in_train_mode(model, fixed)
    report = doctor.check(fixed, X)
    assert report.by_check("shared-bn") == []
    calls = {layer["path"]: layer["calls"] for layer in report.summary["layers"]}
    assert calls == {"bn_stem": 1, "bn_convs.0": 1, "bn_convs.1": 1, "bn_convs.2": 1}


def test_loop_over_blocks_reaches_the_layer_inside_each_item() -> None:
    model = LoopOverBlocks()
    fix_code = _sketch(model, X)
    init, forward = sections(fix_code)
    assert init == ["self.bn_blocks = nn.ModuleList(nn.BatchNorm2d(8, eps=1e-05, momentum=0.1) for _ in self.blocks)"]
    assert forward == ["for block, bn in zip(self.blocks, self.bn_blocks):", "    ... bn(block.conv(...)) ..."]
    fixed = _pasted(LoopOverBlocks, fix_code, "return self.head(x.mean((2, 3)))", head="x = self.stem(x)")
    _same_in_train_mode(model, fixed)
    assert doctor.check(fixed, X).by_check("shared-bn") == []


def test_calls_not_made_by_one_loop_keep_one_bn_per_site() -> None:
    """The sketch as it was before loops were recognized, for an unrolled forward and
    for one line calling the BN after two unrelated layers."""
    assert _sketch(Unrolled(), X) == "\n".join(
        [
            "# __init__: one BN per call site, each with its own running statistics",
            "self.bn_stem = nn.BatchNorm2d(8, eps=1e-05, momentum=0.1)",
            "self.bn_convs_0 = nn.BatchNorm2d(8, eps=1e-05, momentum=0.1)",
            "self.bn_convs_1 = nn.BatchNorm2d(8, eps=1e-05, momentum=0.1)",
            "self.bn_convs_2 = nn.BatchNorm2d(8, eps=1e-05, momentum=0.1)",
            "# forward: each call site uses its own BN",
            "... self.bn_stem(self.stem(...)) ...",
            "... self.bn_convs_0(self.convs[0](...)) ...",
            "... self.bn_convs_1(self.convs[1](...)) ...",
            "... self.bn_convs_2(self.convs[2](...)) ...",
        ]
    )
    assert _sketch(SameLineTwoLayers(), torch.randn(32, 10)) == "\n".join(
        [
            "# __init__: one BN per call site, each with its own running statistics",
            "self.bn_a = nn.BatchNorm1d(16, eps=1e-05, momentum=0.1)",
            "self.bn_b = nn.BatchNorm1d(16, eps=1e-05, momentum=0.1)",
            "# forward: each call site uses its own BN",
            "... self.bn_a(self.a(...)) ...",
            "... self.bn_b(self.b(...)) ...",
        ]
    )
