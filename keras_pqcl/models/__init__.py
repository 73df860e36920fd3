"""Self-supervised methods: each a small model composing shared layers and losses."""

from keras_pqcl.models.adclr import ADCLR
from keras_pqcl.models.base import SelfSupervisedModel, crop_major
from keras_pqcl.models.densecl import DenseCL
from keras_pqcl.models.dino import DINO, SelfDistillation, clone_backbone
from keras_pqcl.models.ibot import IBOT
from keras_pqcl.models.mcl import MCL
from keras_pqcl.models.needs import Needs
from keras_pqcl.models.pqcl import PQCL
