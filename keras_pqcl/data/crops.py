"""Crop geometry: RandomResizedCrop box sampling, crop + resize, flips.

Everything here is plain TensorFlow (``tf.random`` stateless ops, ``tf.image``)
so it runs inside ``tf.data.Dataset.map`` whatever ``KERAS_BACKEND`` is.

Conventions
-----------
* A *box* is a float32 vector ``[top, left, height, width]`` in pixels of the
  source image (integer valued, like torchvision's ``get_params``). PQCL needs
  these exact source coordinates to place positional queries, so
  they are sampled explicitly rather than hidden inside a resize op.
* A *seed* is an int32/int64 tensor of shape ``[2]`` for the ``tf.random``
  stateless ops. The same seed always gives the same box / flip, which is what
  makes a seeded pipeline reproducible.

Why not ``keras_cv.layers.RandomCropAndResize``: it does not return the box
it used, and draws from a stateful generator (not reproducible per example);
Keras core has no RandomResizedCrop (keras#21822).
"""

import math

import tensorflow as tf

__all__ = [
    "sample_crop_box",
    "sample_crop_boxes",
    "crop_and_resize",
    "crop_and_resize_many",
    "horizontal_flip",
    "random_resized_crop",
    "split_seed",
]


def split_seed(seed, num):
    """Derives ``num`` independent stateless seeds from one seed.

    Args:
        seed: int tensor ``[2]``.
        num: Python int.

    Returns:
        int64 tensor ``[num, 2]``.
    """
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return tf.random.experimental.stateless_split(seed, num=num)


def _image_hw(image):
    shape = tf.shape(image)
    return shape[0], shape[1]


