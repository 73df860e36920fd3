"""Self-attention maps and patch-feature PCA of a ViT backbone (DINO ``visualize_attention.py``).

The reference resizes the image, crops it to a multiple of the patch size, takes the last
block's attention of the CLS query to the patch keys (one map per head), reshapes it to the
patch grid and upsamples it by the patch size with nearest-neighbour interpolation. With a
threshold it keeps, per head, the smallest set of patches holding that fraction of the
attention mass (after renormalising the CLS-to-patch row to sum to 1), e.g. 0.6.

A single image runs eagerly: compiling the forward pass would cost more than it saves, and
eager JAX reuses its per-op compilations across calls of the same size.

The PNG writers compose the panels as pixel arrays and save them with matplotlib's
``imsave`` (no figure, no GUI backend needed), so every panel has exactly the map's size.
"""

import os

import keras
import numpy as np

from keras_pqcl.data import augment
from keras_pqcl.eval.features import check_channels_last, inference_mode

__all__ = [
    "attention_maps",
    "cls_attention",
    "feature_pca",
    "prepare_image",
    "save_attention_png",
    "save_pca_png",
    "threshold_attention",
]


def _to_float01(image):
    image = np.asarray(keras.ops.convert_to_numpy(image))
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    image = image.astype(np.float32)
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0 + 1e-6:
        raise ValueError(
            f"float images must lie in [0, 1] (or be uint8); got values in [{lo:g}, {hi:g}]. "
            "For normalised input use preprocess=False."
        )
    return image


def _single(image):
    shape = np.shape(image)
    if len(shape) == 4 and shape[0] == 1:
        image = image[0]
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"expected one image (height, width, 3); got shape {tuple(shape)}.")
    check_channels_last(shape, "image")
    return image


def prepare_image(image, patch_size, image_size=None):
    """The image as the model sees it before normalisation: float32 ``(H', W', 3)`` in [0, 1].

    Args:
        image: ``(H, W, 3)`` (or ``(1, H, W, 3)``), uint8 or float in [0, 1].
        patch_size: the backbone's patch side.
        image_size: resize (bicubic) to ``image_size x image_size`` or to ``(height, width)``
            first; None keeps the size.

    The bottom/right border is then cropped to a multiple of ``patch_size``, as the reference.
    """
    image = _to_float01(_single(image))
    if image_size is not None:
        import tensorflow as tf

        size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (int(image_size),) * 2
        image = np.clip(tf.image.resize(image, size, method="bicubic").numpy(), 0.0, 1.0)
    height = image.shape[0] - image.shape[0] % patch_size
    width = image.shape[1] - image.shape[1] % patch_size
    if not height or not width:
        raise ValueError(
            f"image of {image.shape[1]}x{image.shape[0]} pixels is smaller than one {patch_size}-pixel patch; "
            "pass a larger image or image_size."
        )
    return image[:height, :width]


