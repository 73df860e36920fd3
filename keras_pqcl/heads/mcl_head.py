"""MCL's region neck and per-level predictors.

* :class:`MCLNeck` ("DetConvGpNonLinearHead" in the official code) embeds one region: a
  ``t x t`` tile of a pyramid level that covers exactly one (sub-)image. It mimics the
  detectron2 "4conv1fc" RoI box head: four 3x3 convolutions applied to each tile on its own
  (zero padding at the tile border, so no context crosses tiles), a global average pool,
  then an MLP ending in a BatchNorm without scale or shift. It is shared by all levels.
* :class:`MCLPredictor`: the online network's predictor, one per level (BYOL style).

BatchNorm constants are PyTorch's (momentum 0.1 = Keras 0.9, eps 1e-5); Keras' defaults
(0.99, 1e-3) change the dynamics.
"""

import keras
from keras import ops

from keras_pqcl.layers.init import kaiming_fan_out


def _linear_init():
    # The reference initialises its MLP and predictor Linear layers N(0, 0.01), biases 0.
    return dict(
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        bias_initializer="zeros",
    )


def _batch_norm(name, dtype, momentum, epsilon, affine=True):
    return keras.layers.BatchNormalization(
        momentum=momentum, epsilon=epsilon, center=affine, scale=affine, dtype=dtype, name=name
    )


@keras.saving.register_keras_serializable(package="keras_pqcl")
class MCLNeck(keras.layers.Layer):
    """Region embedding of feature tiles: conv tower, average pool, MLP.

    ``num_convs`` x [3x3 conv ``conv_dim`` (no bias) → BN → ReLU] → mean over the tile →
    Dense ``hidden_dim`` → BN → ReLU → Dense ``out_dim`` → BN (no scale, no shift).

    Args:
        num_convs: convolutions of the tower (4).
        conv_dim: their channels (256).
        hidden_dim: MLP hidden width (2048).
        out_dim: embedding width (256).
        bn_momentum, bn_epsilon: 0.9 and 1e-5 (PyTorch's 0.1 / 1e-5).

    Call:
        ``tiles`` ``(T, t, t, C)`` (one region per row; 7 x 7 at 224 px) →
        ``(T, out_dim)``.

    Weights: convolutions Kaiming-normal (fan_out, ReLU gain; detectron2's box-head
    ``c2_msra_fill``), Dense layers N(0, 0.01) with zero biases.
    """

    def __init__(
        self, num_convs=4, conv_dim=256, hidden_dim=2048, out_dim=256, bn_momentum=0.9, bn_epsilon=1e-5, **kwargs
    ):
        super().__init__(**kwargs)
        self.num_convs = int(num_convs)
        self.conv_dim = int(conv_dim)
        self.hidden_dim = int(hidden_dim)
        self.out_dim = int(out_dim)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        policy = self.dtype_policy
        bn = dict(dtype=policy, momentum=self.bn_momentum, epsilon=self.bn_epsilon)
        init = kaiming_fan_out()
        self.convs, self.conv_norms = [], []
        for i in range(self.num_convs):
            self.convs.append(
                keras.layers.Conv2D(
                    self.conv_dim,
                    3,
                    padding="same",
                    use_bias=False,
                    kernel_initializer=init,
                    dtype=policy,
                    name=f"conv{i + 1}",
                )
            )
            self.conv_norms.append(_batch_norm(f"conv{i + 1}_bn", **bn))
        self.fc1 = keras.layers.Dense(self.hidden_dim, dtype=policy, name="fc1", **_linear_init())
        self.fc1_norm = _batch_norm("fc1_bn", **bn)
        self.fc2 = keras.layers.Dense(self.out_dim, dtype=policy, name="fc2", **_linear_init())
        # affine=False in the reference: the embedding is standardised, not rescaled.
        self.fc2_norm = _batch_norm("fc2_bn", affine=False, **bn)

    def build(self, input_shape):
        channels = input_shape[-1]
        for conv, norm in zip(self.convs, self.conv_norms):
            conv.build((None, None, None, channels))
            channels = self.conv_dim
            norm.build((None, None, None, channels))
        self.fc1.build((None, channels))
        self.fc1_norm.build((None, self.hidden_dim))
        self.fc2.build((None, self.hidden_dim))
        self.fc2_norm.build((None, self.out_dim))
        self.built = True

    def call(self, tiles, training=None):
        x = tiles
        for conv, norm in zip(self.convs, self.conv_norms):
            x = ops.relu(norm(conv(x), training=training))
        x = ops.mean(x, axis=(1, 2))  # the 7x7 average pool: one vector per region
        x = ops.relu(self.fc1_norm(self.fc1(x), training=training))
        return self.fc2_norm(self.fc2(x), training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.out_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_convs=self.num_convs,
            conv_dim=self.conv_dim,
            hidden_dim=self.hidden_dim,
            out_dim=self.out_dim,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_pqcl")
class MCLPredictor(keras.layers.Layer):
    """Online predictor: Dense ``hidden_dim`` → BN → ReLU → Dense ``out_dim`` (no final BN).

    Args:
        hidden_dim: 2048. out_dim: 256.
        bn_momentum, bn_epsilon: 0.9 and 1e-5 (PyTorch's).

    Call: ``(T, D)`` → ``(T, out_dim)``. Weights N(0, 0.01), biases 0 (reference init).
    """

    def __init__(self, hidden_dim=2048, out_dim=256, bn_momentum=0.9, bn_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.out_dim = int(out_dim)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        policy = self.dtype_policy
        self.fc1 = keras.layers.Dense(self.hidden_dim, dtype=policy, name="fc1", **_linear_init())
        self.fc1_norm = _batch_norm("fc1_bn", policy, self.bn_momentum, self.bn_epsilon)
        self.fc2 = keras.layers.Dense(self.out_dim, dtype=policy, name="fc2", **_linear_init())

    def build(self, input_shape):
        self.fc1.build((None, input_shape[-1]))
        self.fc1_norm.build((None, self.hidden_dim))
        self.fc2.build((None, self.hidden_dim))
        self.built = True

    def call(self, x, training=None):
        x = ops.relu(self.fc1_norm(self.fc1(x), training=training))
        return self.fc2(x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.out_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            out_dim=self.out_dim,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
        )
        return config
