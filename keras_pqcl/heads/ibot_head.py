"""iBOT projection head: one MLP for every token, a CLS projection and a patch projection."""

import keras

from keras_pqcl.heads.dino_head import DINOHead
from keras_pqcl.layers.weight_norm import WeightNormDense


@keras.saving.register_keras_serializable(package="keras_pqcl")
class iBOTHead(DINOHead):
    """DINO head applied to every token, with the CLS and patch tokens projected apart.

    The MLP and the L2 normalisation of :class:`DINOHead` run on all ``1 + N`` tokens; the
    weight-normed ``last_layer`` maps the CLS token to ``K`` logits and the patch
    projection maps the patch tokens to ``K_p`` logits. With ``shared_head=True`` (the
    published ViT-S recipe, and the PQCL head whatever its flag says) the patch projection
    *is* ``last_layer``, so ``K_p == K`` and no ``last_layer2`` variables exist. With
    ``shared_head=False`` a second weight-normed layer ``last_layer2`` is created (its gain
    frozen like ``last_layer``'s when ``norm_last_layer``).

    Student and teacher heads must be built with the same ``shared_head`` so that the EMA
    pairs their variables one to one; the reference's default (student separate, teacher
    shared) is not supported.

    Args:
        out_dim: CLS prototypes ``K`` (8192 in iBOT and PQCL).
        hidden_dim, bottleneck_dim, num_layers, norm_last_layer, use_bn: as :class:`DINOHead`.
        patch_out_dim: patch prototypes ``K_p``; ``None`` means ``out_dim``. Must equal
            ``out_dim`` when ``shared_head``.
        shared_head: one projection for CLS and patch tokens (True).

    Call args:
        tokens: ``(B, 1 + N, D)`` backbone tokens, CLS first.

    Returns:
        ``(cls_logits (B, K), patch_logits (B, N, K_p))``.

    Example:

    >>> head = iBOTHead(out_dim=32, hidden_dim=16, bottleneck_dim=8)
    >>> cls, patches = head(keras.ops.ones((2, 5, 12)))
    >>> tuple(cls.shape), tuple(patches.shape)
    ((2, 32), (2, 4, 32))
    """

    def __init__(
        self,
        out_dim=8192,
        hidden_dim=2048,
        bottleneck_dim=256,
        num_layers=3,
        norm_last_layer=True,
        patch_out_dim=None,
        shared_head=True,
        **kwargs,
    ):
        patch_out_dim = out_dim if patch_out_dim is None else patch_out_dim
        if shared_head and patch_out_dim != out_dim:
            raise ValueError(
                f"shared_head=True projects patches with the CLS last layer, so patch_out_dim "
                f"must equal out_dim; got patch_out_dim={patch_out_dim}, out_dim={out_dim}. "
                "Pass shared_head=False for a separate patch projection."
            )
        super().__init__(
            out_dim=out_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            num_layers=num_layers,
            norm_last_layer=norm_last_layer,
            **kwargs,
        )
        self.patch_out_dim = patch_out_dim
        self.shared_head = shared_head
        # Created after the MLP and last_layer, so variable order (the EMA pairing) is
        # mlp_0.., last_layer, last_layer2.
        self.last_layer2 = None
        if not shared_head:
            self.last_layer2 = WeightNormDense(
                patch_out_dim, norm_last_layer=norm_last_layer, dtype=self.dtype_policy, name="last_layer2"
            )

    def build(self, input_shape):
        super().build(input_shape)
        if self.last_layer2 is not None:
            self.last_layer2.build((None, self.bottleneck_dim))

    @property
    def patch_layer(self):
        """The layer that projects patch tokens: ``last_layer2``, or ``last_layer`` if shared."""
        return self.last_layer if self.last_layer2 is None else self.last_layer2

    def call(self, tokens):
        if len(tokens.shape) != 3:
            raise ValueError(
                f"iBOTHead expects tokens (B, 1 + N, D) with the CLS token first; got shape "
                f"{tuple(tokens.shape)}. Use token_logits() for other shapes."
            )
        z = self.project(tokens)
        if self.last_layer2 is None:
            logits = self.last_layer(z)  # one matmul for CLS and patches
            return logits[:, 0], logits[:, 1:]
        return self.last_layer(z[:, 0]), self.last_layer2(z[:, 1:])

    def get_config(self):
        config = super().get_config()
        config.update(patch_out_dim=self.patch_out_dim, shared_head=self.shared_head)
        return config
