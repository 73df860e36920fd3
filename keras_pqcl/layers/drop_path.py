"""Per-sample stochastic depth."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_pqcl")
class DropPath(keras.layers.Layer):
    """Drop a whole residual branch per sample with probability ``rate``.

    Kept samples are divided by ``1 - rate`` so the expectation is unchanged, as in the
    reference ViT. Identity at inference or when ``rate == 0``.
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self.rate > 0 else None
        self.built = True

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        noise = keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype)
        return x * ops.floor(keep + noise) / keep

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config
