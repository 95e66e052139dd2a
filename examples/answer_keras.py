"""The question's model in Keras 3, fixed: one BatchNormalization per hidden layer.

bnlab doctor examples/answer_keras.py:MyModel --data mnist
bnlab doctor examples/answer_keras.py:functional_model --data mnist
"""

import keras
from keras import layers


class MyModel(keras.Model):
    """Subclassed: the question's MLP 784-100-100-10, one BN per site."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.l1 = layers.Dense(100, kernel_initializer="he_normal", name="l1")
        self.l2 = layers.Dense(100, kernel_initializer="he_normal", name="l2")
        self.l3 = layers.Dense(10, kernel_initializer="he_normal", name="l3")
        self.bn1 = layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name="bn1")
        self.bn2 = layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name="bn2")

    def call(self, x, training=None):
        h = keras.ops.relu(self.bn1(self.l1(x), training=training))
        h = keras.ops.relu(self.bn2(self.l2(h), training=training))
        return self.l3(h)


def functional_model() -> keras.Model:
    """The same MLP as a functional model."""
    x = keras.Input((784,))
    h = layers.Dense(100, kernel_initializer="he_normal", name="l1")(x)
    h = layers.Activation("relu")(layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name="bn1")(h))
    h = layers.Dense(100, kernel_initializer="he_normal", name="l2")(h)
    h = layers.Activation("relu")(layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name="bn2")(h))
    out = layers.Dense(10, kernel_initializer="he_normal", name="l3")(h)
    return keras.Model(x, out, name="answer_mlp")
