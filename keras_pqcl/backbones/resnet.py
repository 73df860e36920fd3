"""ResNet backbone (He et al., "Deep Residual Learning", CVPR 2016), torchvision style.

The layout is the one DenseCL, MoCo and MCL pre-train: bottleneck blocks with
the stride in the 3x3 convolution ("ResNet v1.5", torchvision's ``resnet50``), BatchNorm after
every convolution, channels last. The stage outputs ``C2..C5`` (strides 4, 8, 16, 32) are
first-class outputs because the dense methods and the FPN read them.

Reference conventions kept on purpose:

* BatchNorm ``epsilon=1e-5, momentum=0.9``: PyTorch's eps 1e-5 and momentum 0.1 (Keras counts
  the momentum the other way round). Keras' defaults (1e-3, 0.99) change results.
* Symmetric zero padding before the strided convolutions and the max pool (torch's
  ``padding=k // 2``); Keras' ``padding="same"`` pads bottom/right only for even inputs and
  would misalign the grid with torchvision weights. Zero padding before the max pool equals
  torch's -inf padding because the input has just passed a ReLU.
* Convolutions without bias, Kaiming-normal (fan_out, ReLU gain) kernels, BN gamma 1 and
  beta 0, no zero-init of the last BN of a block (the DenseCL/MoCo code does not use it).
* The classifier is torch's default ``nn.Linear`` init (uniform +-1/sqrt(fan_in)).

Shuffle BN (MoCo/DenseCL) on one device is emulated by *split BatchNorm*: with
``bn_splits=G`` every BatchNorm in training mode normalises G equal groups of the batch
separately, as G GPUs with their own BN would. ``bn_splits=1`` is plain BN.
"""

import keras
from keras import ops

from keras_pqcl.backbones.base import Backbone
from keras_pqcl.layers.init import kaiming_fan_out, torch_default_init

STAGE_STRIDES = (1, 2, 2, 2)
EXPANSION = 4  # bottleneck output channels = 4 x its inner width


