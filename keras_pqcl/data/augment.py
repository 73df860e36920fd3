"""Photometric augmentations of DINO (colour jitter, grayscale, blur, solarize).

All functions take one float32 image ``[H, W, 3]`` with values in ``[0, 1]``
and a stateless seed (int tensor ``[2]``), and draw their randomness PER IMAGE
with ``tf.random.stateless_*``. They run inside ``tf.data.Dataset.map`` under
any ``KERAS_BACKEND`` because they only use TensorFlow ops.

Why mostly ``tf.image`` and not keras-cv (keras-cv 0.9.0 was checked):

* ``keras_cv.layers.RandomColorJitter`` draws its factors from a stateful
  generator, so a seeded pipeline could not be reproduced per example; it has
  no apply-probability; its brightness is additive (torchvision multiplies),
  its saturation factor is centred at 0.5 and the four ops have a fixed order.
  We implement torchvision's ``ColorJitter`` semantics directly instead.
* ``keras_cv.layers.RandomGaussianBlur`` also samples sigma from a stateful
  generator and convolves with zero padding ("SAME"), which darkens the
  borders; PIL's blur (used by DINO) extends the edge pixels. We implement a
  separable Gaussian whose truncated kernel is renormalised at the borders.
* ``keras_cv.layers.Grayscale`` and ``keras_cv.layers.Solarization`` are
  deterministic transforms, so they are used when keras-cv imports (the
  random apply decision is ours, stateless). If keras-cv is missing or broken
  the equivalent ``tf.image`` code is used; both give the same numbers.

keras-cv is imported lazily (it takes seconds to import and always imports
TensorFlow), only when :func:`make_ops` is asked for it.
"""

import logging
import math
import numbers

import tensorflow as tf

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "to_float01",
    "random_apply",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "color_jitter",
    "to_grayscale",
    "gaussian_blur",
    "solarize",
    "normalize",
    "make_ops",
    "photometric_augment",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R 601 luma weights with the digits used by torchvision's
# rgb_to_grayscale and tf.image.rgb_to_grayscale (PIL: 0.299, 0.587, 0.114).
_LUMA = (0.2989, 0.587, 0.114)

_logger = logging.getLogger(__name__)


def _split(seed, num):
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return tf.random.experimental.stateless_split(seed, num=num)


def to_float01(image):
    """uint8 ``[..., 3]`` → float32 in ``[0, 1]``; floats are only cast."""
    image = tf.convert_to_tensor(image)
    if image.dtype == tf.uint8:
        return tf.cast(image, tf.float32) / 255.0
    return tf.cast(image, tf.float32)


def random_apply(fn, image, p, seed):
    """Applies ``fn(image)`` with probability ``p`` (``tf.cond`` on a coin).

    Args:
        fn: callable image → image (same shape and dtype).
        image: tensor.
        p: probability, a Python float (``p <= 0`` and ``p >= 1`` are then
            resolved in Python so the graph holds no useless branch) or a
            float scalar tensor.
        seed: int tensor ``[2]`` for the coin.

    Returns:
        ``(image, applied)`` with ``applied`` a bool scalar tensor.
    """
    if isinstance(p, numbers.Real):
        if p <= 0:
            return image, tf.constant(False)
        if p >= 1:
            return fn(image), tf.constant(True)
    applied = tf.random.stateless_uniform([], seed) < p
    out = tf.cond(applied, lambda: fn(image), lambda: image)
    return out, applied


def _gray(image):
    """Luma ``[H, W, 1]`` of an RGB float image."""
    # tensordot (a matmul) is several times faster than multiply + reduce_sum
    # over a 3-wide last axis on CPU.
    weights = tf.constant(_LUMA, tf.float32)[:, None]
    return tf.tensordot(image, weights, axes=1)


