"""SwiGLU feed-forward block of DINOv2's ViT-g.

Shazeer, "GLU Variants Improve Transformer" (2020); used as the FFN of the ViT-g/14 of
Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision" (TMLR 2024).
"""

import keras
from keras import ops

from keras_pqcl.layers.dense import Dense
from keras_pqcl.layers.init import linear_init


def swiglu_hidden_dim(mlp_hidden):
    """DINOv2's SwiGLU width for an MLP of ``mlp_hidden`` units: two thirds of it (so the
    three matrices cost what the MLP's two do), rounded up to a multiple of 8.

    ``swiglu_hidden_dim(4 * 1536) == 4096`` (ViT-g/14).
    """
    return (int(mlp_hidden * 2 / 3) + 7) // 8 * 8


@keras.saving.register_keras_serializable(package="keras_pqcl")
class SwiGLU(keras.layers.Layer):
    """``w3(silu(a) * b)`` where ``[a, b] = w12(x)`` split in two halves along the features.

    ``w12`` is one ``Dense(2 * hidden_dim)`` whose first ``hidden_dim`` outputs are the gate
    ``a`` and the last ``hidden_dim`` the value ``b``, the layout of DINOv2's fused weights.

    Args:
        dim: input and output width.
        hidden_dim: width of the gated hidden layer (see :func:`swiglu_hidden_dim`).

    Call args:
        x: ``(..., dim)``.

    Returns:
        ``(..., dim)``.
    """

    def __init__(self, dim, hidden_dim, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.w12 = Dense(2 * hidden_dim, dtype=self.dtype_policy, name="w12", **linear_init())
        self.w3 = Dense(dim, dtype=self.dtype_policy, name="w3", **linear_init())

    def build(self, input_shape=None):
        self.w12.build((None, self.dim))
        self.w3.build((None, self.hidden_dim))
        self.built = True

    def call(self, x):
        gate_value = self.w12(x)
        gate, value = gate_value[..., : self.hidden_dim], gate_value[..., self.hidden_dim :]
        return self.w3(ops.silu(gate) * value)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, hidden_dim=self.hidden_dim)
        return config
