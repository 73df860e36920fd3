"""Segmentation decoders over a :class:`~keras_pqcl.tasks.pyramid.FeaturePyramid` output.

Each decoder maps the dict ``{"P2": (B, h2, w2, c2), ...}`` to class logits
``(B, h, w, num_classes)`` at the resolution of the finest level it reads; the segmenter
upsamples them to the image. All channels-last, ``keras.ops`` only.

* ``"linear"``: BatchNorm + 1x1 convolution on one level, the linear protocol of iBOT and
  DINOv2 (Oquab et al., 2023) on the backbone's own patch features.
* ``"fpn"``: FPN neck (Lin et al., CVPR 2017; :class:`~keras_pqcl.backbones.FPN`), then a
  3x3 conv-BN-ReLU per level, every level upsampled to P2 and summed (the Semantic FPN head of
  Kirillov et al., CVPR 2019, with one convolution per level instead of one per 2x step).
* ``"upernet"``: UperNet (Xiao et al., "Unified Perceptual Parsing", ECCV 2018) as
  mmsegmentation's ``UPerHead``: a pyramid pooling module (PSPNet's bins 1, 2, 3, 6) on P5,
  lateral 1x1 convolutions, a top-down pathway, 3x3 output convolutions, all levels upsampled
  to P2, concatenated and fused by a 3x3 convolution.

Every convolution but the classifier is conv (no bias) + BatchNorm + ReLU; resizing is
bilinear with half-pixel centres (``align_corners=False``).
"""

import random

import keras
import numpy as np
from keras import ops

from keras_pqcl.backbones.fpn import FPN
from keras_pqcl.tasks.pyramid import LEVELS

DECODERS = ("linear", "fpn", "upernet")
PPM_BINS = (1, 2, 3, 6)


def resize_to(x, like):
    """Bilinear resize of ``x`` ``(B, h, w, C)`` to the spatial size of ``like``."""
    size = tuple(like.shape[1:3])
    if tuple(x.shape[1:3]) == size:
        return x
    return ops.image.resize(x, size, interpolation="bilinear")


def adaptive_avg_pool(x, bins):
    """Average ``x`` ``(B, H, W, C)`` over a ``bins x bins`` grid of cells ``(B, bins, bins, C)``.

    Cell i along an axis of size n covers ``[floor(i n / bins), ceil((i + 1) n / bins))``,
    the cells of PyTorch's ``AdaptiveAvgPool2d`` (they overlap when n is not a multiple).
    Written as two small averaging matrices, since the spatial sizes are static.
    """
    mats = []
    for n in x.shape[1:3]:
        m = np.zeros((bins, n), np.float32)
        for i in range(bins):
            lo, hi = (i * n) // bins, -(-((i + 1) * n) // bins)
            m[i, lo:hi] = 1.0 / (hi - lo)
        mats.append(ops.convert_to_tensor(m, dtype=x.dtype))
    return ops.einsum("ih,bhwc,jw->bijc", mats[0], x, mats[1])


@keras.saving.register_keras_serializable(package="keras_pqcl")
class ConvBNReLU(keras.layers.Layer):
    """``relu(BN(conv_k(x)))``, conv without bias, "same" padding: ``(B, h, w, C_in)`` -> ``(B, h, w, filters)``."""

    def __init__(self, filters, kernel_size=1, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size = int(filters), int(kernel_size)
        policy = self.dtype_policy
        self.conv = keras.layers.Conv2D(
            self.filters, self.kernel_size, padding="same", use_bias=False, dtype=policy, name="conv"
        )
        self.bn = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, dtype=policy, name="bn")

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.bn.build(tuple(input_shape[:-1]) + (self.filters,))
        self.built = True

    def call(self, x, training=None):
        return ops.relu(self.bn(self.conv(x), training=training))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.filters,)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size}


