"""tf.data image + mask pipelines for segmentation fine-tuning, augmented in step.

Training samples get, in this order: photometric jitter (brightness, contrast, saturation;
image only, so it happens first and changes no geometry), ImageNet normalisation, a random
rescale (image bilinear, mask nearest), padding up to the crop size (image with 0, i.e. the
mean colour after normalisation; mask with ``ignore_index``), one random crop and a random
horizontal flip shared by image and mask (they are cut from one stacked tensor, so they stay
aligned). This is mmsegmentation's ADE20K training pipeline (RandomResize ratio 0.5-2.0,
RandomCrop, RandomFlip, PhotoMetricDistortion) at the sizes chosen here. Evaluation samples
are the whole normalised images with their masks.

Sources: arrays (``synthetic_scenes`` via :func:`synthetic_segmentation`) or image/mask
folders (:func:`segmentation_folder`, read by
:func:`keras_pqcl.eval.dense.load_segmentation_folder`).
"""

import os

import numpy as np
import tensorflow as tf

from keras_pqcl.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from keras_pqcl.eval.dense import load_segmentation_folder

__all__ = ["check_masks", "segmentation_dataset", "segmentation_folder", "synthetic_segmentation"]


def check_masks(images, masks, num_classes, ignore_index=255, names=None):
    """Raise one ValueError naming the first sample whose mask does not fit its image.

    Checks: one mask per image, each of its image's height and width, every id in
    ``[0, num_classes)`` or equal to ``ignore_index``. ``names`` (file names) make the message
    point at the file; otherwise samples are named by index.
    """

    def name(i):
        return repr(names[i]) if names is not None else f"sample {i}"

    if len(images) != len(masks):
        raise ValueError(f"got {len(images)} images but {len(masks)} masks; every image needs one mask.")
    for i, (image, mask) in enumerate(zip(images, masks)):
        if np.shape(mask)[:2] != np.shape(image)[:2] or np.ndim(mask) != 2:
            raise ValueError(
                f"mask of {name(i)} has shape {np.shape(mask)} but its image is {np.shape(image)[:2]}; a mask must "
                "be one class id per pixel of its image (height, width)."
            )
        mask = np.asarray(mask)
        bad = (mask != ignore_index) & ((mask < 0) | (mask >= num_classes))
        if bad.any():
            raise ValueError(
                f"mask of {name(i)} holds class id {int(mask[bad][0])}, outside [0, {num_classes}) and not "
                f"ignore_index={ignore_index}; raise num_classes or fix the mask."
            )


def synthetic_segmentation(num_images, image_size=64, num_classes=10, seed=0):
    """``synthetic_scenes`` as a segmentation set: ``{"images", "masks", "num_classes"}`` with
    masks 0 = background and ``k + 1`` = class k, so ``num_classes + 1`` classes."""
    from keras_pqcl.data.synthetic import synthetic_scenes

    data = synthetic_scenes(num_images, image_size=image_size, num_classes=num_classes, seed=seed)
    return {"images": data["images"], "masks": data["masks"], "num_classes": int(num_classes) + 1}


def segmentation_folder(images_dir, masks_dir, num_classes, size=None, ignore_index=255):
    """Image/mask folders paired by file name (see ``load_segmentation_folder``), checked.

    Returns ``{"images" uint8 (N, H, W, 3), "masks" (N, H, W), "names"}``. A missing mask or a
    mask of another size than its image fails in the loader; a class id out of range fails
    here, naming the mask file.
    """
    data = load_segmentation_folder(images_dir, masks_dir, size=size)
    files = [os.path.join(masks_dir, n) for n in data["names"]]
    check_masks(data["images"], data["masks"], num_classes, ignore_index, names=files)
    return data


def _as_unit_float(images):
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    images = images.astype(np.float32)
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise ValueError(
            f"float images must lie in [0, 1] (they are normalised here); got values in [{images.min():.3g}, "
            f"{images.max():.3g}]. Pass uint8 images or images / 255."
        )
    return images


def _photometric(image, seed):
    seeds = tf.random.experimental.stateless_split(seed, 3)
    image = tf.image.stateless_random_brightness(image, 32.0 / 255.0, seeds[0])
    image = tf.image.stateless_random_contrast(image, 0.5, 1.5, seeds[1])
    image = tf.image.stateless_random_saturation(image, 0.5, 1.5, seeds[2])
    return tf.clip_by_value(image, 0.0, 1.0)


