"""Backbones: the Vision Transformer, ResNet and FPN, with their presets; the contract they
share (:mod:`keras_pqcl.backbones.base`) and its check."""

from keras_pqcl.backbones.base import Backbone, check_backbone
from keras_pqcl.backbones.vit import (
    VIT_PRESETS,
    VisionTransformer,
    vit,
    vit_base,
    vit_large,
    vit_small,
    vit_tiny,
)
from keras_pqcl.backbones.fpn import FPN
from keras_pqcl.backbones.resnet import RESNET_PRESETS, ResNet, SplitBatchNorm, resnet, resnet50, resnet101
