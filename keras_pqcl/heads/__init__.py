"""Projection heads."""

from keras_pqcl.heads.dino_head import DINOHead
