"""Frozen features of a backbone for the evaluation protocols (k-NN, linear, dense probes).

Evaluation preprocessing follows the reference transform (DINO/iBOT ``eval_knn.py`` and
``eval_linear.py``): ``Resize(size / crop_fraction)`` of the short side (bicubic), centre crop
``size``, then ImageNet mean/std. The reference uses 256 -> 224, i.e. ``crop_fraction=0.875``;
the default here is 1.0 (the whole image resized), which is what small procedural images such
as ``synthetic_scenes`` need (a crop would cut objects at the border) and what pre-training
saw as a global crop of scale 1.

The backbone interface is the backbone contract of :mod:`keras_pqcl.backbones.base`:
``forward_features(images, training=False, n_last_blocks=n)`` returning a dict with
``"cls"`` ``(B, D)``, ``"patches"`` and ``"last_blocks"`` (a list of ``n`` ``(B, 1 + N, D)``
tensors), plus ``patch_size`` and (optionally) ``image_size`` and ``depth`` attributes.
Token ``"patches"`` ``(B, N, D)`` (the ViT's) are reshaped to the ``patch_size`` grid; a
convolutional backbone's ``(B, h, w, C)`` map (the ResNet's C5) is a grid already.
"""

import contextlib
import os

import keras
import numpy as np
import tensorflow as tf

from keras_pqcl.data import augment
from keras_pqcl.data.sources import load_source

__all__ = ["AVGPOOL_MODES", "FeatureExtractor", "eval_preprocess", "extract_features"]

#: iBOT's ``avgpool_patchtokens``: 0 CLS only, 1 mean patch token only, 2 both (concatenated).
AVGPOOL_MODES = (0, 1, 2)


# ----------------------------------------------------------------------------- preprocessing
def check_channels_last(shape, what="images"):
    if getattr(shape, "rank", 0) is None:  # a dataset of unknown rank: the backbone checks later
        return
    if len(shape) not in (3, 4):
        raise ValueError(f"{what} must be (height, width, 3) or (batch, height, width, 3); got shape {tuple(shape)}.")
    channels = shape[-1]
    if channels is not None and channels != 3:
        hint = {
            1: " Repeat the grey channel: np.repeat(images, 3, axis=-1).",
            4: " Drop the alpha channel: images[..., :3].",
        }.get(channels, " Channels must come last (NHWC); transpose channels-first input.")
        raise ValueError(f"{what} must have 3 channels (RGB, last axis); got shape {tuple(shape)}.{hint}")


def _preprocess_tf(images, size, crop_fraction, antialias, mean, std):
    """TF ops only, so it runs eagerly and inside ``tf.data`` maps (rank 3 or 4, any H, W)."""
    images = augment.to_float01(images)
    if size is not None:
        if isinstance(size, (tuple, list)):
            images = tf.image.resize(images, size, method="bicubic", antialias=antialias)
        else:
            shape = tf.shape(images)
            height = tf.cast(shape[-3], tf.float32)
            width = tf.cast(shape[-2], tf.float32)
            # Short side to size / crop_fraction (torchvision Resize(int)), then centre crop.
            scale = (size / crop_fraction) / tf.minimum(height, width)
            new_hw = tf.cast(tf.round(tf.stack([height * scale, width * scale])), tf.int32)
            new_hw = tf.maximum(new_hw, size)
            images = tf.image.resize(images, new_hw, method="bicubic", antialias=antialias)
            images = tf.image.resize_with_crop_or_pad(images, size, size)
    # Bicubic overshoots [0, 1]; PIL saturates, and so does the pre-training pipeline.
    images = tf.clip_by_value(images, 0.0, 1.0)
    return augment.normalize(images, mean, std)


