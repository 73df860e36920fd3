"""Feature Pyramid Network (Lin et al., CVPR 2017) over ResNet stages, mmdet style.

MCL builds its pyramid this way: per level a lateral 1x1 convolution, a top-down
pathway that adds the nearest-upsampled coarser lateral, then a 3x3 output convolution; no
activation and no extra P6. With ``use_norm=True`` (MCL) each convolution has no bias and is
followed by BatchNorm (eps 1e-5, momentum 0.9 = torch 0.1); with ``use_norm=False`` it is the
original FPN (convolutions with bias, no norm).
"""

import keras
from keras import ops

from keras_pqcl.backbones.resnet import SplitBatchNorm

LEVELS = ("2", "3", "4", "5")


def nearest_resize(x, size):
    """Nearest-neighbour resize of ``(B, h, w, C)`` to ``size = (H, W)`` picking source index
    ``floor(i * h / H)``, like torch's ``F.interpolate(mode="nearest")``: an exact 2x is a
    pixel repeat. (Keras' ``image.resize(nearest)`` uses half-pixel centres, which differs for
    non-integer ratios.)"""
    in_shape = ops.shape(x)
    for axis, out_size in ((1, size[0]), (2, size[1])):
        in_size = in_shape[axis]
        idx = ops.floor(
            ops.cast(ops.arange(out_size), "float32") * ops.cast(in_size, "float32") / ops.cast(out_size, "float32")
        )
        x = ops.take(x, ops.cast(idx, "int32"), axis=axis)
    return x


@keras.saving.register_keras_serializable(package="keras_pqcl")
class FPN(keras.layers.Layer):
    """``{"C2".."C5"}`` -> ``{"P2".."P5"}``, every level with ``out_channels`` channels.

    Args:
        out_channels: width of every pyramid level (256).
        use_norm: BatchNorm after the lateral and output convolutions, convolutions without
            bias (True, as MCL's FPN); False gives the original FPN.
        bn_splits, bn_epsilon, bn_momentum: BatchNorm settings, as in
            :class:`~keras_pqcl.backbones.ResNet`.

    Call args:
        features: dict with ``"C2"`` ``(B, H2, W2, c2)`` ... ``"C5"`` ``(B, H5, W5, c5)``, each
            level about half the size of the previous one (any extra keys are ignored).
        training: BatchNorm mode.

    Returns:
        dict ``"P2".."P5"`` with the spatial sizes of ``C2..C5`` and ``out_channels``
        channels. ``P_i = conv3x3(lateral_i + upsample(lateral_{i+1} + ...))``.

    Weights: Xavier-uniform kernels (mmdet's FPN init), zero biases.

    Example:
    >>> fpn = FPN(out_channels=16)
    >>> feats = ResNet(depths=(1, 1, 1, 1), width=8)(np.zeros((1, 64, 64, 3), "float32"))
    >>> {k: v.shape for k, v in fpn(feats).items()}["P2"]
    (1, 16, 16, 16)
    """

    def __init__(self, out_channels=256, use_norm=True, bn_splits=1, bn_epsilon=1e-5, bn_momentum=0.9, **kwargs):
        super().__init__(**kwargs)
        self.out_channels = int(out_channels)
        self.use_norm = bool(use_norm)
        self.bn_splits = int(bn_splits)
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)
        policy = self.dtype_policy
        conv = dict(
            use_bias=not self.use_norm, kernel_initializer="glorot_uniform", bias_initializer="zeros", dtype=policy
        )
        self.lateral_convs, self.output_convs = [], []
        self.lateral_norms, self.output_norms = [], []
        for level in LEVELS:
            self.lateral_convs.append(keras.layers.Conv2D(self.out_channels, 1, name=f"lateral_conv{level}", **conv))
            self.output_convs.append(
                keras.layers.Conv2D(self.out_channels, 3, padding="same", name=f"output_conv{level}", **conv)
            )
            if self.use_norm:
                for norms, kind in ((self.lateral_norms, "lateral"), (self.output_norms, "output")):
                    norms.append(
                        SplitBatchNorm(
                            num_splits=self.bn_splits,
                            epsilon=self.bn_epsilon,
                            momentum=self.bn_momentum,
                            dtype=policy,
                            name=f"{kind}_bn{level}",
                        )
                    )

    def build(self, input_shape=None):
        if self.built:
            return
        if not isinstance(input_shape, dict):
            raise ValueError(
                f"FPN is built from a dict of C2..C5 shapes, got {input_shape!r}; call it on the ResNet's output dict."
            )
        for i, level in enumerate(LEVELS):
            shape = input_shape.get(f"C{level}")
            if shape is None:
                raise ValueError(f"FPN needs 'C{level}' in its input; got keys {sorted(input_shape)}.")
            self.lateral_convs[i].build((None, None, None, shape[-1]))
            self.output_convs[i].build((None, None, None, self.out_channels))
            if self.use_norm:
                self.lateral_norms[i].build((None, None, None, self.out_channels))
                self.output_norms[i].build((None, None, None, self.out_channels))
        self.built = True

    def _check(self, features):
        if not isinstance(features, dict):
            raise ValueError(
                f"FPN takes the dict {{'C2', 'C3', 'C4', 'C5'}} of a ResNet, got {type(features).__name__}."
            )
        missing = [f"C{level}" for level in LEVELS if f"C{level}" not in features]
        if missing:
            raise ValueError(f"FPN input lacks {missing}; got keys {sorted(features)}.")
        for level in LEVELS:
            shape = tuple(features[f"C{level}"].shape)
            if len(shape) != 4:
                raise ValueError(f"FPN expects C{level} of rank 4 (batch, H, W, C), got shape {shape}.")

    def call(self, features, training=None):
        self._check(features)
        laterals = []
        for i, level in enumerate(LEVELS):
            x = self.lateral_convs[i](features[f"C{level}"])
            if self.use_norm:
                x = self.lateral_norms[i](x, training=training)
            laterals.append(x)
        # Top-down: coarsest first, each level adds the upsampled sum of the coarser ones.
        for i in range(len(LEVELS) - 1, 0, -1):
            target = ops.shape(laterals[i - 1])
            laterals[i - 1] = laterals[i - 1] + nearest_resize(laterals[i], (target[1], target[2]))
        out = {}
        for i, level in enumerate(LEVELS):
            x = self.output_convs[i](laterals[i])
            if self.use_norm:
                x = self.output_norms[i](x, training=training)
            out[f"P{level}"] = x
        return out

    def compute_output_spec(self, features, training=None):
        self._check(features)
        return {
            f"P{level}": keras.KerasTensor(
                tuple(features[f"C{level}"].shape[:3]) + (self.out_channels,), dtype=self.compute_dtype
            )
            for level in LEVELS
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            out_channels=self.out_channels,
            use_norm=self.use_norm,
            bn_splits=self.bn_splits,
            bn_epsilon=self.bn_epsilon,
            bn_momentum=self.bn_momentum,
        )
        return config
