"""Losses; each owns its state (centers) and its softmax/centering arithmetic."""

from keras_pqcl.losses.centering import CenteredTeacherLoss
from keras_pqcl.losses.dino_loss import DINOLoss