def eval_preprocess(
    images,
    size=None,
    crop_fraction=1.0,
    antialias=False,
    mean=augment.IMAGENET_MEAN,
    std=augment.IMAGENET_STD,
):
    """Evaluation transform: [0, 1], bicubic resize + centre crop, mean/std normalisation.

    Args:
        images: uint8 (0..255) or float ([0, 1]) ``(H, W, 3)`` or ``(batch, H, W, 3)``.
        size: output side (int: short side to ``size / crop_fraction``, then centre crop
            ``size x size``), an exact ``(height, width)``, or None to keep the size. Use a
            multiple of the backbone's patch size.
        crop_fraction: 1.0 keeps the whole image; 0.875 is the reference's 256 -> 224.
        antialias: low-pass filter when shrinking, as PIL does. Default False, like the
            pre-training pipeline's default (``MultiCropConfig.antialias``).
        mean, std: per-channel normalisation (ImageNet by default).

    Returns:
        float32 images ``(..., size, size, 3)``: a ``tf.Tensor`` for a ``tf.Tensor`` input
        (usable in ``tf.data``), NumPy otherwise.
    """
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must lie in (0, 1]; got {crop_fraction}.")
    if isinstance(size, (int, np.integer)) and size < 1:
        raise ValueError(f"size must be a positive number of pixels; got {size}.")
    as_tensor = isinstance(images, tf.Tensor)
    if not as_tensor:
        images = np.asarray(keras.ops.convert_to_numpy(images))
        if np.issubdtype(images.dtype, np.floating) and images.size and float(images.min()) < 0.0:
            raise ValueError(
                "float images must lie in [0, 1]; these have negative values, so they look "
                "normalised already. Pass them with preprocess=False."
            )
    check_channels_last(images.shape)
    out = _preprocess_tf(images, size, crop_fraction, antialias, mean, std)
    return out if as_tensor else out.numpy()


