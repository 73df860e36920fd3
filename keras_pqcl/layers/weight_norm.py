"""Weight-normalised dense layer (the DINO/iBOT ``last_layer``)."""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_pqcl")
class WeightNormDense(keras.layers.Layer):
    """``y = x @ (g * V / ||V||)`` without bias, normalised per output unit.

    ``V`` is ``(in_dim, units)``; every column (one output unit) is divided by its L2 norm
    and multiplied by the gain ``g``, stored ``(1, units)`` like the reference ``[K, 1]``
    so that the weight-decay rule "decay tensors with ndim >= 2" treats it the same way.
    With ``norm_last_layer=True`` the gain is frozen at 1 and the logits are cosines in
    [-1, 1].

    Call args:
        x: ``(..., in_dim)``.

    Returns:
        ``(..., units)``.
    """

    def __init__(self, units, norm_last_layer=True, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.norm_last_layer = norm_last_layer

    def build(self, input_shape):
        in_dim = input_shape[-1]
        # nn.Linear default init (uniform +-1/sqrt(fan_in)); only the direction matters.
        bound = 1.0 / math.sqrt(in_dim)
        self.kernel = self.add_weight(
            name="kernel",
            shape=(in_dim, self.units),
            initializer=keras.initializers.RandomUniform(-bound, bound),
        )
        self.gain = self.add_weight(
            name="gain", shape=(1, self.units), initializer="ones", trainable=not self.norm_last_layer
        )
        self.built = True

    def call(self, x):
        kernel = ops.convert_to_tensor(self.kernel)
        norm = ops.sqrt(ops.sum(ops.square(ops.cast(kernel, "float32")), axis=0, keepdims=True))
        scale = ops.cast(self.gain, "float32") / norm
        # Scaling the (batch, units) output is cheaper than normalising the kernel.
        return ops.matmul(x, kernel) * ops.cast(scale, x.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, norm_last_layer=self.norm_last_layer)
        return config