class _Decoder(keras.layers.Layer):
    """Shared arguments: ``num_classes``, ``channels`` (hidden width), ``dropout`` before
    the classifier (0.1 as mmsegmentation's heads), ``seed`` of the dropout (default: drawn
    from Python's ``random``, which ``keras.utils.set_random_seed`` seeds; kept in the config)."""

    #: the pyramid levels the decoder reads.
    levels = LEVELS

    def __init__(self, num_classes, channels=256, dropout=0.1, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.channels, self.dropout_rate = int(num_classes), int(channels), float(dropout)
        # A seeded dropout draws from its own generator state, which a checkpoint saves and a
        # resume restores; unseeded, Keras' PyTorch backend draws from torch's global RNG.
        self.seed = int(seed) if seed is not None else random.randrange(2**31 - 1)
        policy = self.dtype_policy
        self.dropout = keras.layers.Dropout(self.dropout_rate, seed=self.seed, dtype=policy, name="dropout")
        self.classifier = keras.layers.Conv2D(self.num_classes, 1, dtype=policy, name="classifier")

    def _check(self, features):
        if not isinstance(features, dict) or any(lvl not in features for lvl in self.levels):
            got = sorted(features) if isinstance(features, dict) else type(features).__name__
            raise ValueError(
                f"{type(self).__name__} reads the pyramid levels {list(self.levels)}; got {got}. Pass the output "
                "of kp.tasks.FeaturePyramid built with these levels."
            )

    def classify(self, x, training):
        return self.classifier(self.dropout(x, training=training))

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "channels": self.channels,
            "dropout": self.dropout_rate,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="keras_pqcl")
class LinearDecoder(_Decoder):
    """BatchNorm + 1x1 convolution on one level: ``(B, h, w, D)`` -> ``(B, h, w, num_classes)``.

    Args:
        level: the level read (the segmenter picks the backbone's patch stride: P4 for a
            ViT/16, P3 for a ViT/8, P5 for a ResNet).
        num_classes, dropout: see the shared arguments (``channels`` is unused).
    """

    def __init__(self, num_classes, level="P4", channels=256, dropout=0.0, **kwargs):
        super().__init__(num_classes, channels=channels, dropout=dropout, **kwargs)
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}; got {level!r}.")
        self.level = level
        self.levels = (level,)
        self.norm = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, dtype=self.dtype_policy, name="bn")

    def build(self, input_shape):
        shape = input_shape[self.level]
        self.norm.build(shape)
        self.classifier.build(shape)
        self.built = True

    def call(self, features, training=None):
        self._check(features)
        return self.classify(self.norm(features[self.level], training=training), training)

    def get_config(self):
        return {**super().get_config(), "level": self.level}


@keras.saving.register_keras_serializable(package="keras_pqcl")
class FPNDecoder(_Decoder):
    """FPN neck + per-level 3x3 conv-BN-ReLU, upsampled to P2 and summed, then the classifier.

    ``{"P2".."P5"}`` -> ``(B, h2, w2, num_classes)``.
    """

    def __init__(self, num_classes, channels=256, dropout=0.1, **kwargs):
        super().__init__(num_classes, channels=channels, dropout=dropout, **kwargs)
        policy = self.dtype_policy
        self.neck = FPN(out_channels=self.channels, use_norm=True, dtype=policy, name="fpn")
        self.scale_heads = [ConvBNReLU(self.channels, 3, dtype=policy, name=f"head_{lvl}") for lvl in LEVELS]

    def build(self, input_shape):
        self.neck.build({f"C{lvl[1:]}": input_shape[lvl] for lvl in LEVELS})
        for head in self.scale_heads:
            head.build((None, None, None, self.channels))
        self.classifier.build((None, None, None, self.channels))
        self.built = True

    def call(self, features, training=None):
        self._check(features)
        pyramid = self.neck({f"C{lvl[1:]}": features[lvl] for lvl in LEVELS}, training=training)
        maps = [head(pyramid[lvl], training=training) for head, lvl in zip(self.scale_heads, LEVELS)]
        fused = maps[0]
        for x in maps[1:]:
            fused = fused + resize_to(x, maps[0])
        return self.classify(fused, training)