# ------------------------------------------------------------------------------------ inputs
def inference_mode():
    """No autograd graph on torch: extraction would otherwise keep every activation alive."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def _as_labels(labels, n):
    labels = np.asarray(keras.ops.convert_to_numpy(labels))
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), one per image; got {labels.shape}.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids; got dtype {labels.dtype}.")
    return labels.astype(np.int64)


def _split_arrays(data):
    """``images`` / ``(images,)`` / ``(images, labels)`` / dict -> ``(images, labels or None)``."""
    if isinstance(data, dict):
        key = "images" if "images" in data else "image" if "image" in data else None
        if key is None:
            raise ValueError(f"a dict of arrays needs an 'images' entry; got keys {sorted(data)}.")
        return data[key], data.get("labels", data.get("label"))
    if isinstance(data, (tuple, list)):
        if not 1 <= len(data) <= 2:
            raise ValueError(f"pass (images,) or (images, labels); got a sequence of {len(data)}.")
        return data[0], (data[1] if len(data) == 2 else None)
    return data, None


def split_element(element):
    """A dataset element -> ``(images, labels or None)``."""
    if isinstance(element, dict):
        images = element.get("images", element.get("image"))
        if images is None:
            raise ValueError(f"dataset elements need an 'image' entry; got keys {sorted(element)}.")
        return images, element.get("labels", element.get("label"))
    if isinstance(element, (tuple, list)):
        return element[0], (element[1] if len(element) > 1 else None)
    return element, None


def _batches(data, batch_size, image_size, preprocess, crop_fraction, antialias):
    """Yields ``(images float32 (B, S, S, 3), labels (B,) or None)`` NumPy batches."""
    if isinstance(data, (str, os.PathLike)):
        data, _ = load_source(data, shuffle=False)
    if isinstance(data, tf.data.Dataset):
        images_spec, _ = split_element(data.element_spec)
        check_channels_last(images_spec.shape, "dataset images")
        if images_spec.shape.rank == 4:
            data = data.unbatch()

        def prepare(*element):
            images, labels = split_element(element[0] if len(element) == 1 else element)
            if preprocess:
                images = _preprocess_tf(
                    images, image_size, crop_fraction, antialias, augment.IMAGENET_MEAN, augment.IMAGENET_STD
                )
            else:
                images = tf.cast(images, tf.float32)
            return (images,) if labels is None else (images, labels)

        dataset = data.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        try:
            for batch in dataset.batch(batch_size).prefetch(2).as_numpy_iterator():
                yield batch[0], (batch[1] if len(batch) > 1 else None)
        except tf.errors.InvalidArgumentError as error:
            if "shape" in str(error).lower() and image_size is None:
                raise ValueError(
                    "the dataset's images differ in size; pass image_size (a multiple of the "
                    "patch size) so they are resized to one size."
                ) from None
            raise
        return

    images, labels = _split_arrays(data)
    images = keras.ops.convert_to_numpy(images) if not isinstance(images, np.ndarray) else images
    check_channels_last(images.shape)
    if images.ndim == 3:
        raise ValueError(
            f"expected a batch of images (batch, height, width, 3); got one image of shape "
            f"{images.shape}. Add a batch axis with images[None]."
        )
    if labels is not None:
        labels = _as_labels(labels, len(images))
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        if preprocess:
            chunk = eval_preprocess(chunk, image_size, crop_fraction, antialias)
        yield np.asarray(chunk, np.float32), (None if labels is None else labels[start : start + batch_size])


# ---------------------------------------------------------------------------------- features
def _pool(out, n_last_blocks, avgpool_patchtokens):
    """iBOT ``eval_linear``: CLS of each of the last n blocks and/or the mean patch token."""
    blocks = out["last_blocks"][-n_last_blocks:]
    parts = []
    if avgpool_patchtokens in (0, 2):
        parts += [block[:, 0] for block in blocks]
    if avgpool_patchtokens in (1, 2):
        parts.append(keras.ops.mean(blocks[-1][:, 1:], axis=1))
    return parts[0] if len(parts) == 1 else keras.ops.concatenate(parts, axis=-1)


class _Forward(keras.Model):
    """The backbone's frozen forward pass as a Keras model, so ``predict_on_batch`` compiles it
    (``jax.jit`` / ``tf.function``): eager JAX compiles every op separately, several times slower
    to start than one compiled graph. The backbone is tracked, so updated weights are read."""

    def __init__(self, backbone, output, n_last_blocks, avgpool_patchtokens):
        super().__init__(name="frozen_features")
        self.backbone = backbone
        self.output_kind = output
        self.n_last_blocks = n_last_blocks
        self.avgpool_patchtokens = avgpool_patchtokens

    def call(self, images):
        out = self.backbone.forward_features(
            images,
            training=False,
            n_last_blocks=self.n_last_blocks,
            return_attention=self.output_kind == "attention",
        )
        if self.output_kind == "pooled":
            return _pool(out, self.n_last_blocks, self.avgpool_patchtokens)
        return out[self.output_kind]


class FeatureExtractor:
    """Frozen features of one backbone, compiled once per input shape and reused across calls.

    :func:`extract_features` builds one per call; keep one (as :class:`KNNMonitor` does) to
    extract repeatedly from a backbone whose weights change without compiling again.

    Args:
        backbone: a ViT backbone (see the module docstring).
        n_last_blocks, avgpool_patchtokens: pooled image features (see :func:`extract_features`).
        output: ``"pooled"`` (image features), ``"patches"`` (last block's patch tokens) or
            ``"attention"`` (last block's attention ``(B, heads, 1 + N, 1 + N)``).
    """

    def __init__(self, backbone, n_last_blocks=1, avgpool_patchtokens=0, output="pooled"):
        if isinstance(avgpool_patchtokens, bool):
            avgpool_patchtokens = 2 if avgpool_patchtokens else 0
        if avgpool_patchtokens not in AVGPOOL_MODES:
            raise ValueError(
                f"avgpool_patchtokens must be 0 (CLS), 1 (mean patch token) or 2 (both); got {avgpool_patchtokens!r}."
            )
        if int(n_last_blocks) < 1:
            raise ValueError(f"n_last_blocks must be >= 1; got {n_last_blocks}.")
        if output not in ("pooled", "patches", "attention"):
            raise ValueError(f"output must be 'pooled', 'patches' or 'attention'; got {output!r}.")
        if not hasattr(backbone, "forward_features"):
            raise ValueError(
                f"expected a backbone with forward_features() (ViT or ResNet); got {type(backbone).__name__}. "
                "For a whole self-supervised model pass model.teacher_backbone."
            )
        depth = getattr(backbone, "depth", None)
        self.backbone = backbone
        self.n_last_blocks = min(int(n_last_blocks), depth) if depth else int(n_last_blocks)
        self.avgpool_patchtokens = avgpool_patchtokens
        self.output = output
        self.patch_size = getattr(backbone, "patch_size", None)
        self._models = {}

    def _model_for(self, images):
        # One compiled model per image size: TensorFlow's retracing would otherwise relax a
        # second size to unknown height/width, which the ViT (static patch grid) refuses.
        key = tuple(images.shape[1:])
        if key not in self._models:
            # The backbone checks rank, channels and patch multiples; run that check eagerly
            # so its message surfaces as it is, not wrapped by a compiler.
            check = getattr(self.backbone, "_check_images", None)
            if check is not None:
                check(images[:1])
            self._models[key] = _Forward(self.backbone, self.output, self.n_last_blocks, self.avgpool_patchtokens)
        return self._models[key]

    def __call__(self, images):
        """One batch of model inputs ``(B, H, W, 3)`` (normalised) -> float32 NumPy."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4:
            raise ValueError(f"expected a batch (batch, height, width, 3); got shape {images.shape}.")
        model = self._model_for(images)
        with inference_mode():
            value = model.predict_on_batch(images)
        value = np.asarray(keras.ops.convert_to_numpy(value), np.float32)
        if self.output == "patches" and self.patch_size and value.ndim == 3:
            grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
            value = value.reshape((value.shape[0],) + grid + (value.shape[-1],))
        return value

    def extract(
        self,
        data,
        batch_size=64,
        image_size=None,
        preprocess=True,
        crop_fraction=1.0,
        antialias=False,
        return_labels=False,
    ):
        """Features of every image of ``data``; arguments as :func:`extract_features`."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
        if image_size is None and preprocess:
            image_size = getattr(self.backbone, "image_size", None)
        features, labels = [], []
        first = None
        for images, batch_labels in _batches(data, int(batch_size), image_size, preprocess, crop_fraction, antialias):
            n = len(images)
            first = first or n
            if n < first:
                # Pad the last batch to the first one's size: each new shape is a new compile.
                images = np.concatenate([images, np.zeros((first - n,) + images.shape[1:], images.dtype)])
            if return_labels:
                if batch_labels is None:
                    raise ValueError(
                        "labels are needed but the data has none; pass (images, labels), a dataset of "
                        "(image, label) pairs or a labelled source."
                    )
                labels.append(np.asarray(batch_labels, np.int64).reshape(-1))
            features.append(self(images)[:n])
        if first is None:
            raise ValueError("no images to extract features from (the data is empty).")
        features = np.concatenate(features)
        return (features, np.concatenate(labels)) if return_labels else features


def extract_features(
    backbone,
    images_or_dataset,
    batch_size=64,
    n_last_blocks=1,
    avgpool_patchtokens=0,
    patches=False,
    image_size=None,
    preprocess=True,
    crop_fraction=1.0,
    antialias=False,
    return_labels=False,
):
    """Frozen features of ``backbone`` (inference mode, no gradients) as NumPy.

    Args:
        backbone: a ViT backbone (see the module docstring for the interface).
        images_or_dataset: one of
            * images ``(N, H, W, 3)`` (NumPy or backend tensor), or ``(images, labels)``, or a
              dict with ``"images"`` / ``"labels"``;
            * a ``tf.data.Dataset`` of images, ``(image, label)`` pairs or dicts, batched or
              not (as :func:`keras_pqcl.data.load_source` returns);
            * anything :func:`keras_pqcl.data.load_source` accepts (a folder, ``"tfds:NAME"``,
              ``"synthetic_scenes:N"`` - note the latter is the seed-0 *pre-training* set).
        batch_size: images per forward pass.
        n_last_blocks: CLS tokens of the last n blocks are concatenated (clipped to the
            backbone's depth). The reference uses 4 for ViT-S, 1 for ViT-B.
        avgpool_patchtokens: 0 CLS only, 1 mean of the last block's patch tokens only, 2 both
            (iBOT's flag; ``True`` means 2, as DINO's boolean does).
        patches: return the last block's patch tokens as a grid instead.
        image_size: evaluation size (see :func:`eval_preprocess`); None uses
            ``backbone.image_size`` (the size pre-training used for global crops), or keeps the
            input size if the backbone has none. Must be a multiple of the patch size.
        preprocess: apply :func:`eval_preprocess` (images uint8 or float in [0, 1]). False
            feeds the images unchanged (already resized and normalised floats).
        crop_fraction, antialias: see :func:`eval_preprocess`.
        return_labels: also return the labels the data carries.

    Returns:
        float32 ``(N, F)`` with ``F = n_last_blocks * D`` (mode 0), ``D`` (1) or
        ``(n_last_blocks + 1) * D`` (2); with ``patches=True`` ``(N, h, w, D)``, the
        ``h x w`` patch grid. With ``return_labels=True`` a tuple ``(features, labels (N,))``.
    """
    extractor = FeatureExtractor(backbone, n_last_blocks, avgpool_patchtokens, "patches" if patches else "pooled")
    return extractor.extract(
        images_or_dataset,
        batch_size=batch_size,
        image_size=image_size,
        preprocess=preprocess,
        crop_fraction=crop_fraction,
        antialias=antialias,
        return_labels=return_labels,
    )
