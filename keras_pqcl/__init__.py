"""keras_pqcl: dense self-supervised pre-training of vision models in Keras 3.

DINO, iBOT, PQCL, ADCLR, DenseCL and MCL on TensorFlow, JAX and PyTorch.
"""

__version__ = "0.2.0"

import importlib

# The model tier needs only Keras and NumPy, so that a JAX or PyTorch user can load and run a
# saved backbone without TensorFlow installed.
from keras_pqcl import backbones, callbacks, heads, io, layers, losses, models, optimizers, schedules, tasks
from keras_pqcl.io.load import load_backbone
from keras_pqcl.recipe import Recipe, load_recipe
from keras_pqcl.training import pretrain

# ``data`` (tf.data pipelines) and ``eval`` (built on them) import TensorFlow, so they are
# imported on first access (``kp.data.X``, ``from keras_pqcl import eval``), not here.
_LAZY_SUBMODULES = ("data", "eval")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        # import_module also binds the submodule on the package, so this runs once per name.
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
