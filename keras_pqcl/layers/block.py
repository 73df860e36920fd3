"""Pre-norm transformer block with an optional one-directional query stream, LayerScale and
SwiGLU feed-forward (the DINOv2 options)."""

import keras

from keras_pqcl.layers.attention import Attention
from keras_pqcl.layers.drop_path import DropPath
from keras_pqcl.layers.layer_scale import LayerScale
from keras_pqcl.layers.mlp import Mlp
from keras_pqcl.layers.swiglu import SwiGLU, swiglu_hidden_dim

FFN_KINDS = ("mlp", "swiglu")


@keras.saving.register_keras_serializable(package="keras_pqcl")
class Block(keras.layers.Layer):
    """``x + DropPath(LS1(Attn(LN(x))))`` then ``x + DropPath(LS2(FFN(LN(x))))``.

    LayerNorm epsilon is 1e-6 as in the reference ViT (Keras' default 1e-3 changes results).
    Query tokens share every weight with the image tokens; their drop-path is drawn
    independently, as in the PQCL code.

    Args:
        dim, num_heads, mlp_ratio, qkv_bias: the ViT block's sizes; the MLP is
            ``int(dim * mlp_ratio)`` wide.
        drop_path: stochastic-depth rate of both branches.
        layer_scale_init: ``None`` (DINO, iBOT, PQCL: no LayerScale) or the initial value of
            the per-channel gains ``LS1``/``LS2`` on both branches (DINOv2: 1e-5).
        ffn: ``"mlp"`` (GELU MLP) or ``"swiglu"`` (DINOv2's ViT-g: a SwiGLU of width
            :func:`~keras_pqcl.layers.swiglu.swiglu_hidden_dim` of the MLP's).

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
        layer_scale_init=None,
        ffn="mlp",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {ffn!r}.")
        self.dim = dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.drop_path = drop_path
        self.layer_norm_epsilon = layer_norm_epsilon
        self.layer_scale_init = layer_scale_init
        self.ffn = ffn
        policy = self.dtype_policy
        self.norm1 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, dtype=policy, name="norm1")
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, dtype=policy, name="attn")
        self.norm2 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, dtype=policy, name="norm2")
        hidden = int(dim * mlp_ratio)
        if ffn == "swiglu":
            self.mlp = SwiGLU(dim, swiglu_hidden_dim(hidden), dtype=policy, name="mlp")
        else:
            self.mlp = Mlp(dim, hidden, dtype=policy, name="mlp")
        self.drop = DropPath(drop_path, dtype=policy, name="drop_path")
        # DINOv2 builds LayerScale only for a non-zero init value; 0 / None mean none.
        self.ls1 = self.ls2 = None
        if layer_scale_init:
            self.ls1 = LayerScale(dim, layer_scale_init, dtype=policy, name="ls1")
            self.ls2 = LayerScale(dim, layer_scale_init, dtype=policy, name="ls2")

    def build(self, input_shape=None):
        for layer in (self.norm1, self.norm2):
            layer.build((None, None, self.dim))
        self.attn.build()
        self.mlp.build()
        if self.ls1 is not None:
            self.ls1.build()
            self.ls2.build()
        self.built = True

    def _scaled(self, layer_scale, x):
        return x if layer_scale is None else layer_scale(x)

    def _ffn(self, x):
        return self._scaled(self.ls2, self.mlp(self.norm2(x)))

    def call(self, x, queries=None, return_attention=False, training=None):
        y = None if queries is None else self.norm1(queries)
        a_x, a_y, attention = self.attn(self.norm1(x), queries=y, return_attention=return_attention)
        x = x + self.drop(self._scaled(self.ls1, a_x), training=training)
        x = x + self.drop(self._ffn(x), training=training)
        if queries is not None:
            queries = queries + self.drop(self._scaled(self.ls1, a_y), training=training)
            queries = queries + self.drop(self._ffn(queries), training=training)
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
        # Written only when set: a plain block's config stays that of the versions before them.
        if self.layer_scale_init:
            config["layer_scale_init"] = self.layer_scale_init
        if self.ffn != "mlp":
            config["ffn"] = self.ffn
        return config
