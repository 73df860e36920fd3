"""Optimizers: AdamW with the DINO/iBOT conventions; torch-style SGD for the contrastive methods;
AdamW with layer-wise learning-rate decay for fine-tuning."""

from keras_pqcl.optimizers.adamw import AdamW, dino_adamw
from keras_pqcl.optimizers.finetune import LayerDecayAdamW, WarmupPoly, finetune_adamw, layer_decay_multipliers
from keras_pqcl.optimizers.sgd import SGD, moco_sgd
