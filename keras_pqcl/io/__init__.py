"""Import of weights trained in other frameworks (PyTorch DINO, iBOT and PQCL checkpoints)."""

from keras_pqcl.io.torch_checkpoint import load_torch_checkpoint