def sample_crop_boxes(
    seed,
    height,
    width,
    num,
    scale=(0.08, 1.0),
    ratio=(3.0 / 4.0, 4.0 / 3.0),
    num_tries=10,
):
    """Samples ``num`` RandomResizedCrop boxes like torchvision's ``get_params``.

    For each box, ``num_tries`` attempts are drawn at once (vectorised) and
    the first acceptable one is kept, which is the same as trying them in
    order:

    * ``area = U(scale) * H * W``
    * ``ar = exp(U(log ratio[0], log ratio[1]))`` (log-uniform aspect ratio)
    * ``w = round(sqrt(area * ar))``, ``h = round(sqrt(area / ar))``
    * accepted if ``0 < w <= W`` and ``0 < h <= H``; then
      ``top ~ randint[0, H - h]`` and ``left ~ randint[0, W - w]`` (inclusive).

    If no attempt is accepted, torchvision's fallback is used: a centre crop
    whose aspect ratio is the image's, clamped to ``ratio``.

    Rounding uses ``tf.round`` (half to even), the same rule as Python's
    ``round`` used by torchvision.

    Args:
        seed: int tensor ``[2]`` for the stateless RNG.
        height, width: source image size (int scalars or tensors).
        num: Python int, number of boxes.
        scale: ``(min, max)`` fraction of the image area.
        ratio: ``(min, max)`` aspect ratio ``w / h``.
        num_tries: number of rejection-sampling attempts (torchvision: 10).

    Returns:
        float32 tensor ``[num, 4]``: ``(top, left, height, width)`` in source
        pixels.
    """
    seeds = split_seed(seed, 3)
    H = tf.cast(height, tf.float32)
    W = tf.cast(width, tf.float32)
    area = H * W

    target_area = area * tf.random.stateless_uniform([num, num_tries], seeds[0], minval=scale[0], maxval=scale[1])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(tf.random.stateless_uniform([num, num_tries], seeds[1], minval=log_lo, maxval=log_hi))
    w = tf.round(tf.sqrt(target_area * aspect))
    h = tf.round(tf.sqrt(target_area / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    # argmax on the 0/1 rows returns the first accepted attempt.
    first = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)
    any_ok = tf.reduce_any(ok, axis=1)

    # torchvision fallback: keep the whole image if its ratio is in range,
    # otherwise the largest centred box with the clamped ratio.
    in_ratio = W / H
    fb_w = tf.where(in_ratio > ratio[1], tf.round(H * ratio[1]), W)
    fb_h = tf.where(in_ratio < ratio[0], tf.round(W / ratio[0]), H)
    # Guard against a 0-pixel side on degenerate inputs (e.g. a 1-pixel-high
    # image with a huge ratio); torchvision would crash there.
    fb_w = tf.clip_by_value(fb_w, 1.0, W)
    fb_h = tf.clip_by_value(fb_h, 1.0, H)

    crop_h = tf.where(any_ok, tf.gather(h, first, batch_dims=1), fb_h)
    crop_w = tf.where(any_ok, tf.gather(w, first, batch_dims=1), fb_w)

    # randint[0, H - h] inclusive, as floor(u * (H - h + 1)) with u in [0, 1):
    # the integer stateless op only takes scalar bounds.
    u = tf.random.stateless_uniform([2, num], seeds[2])
    top = tf.minimum(tf.floor(u[0] * (H - crop_h + 1.0)), H - crop_h)
    left = tf.minimum(tf.floor(u[1] * (W - crop_w + 1.0)), W - crop_w)
    top = tf.where(any_ok, top, tf.floor((H - crop_h) / 2.0))
    left = tf.where(any_ok, left, tf.floor((W - crop_w) / 2.0))
    return tf.stack([top, left, crop_h, crop_w], axis=1)


def sample_crop_box(
    seed,
    height,
    width,
    scale=(0.08, 1.0),
    ratio=(3.0 / 4.0, 4.0 / 3.0),
    num_tries=10,
):
    """One box of :func:`sample_crop_boxes`: float32 ``[4]``
    ``(top, left, height, width)``."""
    return sample_crop_boxes(seed, height, width, 1, scale, ratio, num_tries)[0]


def crop_and_resize(image, box, size, method="bicubic", antialias=True):
    """Cuts ``box`` out of ``image`` and resizes it to ``size x size``.

    Bicubic with ``antialias=True`` mimics PIL's bicubic resize used by
    torchvision on PIL images (PIL always low-pass filters when shrinking).

    Args:
        image: ``[H, W, C]`` tensor of any real dtype. The output is float32
            on the input's scale (uint8 in gives values in 0..255).
        box: float/int tensor ``[4]`` = ``(top, left, height, width)``.
        size: int or ``(height, width)`` of the output.
        method, antialias: passed to ``tf.image.resize``.

    Returns:
        float32 ``[size, size, C]``. Not clipped: bicubic can overshoot the
        input range slightly; callers clip where the range matters.
    """
    if isinstance(size, int):
        size = (size, size)
    image = tf.convert_to_tensor(image)
    box = tf.cast(tf.round(tf.cast(box, tf.float32)), tf.int32)
    crop = tf.slice(
        image,
        tf.stack([box[0], box[1], 0]),
        tf.stack([box[2], box[3], -1]),
    )
    # Resizing the uint8 slice directly (the op outputs float32) avoids
    # converting the whole source image once per crop.
    out = tf.cast(tf.image.resize(crop, size, method=method, antialias=antialias), tf.float32)
    # Static shape for downstream batching (channels known when input's are).
    out.set_shape([size[0], size[1], image.shape[-1]])
    return out


def crop_and_resize_many(image, boxes, size, antialias=False):
    """:func:`crop_and_resize` (bicubic) of every box, stacked.

    Same numbers as calling :func:`crop_and_resize` per box, with fewer ops
    per crop (two: a slice and the resize), which matters in ``tf.data``
    where each op has a fixed cost. A uint8 image gives uint8 crops, rounded
    and saturated as PIL's resize of a uint8 image does: a quarter of the
    bytes to concatenate, batch and read again in the photometric stage.

    Args:
        image: ``[H, W, C]`` tensor of any real dtype.
        boxes: ``[n, 4]`` ``(top, left, height, width)``, static ``n``.
        size: output side (int).
        antialias: PIL-like low-pass filter when shrinking.

    Returns:
        ``[n, size, size, C]`` on the input's scale: uint8 for a uint8 image,
        otherwise float32 and not clipped (bicubic overshoots a little).
    """
    image = tf.convert_to_tensor(image)
    num = boxes.shape[0]
    boxes = tf.cast(tf.round(tf.cast(boxes, tf.float32)), tf.int32)
    # Slicing a 4-D view gives the batch axis the resize op wants for free.
    image = image[None]
    zeros = tf.zeros([num, 1], tf.int32)
    begins = tf.unstack(tf.concat([zeros, boxes[:, :2], zeros], 1))
    sizes = tf.unstack(tf.concat([zeros + 1, boxes[:, 2:], zeros - 1], 1))
    crops = []
    for begin, extent in zip(begins, sizes):
        crop = tf.slice(image, begin, extent)
        if antialias:
            crop = tf.image.resize(crop, (size, size), method="bicubic", antialias=True)
        else:
            # What tf.image.resize(method="bicubic") runs, minus its checks.
            crop = tf.raw_ops.ResizeBicubic(images=crop, size=[size, size], half_pixel_centers=True)
        crops.append(tf.cast(crop, tf.float32))
    out = tf.concat(crops, 0) if num > 1 else crops[0]
    if image.dtype == tf.uint8:
        # +0.5 then truncation: round half up, like PIL (values are >= 0
        # once saturated).
        out = tf.saturate_cast(out + 0.5, tf.uint8)
    out.set_shape([num, size, size, image.shape[-1]])
    return out


def horizontal_flip(image, flip):
    """Mirrors ``image [H, W, C]`` left-right when the bool scalar ``flip``."""
    return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def random_resized_crop(
    image,
    seed,
    size,
    scale=(0.08, 1.0),
    ratio=(3.0 / 4.0, 4.0 / 3.0),
    flip_p=0.5,
    method="bicubic",
    antialias=True,
    num_tries=10,
):
    """RandomResizedCrop + RandomHorizontalFlip, returning the geometry.

    The flip is applied after the crop (as in DINO), and recorded so that
    models can mirror positional coordinates of flipped views.

    Args:
        image: ``[H, W, C]`` tensor (float values kept as they are).
        seed: int tensor ``[2]``.
        size: output side (int) or ``(height, width)``.
        scale, ratio, num_tries: see :func:`sample_crop_box`.
        flip_p: probability of a horizontal flip.

    Returns:
        ``(crop, box, flipped)``: float32 ``[size, size, C]``, float32 ``[4]``
        ``(top, left, height, width)`` in source pixels, bool scalar.
    """
    seeds = split_seed(seed, 2)
    height, width = _image_hw(image)
    box = sample_crop_box(seeds[0], height, width, scale=scale, ratio=ratio, num_tries=num_tries)
    crop = crop_and_resize(image, box, size, method=method, antialias=antialias)
    if flip_p <= 0:
        flipped = tf.constant(False)
    else:
        flipped = tf.random.stateless_uniform([], seeds[1]) < flip_p
        crop = horizontal_flip(crop, flipped)
    return crop, box, flipped
