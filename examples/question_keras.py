"""The question's model in Keras 3 -- with the bug.

One BatchNormalization layer is applied after BOTH hidden Dense layers. Keras 3 accepts
this without a word; the layer's moving statistics average two different activations, so
the model falls apart in inference mode (``model(x, training=False)``, ``predict``,
``evaluate``). Runs on any Keras backend (``KERAS_BACKEND=torch`` or ``tensorflow``).

    bnlab doctor examples/question_keras.py:MyModel --data mnist
    bnlab doctor examples/question_keras.py:functional_model --data mnist
"""

import keras
from keras import layers


class MyModel(keras.Model):
    """Subclassed: the question's MLP 784-100-100-10."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.l1 = layers.Dense(100, kernel_initializer="he_normal", name="l1")
        self.l2 = layers.Dense(100, kernel_initializer="he_normal", name="l2")
        self.l3 = layers.Dense(10, kernel_initializer="he_normal", name="l3")
        self.bn = layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name="bn")  # one BN ...

    def call(self, x, training=None):
        h = keras.ops.relu(self.bn(self.l1(x), training=training))  # ... used here
        h = keras.ops.relu(self.bn(self.l2(h), training=training))  # ... and here
        return self.l3(h)


def functional_model() -> keras.Model:
    """The same MLP as a functional model (the form the issue measured)."""
    bn = layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name="bn")  # one BN ...
    x = keras.Input((784,))
    h = layers.Activation("relu")(bn(layers.Dense(100, kernel_initializer="he_normal", name="l1")(x)))
    h = layers.Activation("relu")(bn(layers.Dense(100, kernel_initializer="he_normal", name="l2")(h)))
    out = layers.Dense(10, kernel_initializer="he_normal", name="l3")(h)
    return keras.Model(x, out, name="question_mlp")
