"""Projection heads."""

from keras_pqcl.heads.dino_head import DINOHead
from keras_pqcl.heads.ibot_head import iBOTHead
