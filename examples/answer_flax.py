"""The question's model in JAX/Flax, fixed: one BatchNorm per hidden layer.

bnlab doctor examples/answer_flax.py:MyModel --data mnist
bnlab doctor examples/answer_flax.py:LinenModel --data mnist
"""

import jax
from flax import linen, nnx

HE = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # PyTorch's kaiming_normal_


class MyModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.l1 = nnx.Linear(784, 100, kernel_init=HE, rngs=rngs)
        self.l2 = nnx.Linear(100, 100, kernel_init=HE, rngs=rngs)
        self.l3 = nnx.Linear(100, 10, kernel_init=HE, rngs=rngs)
        self.bn1 = nnx.BatchNorm(100, momentum=0.9, epsilon=1e-3, rngs=rngs)
        self.bn2 = nnx.BatchNorm(100, momentum=0.9, epsilon=1e-3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.l1(x)))
        h = nnx.relu(self.bn2(self.l2(h)))
        return self.l3(h)


class LinenModel(linen.Module):
    @linen.compact
    def __call__(self, x, train: bool = False):
        h = linen.relu(linen.BatchNorm(not train, momentum=0.9, epsilon=1e-3)(linen.Dense(100, kernel_init=HE)(x)))
        h = linen.relu(linen.BatchNorm(not train, momentum=0.9, epsilon=1e-3)(linen.Dense(100, kernel_init=HE)(h)))
        return linen.Dense(10, kernel_init=HE)(h)
