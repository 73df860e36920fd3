"""Downstream tasks: fine-tuning a pre-trained backbone for semantic segmentation.

:class:`SemanticSegmenter` (backbone -> :class:`FeaturePyramid` -> decoder), its loss and
metrics. ``kp.tasks.data`` (tf.data image+mask pipelines) imports TensorFlow, so it is imported
on first access, not here.
"""

import importlib

from keras_pqcl.tasks.decoders import DECODERS, FPNDecoder, LinearDecoder, UperNetDecoder, build_decoder
from keras_pqcl.tasks.loss import PixelCrossEntropy, pixel_cross_entropy
from keras_pqcl.tasks.metrics import MeanAccuracy, MeanIoU, PixelAccuracy, segmentation_metrics
from keras_pqcl.tasks.pyramid import LEVELS, FeaturePyramid
from keras_pqcl.tasks.segmenter import SemanticSegmenter

_LAZY_SUBMODULES = ("data",)


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
