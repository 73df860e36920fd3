"""Building blocks shared by every backbone and method."""

from keras_pqcl.layers.attention import Attention
from keras_pqcl.layers.batch_stat_norm import BatchStatNorm
from keras_pqcl.layers.block import Block
from keras_pqcl.layers.dense import Dense
from keras_pqcl.layers.drop_path import DropPath
from keras_pqcl.layers.layer_scale import LayerScale
from keras_pqcl.layers.mlp import Mlp
from keras_pqcl.layers.patch_embed import PatchEmbed
from keras_pqcl.layers.pos_embed import (
    bicubic_matrix,
    interpolate_grid,
    sincos_embedding,
    sincos_from_coords,
    sincos_grid,
)
from keras_pqcl.layers.swiglu import SwiGLU, swiglu_hidden_dim
from keras_pqcl.layers.weight_norm import WeightNormDense