@keras.saving.register_keras_serializable(package="keras_pqcl")
class SplitBatchNorm(keras.layers.BatchNormalization):
    """BatchNormalization whose training-mode statistics are taken per group of the batch.

    With ``num_splits=G`` a batch of N images is cut into G consecutive groups of N / G; each
    group is normalised with its own mean and (biased) variance, as G devices running their
    own BN would. The moving statistics are updated with the mean over groups of the group
    statistics (MoCo's ``SplitBatchNorm``). In inference mode, and with ``num_splits=1``, this
    is exactly ``keras.layers.BatchNormalization``.

    Only channels-last inputs are supported (``axis=-1``).
    """

    def __init__(self, num_splits=1, **kwargs):
        super().__init__(**kwargs)
        if int(num_splits) < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}.")
        self.num_splits = int(num_splits)

    def call(self, inputs, training=None, mask=None):
        if self.num_splits == 1 or not (training and self.trainable) or mask is not None:
            return super().call(inputs, training=training, mask=mask)
        groups = self.num_splits
        batch = inputs.shape[0]
        if batch is not None and batch % groups:
            raise ValueError(
                f"Split BatchNorm with num_splits={groups} needs a batch divisible by {groups}; "
                f"got {batch}. Change the batch size or the backbone's bn_splits."
            )
        dtype = keras.backend.result_type(inputs.dtype, "float32")  # statistics in float32
        x = ops.cast(inputs, dtype)
        rest = tuple(ops.shape(x)[1:])
        grouped = ops.reshape(x, (groups, -1) + rest)
        axes = tuple(range(1, len(grouped.shape) - 1))
        mean, variance = ops.moments(grouped, axes=axes, keepdims=True)
        out = (grouped - mean) * ops.rsqrt(variance + self.epsilon)
        if self.scale:
            out = out * ops.cast(self.gamma, dtype)
        if self.center:
            out = out + ops.cast(self.beta, dtype)
        channels = x.shape[-1]
        group_mean = ops.mean(ops.reshape(mean, (groups, channels)), axis=0)
        group_var = ops.mean(ops.reshape(variance, (groups, channels)), axis=0)
        m = self.momentum
        self.moving_mean.assign(ops.cast(self.moving_mean, dtype) * m + group_mean * (1.0 - m))
        self.moving_variance.assign(ops.cast(self.moving_variance, dtype) * m + group_var * (1.0 - m))
        return ops.cast(ops.reshape(out, ops.shape(x)), self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config["num_splits"] = self.num_splits
        return config


def _batch_norm(name, bn_splits, dtype, epsilon, momentum):
    return SplitBatchNorm(num_splits=bn_splits, axis=-1, epsilon=epsilon, momentum=momentum, dtype=dtype, name=name)


@keras.saving.register_keras_serializable(package="keras_pqcl")
class Bottleneck(keras.layers.Layer):
    """1x1 (width) -> 3x3 (width, stride) -> 1x1 (4 x width), each followed by BN; ReLU after
    the first two and after the residual sum. A 1x1 strided projection + BN ("downsample")
    replaces the identity when the shape changes.

    Args:
        width: inner channels (64, 128, 256, 512 in ResNet-50).
        stride: stride of the 3x3 conv (and of the projection).
        downsample: whether to use the projection shortcut.
        bn_splits, bn_epsilon, bn_momentum: see :class:`ResNet`.

    Call: ``(batch, H, W, C_in)`` -> ``(batch, H / stride, W / stride, 4 * width)``.
    """

    def __init__(self, width, stride=1, downsample=False, bn_splits=1, bn_epsilon=1e-5, bn_momentum=0.9, **kwargs):
        super().__init__(**kwargs)
        self.width = int(width)
        self.stride = int(stride)
        self.downsample = bool(downsample)
        self.bn_splits = bn_splits
        self.bn_epsilon = bn_epsilon
        self.bn_momentum = bn_momentum
        policy = self.dtype_policy
        bn = dict(bn_splits=bn_splits, dtype=policy, epsilon=bn_epsilon, momentum=bn_momentum)
        conv = dict(use_bias=False, kernel_initializer=kaiming_fan_out(), dtype=policy)
        out = self.width * EXPANSION
        self.conv1 = keras.layers.Conv2D(self.width, 1, name="conv1", **conv)
        self.bn1 = _batch_norm("bn1", **bn)
        self.pad2 = keras.layers.ZeroPadding2D(1, dtype=policy, name="pad2")
        self.conv2 = keras.layers.Conv2D(self.width, 3, strides=self.stride, name="conv2", **conv)
        self.bn2 = _batch_norm("bn2", **bn)
        self.conv3 = keras.layers.Conv2D(out, 1, name="conv3", **conv)
        self.bn3 = _batch_norm("bn3", **bn)
        if self.downsample:
            self.down_conv = keras.layers.Conv2D(out, 1, strides=self.stride, name="downsample_conv", **conv)
            self.down_bn = _batch_norm("downsample_bn", **bn)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.conv1.build((None, None, None, channels))
        self.bn1.build((None, None, None, self.width))
        self.pad2.build((None, None, None, self.width))
        self.conv2.build((None, None, None, self.width))
        self.bn2.build((None, None, None, self.width))
        self.conv3.build((None, None, None, self.width))
        self.bn3.build((None, None, None, self.width * EXPANSION))
        if self.downsample:
            self.down_conv.build((None, None, None, channels))
            self.down_bn.build((None, None, None, self.width * EXPANSION))
        self.built = True

    def call(self, x, training=None):
        shortcut = x
        y = ops.relu(self.bn1(self.conv1(x), training=training))
        y = ops.relu(self.bn2(self.conv2(self.pad2(y)), training=training))
        y = self.bn3(self.conv3(y), training=training)
        if self.downsample:
            shortcut = self.down_bn(self.down_conv(x), training=training)
        return ops.relu(y + shortcut)

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        s = self.stride
        h = None if h is None else (h - 1) // s + 1
        w = None if w is None else (w - 1) // s + 1
        return (b, h, w, self.width * EXPANSION)

    def get_config(self):
        config = super().get_config()
        config.update(
            width=self.width,
            stride=self.stride,
            downsample=self.downsample,
            bn_splits=self.bn_splits,
            bn_epsilon=self.bn_epsilon,
            bn_momentum=self.bn_momentum,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_pqcl")
class ResNet(Backbone, keras.Model):
    """Bottleneck ResNet returning the stage outputs ``C2..C5``.

    A :class:`~keras_pqcl.backbones.base.Backbone` without position table or mask token
    (``pos_embed_kind`` None, ``has_mask_token`` False): ``embed_dim`` is C5's channels,
    ``patch_size`` C5's stride (32), ``out_channels`` the widths of ``C2..C5``.

    Args:
        depths: blocks per stage; ``(3, 4, 6, 3)`` is ResNet-50, ``(3, 4, 23, 3)`` ResNet-101.
        width: stem channels and inner width of the first stage (64); stage ``i`` has inner
            width ``width * 2**i`` and ``4 * width * 2**i`` output channels.
        include_top: add global average pooling and a ``num_classes`` classifier.
        num_classes: classifier outputs (1000).
        bn_splits: groups of the split BatchNorm used in training (1 = plain BN; 8 emulates
            MoCo/DenseCL's 8-GPU shuffle BN on one device, see :class:`SplitBatchNorm`).
        bn_epsilon: 1e-5 as in torchvision.
        bn_momentum: 0.9 (= torch momentum 0.1).
        input_channels: channels of the input images (3).

    Call args:
        images: ``(batch, height, width, input_channels)``, any height/width >= 32
            (ImageNet-normalised, channels last).
        training: BatchNorm uses batch statistics when True.

    Returns:
        dict with ``"C2"`` ``(B, H/4, W/4, 4w)``, ``"C3"`` ``(B, H/8, W/8, 8w)``, ``"C4"``
        ``(B, H/16, W/16, 16w)`` and ``"C5"`` ``(B, H/32, W/32, 32w)`` (sizes rounded up);
        with ``include_top`` also ``"logits"`` ``(B, num_classes)``.

    Example:
    >>> net = ResNet(depths=(1, 1, 1, 1), width=8)
    >>> out = net(np.zeros((2, 64, 64, 3), "float32"))
    >>> out["C2"].shape, out["C5"].shape
    ((2, 16, 16, 32), (2, 2, 2, 256))
    """

    def __init__(
        self,
        depths=(3, 4, 6, 3),
        width=64,
        include_top=False,
        num_classes=1000,
        bn_splits=1,
        bn_epsilon=1e-5,
        bn_momentum=0.9,
        input_channels=3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        depths = tuple(int(d) for d in depths)
        if len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"depths must be 4 positive block counts (C2..C5), got {depths}.")
        self.depths = depths
        self.width = int(width)
        self.include_top = bool(include_top)
        self.num_classes = int(num_classes)
        self.bn_splits = int(bn_splits)
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)
        self.input_channels = int(input_channels)
        self.stage_channels = tuple(self.width * 2**i * EXPANSION for i in range(4))
        self.out_channels = {f"C{i + 2}": c for i, c in enumerate(self.stage_channels)}

        policy = self.dtype_policy
        bn = dict(bn_splits=self.bn_splits, dtype=policy, epsilon=self.bn_epsilon, momentum=self.bn_momentum)
        self.stem_pad = keras.layers.ZeroPadding2D(3, dtype=policy, name="stem_pad")
        self.conv1 = keras.layers.Conv2D(
            self.width, 7, strides=2, use_bias=False, kernel_initializer=kaiming_fan_out(), dtype=policy, name="conv1"
        )
        self.bn1 = _batch_norm("bn1", **bn)
        self.pool_pad = keras.layers.ZeroPadding2D(1, dtype=policy, name="pool_pad")
        self.maxpool = keras.layers.MaxPooling2D(3, strides=2, dtype=policy, name="maxpool")
        self.stages = []
        in_channels = self.width
        for i, (depth, stride) in enumerate(zip(depths, STAGE_STRIDES)):
            inner = self.width * 2**i
            blocks = []
            for j in range(depth):
                s = stride if j == 0 else 1
                blocks.append(
                    Bottleneck(
                        inner,
                        stride=s,
                        downsample=j == 0 and (s != 1 or in_channels != inner * EXPANSION),
                        bn_splits=self.bn_splits,
                        bn_epsilon=self.bn_epsilon,
                        bn_momentum=self.bn_momentum,
                        dtype=policy,
                        name=f"layer{i + 1}_{j}",
                    )
                )
                in_channels = inner * EXPANSION
            self.stages.append(blocks)
        if self.include_top:
            self.fc = keras.layers.Dense(
                self.num_classes, dtype=policy, name="fc", **torch_default_init(self.stage_channels[-1])
            )
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        self.stem_pad.build((None, None, None, self.input_channels))
        self.conv1.build((None, None, None, self.input_channels))
        self.bn1.build((None, None, None, self.width))
        self.pool_pad.build((None, None, None, self.width))
        self.maxpool.build((None, None, None, self.width))
        in_channels = self.width
        for blocks, out_channels in zip(self.stages, self.stage_channels):
            for block in blocks:
                block.build((None, None, None, in_channels))
                in_channels = out_channels
        if self.include_top:
            self.fc.build((None, self.stage_channels[-1]))
        self.built = True

    def _check_images(self, images):
        shape = tuple(images.shape)
        if len(shape) != 4:
            raise ValueError(
                f"ResNet expects images of shape (batch, height, width, {self.input_channels}), got "
                f"rank {len(shape)} with shape {shape}. Add a batch axis with `images[None]`."
            )
        if shape[-1] != self.input_channels:
            raise ValueError(
                f"ResNet expects {self.input_channels} channels last, got shape {shape}. Convert "
                "grayscale to RGB (repeat the channel) or transpose channels-first input "
                "(batch, C, H, W) to (batch, H, W, C)."
            )

    def call(self, images, training=None):
        self._check_images(images)
        x = self.conv1(self.stem_pad(images))
        x = ops.relu(self.bn1(x, training=training))
        x = self.maxpool(self.pool_pad(x))
        out = {}
        for i, blocks in enumerate(self.stages):
            for block in blocks:
                x = block(x, training=training)
            out[f"C{i + 2}"] = x
        if self.include_top:
            out["logits"] = self.fc(ops.mean(x, axis=(1, 2)))
        return out

    @property
    def embed_dim(self):
        """Width of the ``"cls"`` and ``"patches"`` features: C5's channels."""
        return self.stage_channels[-1]

    @property
    def patch_size(self):
        """Output stride of ``"patches"`` (C5) in pixels."""
        return 2 ** (len(self.stage_channels) + 1)

    def forward_features(self, images, training=False, n_last_blocks=1, return_attention=False):
        """The backbone contract's feature dict (see :mod:`keras_pqcl.backbones.base`), read
        by :mod:`keras_pqcl.eval`.

        Returns a dict with ``"cls"`` ``(B, C)``: the globally average-pooled C5 (the image
        feature of the contrastive ResNet papers' k-NN and linear probes), ``"patches"``
        ``(B, h, w, C)``: the C5 map (the dense probe's features, stride 32) and
        ``"last_blocks"``: ``[(B, 1 + h*w, C)]``, pooled feature then positions, so the
        ViT-style pooling of the probes reads the pooled feature as its "CLS".
        """
        if return_attention:
            raise ValueError("attention maps need a ViT backbone; a ResNet has no attention.")
        c5 = self(images, training=training)["C5"]
        pooled = ops.mean(c5, axis=(1, 2))
        b, h, w, c = ops.shape(c5)[0], c5.shape[1], c5.shape[2], c5.shape[3]
        tokens = ops.concatenate([pooled[:, None], ops.reshape(c5, (b, h * w, c))], axis=1)
        return {"cls": pooled, "patches": c5, "last_blocks": [tokens]}

    def compute_output_spec(self, images, training=None):
        self._check_images(images)
        b, h, w, _ = images.shape
        out = {}
        for i, channels in enumerate(self.stage_channels):
            stride = 2 ** (i + 2)
            oh = None if h is None else -(-h // stride)
            ow = None if w is None else -(-w // stride)
            out[f"C{i + 2}"] = keras.KerasTensor((b, oh, ow, channels), dtype=self.compute_dtype)
        if self.include_top:
            out["logits"] = keras.KerasTensor((b, self.num_classes), dtype=self.compute_dtype)
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            depths=list(self.depths),
            width=self.width,
            include_top=self.include_top,
            num_classes=self.num_classes,
            bn_splits=self.bn_splits,
            bn_epsilon=self.bn_epsilon,
            bn_momentum=self.bn_momentum,
            input_channels=self.input_channels,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("trainable", None)
        return cls(**config)


# Presets: blocks per stage from the ResNet paper (Table 1).
RESNET_PRESETS = {
    "resnet50": dict(depths=(3, 4, 6, 3)),
    "resnet101": dict(depths=(3, 4, 23, 3)),
    # For CPU-minutes recipes and tests: one block per stage, a quarter of the width.
    "resnet_tiny": dict(depths=(1, 1, 1, 1), width=16),
}


def resnet50(**kwargs):
    """ResNet-50 (torchvision layout): 23,508,032 parameters without the classifier,
    25,557,032 with ``include_top=True`` (1000 classes). Other arguments go to :class:`ResNet`."""
    kwargs.setdefault("name", "resnet50")
    return ResNet(**{**RESNET_PRESETS["resnet50"], **kwargs})


def resnet101(**kwargs):
    """ResNet-101 (DenseCL's R101 row). Other arguments go to :class:`ResNet`."""
    kwargs.setdefault("name", "resnet101")
    return ResNet(**{**RESNET_PRESETS["resnet101"], **kwargs})


def resnet(name, **kwargs):
    """Build a preset by name (``"resnet50"``, ``"resnet101"``, ``"resnet_tiny"``); other
    arguments go to :class:`ResNet` and override the preset."""
    if name not in RESNET_PRESETS:
        raise ValueError(f"Unknown ResNet preset {name!r}; choose one of {sorted(RESNET_PRESETS)}.")
    kwargs.setdefault("name", name)
    return ResNet(**{**RESNET_PRESETS[name], **kwargs})