def _model_input(backbone, image, image_size, preprocess):
    patch = backbone.patch_size
    if preprocess:
        shown = prepare_image(image, patch, image_size)
        x = np.asarray(augment.normalize(shown), np.float32)
    else:
        x = np.asarray(keras.ops.convert_to_numpy(_single(image)), np.float32)
        x = x[: x.shape[0] - x.shape[0] % patch, : x.shape[1] - x.shape[1] % patch]
    return x[None], (x.shape[0] // patch, x.shape[1] // patch)


def cls_attention(backbone, images):
    """Last-block attention of the CLS query: ``(B, heads, 1 + N)`` (each row sums to 1).

    ``images`` are model inputs ``(B, H, W, 3)`` (normalised); entry 0 of the last axis is
    the CLS key, entries ``1..N`` the patch keys in row-major grid order.
    """
    with inference_mode():
        out = backbone.forward_features(keras.ops.convert_to_tensor(images), training=False, return_attention=True)
        attention = np.asarray(keras.ops.convert_to_numpy(out["attention"]), np.float32)
    return attention[:, :, 0, :]


def threshold_attention(attention, threshold):
    """Per-row masks of the smallest sets of entries holding ``threshold`` of the mass.

    Args:
        attention: ``(heads, N)`` non-negative weights (renormalised to sum 1 per row).
        threshold: fraction in (0, 1], e.g. 0.6.

    Returns:
        bool ``(heads, N)``. As the reference: sort ascending, cumulative sum, keep the
        entries whose cumulative mass exceeds ``1 - threshold``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold is a fraction of the attention mass in (0, 1]; got {threshold}.")
    attention = np.asarray(attention, np.float64)
    attention = attention / attention.sum(axis=-1, keepdims=True)
    order = np.argsort(attention, axis=-1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(attention, order, axis=-1), axis=-1)
    keep_sorted = cumulative > 1.0 - threshold
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep


def attention_maps(backbone, image, threshold=None, image_size=None, preprocess=True):
    """Per-head CLS attention of the last block, upsampled to pixels.

    Args:
        backbone: a ViT backbone with ``forward_features(..., return_attention=True)``.
        image: one image ``(H, W, 3)``, uint8 or float in [0, 1] (normalised floats with
            ``preprocess=False``).
        threshold: None for the attention itself; a fraction (e.g. 0.6) for 0/1 masks of
            the smallest patch sets holding that fraction of each head's mass.
        image_size: resize first (see :func:`prepare_image`); None keeps the image's size
            (cropped to a multiple of the patch size).
        preprocess: resize/crop and normalise ``image`` (False: only crop).

    Returns:
        float32 ``(heads, H', W')`` with ``H' = h * patch_size``: each patch's CLS attention
        (or mask) repeated over its ``patch_size x patch_size`` pixels.
    """
    x, (h, w) = _model_input(backbone, image, image_size, preprocess)
    row = cls_attention(backbone, x)[0, :, 1:]  # the reference drops the CLS key
    values = threshold_attention(row, threshold).astype(np.float32) if threshold is not None else row
    p = backbone.patch_size
    grid = values.reshape(values.shape[0], h, w)
    return np.repeat(np.repeat(grid, p, axis=1), p, axis=2).astype(np.float32)


def feature_pca(backbone, image, image_size=None, preprocess=True):
    """First three principal components of the last block's patch tokens, scaled to [0, 1].

    Args:
        backbone, image, image_size, preprocess: as :func:`attention_maps`.

    Returns:
        float32 ``(h, w, 3)`` over the patch grid; component c is min-max scaled to [0, 1]
        over the image's patches. Signs are fixed (largest loading positive) so the colours
        are reproducible. Fewer than 3 components (tiny grids) are padded with zeros.
    """
    x, (h, w) = _model_input(backbone, image, image_size, preprocess)
    with inference_mode():
        out = backbone.forward_features(keras.ops.convert_to_tensor(x), training=False)
        tokens = keras.ops.convert_to_numpy(out["patches"])
    tokens = np.asarray(tokens, np.float64)[0]
    tokens = tokens - tokens.mean(axis=0)
    _, _, vt = np.linalg.svd(tokens, full_matrices=False)
    vt = vt[:3]
    vt = vt * np.sign(vt[np.arange(len(vt)), np.argmax(np.abs(vt), axis=1)])[:, None]
    comps = tokens @ vt.T
    lo, hi = comps.min(axis=0), comps.max(axis=0)
    comps = (comps - lo) / np.where(hi > lo, hi - lo, 1.0)
    if comps.shape[1] < 3:
        comps = np.concatenate([comps, np.zeros((len(comps), 3 - comps.shape[1]))], axis=1)
    return comps.reshape(h, w, 3).astype(np.float32)


# ---------------------------------------------------------------------------------------- PNG
def _display(image, height, width):
    """``image`` as float [0, 1] ``(height, width, 3)`` (resized bilinearly if it differs)."""
    image = np.asarray(keras.ops.convert_to_numpy(_single(image)))
    if image.dtype != np.uint8:
        image = image.astype(np.float32)
        lo, hi = float(image.min()), float(image.max())
        if lo < 0.0 or hi > 1.0 + 1e-6:  # normalised input: stretch it for display
            image = (image - lo) / max(hi - lo, 1e-6)
        image = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    if image.shape[:2] != (height, width):
        from PIL import Image

        image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    return image.astype(np.float32) / 255.0


def _save(path, panels):
    from matplotlib import image as mpl_image

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    mpl_image.imsave(path, np.clip(np.concatenate(panels, axis=1), 0.0, 1.0))
    return path


def save_attention_png(path, image, maps, alpha=0.5, cmap="inferno"):
    """One PNG: the image, then each head's map over it.

    Args:
        path: output file (``.png``); its folder is created.
        image: ``(H, W, 3)`` uint8 or float in [0, 1] (resized to the maps' size if needed).
        maps: ``(heads, H, W)`` from :func:`attention_maps` (attention or threshold masks);
            each head is min-max scaled before the colour map.
        alpha: weight of the colour map over the image.

    Returns:
        ``path``. The PNG is ``H`` pixels high and ``(1 + heads) * W`` wide.
    """
    from matplotlib import colormaps

    maps = np.asarray(maps, np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (heads, height, width); got shape {maps.shape}.")
    height, width = maps.shape[1:]
    shown = _display(image, height, width)
    colour = colormaps[cmap]
    panels = [shown]
    for head in maps:
        lo, hi = float(head.min()), float(head.max())
        scaled = (head - lo) / (hi - lo) if hi > lo else np.zeros_like(head)
        panels.append((1.0 - alpha) * shown + alpha * colour(scaled)[..., :3])
    return _save(path, panels)


def save_pca_png(path, image, pca):
    """One PNG: the image and the PCA colours of its patches (nearest upsampling).

    Args:
        path: output file; its folder is created.
        image: ``(H, W, 3)`` uint8 or float in [0, 1].
        pca: ``(h, w, 3)`` from :func:`feature_pca`.

    Returns:
        ``path``. The PNG is ``H`` high and ``2 * W`` wide.
    """
    from PIL import Image

    pca = np.asarray(pca, np.float32)
    if pca.ndim != 3 or pca.shape[-1] != 3:
        raise ValueError(f"pca must be (h, w, 3); got shape {pca.shape}.")
    shown = _display(image, *np.shape(_single(image))[:2])
    height, width = shown.shape[:2]
    colours = np.round(np.clip(pca, 0.0, 1.0) * 255).astype(np.uint8)
    colours = np.asarray(Image.fromarray(colours).resize((width, height), Image.NEAREST), np.float32) / 255.0
    return _save(path, [shown, colours])
