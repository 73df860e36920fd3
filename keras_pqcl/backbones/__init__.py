"""Backbones: the Vision Transformer and its presets."""

from keras_pqcl.backbones.vit import (
    VIT_PRESETS,
    VisionTransformer,
    vit,
    vit_base,
    vit_large,
    vit_small,
    vit_tiny,
)
