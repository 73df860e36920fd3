"""Pre-norm transformer block with an optional one-directional query stream."""

import keras

from keras_pqcl.layers.attention import Attention
from keras_pqcl.layers.drop_path import DropPath
from keras_pqcl.layers.mlp import Mlp


@keras.saving.register_keras_serializable(package="keras_pqcl")
class Block(keras.layers.Layer):
    """``x + DropPath(Attn(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``.

    LayerNorm epsilon is 1e-6 as in the reference ViT (Keras' default 1e-3 changes results).
    Query tokens share every weight with the image tokens; their drop-path is drawn
    independently, as in the PQCL code.

    Call args:
        x: ``(batch, tokens, dim)``.
        queries: optional ``(batch, num_queries, dim)``.
        return_attention: also return this block's attention ``(batch, heads, T, T)``.

    Returns:
        ``(x, queries, attention)`` with ``None`` for absent entries.
    """

    def __init__(
        self,
        dim,
        num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path=0.0,
        layer_norm_epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dim = dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.drop_path = drop_path
        self.layer_norm_epsilon = layer_norm_epsilon
        policy = self.dtype_policy
        self.norm1 = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=policy, name="norm1"
        )
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, dtype=policy, name="attn")
        self.norm2 = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=policy, name="norm2"
        )
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=policy, name="mlp")
        self.drop = DropPath(drop_path, dtype=policy, name="drop_path")

    def build(self, input_shape=None):
        for layer in (self.norm1, self.norm2):
            layer.build((None, None, self.dim))
        self.attn.build()
        self.mlp.build()
        self.built = True

    def call(self, x, queries=None, return_attention=False, training=None):
        y = None if queries is None else self.norm1(queries)
        a_x, a_y, attention = self.attn(self.norm1(x), queries=y, return_attention=return_attention)
        x = x + self.drop(a_x, training=training)
        x = x + self.drop(self.mlp(self.norm2(x)), training=training)
        if queries is not None:
            queries = queries + self.drop(a_y, training=training)
            queries = queries + self.drop(self.mlp(self.norm2(queries)), training=training)
        return x, queries, attention

    def get_config(self):
        config = super().get_config()
        config.update(
            dim=self.dim,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            drop_path=self.drop_path,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config
