"""Initialisers shared by the backbones and the heads."""

import math

import keras


def linear_init():
    """Kernel/bias initialisers of a reference ``nn.Linear`` in DINO/iBOT.

    The reference calls ``trunc_normal_(std=0.02)`` with cut-offs at +-2 *absolute*, i.e.
    +-100 sigma, so the draw is effectively an untruncated N(0, 0.02^2). Keras'
    ``TruncatedNormal`` cuts at 2 sigma and would shrink the spread; hence RandomNormal.
    """
    return {
        "kernel_initializer": keras.initializers.RandomNormal(stddev=0.02),
        "bias_initializer": "zeros",
    }


def kaiming_fan_out():
    """torch ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, untruncated: the
    convolutions of torchvision's ResNet and of detectron2-style conv heads."""
    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


def torch_default_init(fan_in):
    """Kernel/bias initialisers of a default PyTorch ``nn.Linear``/``nn.Conv2d``:
    kaiming_uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in)) for kernel and bias."""
    bound = 1.0 / math.sqrt(fan_in)
    return {
        "kernel_initializer": keras.initializers.VarianceScaling(1.0 / 3.0, mode="fan_in", distribution="uniform"),
        "bias_initializer": keras.initializers.RandomUniform(-bound, bound),
    }
