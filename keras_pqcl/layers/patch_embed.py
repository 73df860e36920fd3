"""Convolutional patch embedding."""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_pqcl")
class PatchEmbed(keras.layers.Layer):
    """Split an image into non-overlapping patches and project each to ``embed_dim``.

    A ``patch_size`` x ``patch_size`` convolution with stride ``patch_size`` and bias.
    The initialiser is PyTorch's ``Conv2d`` default (uniform +-1/sqrt(fan_in) for kernel and
    bias), as in the reference ViT, rather than Glorot.

    Call args:
        images: ``(batch, height, width, channels)``, both sizes multiples of ``patch_size``.

    Returns:
        ``(batch, height // patch_size * width // patch_size, embed_dim)``, row-major.
    """

    def __init__(self, patch_size=16, embed_dim=384, in_channels=3, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.in_channels = in_channels
        bound = 1.0 / math.sqrt(in_channels * patch_size * patch_size)
        self.proj = keras.layers.Conv2D(
            embed_dim,
            patch_size,
            strides=patch_size,
            padding="valid",
            kernel_initializer=keras.initializers.RandomUniform(-bound, bound),
            bias_initializer=keras.initializers.RandomUniform(-bound, bound),
            dtype=self.dtype_policy,
            name="proj",
        )

    def build(self, input_shape=None):
        self.proj.build((None, None, None, self.in_channels))
        self.built = True

    def call(self, images):
        x = self.proj(images)
        shape = ops.shape(x)
        return ops.reshape(x, (shape[0], shape[1] * shape[2], self.embed_dim))

    def get_config(self):
        config = super().get_config()
        config.update(patch_size=self.patch_size, embed_dim=self.embed_dim, in_channels=self.in_channels)
        return config
