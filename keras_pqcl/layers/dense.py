"""Dense layer that multiplies 2-D matrices whatever the input rank."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_pqcl")
class Dense(keras.layers.Dense):
    """``keras.layers.Dense`` that flattens leading axes into one before the matmul.

    XLA:CPU under JAX runs a ``(batch, tokens, dim) @ (dim, units)`` product and its
    gradients about 2.5x slower than the same product on ``(batch * tokens, dim)``
    (measured: 255 ms vs 100 ms forward+backward for ViT-S MLP shapes on 2 cores);
    reshaping is free on every backend. Weights and config are those of ``keras.layers.Dense``.
    """

    def call(self, inputs, training=None):
        if len(inputs.shape) <= 2:
            return super().call(inputs, training=training)
        shape = ops.shape(inputs)
        flat = ops.reshape(inputs, (-1, inputs.shape[-1]))
        out = super().call(flat, training=training)
        return ops.reshape(out, (*shape[:-1], self.units))
