"""Vision Transformer backbone as used by DINO, iBOT and PQCL.

Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021); training details follow
Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO, ICCV 2021)
and Zhou et al., "iBOT" (ICLR 2022); the fixed sin-cos variant and the query stream follow
Zhang et al., "Patch-level Contrastive Learning via Positional Query" (PQCL, ICML 2023).
The DINOv2 options (LayerScale, register tokens, SwiGLU FFN, patch 14 presets, its position-table
resampling) follow Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision"
(TMLR 2024) and Darcet et al., "Vision Transformers Need Registers" (ICLR 2024).
"""

import keras
import numpy as np
from keras import ops

from keras_pqcl.backbones.base import Backbone
from keras_pqcl.layers.block import FFN_KINDS, Block
from keras_pqcl.layers.patch_embed import PatchEmbed
from keras_pqcl.layers.pos_embed import interpolate_grid, sincos_grid

POS_EMBED_KINDS = ("learned", "sincos")
#: The DINOv2 options' values that leave a DINO/iBOT/PQCL ViT unchanged.
DINOV2_OPTION_DEFAULTS = dict(
    layer_scale_init=None, num_register_tokens=0, ffn="mlp", interpolate_offset=0.1, interpolate_antialias=False
)


@keras.saving.register_keras_serializable(package="keras_pqcl")
class VisionTransformer(Backbone, keras.Model):
    """ViT with CLS token, interpolated position embedding, mask token and query stream.

    A :class:`~keras_pqcl.backbones.base.Backbone`: ``pos_embed_kind`` is ``pos_embed``,
    ``has_mask_token`` is ``use_mask_token``, ``embed_dim`` is ``D``, ``patch_size`` the
    patch side, ``out_channels`` empty (``call`` returns tokens).

    Works on any input whose height and width are multiples of ``patch_size``; the position
    table, made for ``image_size``, is resampled bicubically (as DINO does) for other sizes.
    Height and width may be ``None`` when traced (an exported model with free sizes): the
    resampling is then built in the graph.

    Register tokens (DINOv2 "with registers") are extra learned tokens placed after CLS,
    after the position table is added (they have no position). They take part in attention
    but are not outputs of the backbone contract: ``"patches"``, ``"last_blocks"`` and
    ``"attention"`` hold CLS and patch tokens only, as DINOv2's own ``get_intermediate_layers``
    drops them; ``forward_features`` returns them separately as ``"registers"``.

    Args:
        patch_size: side of the square patches.
        embed_dim: token width ``D``.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``D``.
        qkv_bias: bias in the fused qkv projection.
        drop_path_rate: stochastic depth of the last block; rises linearly from 0.
        pos_embed: ``"learned"`` (DINO/iBOT) or ``"sincos"`` (fixed, PQCL).
        image_size: the size the position table is made for (224 in the papers).
        use_mask_token: create the learned mask token (iBOT, PQCL and ADCLR students).
        layer_norm_epsilon: 1e-6 as in the reference.
        layer_scale_init: ``None`` (no LayerScale; DINO, iBOT, PQCL) or the initial value of
            the per-channel gains after attention and after the FFN (DINOv2: 1e-5).
        num_register_tokens: register tokens after CLS (DINOv2 with registers: 4).
        ffn: ``"mlp"`` or ``"swiglu"`` (DINOv2's ViT-g/14).
        interpolate_offset: the position table is resampled with scale factor
            ``(out + offset) / in`` (DINO and DINOv2: 0.1); 0 resamples to the exact size
            (DINOv2 with registers).
        interpolate_antialias: use PyTorch's antialiased bicubic kernel when resampling
            (DINOv2 with registers).

    Call args:
        images: ``(batch, height, width, 3)``.
        masks: optional bool ``(batch, height / p, width / p)`` or ``(batch, num_patches)``;
            masked patch embeddings are replaced by the mask token before the position
            embedding is added.
        queries: optional ``(batch, num_queries, D)`` extra tokens that attend to the image
            tokens (and to each other) while the image tokens never see them. PQCL builds
            them with :meth:`positional_queries`.

    Returns:
        dict with ``"cls"`` ``(batch, D)``, ``"patches"`` ``(batch, num_patches, D)`` and,
        if queries were given, ``"queries"`` ``(batch, num_queries, D)``; all after the final
        LayerNorm.

    Example:
    >>> backbone = vit_tiny(patch_size=16)
    >>> out = backbone(np.zeros((2, 96, 96, 3), "float32"))
    >>> out["cls"].shape, out["patches"].shape
    ((2, 192), (2, 36, 192))
    """

    def __init__(
        self,
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.0,
        pos_embed="learned",
        image_size=224,
        use_mask_token=False,
        layer_norm_epsilon=1e-6,
        layer_scale_init=None,
        num_register_tokens=0,
        ffn="mlp",
        interpolate_offset=0.1,
        interpolate_antialias=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {ffn!r}.")
        if int(num_register_tokens) != num_register_tokens or num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be an integer >= 0, got {num_register_tokens!r}.")
        if interpolate_offset < 0:
            raise ValueError(
                f"interpolate_offset must be >= 0 (0.1 for DINO, 0 for DINOv2 with registers), "
                f"got {interpolate_offset!r}."
            )
        if pos_embed not in POS_EMBED_KINDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_KINDS}, got {pos_embed!r}.")
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} is not a multiple of patch_size={patch_size}; "
                f"use {image_size // patch_size * patch_size} or {(image_size // patch_size + 1) * patch_size}."
            )
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.drop_path_rate = drop_path_rate
        self.pos_embed_kind = pos_embed
        self.image_size = image_size
        self.use_mask_token = use_mask_token
        self.layer_norm_epsilon = layer_norm_epsilon
        self.layer_scale_init = layer_scale_init
        self.num_register_tokens = int(num_register_tokens)
        self.ffn = ffn
        self.interpolate_offset = float(interpolate_offset)
        self.interpolate_antialias = bool(interpolate_antialias)
        self.grid_size = image_size // patch_size

        policy = self.dtype_policy
        self.patch_embed = PatchEmbed(patch_size, embed_dim, dtype=policy, name="patch_embed")
        rates = np.linspace(0.0, drop_path_rate, depth) if depth else []
        self.blocks = [
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=float(rates[i]),
                layer_norm_epsilon=layer_norm_epsilon,
                layer_scale_init=layer_scale_init,
                ffn=ffn,
                dtype=policy,
                name=f"block_{i}",
            )
            for i in range(depth)
        ]
        self.norm = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, dtype=policy, name="norm")
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        dim = self.embed_dim
        num_pos = 1 + self.grid_size**2
        normal = keras.initializers.RandomNormal(stddev=0.02)
        self.cls_token = self.add_weight(name="cls_token", shape=(1, 1, dim), initializer=normal)
        if self.pos_embed_kind == "learned":
            self.pos_embed = self.add_weight(name="pos_embed", shape=(1, num_pos, dim), initializer=normal)
        else:
            table = sincos_grid(self.grid_size, self.grid_size, dim)[None]
            self.pos_embed = self.add_weight(
                name="pos_embed",
                shape=(1, num_pos, dim),
                initializer=keras.initializers.Constant(table),
                trainable=False,
            )
        self.register_tokens = None
        if self.num_register_tokens:
            # DINOv2 draws registers (like its CLS token) from N(0, 1e-6^2).
            self.register_tokens = self.add_weight(
                name="register_tokens",
                shape=(1, self.num_register_tokens, dim),
                initializer=keras.initializers.RandomNormal(stddev=1e-6),
            )
        self.mask_token = None
        if self.use_mask_token:
            # iBOT initialises the mask token to zeros.
            self.mask_token = self.add_weight(name="mask_token", shape=(1, dim), initializer="zeros")
        self.patch_embed.build()
        for block in self.blocks:
            block.build()
        self.norm.build((None, None, dim))
        self.built = True

    # ------------------------------------------------------------------ inputs
    def _check_images(self, images):
        shape = images.shape
        if len(shape) != 4:
            raise ValueError(
                f"VisionTransformer expects images of shape (batch, height, width, 3), got rank "
                f"{len(shape)} with shape {tuple(shape)}. Add a batch axis with "
                "`images[None]` or stack single images."
            )
        if shape[-1] != 3:
            raise ValueError(
                f"VisionTransformer expects 3 channels last, got shape {tuple(shape)}. "
                "Convert grayscale to RGB (repeat the channel) or transpose channels-first input."
            )
        height, width = shape[1], shape[2]
        p = self.patch_size
        if not (isinstance(height, int) and isinstance(width, int)):
            # Free height and width (None, or a symbolic size while a model is exported with
            # --dynamic-size): the grid is read when the graph runs, and the sizes must then
            # be multiples of the patch size.
            dynamic = ops.shape(images)
            return dynamic[1] // p, dynamic[2] // p
        for name, size in (("height", height), ("width", width)):
            if size % p:
                lo, hi = size // p * p, (size // p + 1) * p
                raise ValueError(
                    f"Image {name} {size} is not a multiple of the patch size {p}. "
                    f"Resize or crop to {lo or hi} or {hi}."
                )
        return height // p, width // p

    def position_embedding(self, grid_hw):
        """Position table ``(1, 1 + h * w, D)`` for a ``grid_hw`` patch grid."""
        pos = ops.convert_to_tensor(self.pos_embed)
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = interpolate_grid(
            patch_pos,
            (self.grid_size, self.grid_size),
            grid_hw,
            offset=self.interpolate_offset,
            antialias=self.interpolate_antialias,
        )
        return ops.concatenate([cls_pos, patch_pos], axis=1)

    def embed(self, images, masks=None):
        """Patch-embed, mask, prepend CLS, add positions and insert the ``R`` register tokens
        after CLS: ``(batch, 1 + R + N, D)``."""
        grid_hw = self._check_images(images)
        x = self.patch_embed(images)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError(
                    "masks were given but this backbone has no mask token; build it with "
                    "use_mask_token=True (iBOT/PQCL models do this for you)."
                )
            masks = ops.reshape(ops.cast(masks, "bool"), (ops.shape(x)[0], ops.shape(x)[1], 1))
            x = ops.where(masks, ops.cast(self.mask_token, x.dtype)[None], x)
        batch = ops.shape(x)[0]
        cls = ops.broadcast_to(ops.cast(self.cls_token, x.dtype), (batch, 1, self.embed_dim))
        x = ops.concatenate([cls, x], axis=1)
        x = x + ops.cast(self.position_embedding(grid_hw), x.dtype)
        if self.register_tokens is None:
            return x
        registers = ops.broadcast_to(
            ops.cast(self.register_tokens, x.dtype), (batch, self.num_register_tokens, self.embed_dim)
        )
        return ops.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)

    def _drop_registers(self, x, axis=1):
        """``x`` without the register positions ``1 .. R`` along ``axis``."""
        if not self.num_register_tokens:
            return x
        r = self.num_register_tokens
        first = [slice(None)] * axis + [slice(0, 1)]
        rest = [slice(None)] * axis + [slice(1 + r, None)]
        return ops.concatenate([x[tuple(first)], x[tuple(rest)]], axis=axis)

    def positional_queries(self, tables):
        """PQCL query tokens: ``mask_token + tables`` for tables ``(batch, L, D)``."""
        if self.mask_token is None:
            raise ValueError("positional queries need a mask token; build with use_mask_token=True.")
        return tables + ops.cast(self.mask_token, tables.dtype)[None]

    # ----------------------------------------------------------------- forward
    def forward_features(
        self,
        images,
        masks=None,
        queries=None,
        training=False,
        n_last_blocks=1,
        return_attention=False,
    ):
        """Full forward pass with every feature the methods and evaluations need (the
        backbone contract's feature dict, see :mod:`keras_pqcl.backbones.base`).

        Returns:
            dict with ``"cls"`` ``(B, D)``, ``"patches"`` ``(B, N, D)``, ``"queries"``
            ``(B, L, D)`` (if given), ``"last_blocks"`` (list of the last ``n_last_blocks``
            block outputs ``(B, 1 + N, D)``, each through the final LayerNorm) and
            ``"attention"`` ``(B, heads, 1 + N, 1 + N)`` of the last block if asked for, and
            ``"registers"`` ``(B, R, D)`` (after the final LayerNorm) when the backbone has
            register tokens. Register tokens are left out of ``"last_blocks"`` and of
            ``"attention"`` (rows and columns), so attention rows then sum to less than 1:
            the mass on the registers is not shown.
        """
        x = self.embed(images, masks)
        if queries is not None:
            queries = ops.cast(queries, x.dtype)
        outputs = []
        attention = None
        for i, block in enumerate(self.blocks):
            last = i == self.depth - 1
            x, queries, attn = block(x, queries=queries, return_attention=return_attention and last, training=training)
            if last:
                attention = attn
            if i >= self.depth - n_last_blocks:
                outputs.append(x)
        normed = [self.norm(o) for o in outputs]
        x = normed[-1]
        r = self.num_register_tokens
        result = {
            "cls": x[:, 0],
            "patches": x[:, 1 + r :],
            "last_blocks": [self._drop_registers(o) for o in normed],
        }
        if r:
            result["registers"] = x[:, 1 : 1 + r]
            if attention is not None:
                attention = self._drop_registers(self._drop_registers(attention, axis=2), axis=3)
        if queries is not None:
            result["queries"] = self.norm(queries)
        if return_attention:
            result["attention"] = attention
        return result

    def call(self, images, masks=None, queries=None, training=None):
        out = self.forward_features(images, masks=masks, queries=queries, training=training)
        out.pop("last_blocks")
        out.pop("registers", None)
        return out

    def get_intermediate_layers(self, images, n=1):
        """Outputs of the last ``n`` blocks, each through the final LayerNorm."""
        return self.forward_features(images, n_last_blocks=n)["last_blocks"]

    def get_last_selfattention(self, images):
        """Softmax attention of the last block: ``(batch, heads, 1 + N, 1 + N)``."""
        return self.forward_features(images, return_attention=True)["attention"]

    def get_config(self):
        config = super().get_config()
        config.update(
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            drop_path_rate=self.drop_path_rate,
            pos_embed=self.pos_embed_kind,
            image_size=self.image_size,
            use_mask_token=self.use_mask_token,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        # The DINOv2 options are written only when set, so that a plain ViT's file keeps the
        # config (and loads with) the versions before them.
        dinov2 = dict(
            layer_scale_init=self.layer_scale_init,
            num_register_tokens=self.num_register_tokens,
            ffn=self.ffn,
            interpolate_offset=self.interpolate_offset,
            interpolate_antialias=self.interpolate_antialias,
        )
        config.update({k: v for k, v in dinov2.items() if v != DINOV2_OPTION_DEFAULTS[k]})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("trainable",):
            config.pop(key, None)
        return cls(**config)


# Presets: (embed_dim, depth, num_heads) from the ViT/DeiT papers.
VIT_PRESETS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}