@keras.saving.register_keras_serializable(package="keras_pqcl")
class UperNetDecoder(_Decoder):
    """UperNet head: PPM on P5 + FPN fusion of P2..P5 -> ``(B, h2, w2, num_classes)``.

    Per mmsegmentation's ``UPerHead``: ``psp = conv3x3([P5, up(conv1x1(pool_b(P5))) for b in
    (1, 2, 3, 6)])``; laterals ``L_i = conv1x1(P_i)`` for i < 5 and ``L_5 = psp``; top-down
    ``L_{i-1} += up(L_i)``; outputs ``conv3x3(L_i)`` for i < 5 and ``L_5``; all upsampled to
    P2, concatenated and fused by a 3x3 convolution, then dropout and the 1x1 classifier.
    """

    def __init__(self, num_classes, channels=256, dropout=0.1, **kwargs):
        super().__init__(num_classes, channels=channels, dropout=dropout, **kwargs)
        policy = self.dtype_policy
        c = self.channels
        self.ppm = [ConvBNReLU(c, 1, dtype=policy, name=f"ppm_{b}") for b in PPM_BINS]
        self.psp_bottleneck = ConvBNReLU(c, 3, dtype=policy, name="psp_bottleneck")
        self.laterals = [ConvBNReLU(c, 1, dtype=policy, name=f"lateral_{lvl}") for lvl in LEVELS[:-1]]
        self.outputs = [ConvBNReLU(c, 3, dtype=policy, name=f"fpn_{lvl}") for lvl in LEVELS[:-1]]
        self.fpn_bottleneck = ConvBNReLU(c, 3, dtype=policy, name="fpn_bottleneck")

    def build(self, input_shape):
        c = self.channels
        top = input_shape[LEVELS[-1]][-1]
        for layer in self.ppm:
            layer.build((None, None, None, top))
        self.psp_bottleneck.build((None, None, None, top + len(PPM_BINS) * c))
        for lvl, lateral, output in zip(LEVELS, self.laterals, self.outputs):
            lateral.build((None, None, None, input_shape[lvl][-1]))
            output.build((None, None, None, c))
        self.fpn_bottleneck.build((None, None, None, len(LEVELS) * c))
        self.classifier.build((None, None, None, c))
        self.built = True

    def call(self, features, training=None):
        self._check(features)
        top = features[LEVELS[-1]]
        pooled = [
            resize_to(conv(adaptive_avg_pool(top, b), training=training), top) for conv, b in zip(self.ppm, PPM_BINS)
        ]
        laterals = [conv(features[lvl], training=training) for conv, lvl in zip(self.laterals, LEVELS)]
        laterals.append(self.psp_bottleneck(ops.concatenate([top] + pooled, axis=-1), training=training))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_to(laterals[i], laterals[i - 1])
        outs = [conv(x, training=training) for conv, x in zip(self.outputs, laterals[:-1])] + [laterals[-1]]
        fused = ops.concatenate([resize_to(x, outs[0]) for x in outs], axis=-1)
        return self.classify(self.fpn_bottleneck(fused, training=training), training)


def build_decoder(name, num_classes, channels=256, dropout=0.1, level="P4", dtype=None):
    """The decoder called ``name`` (one of :data:`DECODERS`); ``level`` is the linear decoder's."""
    if name not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}; got {name!r}.")
    if name == "linear":
        return LinearDecoder(num_classes, level=level, channels=channels, dropout=0.0, dtype=dtype, name="linear")
    cls = FPNDecoder if name == "fpn" else UperNetDecoder
    return cls(num_classes, channels=channels, dropout=dropout, dtype=dtype, name=name)
