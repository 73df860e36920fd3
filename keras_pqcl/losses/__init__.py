"""Losses; each owns its state (centers) and its softmax/centering arithmetic."""

from keras_pqcl.losses.centering import CenteredTeacherLoss
from keras_pqcl.losses.dino_loss import DINOLoss
from keras_pqcl.losses.ibot_loss import MaskedPatchLoss, iBOTLoss
from keras_pqcl.losses.info_nce import InfoNCE, Queue, info_nce
from keras_pqcl.losses.query_loss import QueryLoss, query_agreement
