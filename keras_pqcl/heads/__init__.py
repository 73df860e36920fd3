"""Projection heads."""

from keras_pqcl.heads.densecl_head import DenseCLDenseHead, DenseCLGlobalHead
from keras_pqcl.heads.dino_head import DINOHead
from keras_pqcl.heads.ibot_head import iBOTHead
from keras_pqcl.heads.mcl_head import MCLNeck, MCLPredictor
