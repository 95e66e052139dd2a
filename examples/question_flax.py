"""The question's model in JAX/Flax (``flax.nnx``) -- with the bug.

One ``nnx.BatchNorm`` is applied after BOTH hidden layers. Flax raises nothing: the
layer has one ``mean``/``var`` pair (``nnx.BatchStat``), updated twice per training step
with two different activations, so the model falls apart in eval mode
(``model.eval()``: ``use_running_average=True``).

    bnlab doctor examples/question_flax.py:MyModel --data mnist
    bnlab doctor examples/question_flax.py:LinenModel --data mnist

``LinenModel`` is the same bug in ``flax.linen``: a BatchNorm bound once in ``setup`` and
called at two sites has ONE ``batch_stats`` entry, updated twice a step.
"""

import jax
from flax import linen, nnx

# PyTorch's kaiming_normal_ (He init, fan_in, untruncated normal): what the question used.
HE = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class MyModel(nnx.Module):
    """The question's MLP 784-100-100-10 with one shared BatchNorm."""

    def __init__(self, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.l1 = nnx.Linear(784, 100, kernel_init=HE, rngs=rngs)
        self.l2 = nnx.Linear(100, 100, kernel_init=HE, rngs=rngs)
        self.l3 = nnx.Linear(100, 10, kernel_init=HE, rngs=rngs)
        self.bn = nnx.BatchNorm(100, momentum=0.9, epsilon=1e-3, rngs=rngs)  # one BN ...

    def __call__(self, x):
        h = nnx.relu(self.bn(self.l1(x)))  # ... used here
        h = nnx.relu(self.bn(self.l2(h)))  # ... and here
        return self.l3(h)


class LinenModel(linen.Module):
    """The same MLP in flax.linen: the BatchNorm is bound once, in setup."""

    def setup(self):
        self.l1 = linen.Dense(100, kernel_init=HE)
        self.l2 = linen.Dense(100, kernel_init=HE)
        self.l3 = linen.Dense(10, kernel_init=HE)
        self.bn = linen.BatchNorm(momentum=0.9, epsilon=1e-3)  # one BN, one batch_stats entry ...

    def __call__(self, x, train: bool = False):
        h = linen.relu(self.bn(self.l1(x), use_running_average=not train))  # ... updated here
        h = linen.relu(self.bn(self.l2(h), use_running_average=not train))  # ... and here
        return self.l3(h)
