"""The shared-bn fix sketch for an nnx BatchNorm reused in a loop over an nnx.List: one
nnx.List of BNs zipped with the container, and pasted in, it fixes the model."""

from __future__ import annotations

import pytest

pytest.importorskip("flax")  # the modern venv has Flax; the Chainer venv collects nothing here

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from sketch_paste import forward_source, sections  # noqa: E402

from bnlab.doctor import check  # noqa: E402

X = jax.random.normal(jax.random.key(0), (64, 10))


class LoopShared(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Linear(10, 16, use_bias=False, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(16, 16, use_bias=False, rngs=rngs) for _ in range(3)])
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem(x)))
        for layer in self.layers:
            x = nnx.relu(self.bn(layer(x)))
        return self.out(x)


def test_nnx_loop_sketch_is_one_list_and_pasted_in_fixes_the_model() -> None:
    (finding,) = check(LoopShared(nnx.Rngs(0)), X).by_check("shared-bn")
    init, forward = sections(finding.fix_code)
    bn = "nnx.BatchNorm(16, momentum=0.99, epsilon=1e-05, rngs=rngs)"
    assert init == [f"self.bn_stem = {bn}", f"self.bn_layers = nnx.List([{bn} for _ in self.layers])"]
    assert forward == [
        "... self.bn_stem(self.stem(...)) ...",
        "for layer, bn in zip(self.layers, self.bn_layers):",
        "    ... bn(layer(...)) ...",
    ]

    namespace: dict[str, object] = {"nnx": nnx}
    exec(forward_source(finding.fix_code, "__call__", "nnx.relu", "pass", "return self.out(x)"), namespace)  # noqa: S102

    class Pasted(LoopShared):
        def __init__(self, rngs: nnx.Rngs):
            super().__init__(rngs)
            del self.bn
            exec("\n".join(init), {"nnx": nnx, "self": self, "rngs": rngs})  # noqa: S102

        __call__ = namespace["__call__"]

    model, fixed = LoopShared(nnx.Rngs(0)), Pasted(nnx.Rngs(0))
    np.testing.assert_allclose(fixed(X), model(X), rtol=1e-5, atol=1e-5)  # train mode: the same function
    report = check(fixed, X)
    assert report.by_check("shared-bn") == []
    assert [layer["calls"] for layer in report.summary["layers"]] == [1, 1, 1, 1]
