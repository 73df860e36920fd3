"""Transformer feed-forward block."""

import keras

from keras_pqcl.layers.dense import Dense
from keras_pqcl.layers.init import linear_init


@keras.saving.register_keras_serializable(package="keras_pqcl")
class Mlp(keras.layers.Layer):
    """``Dense(hidden) -> GELU (exact erf form) -> Dense(dim)``, no dropout.

    Call args:
        x: ``(..., dim)``.

    Returns:
        ``(..., dim)``.
    """

    def __init__(self, dim, hidden_dim, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.fc1 = Dense(hidden_dim, activation="gelu", dtype=self.dtype_policy, name="fc1", **linear_init())
        self.fc2 = Dense(dim, dtype=self.dtype_policy, name="fc2", **linear_init())

    def build(self, input_shape=None):
        self.fc1.build((None, self.dim))
        self.fc2.build((None, self.hidden_dim))
        self.built = True

    def call(self, x):
        return self.fc2(self.fc1(x))

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, hidden_dim=self.hidden_dim)
        return config
