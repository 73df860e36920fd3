"""Dense (per-pixel) linear probe on frozen patch tokens, and segmentation scores.

A linear classifier reads each standardised patch token of the frozen backbone's last block;
its logits ``(h, w, C)`` are upsampled bilinearly to the mask resolution and trained with
per-pixel cross-entropy (pixels equal to ``ignore_index`` do not count). It is scored by
mean IoU and pixel accuracy on a test split. This is the linear segmentation probe used to
compare dense self-supervised features (e.g. iBOT's ADE20K linear head, which is trained the
same way on frozen patch tokens); here it is small enough to run on ``synthetic_scenes``
(masks 0..K, 0 = background) or on a user's image/mask folders
(:func:`load_segmentation_folder`).
"""

import os

import keras
import numpy as np
from keras import ops

from keras_pqcl.data.sources import IMAGE_EXTENSIONS
from keras_pqcl.eval.features import FeatureExtractor, check_channels_last, inference_mode

__all__ = [
    "confusion_matrix",
    "dense_probe",
    "load_segmentation_folder",
    "miou",
    "segmentation_scores",
]


# ------------------------------------------------------------------------------------ scores
def confusion_matrix(pred, target, num_classes, ignore_index=255):
    """``(C, C)`` int64 counts, rows = target class, columns = predicted class.

    Pixels whose target is ``ignore_index`` are left out. Any shapes, as long as ``pred``
    and ``target`` match.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape; got {pred.shape} and {target.shape}.")
    valid = target != ignore_index if ignore_index is not None else np.ones(target.shape, bool)
    pred, target = pred[valid].astype(np.int64), target[valid].astype(np.int64)
    for name, values in (("target", target), ("pred", pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name} values must lie in [0, {num_classes}) (or be ignore_index={ignore_index}); "
                f"got [{int(values.min())}, {int(values.max())}]."
            )
    return np.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(confusion):
    """mIoU and pixel accuracy (in %) of a confusion matrix.

    The IoU of class c is ``TP / (TP + FP + FN)``; the mean runs over the classes present in
    the target or the prediction (a class absent from both has no IoU).

    Returns:
        ``{"miou", "pixel_acc", "iou": [per class, None when undefined]}``.
    """
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1.0), np.nan)
    total = confusion.sum()
    return {
        "miou": 100.0 * float(iou[present].mean()) if present.any() else float("nan"),
        "pixel_acc": 100.0 * float(tp.sum() / total) if total else float("nan"),
        "iou": [None if np.isnan(v) else 100.0 * float(v) for v in iou],
    }


def miou(pred, target, num_classes, ignore_index=255):
    """Mean IoU (%) of integer label maps ``pred`` and ``target`` (same shape)."""
    return segmentation_scores(confusion_matrix(pred, target, num_classes, ignore_index))["miou"]


# ------------------------------------------------------------------------------------ folders
def paired_listing(root, what):
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{what} folder not found: {root!r}")
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            stem = os.path.splitext(rel)[0].replace(os.sep, "/")
            if stem in found:
                raise ValueError(
                    f"two {what} files share the name {stem!r} ({os.path.basename(found[stem])} and {name}); "
                    "images and masks are paired by file name without extension."
                )
            found[stem] = os.path.join(dirpath, name)
    if not found:
        raise ValueError(f"no image files in the {what} folder {root!r} (extensions {', '.join(IMAGE_EXTENSIONS)}).")
    return found


def _read_mask(path):
    from PIL import Image

    with Image.open(path) as img:
        mode = img.mode
        mask = np.array(img)  # palette ("P") images give their indices, i.e. class ids
    if mask.ndim == 3:
        if np.all(mask[..., :3] == mask[..., :1]):
            return mask[..., 0]
        raise ValueError(
            f"mask {path!r} is a colour ({mode}) image; masks must be single-channel PNGs of class ids "
            "(mode L or P, value k = class k, 255 = ignore)."
        )
    return mask.astype(np.uint8 if mask.dtype == bool else mask.dtype)


def _nearest_resize(mask, size):
    """Nearest-neighbour resize by pixel centres (class ids must not be interpolated)."""
    h, w = mask.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return mask[rows][:, cols]


def load_segmentation_folder(images_dir, masks_dir, size=None):
    """Image/mask pairs from two folders, paired by file name without extension.

    ``images/a.jpg`` goes with ``masks/a.png`` (sub-folders are kept in the name). Masks are
    single-channel images of class ids (PNG mode L or P; 255 is the usual "ignore" value).

    Args:
        images_dir: folder of RGB images (any of ``IMAGE_EXTENSIONS``; grey is converted).
        masks_dir: folder of masks with the same names.
        size: resize every pair to ``size x size`` (images bicubic, masks nearest); None keeps
            the sizes, which must then all be equal.

    Returns:
        dict with ``"images"`` uint8 ``(N, H, W, 3)``, ``"masks"`` ``(N, H, W)`` (uint8, or
        int32 for 16-bit masks) and ``"names"`` (list of N names).
    """
    from PIL import Image

    images = paired_listing(images_dir, "images")
    masks = paired_listing(masks_dir, "masks")
    missing = sorted(set(images) - set(masks))
    extra = sorted(set(masks) - set(images))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} image(s) without a mask (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} mask(s) without an image (e.g. {', '.join(extra[:3])})")
        raise ValueError(
            f"images in {images_dir!r} and masks in {masks_dir!r} do not pair up: {'; '.join(parts)}. "
            "Each image needs a mask with the same name (extension aside)."
        )
    out_images, out_masks, names = [], [], sorted(images)
    for name in names:
        with Image.open(images[name]) as img:
            image = img.convert("RGB")
            mask = _read_mask(masks[name])
            if mask.shape != (image.height, image.width):
                raise ValueError(
                    f"image {images[name]!r} is {image.width}x{image.height} but its mask {masks[name]!r} is "
                    f"{mask.shape[1]}x{mask.shape[0]}; a mask must have its image's size."
                )
            if size is not None:
                image = image.resize((size, size), Image.BICUBIC)
                mask = _nearest_resize(mask, (size, size))
            out_images.append(np.asarray(image, np.uint8))
            out_masks.append(mask)
    shapes = sorted({m.shape for m in out_masks})
    if len(shapes) > 1:
        raise ValueError(
            f"the images in {images_dir!r} have different sizes ({', '.join(f'{w}x{h}' for h, w in shapes[:4])}"
            f"{', ...' if len(shapes) > 4 else ''}); pass size=... to resize them to one size."
        )
    masks_arr = np.stack(out_masks)
    masks_arr = masks_arr.astype(np.uint8 if masks_arr.max() <= 255 else np.int32)
    return {"images": np.stack(out_images), "masks": masks_arr, "names": names}


# -------------------------------------------------------------------------------------- probe
@keras.saving.register_keras_serializable(package="keras_pqcl")
class ResizeLogits(keras.layers.Layer):
    """Bilinear resize of ``(batch, h, w, C)`` logits to ``(batch, height, width, C)``."""

    def __init__(self, height, width, **kwargs):
        super().__init__(**kwargs)
        self.height, self.width = int(height), int(width)

    def call(self, logits):
        return ops.image.resize(logits, (self.height, self.width), interpolation="bilinear")

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.height, self.width, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "height": self.height, "width": self.width}


def _masks_array(masks, images, name):
    masks = np.asarray(keras.ops.convert_to_numpy(masks))
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    if masks.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) class ids; got shape {masks.shape}.")
    if not np.issubdtype(masks.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids; got dtype {masks.dtype}.")
    if masks.shape != tuple(images.shape[:3]):
        raise ValueError(
            f"{name} {masks.shape} must match the images' (N, H, W) {tuple(images.shape[:3])}; one mask per "
            "image, at the image's resolution."
        )
    return masks.astype(np.int32)


def dense_probe(
    backbone,
    train_images,
    train_masks,
    test_images,
    test_masks,
    num_classes=None,
    ignore_index=255,
    epochs=30,
    lr=1e-2,
    batch_size=16,
    image_size=None,
    preprocess=True,
    feature_batch_size=64,
    seed=0,
    verbose=0,
):
    """Per-pixel linear probe on frozen patch tokens; mIoU and pixel accuracy on the test split.

    Args:
        backbone: a ViT backbone (see :mod:`keras_pqcl.eval.features`).
        train_images, test_images: ``(N, H, W, 3)`` uint8 or float in [0, 1] (or normalised
            floats with ``preprocess=False``).
        train_masks, test_masks: int ``(N, H, W)`` class ids at the images' resolution;
            ``ignore_index`` marks unlabelled pixels. ``synthetic_scenes`` masks are
            0 = background, ``k + 1`` = class k (so ``num_classes = K + 1``).
        num_classes: defaults to the largest id (other than ``ignore_index``) plus one.
        ignore_index: mask value left out of the loss and the scores (255).
        epochs, lr, batch_size: Adam on the classifier (images per batch), cosine decay to 0.
        image_size: backbone input side; each image is resized whole (no crop, so the patch
            grid stays aligned with the mask). None uses ``backbone.image_size``.
        preprocess: apply :func:`eval_preprocess`.
        feature_batch_size: images per backbone forward pass.
        seed: classifier initialisation seed.

    Returns:
        dict with ``miou`` and ``pixel_acc`` (%), ``iou`` per class (%, None where
        undefined), ``num_classes``, ``grid`` ``(h, w)`` and sizes.
    """
    for name, images in (("train_images", train_images), ("test_images", test_images)):
        check_channels_last(np.shape(images), name)
        if np.ndim(images) != 4:
            raise ValueError(f"{name} must be a batch (N, H, W, 3); got shape {np.shape(images)}.")
    train_masks = _masks_array(train_masks, np.asarray(train_images), "train_masks")
    test_masks = _masks_array(test_masks, np.asarray(test_images), "test_masks")
    if num_classes is None:
        values = np.concatenate([np.unique(train_masks), np.unique(test_masks)])
        values = values[values != ignore_index]
        num_classes = int(values.max()) + 1 if values.size else 1
    for name, masks in (("train_masks", train_masks), ("test_masks", test_masks)):
        bad = (masks != ignore_index) & ((masks < 0) | (masks >= num_classes))
        if bad.any():
            raise ValueError(
                f"{name} hold ids outside [0, {num_classes}) other than ignore_index={ignore_index} "
                f"(e.g. {int(masks[bad][0])}); pass num_classes or fix the masks."
            )

    if image_size is None and preprocess:
        image_size = getattr(backbone, "image_size", None)
    size = (
        None
        if image_size is None
        else (tuple(image_size) if isinstance(image_size, (tuple, list)) else (int(image_size), int(image_size)))
    )
    extractor = FeatureExtractor(backbone, output="patches")  # one compile for both splits
    feature_args = dict(batch_size=feature_batch_size, image_size=size, preprocess=preprocess)
    train_x = extractor.extract(train_images, **feature_args)
    test_x = extractor.extract(test_images, **feature_args)
    # Standardised with train statistics: token norms vary a lot across backbones and layers,
    # and one learning rate then suits them all.
    mean = train_x.mean(axis=(0, 1, 2))
    std = train_x.std(axis=(0, 1, 2)) + 1e-6
    train_x = (train_x - mean) / std
    test_x = (test_x - mean) / std

    height, width = train_masks.shape[1:]
    grid, dim = train_x.shape[1:3], train_x.shape[-1]
    classifier = keras.Sequential(
        [
            keras.Input(grid + (dim,)),
            keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01, seed=seed)),
            ResizeLogits(height, width),
        ],
        name="dense_linear_probe",
    )
    steps = int(epochs) * int(np.ceil(len(train_x) / batch_size))
    classifier.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, max(steps, 1))),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=ignore_index),
    )
    classifier.fit(train_x, train_masks, batch_size=batch_size, epochs=int(epochs), shuffle=True, verbose=verbose)

    confusion = np.zeros((num_classes, num_classes), np.int64)
    with inference_mode():
        for start in range(0, len(test_x), batch_size):
            logits = classifier(test_x[start : start + batch_size], training=False)
            pred = np.asarray(ops.convert_to_numpy(ops.argmax(logits, axis=-1)))
            confusion += confusion_matrix(pred, test_masks[start : start + batch_size], num_classes, ignore_index)
    scores = segmentation_scores(confusion)
    scores.update(
        num_classes=int(num_classes),
        grid=tuple(int(g) for g in grid),
        epochs=int(epochs),
        lr=float(lr),
        num_train=len(train_x),
        num_test=len(test_x),
    )
    return scores
