"""Backbones: the Vision Transformer, ResNet and FPN, with their presets; the contract they
share (:mod:`keras_pqcl.backbones.base`) and its check."""

from keras_pqcl.backbones.base import Backbone, check_backbone
from keras_pqcl.backbones.vit import (
    DINOV2_PRESETS,
    VIT_PRESETS,
    VisionTransformer,
    vit,
    vit_base,
    vit_base14,
    vit_base14_reg,
    vit_giant14,
    vit_giant14_reg,
    vit_large,
    vit_large14,
    vit_large14_reg,
    vit_small,
    vit_small14,
    vit_small14_reg,
    vit_tiny,
)
from keras_pqcl.backbones.fpn import FPN
from keras_pqcl.backbones.resnet import RESNET_PRESETS, ResNet, SplitBatchNorm, resnet, resnet50, resnet101