# DINOv2's released backbones: patch 14, LayerScale 1e-5, position table for 518 px (37 x 37,
# the size of the released weights; other sizes are resampled); ViT-g is DINOv2's "giant2"
# (1536 wide, 40 blocks, 24 heads of 64) with the SwiGLU FFN. The "_reg" variants add 4
# registers and resample the table by size with the antialiased kernel, as released.
_DINOV2 = dict(layer_scale_init=1e-5, image_size=518)
_REGISTERS = dict(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
DINOV2_PRESETS = {
    "vit_small14": dict(embed_dim=384, depth=12, num_heads=6, **_DINOV2),
    "vit_base14": dict(embed_dim=768, depth=12, num_heads=12, **_DINOV2),
    "vit_large14": dict(embed_dim=1024, depth=24, num_heads=16, **_DINOV2),
    "vit_giant14": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu", **_DINOV2),
}
DINOV2_PRESETS.update({f"{name}_reg": dict(preset, **_REGISTERS) for name, preset in list(DINOV2_PRESETS.items())})
VIT_PRESETS.update(DINOV2_PRESETS)


def _preset(name):
    default_patch = 14 if name in DINOV2_PRESETS else 16

    def builder(patch_size=default_patch, **kwargs):
        kwargs.setdefault("name", name)
        return VisionTransformer(patch_size=patch_size, **{**VIT_PRESETS[name], **kwargs})

    builder.__name__ = name
    builder.__doc__ = f"{name}: ``VisionTransformer`` with {VIT_PRESETS[name]}; other arguments are passed on."
    return builder


vit_tiny = _preset("vit_tiny")
vit_small = _preset("vit_small")
vit_base = _preset("vit_base")
vit_large = _preset("vit_large")
vit_small14 = _preset("vit_small14")
vit_base14 = _preset("vit_base14")
vit_large14 = _preset("vit_large14")
vit_giant14 = _preset("vit_giant14")
vit_small14_reg = _preset("vit_small14_reg")
vit_base14_reg = _preset("vit_base14_reg")
vit_large14_reg = _preset("vit_large14_reg")
vit_giant14_reg = _preset("vit_giant14_reg")


def vit(name, **kwargs):
    """Build a preset by name (``"vit_small"``, ...)."""
    if name not in VIT_PRESETS:
        raise ValueError(f"Unknown ViT preset {name!r}; choose one of {sorted(VIT_PRESETS)}.")
    return _preset(name)(**kwargs)
