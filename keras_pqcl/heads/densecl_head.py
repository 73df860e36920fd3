"""DenseCL projection heads (Wang et al., CVPR 2021).

Both heads read the backbone's last stage ``C5`` and have no BatchNorm:

* :class:`DenseCLGlobalHead` ("MoCo-v2 MLP"): global average pool -> Dense 2048 -> ReLU -> Dense 128.
* :class:`DenseCLDenseHead`: 1x1 conv 2048 -> ReLU -> 1x1 conv 128 on every position, plus the
  position average of its (unnormalised) output, which is what DenseCL's dense queue stores.
"""

import keras
from keras import ops

from keras_pqcl.layers.init import torch_default_init


def kaiming_relu_init():
    """torch ``kaiming_normal_(mode="fan_in", nonlinearity="relu")``, zero bias: the DenseCL
    code's init of the global head's Linear layers. Untruncated, unlike Keras' ``he_normal``."""
    return {
        "kernel_initializer": keras.initializers.VarianceScaling(2.0, mode="fan_in", distribution="untruncated_normal"),
        "bias_initializer": "zeros",
    }


@keras.saving.register_keras_serializable(package="keras_pqcl")
class DenseCLGlobalHead(keras.layers.Layer):
    """MoCo-v2 projection: ``(B, H, W, C) -> (B, out_dim)``, not normalised.

    Args:
        hidden_dim: 2048.
        out_dim: 128.
    """

    def __init__(self, hidden_dim=2048, out_dim=128, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.out_dim = int(out_dim)
        policy = self.dtype_policy
        self.fc1 = keras.layers.Dense(self.hidden_dim, dtype=policy, name="fc1", **kaiming_relu_init())
        self.fc2 = keras.layers.Dense(self.out_dim, dtype=policy, name="fc2", **kaiming_relu_init())

    def build(self, input_shape):
        self.fc1.build((None, input_shape[-1]))
        self.fc2.build((None, self.hidden_dim))
        self.built = True

    def call(self, features):
        pooled = ops.mean(features, axis=(1, 2))
        return self.fc2(ops.relu(self.fc1(pooled)))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.out_dim)

    def get_config(self):
        config = super().get_config()
        config.update(hidden_dim=self.hidden_dim, out_dim=self.out_dim)
        return config


@keras.saving.register_keras_serializable(package="keras_pqcl")
class DenseCLDenseHead(keras.layers.Layer):
    """Per-position projection: ``(B, H, W, C) -> (B, H, W, out_dim)`` and its mean over
    positions ``(B, out_dim)``; neither is normalised (DenseCL normalises the pooled vector
    after averaging).

    Args:
        hidden_dim: 2048.
        out_dim: 128.

    Returns:
        ``(dense, pooled)``.
    """

    def __init__(self, hidden_dim=2048, out_dim=128, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.out_dim = int(out_dim)

    def build(self, input_shape):
        channels = input_shape[-1]
        policy = self.dtype_policy
        # Created here because the torch-default bias bound depends on the input width.
        self.conv1 = keras.layers.Conv2D(self.hidden_dim, 1, dtype=policy, name="conv1", **torch_default_init(channels))
        self.conv2 = keras.layers.Conv2D(
            self.out_dim, 1, dtype=policy, name="conv2", **torch_default_init(self.hidden_dim)
        )
        self.conv1.build((None, None, None, channels))
        self.conv2.build((None, None, None, self.hidden_dim))
        self.built = True

    def call(self, features):
        dense = self.conv2(ops.relu(self.conv1(features)))
        return dense, ops.mean(dense, axis=(1, 2))

    def compute_output_shape(self, input_shape):
        return (tuple(input_shape[:3]) + (self.out_dim,), (input_shape[0], self.out_dim))

    def get_config(self):
        config = super().get_config()
        config.update(hidden_dim=self.hidden_dim, out_dim=self.out_dim)
        return config
