"""Initialisers shared by the ViT and the heads."""

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