def augment_pair(
    image,
    mask,
    seed,
    crop_size,
    scale_range=(0.5, 2.0),
    flip=True,
    photometric=True,
    ignore_index=255,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
):
    """One training sample: ``image`` float [0, 1] ``(H, W, 3)``, ``mask`` int ``(H, W)``,
    ``seed`` int ``(2,)`` -> normalised ``(crop, crop, 3)`` float32 and ``(crop, crop)`` int32."""
    seeds = tf.random.experimental.stateless_split(seed, 4)
    if photometric:
        image = _photometric(image, seeds[0])
    image = normalize(image, mean, std)
    mask = tf.cast(mask, tf.float32)[..., None]
    lo, hi = float(scale_range[0]), float(scale_range[1])
    if (lo, hi) != (1.0, 1.0):
        scale = tf.random.stateless_uniform((), seeds[1], lo, hi)
        size = tf.cast(tf.round(tf.cast(tf.shape(image)[:2], tf.float32) * scale), tf.int32)
        size = tf.maximum(size, 1)
        image = tf.image.resize(image, size, method="bilinear")
        mask = tf.image.resize(mask, size, method="nearest")
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    pad_h, pad_w = tf.maximum(crop_size - height, 0), tf.maximum(crop_size - width, 0)
    image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
    mask = tf.pad(mask - ignore_index, [[0, pad_h], [0, pad_w], [0, 0]]) + ignore_index
    stacked = tf.concat([image, mask], axis=-1)
    stacked = tf.image.stateless_random_crop(stacked, (crop_size, crop_size, 4), seeds[2])
    if flip:
        stacked = tf.image.stateless_random_flip_left_right(stacked, seeds[3])
    return stacked[..., :3], tf.cast(tf.round(stacked[..., 3]), tf.int32)


def segmentation_dataset(
    images,
    masks,
    num_classes,
    batch_size=8,
    training=True,
    crop_size=None,
    scale_range=(0.5, 2.0),
    flip=True,
    photometric=True,
    ignore_index=255,
    shuffle=True,
    seed=0,
    names=None,
    drop_remainder=None,
    epochs=None,
    start_epoch=0,
):
    """Batches of ``(images (B, S, S, 3) float32 normalised, masks (B, S, S) int32)``.

    Args:
        images: uint8 ``(N, H, W, 3)`` or floats in [0, 1].
        masks: int ``(N, H, W)`` class ids, ``ignore_index`` for unlabelled pixels.
        num_classes: the number of classes, for the id check.
        batch_size: samples per batch.
        training: augment (random scale, crop, flip, photometric) and shuffle, repeat
            per epoch with new draws; False gives the whole images, in order.
        crop_size: training crop side (default: the image height).
        scale_range, flip, photometric: the augmentations (see the module docstring).
        ignore_index: padding value of the masks.
        shuffle: shuffle training samples every epoch.
        seed: makes the sample order and augmentations reproducible.
        names: optional file names for the error messages of :func:`check_masks`.
        drop_remainder: default True in training (static batch shapes), False otherwise.
        epochs: training only. None: one epoch per pass over the dataset, new draws on every
            pass. An int: one finite stream of the epochs ``start_epoch`` to ``epochs - 1``,
            ``N // batch_size`` full batches each (fit it with ``steps_per_epoch``), where epoch
            e's order and augmentations depend on ``(seed, e)`` alone, so a run resumed at an
            epoch sees the batches an uninterrupted run would have seen.
        start_epoch: the first epoch of that stream.
    """
    masks = np.asarray(masks)
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    check_masks(images, masks, num_classes, ignore_index, names)
    images = _as_unit_float(images)
    masks = masks.astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices((images, masks))
    if not training:
        ds = ds.map(lambda x, y: (normalize(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(batch_size, drop_remainder=bool(drop_remainder)).prefetch(tf.data.AUTOTUNE)
    crop = int(crop_size or images.shape[1])
    if epochs is not None:
        return _epoch_stream(
            images,
            masks,
            batch_size,
            crop,
            scale_range,
            flip,
            photometric,
            ignore_index,
            shuffle,
            seed,
            int(start_epoch),
            int(epochs),
        )
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    # One fresh seed pair per sample and epoch.
    noise = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    ds = tf.data.Dataset.zip((ds, noise)).map(
        lambda pair, s: augment_pair(pair[0], pair[1], s, crop, scale_range, flip, photometric, ignore_index),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    drop = True if drop_remainder is None else bool(drop_remainder)
    return ds.batch(batch_size, drop_remainder=drop).prefetch(tf.data.AUTOTUNE)


def _epoch_stream(
    images, masks, batch_size, crop, scale_range, flip, photometric, ignore_index, shuffle, seed, start, stop
):
    """Epochs ``start .. stop - 1`` as one stream of full batches (see :func:`segmentation_dataset`)."""
    n = len(images)
    per_epoch = (n // batch_size) * batch_size
    if per_epoch == 0 or stop <= start:
        raise ValueError(
            f"{n} training images make no batch of {batch_size} (or epochs {start}..{stop} is empty); lower "
            "batch_size or add images."
        )
    order, seeds = [], []
    for epoch in range(start, stop):
        # Keyed by (seed, epoch) only, never by what ran before: a resumed run gets the same epoch.
        rng = np.random.default_rng([int(seed), epoch])
        order.append(rng.permutation(n)[:per_epoch] if shuffle else np.arange(per_epoch))
        seeds.append(rng.integers(0, 2**31 - 1, size=(per_epoch, 2)))
    order = np.concatenate(order).astype(np.int64)
    seeds = np.concatenate(seeds).astype(np.int64)
    ds = tf.data.Dataset.from_tensor_slices((order, seeds))
    ds = ds.map(
        lambda i, s: augment_pair(
            tf.gather(images, i), tf.gather(masks, i), s, crop, scale_range, flip, photometric, ignore_index
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
