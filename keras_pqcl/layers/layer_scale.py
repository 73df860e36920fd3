"""LayerScale: a learned per-channel gain on a residual branch.

Touvron et al., "Going deeper with Image Transformers" (CaiT, ICCV 2021); DINOv2 (Oquab et al.,
TMLR 2024) puts one after the attention and one after the feed-forward branch of every block,
initialised to 1e-5 so that each block starts close to the identity.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_pqcl")
class LayerScale(keras.layers.Layer):
    """``x * gamma`` with ``gamma`` ``(dim,)`` initialised to ``init_value``.

    Call args:
        x: ``(..., dim)``.

    Returns:
        ``(..., dim)``.
    """

    def __init__(self, dim, init_value=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.init_value = init_value

    def build(self, input_shape=None):
        self.gamma = self.add_weight(
            name="gamma", shape=(self.dim,), initializer=keras.initializers.Constant(self.init_value)
        )
        self.built = True

    def call(self, x):
        return x * ops.cast(self.gamma, x.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, init_value=self.init_value)
        return config
