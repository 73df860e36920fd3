"""Multi-scale feature maps from any keras_pqcl backbone, for dense heads.

One output for every backbone: a dict of channels-last maps named by level, ``"P2"`` ..
``"P5"``, where level ``Pi`` has stride ``2**i`` (4, 8, 16, 32 pixels), sizes rounded up.

* ResNet: ``Pi`` is the stage output ``Ci`` (no extra weights).
* Vision Transformer, ``source="last"``: the "simple feature pyramid" of ViTDet (Li et al.,
  "Exploring Plain Vision Transformer Backbones for Object Detection", ECCV 2022) built from
  the last block's patch tokens alone. The token grid (stride ``p``, the patch size) is the
  level of stride ``p`` as it is; finer levels come from 2x transposed convolutions (with
  LayerNorm and GELU between two of them), coarser ones from max pooling. For ``p = 16``:
  P2 = deconv x4, P3 = deconv x2, P4 = identity, P5 = max pool.
* Vision Transformer, ``source="blocks"``: the same four operations, each applied to the
  tokens of a different block (BEiT's and iBOT's UperNet setting: Bao et al., "BEiT", ICLR
  2022; Zhou et al., "iBOT", ICLR 2022), shallow blocks feeding the fine levels.

Every ViT level keeps the token width ``D`` (BEiT's choice; ViTDet narrows the fine levels,
which only saves compute), and every token map passes the backbone's final LayerNorm, so
each block's features are on the scale the pre-training heads saw.
"""

import math

import keras
from keras import ops

LEVELS = ("P2", "P3", "P4", "P5")
VIT_SOURCES = ("last", "blocks")


def level_stride(level):
    """``"P3"`` -> 8."""
    return 2 ** int(level[1:])


def default_block_indices(depth):
    """Four evenly spaced blocks ending with the last: (2, 5, 8, 11) for 12 blocks
    (BEiT's segmentation used 3, 5, 7, 11)."""
    return tuple(max(round((k + 1) * depth / 4) - 1, 0) for k in range(4))


def is_token_backbone(backbone):
    """A ViT-like backbone: it has a position table (see :mod:`keras_pqcl.backbones.base`)."""
    return getattr(backbone, "pos_embed_kind", None) is not None


def _check_levels(levels):
    levels = tuple(levels)
    bad = [lvl for lvl in levels if lvl not in LEVELS]
    if bad or not levels:
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}; got {levels!r}.")
    return levels


