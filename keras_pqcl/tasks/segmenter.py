"""``SemanticSegmenter``: a pre-trained backbone fine-tuned for per-pixel classification.

backbone -> :class:`~keras_pqcl.tasks.pyramid.FeaturePyramid` -> decoder
(:mod:`keras_pqcl.tasks.decoders`) -> logits bilinearly upsampled to the input size. Trained
with per-pixel cross-entropy that skips ``ignore_index`` and scored with mIoU / mAcc / aAcc
(:mod:`keras_pqcl.tasks.metrics`), as in the fine-tuning evaluations of BEiT, iBOT and
DINOv2 (UperNet or linear head on ADE20K).
"""

import math

import keras
import numpy as np
from keras import ops

from keras_pqcl.tasks.decoders import DECODERS, build_decoder
from keras_pqcl.tasks.loss import PixelCrossEntropy
from keras_pqcl.tasks.metrics import segmentation_metrics
from keras_pqcl.tasks.pyramid import FeaturePyramid, is_token_backbone


@keras.saving.register_keras_serializable(package="keras_pqcl")
class SemanticSegmenter(keras.Model):
    """Backbone + pyramid + decoder, logits at the input resolution.

    Args:
        backbone: a keras_pqcl backbone (ViT or ResNet), e.g. a pre-trained
            ``teacher_backbone.keras`` loaded with ``keras.saving.load_model``.
        num_classes: C, the number of classes (``ignore_index`` is not one of them).
        decoder: ``"upernet"`` (default), ``"fpn"`` or ``"linear"``. The linear decoder reads
            the backbone's own patch features (the pyramid level at ``backbone.patch_size``).
        ignore_index: mask value of unlabelled pixels, left out of loss and metrics (255).
        freeze_backbone: keep the backbone's weights fixed and run it in inference mode
            (frozen BatchNorm statistics, no drop path); only pyramid and decoder train.
        channels: hidden width of the FPN/UperNet decoders (256 in mmsegmentation's heads;
            512 in BEiT's UperNet).
        dropout: dropout before the classifier of the FPN/UperNet decoders (0.1).
        pyramid: ViT only: ``"last"`` (ViTDet's simple pyramid from the last block) or
            ``"blocks"`` (four intermediate blocks, BEiT/iBOT); see
            :class:`~keras_pqcl.tasks.pyramid.FeaturePyramid`.
        block_indices: the four blocks of ``pyramid="blocks"``.

    The backbone's mask token (iBOT/PQCL students) plays no part in segmentation: it is made
    non-trainable, so no optimizer sees a weight without a gradient.

    Call args:
        images: float ``(B, H, W, 3)``, ImageNet-normalised as in pre-training, any size the
            backbone takes (multiples of the patch size for a ViT; its position table is
            resampled to the grid).

    Returns:
        logits ``(B, H, W, num_classes)``.

    Example:
    >>> seg = SemanticSegmenter(kp.backbones.vit_tiny(16, depth=2), num_classes=5)
    >>> seg.compile(optimizer=kp.optimizers.finetune_adamw(seg, lr=1e-4, total_steps=1000))
    >>> seg(np.zeros((1, 64, 96, 3), "float32")).shape
    (1, 64, 96, 5)
    """

    def __init__(
        self,
        backbone,
        num_classes,
        decoder="upernet",
        ignore_index=255,
        freeze_backbone=False,
        channels=256,
        dropout=0.1,
        pyramid="last",
        block_indices=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        num_classes = int(num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background counts as a class); got {num_classes}.")
        if ignore_index is not None and 0 <= int(ignore_index) < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a class id (num_classes={num_classes}); use a value outside "
                f"[0, {num_classes}) such as 255."
            )
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}; got {decoder!r}.")
        self.num_classes = num_classes
        self.decoder_name = decoder
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.freeze_backbone = bool(freeze_backbone)
        self.channels = int(channels)
        self.dropout = float(dropout)
        self.pyramid_source = pyramid
        patch = int(getattr(backbone, "patch_size", 32))
        level = f"P{int(round(math.log2(patch)))}" if patch > 0 else "P4"
        self.decoder = build_decoder(
            decoder, num_classes, channels=self.channels, dropout=self.dropout, level=level, dtype=self.dtype_policy
        )
        self.pyramid = FeaturePyramid(
            backbone,
            levels=self.decoder.levels,
            source=pyramid,
            block_indices=block_indices,
            dtype=self.dtype_policy,
            name="pyramid",
        )
        self.block_indices = self.pyramid.block_indices
        mask_token = getattr(backbone, "mask_token", None)
        if mask_token is not None:
            mask_token.trainable = False
        if self.freeze_backbone:
            backbone.trainable = False
        # Built once on a small input so that every weight exists before a checkpoint is
        # loaded or an optimizer enumerates them; the layers work at any size afterwards.
        side = max(32, patch) * (2 if is_token_backbone(backbone) else 1)
        self(keras.KerasTensor((1, side, side, 3), dtype="float32"))

    @property
    def backbone(self):
        return self.pyramid.backbone

    def call(self, images, training=None):
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(
                f"SemanticSegmenter expects images (batch, height, width, 3), channels last and normalised; got "
                f"shape {shape}. Add a batch axis with images[None] or transpose channels-first input."
            )
        images = ops.cast(images, self.compute_dtype)
        features = self.pyramid(images, training=False if self.freeze_backbone else training)
        logits = self.decoder(features, training=training)
        return ops.image.resize(logits, shape[1:3], interpolation="bilinear")

    def compile(self, optimizer="adamw", loss=None, metrics=None, **kwargs):
        """``keras.Model.compile`` with the segmentation defaults: loss
        :class:`~keras_pqcl.tasks.loss.PixelCrossEntropy` with this model's ``ignore_index``
        and metrics mIoU, mAcc, aAcc (pass ``metrics=[]`` for none)."""
        loss = PixelCrossEntropy(self.ignore_index) if loss is None else loss
        metrics = segmentation_metrics(self.num_classes, self.ignore_index) if metrics is None else metrics
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def get_compile_config(self):
        return super().get_compile_config()

    def compile_from_config(self, config):
        # Keras skips compile() on load when a model overrides it; this one only fills in
        # defaults, so the saved arguments (loss and metrics included) can be replayed.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    # ------------------------------------------------------------- inference
    def predict_logits(self, images, window=None, stride=None, batch_size=8):
        """Logits ``(N, H, W, C)`` as NumPy, whole-image or by sliding window.

        Args:
            images: ``(N, H, W, 3)`` normalised floats.
            window: None runs each image whole; an int or ``(h, w)`` crop size runs
                overlapping crops and averages the logits where they overlap (mmsegmentation's
                "slide" mode; the last crop of a row or column is moved back inside the image).
            stride: step between crops (default: two thirds of the window).
            batch_size: images (whole mode) or crops (slide mode) per forward pass.
        """
        images = np.asarray(ops.convert_to_numpy(images), np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3); got shape {images.shape}.")
        if window is None:
            return np.concatenate(
                [self._forward(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
            )
        n, height, width, _ = images.shape
        wh, ww = (int(window), int(window)) if np.isscalar(window) else (int(window[0]), int(window[1]))
        if stride is None:
            sh, sw = max(wh * 2 // 3, 1), max(ww * 2 // 3, 1)
        else:
            sh, sw = (int(stride), int(stride)) if np.isscalar(stride) else (int(stride[0]), int(stride[1]))
        boxes = []
        for y in range(max(height - wh + sh - 1, 0) // sh + 1):
            for x in range(max(width - ww + sw - 1, 0) // sw + 1):
                y2, x2 = min(y * sh + wh, height), min(x * sw + ww, width)
                boxes.append((max(y2 - wh, 0), y2, max(x2 - ww, 0), x2))
        logits = np.zeros((n, height, width, self.num_classes), np.float32)
        counts = np.zeros((1, height, width, 1), np.float32)
        crops = [(i, box) for i in range(n) for box in boxes]
        for start in range(0, len(crops), batch_size):
            chunk = crops[start : start + batch_size]
            batch = np.stack([images[i, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in chunk])
            out = self._forward(batch)
            for k, (i, (y1, y2, x1, x2)) in enumerate(chunk):
                logits[i, y1:y2, x1:x2] += out[k]
        for y1, y2, x1, x2 in boxes:
            counts[:, y1:y2, x1:x2] += 1.0
        return logits / counts

    def _forward(self, batch):
        if keras.backend.backend() == "jax":
            # The compiled predict function: one XLA compile per input shape instead of one per
            # op. (TensorFlow's relaxes the spatial sizes to None after a second shape, and the
            # decoders need them static; eager calls are fast there and on PyTorch.)
            return np.asarray(self.predict_on_batch(batch), np.float32)
        return np.asarray(ops.convert_to_numpy(self(batch, training=False)), np.float32)

    def segment(self, images, window=None, stride=None, batch_size=8):
        """Class ids ``(N, H, W)`` int32: argmax of :meth:`predict_logits` (same arguments)."""
        return self.predict_logits(images, window, stride, batch_size).argmax(-1).astype(np.int32)

    # ---------------------------------------------------------- serialization
    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=keras.saving.serialize_keras_object(self.backbone),
            num_classes=self.num_classes,
            decoder=self.decoder_name,
            ignore_index=self.ignore_index,
            freeze_backbone=self.freeze_backbone,
            channels=self.channels,
            dropout=self.dropout,
            pyramid=self.pyramid_source,
            block_indices=None if self.block_indices is None else list(self.block_indices),
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("trainable", None)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)
