"""Optimizers: AdamW with the DINO/iBOT conventions; torch-style SGD for the contrastive methods."""

from keras_pqcl.optimizers.adamw import AdamW, dino_adamw
from keras_pqcl.optimizers.sgd import SGD, moco_sgd