def adjust_brightness(image, factor):
    """torchvision brightness: multiply by ``factor``, clip to [0, 1]."""
    return tf.clip_by_value(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
    """torchvision contrast: blend with the mean luma of the image."""
    mean = tf.reduce_mean(_gray(image))
    return tf.clip_by_value(factor * image + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image, factor):
    """torchvision saturation: blend with the grayscale version."""
    gray = _gray(image)
    return tf.clip_by_value(factor * image + (1.0 - factor) * gray, 0.0, 1.0)


def adjust_hue(image, delta):
    """Rotates hue by ``delta`` turns (``[-0.5, 0.5]``), like torchvision."""
    return tf.clip_by_value(tf.image.adjust_hue(image, delta), 0.0, 1.0)


def _factor_range(strength):
    return max(0.0, 1.0 - strength), 1.0 + strength


def _linear_step(image, coef):
    """``clip(a * x + g * gray(x) + m * mean(gray(x)))`` for ``coef=(a, g, m)``.

    Brightness ``(f, 0, 0)``, contrast ``(f, 0, 1 - f)`` and saturation
    ``(f, 1 - f, 0)`` are all of this form (torchvision's ``_blend``), and
    ``(1, 0, 0)`` is the identity; one formula lets the op of each step be
    chosen by a gather instead of a ``switch_case`` (much slower in
    ``tf.data`` on CPU).
    """
    gray = _gray(image)
    mean = tf.reduce_mean(gray)
    out = coef[0] * image + coef[1] * gray + coef[2] * mean
    return tf.clip_by_value(out, 0.0, 1.0)


def color_jitter(
    image, seed, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
    random_order=True,
):
    """torchvision ``ColorJitter`` on one image.

    Factors are drawn per call: brightness, contrast and saturation factors
    ``~ U(max(0, 1 - s), 1 + s)``, hue shift ``~ U(-hue, hue)``. An op with
    strength 0 is skipped. With ``random_order`` the ops run in a uniformly
    random permutation (as torchvision does); otherwise in the fixed order
    brightness, contrast, saturation, hue. Each op clips to [0, 1], which is
    the only reason the order matters at all.

    Args:
        image: float32 ``[H, W, 3]`` in ``[0, 1]``.
        seed: int tensor ``[2]``.

    Returns:
        float32 ``[H, W, 3]`` in ``[0, 1]``.
    """
    seeds = _split(seed, 6)
    coefs = []
    for strength, kind, s in ((brightness, "b", seeds[0]),
                              (contrast, "c", seeds[1]),
                              (saturation, "s", seeds[2])):
        if strength <= 0:
            continue
        lo, hi = _factor_range(strength)
        f = tf.random.stateless_uniform([], s, lo, hi)
        zero = tf.zeros([])
        if kind == "b":
            coefs.append(tf.stack([f, zero, zero]))
        elif kind == "c":
            coefs.append(tf.stack([f, zero, 1.0 - f]))
        else:
            coefs.append(tf.stack([f, 1.0 - f, zero]))
    n_lin = len(coefs)
    delta = (tf.random.stateless_uniform([], seeds[3], -hue, hue)
             if hue > 0 else None)
    if n_lin == 0:
        return adjust_hue(image, delta) if delta is not None else image
    table = tf.stack(coefs)  # [n_lin, 3]

    if not random_order:
        for j in range(n_lin):
            image = _linear_step(image, table[j])
        return adjust_hue(image, delta) if delta is not None else image

    # A uniform permutation of the n_lin linear ops plus hue = a uniform
    # permutation of the linear ops and an independent uniform slot for hue.
    order = tf.argsort(tf.random.stateless_uniform([n_lin], seeds[4]))
    if delta is None:
        for j in range(n_lin):
            image = _linear_step(image, tf.gather(table, order[j]))
        return image
    hue_pos = tf.random.stateless_uniform(
        [], seeds[5], minval=0, maxval=n_lin + 1, dtype=tf.int32
    )
    identity = tf.constant([1.0, 0.0, 0.0])
    # Linear steps before the hue slot, then hue, then the rest; a step on
    # the wrong side of the slot uses the identity coefficients.
    for j in range(n_lin):
        coef = tf.gather(table, order[j])
        image = _linear_step(image, tf.where(j < hue_pos, coef, identity))
    image = adjust_hue(image, delta)
    for j in range(n_lin):
        coef = tf.gather(table, order[j])
        image = _linear_step(image, tf.where(j >= hue_pos, coef, identity))
    return image


def to_grayscale(image):
    """RGB → luma replicated on 3 channels (torchvision ``Grayscale(3)``)."""
    return tf.tile(_gray(image), [1, 1, 3])


def _blur_matrix(n, sigma, radius):
    """[n, n] row-stochastic matrix of a Gaussian truncated at ``radius``.

    Rows are renormalised where the kernel leaves the image, so borders are
    not darkened (PIL extends the edge pixels; the effect is similar).
    """
    idx = tf.range(n)
    d = tf.cast(idx[:, None] - idx[None, :], tf.float32)
    m = tf.exp(-tf.square(d) / (2.0 * tf.square(sigma)))
    m = m * tf.cast(tf.abs(d) <= float(radius), tf.float32)
    return m / tf.reduce_sum(m, axis=1, keepdims=True)


def gaussian_blur(image, sigma, radius=6):
    """Separable Gaussian blur of one image with a (tensor) ``sigma``.

    The kernel support is the fixed ``2 * radius + 1`` taps; its weights use
    the drawn sigma. The default radius 6 equals ``ceil(3 * sigma_max)`` for
    DINO's ``sigma_max = 2.0`` (13 taps), i.e. the usual
    ``2 * ceil(3 sigma) + 1`` kernel at the largest sigma; for smaller sigmas
    the extra taps get ~0 weight. DINO blurs with PIL, whose ``radius`` is the
    standard deviation in output pixels whatever the crop size (224 or 96),
    so sigma is not rescaled with the crop size either.

    Implementation: two matmuls with banded ``[H, H]`` / ``[W, W]`` matrices.
    On CPU this is ~4x faster than ``tf.nn.depthwise_conv2d`` with a
    13-tap kernel (measured in ``tf.data.map`` at 224 px).

    Args:
        image: float32 ``[H, W, C]``.
        sigma: float scalar tensor (> 0).
        radius: Python int, half kernel size.

    Returns:
        float32 ``[H, W, C]``.
    """
    if radius <= 0:
        return image
    sigma = tf.maximum(tf.cast(sigma, tf.float32), 1e-3)
    shape = tf.shape(image)
    h, w, c = shape[0], shape[1], shape[2]
    m_h = _blur_matrix(h, sigma, radius)
    m_w = _blur_matrix(w, sigma, radius)
    # Vertical pass: [H, H] @ [H, W*C].
    out = tf.reshape(tf.matmul(m_h, tf.reshape(image, [h, -1])), [h, w, c])
    # Horizontal pass: contract the W axis with m_w.
    out = tf.einsum("vw,hwc->hvc", m_w, out)
    out.set_shape(image.shape)
    return out


def solarize(image, threshold=128.0):
    """Inverts pixels ``>= threshold`` on the 0..255 scale (PIL solarize)."""
    return tf.where(image * 255.0 >= threshold, 1.0 - image, image)


def normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """``(image - mean) / std`` per channel (image in [0, 1])."""
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (image - mean) / std


_KERAS_CV_STATE = {"tried": False, "ok": False}


def make_ops(use_keras_cv=True, solarize_threshold=128.0):
    """Builds the deterministic grayscale and solarize transforms.

    Call this eagerly (outside ``Dataset.map``): keras-cv layers create
    their state when constructed, which must not happen during tracing.

    Args:
        use_keras_cv: use ``keras_cv.layers.Grayscale`` and
            ``keras_cv.layers.Solarization`` when keras-cv imports; fall back
            to the ``tf.image`` versions (one logged warning) otherwise.
        solarize_threshold: threshold on the 0..255 scale.

    Returns:
        dict with callables ``"grayscale"`` and ``"solarize"`` (float32
        ``[H, W, 3]`` in [0, 1] → same), and ``"impl"`` (``"keras_cv"`` or
        ``"tf"``).
    """
    ops = {
        "grayscale": to_grayscale,
        "solarize": lambda x: solarize(x, solarize_threshold),
        "impl": "tf",
    }
    if not use_keras_cv:
        return ops
    try:
        import keras_cv  # noqa: F401  (lazy: slow import)

        gray_layer = keras_cv.layers.Grayscale(output_channels=3)
        sol_layer = keras_cv.layers.Solarization(
            value_range=(0, 1),
            threshold_factor=(solarize_threshold, solarize_threshold),
        )
    except Exception as err:  # ImportError, or keras.src API drift
        if not _KERAS_CV_STATE["tried"]:
            _logger.warning(
                "keras-cv is unavailable (%s: %s); using tf.image for "
                "grayscale and solarize (same results).",
                type(err).__name__, err,
            )
        _KERAS_CV_STATE.update(tried=True, ok=False)
        return ops
    _KERAS_CV_STATE.update(tried=True, ok=True)

    def kcv_gray(x):
        out = tf.cast(gray_layer(x), tf.float32)
        out.set_shape(x.shape)
        return out

    def kcv_solarize(x):
        out = tf.cast(sol_layer(x), tf.float32)
        out.set_shape(x.shape)
        return out

    return {"grayscale": kcv_gray, "solarize": kcv_solarize, "impl": "keras_cv"}


def photometric_augment(
    image, seed, *, color_jitter_strength=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
    jitter_random_order=True, grayscale_p=0.2, blur_p=0.5,
    blur_sigma=(0.1, 2.0), solarize_p=0.0, ops=None,
):
    """DINO photometric chain for one crop, each op drawn per image.

    Order (as in DINO): colour jitter (p ``jitter_p``) → grayscale
    (p ``grayscale_p``) → Gaussian blur with ``sigma ~ U(blur_sigma)``
    (p ``blur_p``) → solarize (p ``solarize_p``). Normalisation is separate
    (:func:`normalize`).

    Args:
        image: float32 ``[H, W, 3]`` in ``[0, 1]``.
        seed: int tensor ``[2]``.
        color_jitter_strength: ``(brightness, contrast, saturation, hue)``.
        ops: dict from :func:`make_ops`; ``None`` = plain ``tf.image`` ops.

    Returns:
        ``(image, applied)``: float32 ``[H, W, 3]`` in ``[0, 1]`` and int32
        ``[4]`` flags for (jitter, grayscale, blur, solarize).
    """
    if ops is None:
        ops = make_ops(use_keras_cv=False)
    seeds = _split(seed, 6)
    b, c, s, h = color_jitter_strength
    image, j_on = random_apply(
        lambda x: color_jitter(x, seeds[0], b, c, s, h, jitter_random_order),
        image, jitter_p, seeds[1],
    )
    image, g_on = random_apply(ops["grayscale"], image, grayscale_p, seeds[2])
    sigma = tf.random.stateless_uniform(
        [], seeds[3], minval=blur_sigma[0], maxval=blur_sigma[1]
    )
    radius = int(math.ceil(3.0 * blur_sigma[1]))
    image, b_on = random_apply(
        lambda x: gaussian_blur(x, sigma, radius), image, blur_p, seeds[4]
    )
    image, s_on = random_apply(ops["solarize"], image, solarize_p, seeds[5])
    applied = tf.cast(tf.stack([j_on, g_on, b_on, s_on]), tf.int32)
    return image, applied
