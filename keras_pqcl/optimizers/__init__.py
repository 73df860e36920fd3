"""Optimizers with the DINO/iBOT conventions."""

from keras_pqcl.optimizers.adamw import AdamW, dino_adamw
