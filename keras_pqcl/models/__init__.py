"""Self-supervised methods: each a small model composing shared layers and losses."""

from keras_pqcl.models.adclr import ADCLR
from keras_pqcl.models.base import SelfSupervisedModel, clone_layer, crop_major
from keras_pqcl.models.densecl import DenseCL
from keras_pqcl.models.dino import DINO
from keras_pqcl.models.ibot import IBOT
from keras_pqcl.models.mcl import MCL
from keras_pqcl.models.needs import Needs
from keras_pqcl.models.pqcl import PQCL
from keras_pqcl.models.self_distillation import SelfDistillation
from keras_pqcl.models import terms
