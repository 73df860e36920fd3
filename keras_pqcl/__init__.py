"""keras_pqcl: dense self-supervised pre-training of vision models in Keras 3.

DINO, iBOT, PQCL, ADCLR, DenseCL and MCL on TensorFlow, JAX and PyTorch.
"""

__version__ = "0.1.0"

from keras_pqcl import backbones, callbacks, data, eval, heads, io, layers, losses, models, optimizers, schedules
from keras_pqcl.io.load import load_backbone
from keras_pqcl.recipe import Recipe, load_recipe
from keras_pqcl.training import pretrain
