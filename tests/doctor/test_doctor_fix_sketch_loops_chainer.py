"""The shared-bn fix sketch for a Chainer BatchNormalization reused in a loop over a
ChainList: one ChainList of BNs zipped with it, and pasted in, it fixes the model."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.chainer  # runs in .venv-chainer (make test-chainer)
chainer = pytest.importorskip("chainer")
import chainer.functions as F  # noqa: E402
import chainer.links as L  # noqa: E402
from sketch_paste import forward_source, sections  # noqa: E402

from bnlab import doctor  # noqa: E402

X = np.random.RandomState(0).randn(16, 3, 8, 8).astype(np.float32)


class LoopShared(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.stem = L.Convolution2D(3, 8, 3, pad=1, nobias=True)
            self.convs = chainer.ChainList(*(L.Convolution2D(8, 8, 3, pad=1, nobias=True) for _ in range(2)))
            self.bn = L.BatchNormalization(8)
            self.fc = L.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        for conv in self.convs:
            x = F.relu(self.bn(conv(x)))
        return self.fc(F.mean(x, axis=(2, 3)))


def test_chainer_loop_sketch_is_one_chainlist_and_pasted_in_fixes_the_model() -> None:
    np.random.seed(0)
    model = LoopShared()
    (finding,) = doctor.check(model, X).by_check("shared-bn")
    init, forward = sections(finding.fix_code)
    bn = "L.BatchNormalization(8, decay=0.9, eps=2e-05)"
    assert init == [
        "with self.init_scope():",
        f"    self.bn_stem = {bn}",
        f"    self.bn_convs = chainer.ChainList(*({bn} for _ in self.convs))",
    ]
    assert forward == [
        "... self.bn_stem(self.stem(...)) ...",
        "for conv, bn in zip(self.convs, self.bn_convs):",
        "    ... bn(conv(...)) ...",
    ]

    namespace: dict[str, object] = {"F": F}
    tail = "return self.fc(F.mean(x, axis=(2, 3)))"
    exec(forward_source(finding.fix_code, "forward", "F.relu", "pass", tail), namespace)  # noqa: S102

    class Pasted(LoopShared):
        def __init__(self):
            super().__init__()
            del self.bn
            exec("\n".join(init), {"L": L, "chainer": chainer, "self": self})  # noqa: S102

        forward = namespace["forward"]

    fixed = Pasted()
    for name, param in model.namedparams():
        if not name.startswith("/bn/"):
            dict(fixed.namedparams())[name].array[...] = param.array
    with chainer.using_config("train", True):
        np.testing.assert_allclose(fixed(X).array, model(X).array, rtol=1e-5, atol=1e-5)
    report = doctor.check(fixed, X)
    assert report.by_check("shared-bn") == []
    assert [layer["calls"] for layer in report.summary["layers"]] == [1, 1, 1]