@keras.saving.register_keras_serializable(package="keras_pqcl")
class FeaturePyramid(keras.layers.Layer):
    """Backbone + pyramid: images ``(B, H, W, 3)`` -> ``{"P2": (B, H/4, W/4, C2), ...}``.

    Args:
        backbone: a keras_pqcl backbone: a ViT (``pos_embed_kind`` set, ``forward_features``
            returning ``"patches"`` ``(B, N, D)``) or a ResNet (``call`` returning
            ``"C2".."C5"``).
        levels: the levels to compute (all four by default); a head that reads one level
            builds only that one, so no weight goes without a gradient.
        source: ViT only: ``"last"`` (ViTDet) or ``"blocks"`` (BEiT/iBOT UperNet).
        block_indices: ViT with ``source="blocks"``: four 0-based block indices feeding
            P2, P3, P4, P5 (default :func:`default_block_indices`).

    Call args:
        images: ``(B, H, W, 3)``; for a ViT, H and W multiples of the patch size.
        training: passed to the backbone (drop path, BatchNorm).

    Returns:
        dict ``{level: (B, ceil(H / s), ceil(W / s), channels[level])}``, s the level's stride
        (ViT levels coarser than the token grid round the grid size up). ``channels`` is the
        attribute of the same name.
    """

    def __init__(self, backbone, levels=LEVELS, source="last", block_indices=None, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.levels = _check_levels(levels)
        self.source = source
        self.is_vit = is_token_backbone(backbone)
        self.block_indices = None
        self.ops = {}
        if self.is_vit:
            self._init_vit(block_indices)
        else:
            out_channels = dict(getattr(backbone, "out_channels", None) or {})
            missing = [f"C{lvl[1:]}" for lvl in self.levels if f"C{lvl[1:]}" not in out_channels]
            if missing:
                raise ValueError(
                    f"FeaturePyramid needs a ViT or a backbone whose call returns {missing} (listed in "
                    f"`out_channels`); {type(backbone).__name__} lists {sorted(out_channels)}. "
                    "Use kp.backbones.vit_small(16) or kp.backbones.resnet50()."
                )
            self.channels = {lvl: int(out_channels[f"C{lvl[1:]}"]) for lvl in self.levels}

    # ------------------------------------------------------------------ ViT
    def _init_vit(self, block_indices):
        backbone = self.backbone
        if self.source not in VIT_SOURCES:
            raise ValueError(f"source must be one of {VIT_SOURCES}; got {self.source!r}.")
        p = int(backbone.patch_size)
        if p not in (4, 8, 16, 32):
            raise ValueError(
                f"FeaturePyramid builds strides 4..32 from the ViT's token grid by factors of 2, so the patch "
                f"size must be 4, 8, 16 or 32; got {p}. Use a ViT with patch_size=16 (or 8)."
            )
        self.token_level = f"P{int(math.log2(p))}"
        if self.source == "blocks":
            depth = int(backbone.depth)
            indices = tuple(int(i) for i in (block_indices or default_block_indices(depth)))
            if len(indices) != 4 or min(indices) < 0 or max(indices) >= depth:
                raise ValueError(
                    f"block_indices must be 4 block indices in [0, {depth}) (for P2, P3, P4, P5); got {indices!r}."
                )
            self.block_indices = indices
        dim = int(backbone.embed_dim)
        self.channels = {lvl: dim for lvl in self.levels}
        policy = self.dtype_policy
        for lvl in self.levels:
            steps = int(math.log2(p)) - int(lvl[1:])  # > 0: upsample 2**steps, < 0: pool
            layers = []
            for k in range(max(steps, 0)):
                if k:
                    layers.append(keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy, name=f"{lvl}_norm{k}"))
                    layers.append(keras.layers.Activation("gelu", dtype=policy, name=f"{lvl}_gelu{k}"))
                layers.append(keras.layers.Conv2DTranspose(dim, 2, strides=2, dtype=policy, name=f"{lvl}_deconv{k}"))
            if steps < 0:
                layers.append(keras.layers.MaxPooling2D(2**-steps, padding="same", dtype=policy, name=f"{lvl}_pool"))
            self.ops[lvl] = layers

    def _vit_maps(self, images, training):
        backbone = self.backbone
        p = backbone.patch_size
        h, w = images.shape[1] // p, images.shape[2] // p
        if self.source == "last":
            patches = backbone.forward_features(images, training=training)["patches"]
            tokens = {lvl: patches for lvl in self.levels}
        else:
            wanted = dict(zip(LEVELS, self.block_indices))
            n_last = backbone.depth - min(wanted[lvl] for lvl in self.levels)
            blocks = backbone.forward_features(images, training=training, n_last_blocks=n_last)["last_blocks"]
            offset = backbone.depth - n_last  # last_blocks[j] is block offset + j
            tokens = {lvl: blocks[wanted[lvl] - offset][:, 1:] for lvl in self.levels}
        out = {}
        for lvl in self.levels:
            x = ops.reshape(tokens[lvl], (-1, h, w, backbone.embed_dim))
            for layer in self.ops[lvl]:
                x = layer(x)
            out[lvl] = x
        return out

    # ---------------------------------------------------------------- common
    def build(self, input_shape=None):
        if self.built:
            return
        dim = self.channels[self.levels[0]]
        for layers in self.ops.values():
            for layer in layers:
                layer.build((None, None, None, dim))
        self.built = True

    def call(self, images, training=None):
        if len(images.shape) != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"FeaturePyramid expects images (batch, height, width, 3), channels last; got shape "
                f"{tuple(images.shape)}."
            )
        if self.is_vit:
            return self._vit_maps(images, training)
        maps = self.backbone(images, training=training)
        return {lvl: maps[f"C{lvl[1:]}"] for lvl in self.levels}

    def compute_output_spec(self, images, training=None):
        b, h, w = images.shape[:3]

        def ceil_div(size, stride):
            return None if size is None else -(-size // stride)

        return {
            lvl: keras.KerasTensor(
                (b, ceil_div(h, level_stride(lvl)), ceil_div(w, level_stride(lvl)), self.channels[lvl]),
                dtype=self.compute_dtype,
            )
            for lvl in self.levels
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=keras.saving.serialize_keras_object(self.backbone),
            levels=list(self.levels),
            source=self.source,
            block_indices=None if self.block_indices is None else list(self.block_indices),
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)
