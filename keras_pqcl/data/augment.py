"""Photometric augmentations of DINO (colour jitter, grayscale, blur, solarize).

The work is split in two halves so the pipeline can be fast:

* :meth:`Photometric.sample` draws every random choice for ``num`` crops of one
  image (a few scalars per crop, ``tf.random.stateless_*`` from the example's
  seed). It runs in the per-example ``map``.
* :meth:`Photometric.apply` applies those choices to a stack of crops
  ``[num, H, W, 3]``, one crop per iteration of a loop (:func:`map_crops`).
  It is written for XLA, which on CPU runs it several times faster than the
  same ops without XLA: the blur and the colour jitter (the expensive ops) run
  only on the crops that drew them, through one switch over the four
  combinations of the two, and the cheap ops (grayscale, solarize, and the
  caller's flip, scaling and normalisation) are selects fused into the
  neighbouring passes, because under XLA every ``tf.cond`` costs a copy of
  the crop and splits the elementwise work around it.

The randomness is still drawn per image, never once per batch.

Why mostly plain TensorFlow and not keras-cv (keras-cv 0.9.0 was checked):

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
    "Photometric",
    "to_float01",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "color_jitter",
    "to_grayscale",
    "gaussian_blur",
    "solarize",
    "normalize",
    "map_crops",
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


def _per_image(value):
    """Per-image values ``[...]`` reshaped to broadcast over ``[..., H, W, C]``."""
    value = tf.convert_to_tensor(value)
    return value[..., None, None, None]


def to_float01(image):
    """uint8 ``[..., 3]`` → float32 in ``[0, 1]``; floats are only cast."""
    image = tf.convert_to_tensor(image)
    if image.dtype == tf.uint8:
        return tf.cast(image, tf.float32) / 255.0
    return tf.cast(image, tf.float32)


def _gray(image):
    """Luma ``[..., H, W, 1]`` of an RGB float image."""
    # Channel slices rather than a dot with the weights: XLA fuses these into
    # the surrounding elementwise loop.
    r, g, b = (image[..., i : i + 1] for i in range(3))
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def _mean_gray(image):
    """Mean luma of each image, shape ``[..., 1, 1, 1]``."""
    return tf.reduce_mean(_gray(image), axis=[-3, -2, -1], keepdims=True)


# Every op below takes images ``[..., H, W, 3]`` in [0, 1] and a factor that is
# a Python float, a scalar, or one value per image (shape ``[...]``).
def adjust_brightness(image, factor):
    """torchvision brightness: multiply by ``factor``, clip to [0, 1]."""
    return tf.clip_by_value(image * _per_image(factor), 0.0, 1.0)


def adjust_contrast(image, factor):
    """torchvision contrast: blend with the mean luma of each image."""
    f = _per_image(factor)
    return tf.clip_by_value(f * image + (1.0 - f) * _mean_gray(image), 0.0, 1.0)


def adjust_saturation(image, factor):
    """torchvision saturation: blend with the grayscale version."""
    f = _per_image(factor)
    return tf.clip_by_value(f * image + (1.0 - f) * _gray(image), 0.0, 1.0)


# Hexcone constants of hsv_to_rgb, one per output channel (R, G, B): a channel
# is ``max - chroma * (1 - clip(sign * |6h - centre| + offset, 0, 1))``.
_HUE_CENTRE = (3.0, 2.0, 4.0)
_HUE_SIGN = (1.0, -1.0, -1.0)
_HUE_OFFSET = (-1.0, 2.0, 2.0)


def adjust_hue(image, delta):
    """Rotates hue by ``delta`` turns (``[-0.5, 0.5]``), like torchvision.

    Same numbers as ``rgb_to_hsv`` → shift → ``hsv_to_rgb`` (and as
    ``tf.image.adjust_hue``, up to float rounding), but written out so that
    XLA keeps it one cheap elementwise pass: value and saturation are
    preserved by the rotation, so only the max, the chroma and the hue
    sector of each pixel are needed, and the hue is wrapped with ``floor``
    (XLA lowers ``floormod`` to a slow ``fmod`` call). ``delta`` may be one
    value per image (``tf.image.adjust_hue`` takes one per call).
    """
    image = tf.convert_to_tensor(image)
    r, g, b = image[..., 0:1], image[..., 1:2], image[..., 2:3]
    # Elementwise rather than reduce_max/min over channels: XLA:CPU hands
    # reductions to a library call that does not fuse.
    top = tf.maximum(tf.maximum(r, g), b)
    chroma = top - tf.minimum(tf.minimum(r, g), b)
    # The sector tests run in rgb_to_hsv's order (red wins ties, then green).
    is_r, is_g = top == r, top == g
    num = tf.where(is_r, g - b, tf.where(is_g, b - r, r - g))
    sector = tf.where(is_r, 0.0, tf.where(is_g, 2.0, 4.0))
    hue6 = num / tf.where(chroma > 0, chroma, 1.0) + sector + 6.0 * _per_image(delta)
    hue6 -= 6.0 * tf.floor(hue6 * (1.0 / 6.0))
    centre = tf.constant(_HUE_CENTRE, image.dtype)
    sign = tf.constant(_HUE_SIGN, image.dtype)
    offset = tf.constant(_HUE_OFFSET, image.dtype)
    weight = tf.clip_by_value(sign * tf.abs(hue6 - centre) + offset, 0.0, 1.0)
    return tf.clip_by_value(top - chroma * (1.0 - weight), 0.0, 1.0)


def to_grayscale(image):
    """RGB → luma replicated on 3 channels (torchvision ``Grayscale(3)``)."""
    gray = _gray(image)
    return tf.concat([gray, gray, gray], axis=-1)


def _blur_axis(planes, weights, axis, radius):
    """Border-renormalised 1-D convolution of ``planes [N, C, H, W]`` along
    ``axis`` (2 or 3) with per-image taps ``weights [N, 2 * radius + 1]``."""
    n = planes.shape[axis] if planes.shape[axis] is not None else tf.shape(planes)[axis]
    pad = [[0, 0]] * 4
    pad[axis] = [radius, radius]
    padded = tf.pad(planes, pad)
    out = 0.0
    for t in range(2 * radius + 1):
        begin = [0, 0, 0, 0]
        begin[axis] = t
        size = [-1, -1, -1, -1]
        size[axis] = n
        out += weights[:, t, None, None, None] * tf.slice(padded, begin, size)
    # Sum of the taps that fall inside the image, per output position: the
    # truncated kernel is renormalised there (no dark borders).
    pos = tf.range(n)[None, :] + tf.range(2 * radius + 1)[:, None] - radius
    valid = tf.cast((pos >= 0) & (pos < n), tf.float32)  # [T, n]
    norm = tf.matmul(weights, valid)  # [N, n]
    norm = norm[:, None, :, None] if axis == 2 else norm[:, None, None, :]
    return out / norm


def gaussian_blur(image, sigma, radius=6):
    """Separable Gaussian blur with one sigma per image.

    The kernel support is the fixed ``2 * radius + 1`` taps; its weights use
    the drawn sigma. The default radius 6 equals ``ceil(3 * sigma_max)`` for
    DINO's ``sigma_max = 2.0`` (13 taps), i.e. the usual
    ``2 * ceil(3 sigma) + 1`` kernel at the largest sigma; for smaller sigmas
    the extra taps get ~0 weight. DINO blurs with PIL, whose ``radius`` is the
    standard deviation in output pixels whatever the crop size (224 or 96),
    so sigma is not rescaled with the crop size either. Where the kernel
    leaves the image it is renormalised over the taps inside (PIL extends the
    edge pixels; the effect is similar: no darkened borders).

    Args:
        image: float32 ``[..., H, W, C]``.
        sigma: float, scalar or ``[...]`` (one per image), > 0.
        radius: Python int, half kernel size.

    Returns:
        float32 ``[..., H, W, C]``.
    """
    if radius <= 0:
        return image
    image = tf.convert_to_tensor(image, tf.float32)
    shape = tf.shape(image)
    flat = tf.reshape(image, tf.concat([[-1], shape[-3:]], 0))
    flat.set_shape([None] + image.shape[-3:].as_list())
    sigma = tf.maximum(tf.cast(sigma, tf.float32), 1e-3)
    sigma = tf.reshape(tf.broadcast_to(sigma, tf.shape(image)[:-3]), [-1, 1])
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)[None, :]
    weights = tf.exp(-tf.square(taps) / (2.0 * tf.square(sigma)))  # [N, T]
    # Channel planes: the shifted slices are then contiguous rows, which XLA
    # vectorises (about 2x faster than shifting interleaved RGB).
    planes = tf.transpose(flat, [0, 3, 1, 2])
    planes = _blur_axis(planes, weights, 2, radius)
    planes = _blur_axis(planes, weights, 3, radius)
    out = tf.reshape(tf.transpose(planes, [0, 2, 3, 1]), shape)
    out.set_shape(image.shape)
    return out


def solarize(image, threshold=128.0):
    """Inverts pixels ``>= threshold`` on the 0..255 scale (PIL solarize)."""
    return tf.where(image * 255.0 >= threshold, 1.0 - image, image)


def normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """``(image - mean) / std`` per channel (image in [0, 1])."""
    mean = tf.constant(mean, tf.float32)
    inv_std = tf.constant([1.0 / s for s in std], tf.float32)
    return (image - mean) * inv_std


def map_crops(fn, crops, per_crop):
    """``stack([fn(crops[i], per_crop[i]) for i in range(n)])`` as one loop.

    Inside XLA the loop body is compiled once whatever ``n`` is (unrolling it
    compiled the whole photometric chain once per crop: minutes for 12
    crops).

    Args:
        fn: ``(crop [H, W, C], item) -> float32 [H, W, C]``.
        crops: ``[n, H, W, C]``.
        per_crop: nest of tensors ``[n, ...]``.

    Returns:
        float32 ``[n, H, W, C]``.
    """
    n = crops.shape[0]
    if n is None:
        n = tf.shape(crops)[0]
    out = tf.TensorArray(tf.float32, size=n, element_shape=crops.shape[1:])

    def body(i, out):
        item = tf.nest.map_structure(lambda v: v[i], per_crop)
        return i + 1, out.write(i, fn(crops[i], item))

    _, out = tf.while_loop(lambda i, _: i < n, body, (tf.constant(0), out))
    out = out.stack()
    out.set_shape(crops.shape)
    return out


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
                "keras-cv is unavailable (%s: %s); using tf.image for grayscale and solarize (same results).",
                type(err).__name__,
                err,
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


def _is_zero(p):
    """True when a probability (float or tuple of floats) is 0 everywhere."""
    values = p if isinstance(p, (tuple, list)) else (p,)
    return all(isinstance(v, numbers.Real) and v <= 0 for v in values)


def _coin(seed, num, p):
    """``num`` bools, each True with probability ``p`` (a float or ``num``
    per-crop floats)."""
    values = p if isinstance(p, (tuple, list)) else (p,) * num
    if all(v >= 1 for v in values):
        return tf.ones([num], tf.bool)
    if all(v <= 0 for v in values):
        return tf.zeros([num], tf.bool)
    return tf.random.stateless_uniform([num], seed) < tf.constant(values, tf.float32)


class Photometric:
    """DINO's photometric chain, drawn per crop and applied crop by crop.

    Order (as in DINO): colour jitter (p ``jitter_p``) → grayscale
    (p ``grayscale_p``) → Gaussian blur with ``sigma ~ U(blur_sigma)``
    (p per crop) → solarize (p per crop). Normalisation is separate
    (:func:`normalize`).

    Colour jitter is torchvision's ``ColorJitter``: brightness, contrast and
    saturation factors ``~ U(max(0, 1 - s), 1 + s)``, hue shift
    ``~ U(-hue, hue)``; an op with strength 0 is skipped. With
    ``random_order`` the ops run in a uniformly random permutation per crop
    (as torchvision does), otherwise in the order b, c, s, h. Each op clips
    to [0, 1], which is the only reason the order matters.

    :meth:`apply` branches per crop on the jitter and blur choices
    (``tf.switch_case``), so under XLA only the expensive ops a crop actually
    draws are computed: the blur of a crop with blur probability 0.1 costs a
    tenth of a blur on average.

    Args:
        color_jitter: ``(brightness, contrast, saturation, hue)`` strengths.
        jitter_p: probability of applying the jitter.
        random_order: torchvision's random order of the jitter ops.
        grayscale_p: probability of grayscale (3 channels kept).
        blur_sigma: ``(min, max)`` of the blur sigma in output pixels.
        ops: dict from :func:`make_ops` (grayscale and solarize transforms);
            ``None`` = the ``tf.image`` versions.
    """

    def __init__(
        self,
        color_jitter=(0.4, 0.4, 0.2, 0.1),
        jitter_p=0.8,
        random_order=True,
        grayscale_p=0.2,
        blur_sigma=(0.1, 2.0),
        ops=None,
    ):
        self.strengths = tuple(float(s) for s in color_jitter)
        self.jitter_p = jitter_p
        self.random_order = random_order
        self.grayscale_p = grayscale_p
        self.blur_sigma = tuple(blur_sigma)
        self.radius = int(math.ceil(3.0 * self.blur_sigma[1]))
        self.ops = ops if ops is not None else make_ops(use_keras_cv=False)
        # Jitter ops that are on: 0 brightness, 1 contrast, 2 saturation, 3 hue.
        self.jitter_ops = [i for i in range(4) if self.strengths[i] > 0]
        # Unrolling the jitter slots saves XLA a copy of the crop per slot
        # but compiles every op four times (about 30 s instead of 3 s for
        # DINO's two crop sizes) for a gain within noise (~0.1 ms/image).
        self._unroll_jitter = False

    def sample(self, seed, num, blur_p=0.5, solarize_p=0.0):
        """Draws the random choices for ``num`` crops.

        Args:
            seed: int tensor ``[2]``.
            num: Python int, number of crops.
            blur_p, solarize_p: a probability for all crops or a tuple of one
                per crop.

        Returns:
            dict of tensors with leading axis ``[num]``: ``jitter`` (bool),
            ``factors`` ``[num, 4]`` (brightness, contrast and saturation
            factors, hue shift), ``perm`` ``[num, k]`` (the order of the
            ``k`` active jitter ops, as indices into :attr:`jitter_ops`);
            ``grayscale``; ``blur`` and ``sigma``; ``solarize``. Keys of ops
            that can never fire are left out, and :meth:`apply` then skips
            those ops entirely.
        """
        seeds = _split(seed, 8)
        params = {}
        k = len(self.jitter_ops)
        if not _is_zero(self.jitter_p) and k:
            params["jitter"] = _coin(seeds[0], num, self.jitter_p)
            b, c, s, h = self.strengths
            lo = tf.constant([max(0.0, 1.0 - b), max(0.0, 1.0 - c), max(0.0, 1.0 - s), -h])
            hi = tf.constant([1.0 + b, 1.0 + c, 1.0 + s, h])
            u = tf.random.stateless_uniform([num, 4], seeds[1])
            params["factors"] = lo + u * (hi - lo)
            if self.random_order:
                params["perm"] = tf.argsort(tf.random.stateless_uniform([num, k], seeds[2]), axis=-1, stable=True)
            else:
                params["perm"] = tf.tile(tf.range(k)[None], [num, 1])
        if not _is_zero(self.grayscale_p):
            params["grayscale"] = _coin(seeds[3], num, self.grayscale_p)
        if not _is_zero(blur_p):
            params["blur"] = _coin(seeds[4], num, blur_p)
            params["sigma"] = tf.random.stateless_uniform([num], seeds[5], self.blur_sigma[0], self.blur_sigma[1])
        if not _is_zero(solarize_p):
            params["solarize"] = _coin(seeds[6], num, solarize_p)
        return params

    def apply(self, images, params):
        """Applies :meth:`sample`'s choices to ``images [num, H, W, 3]``."""
        return map_crops(self.apply_one, images, params)

    def apply_one(self, x, p, pre=None, post=None):
        """One crop ``[H, W, 3]`` with its choices ``p`` (scalars per key).

        ``pre`` and ``post`` are optional elementwise functions applied
        before and after the chain (the crop's flip/scale and its
        normalisation, in :class:`~keras_pqcl.data.MultiCrop`). They are
        written into each branch below so that XLA fuses them into the
        chain's first and last passes instead of spending a pass over the
        crop on each.
        """
        shape = x.shape
        pre = pre or (lambda y: y)
        post = post or (lambda y: y)

        def gray(y):
            if "grayscale" not in p:
                return y
            return self._maybe(p["grayscale"], self.ops["grayscale"], y)

        def tail(y):
            if "solarize" in p:
                y = self._maybe(p["solarize"], self.ops["solarize"], y)
            return post(y)

        def variant(jitter, blur):
            # One straight-line program per combination of the two expensive
            # ops rather than a tf.cond around each: under XLA an untaken
            # cond still copies the crop, and every cond boundary splits the
            # elementwise work around it into separate passes.
            def run():
                y = pre(x)
                if jitter:
                    y = self._jitter(y, p, last=gray if blur else (lambda z: tail(gray(z))))
                else:
                    y = gray(y)
                if blur:
                    y = gaussian_blur(y, p["sigma"], self.radius)
                if blur or not jitter:
                    y = tail(y)
                y.set_shape(shape)
                return y

            return run

        flags = [(key, tf.cast(p[key], tf.int32)) for key in ("jitter", "blur") if key in p]
        if not flags:
            return variant(False, False)()
        index, branches = 0, [{}]
        for bit, (key, on) in enumerate(flags):
            index += on * (1 << bit)
            branches = branches + [dict(b, **{key: True}) for b in branches]
        return tf.switch_case(index, [variant(b.get("jitter", False), b.get("blur", False)) for b in branches])

    def _maybe(self, flag, fn, x):
        # A select, even for keras-cv's grayscale (a small dot product):
        # under XLA a tf.cond copies the crop whichever branch runs and
        # splits the elementwise passes around it, which costs more than
        # computing these cheap ops for every crop.
        return tf.where(flag, fn(x), x)

    def _jitter(self, x, p, last=None):
        """The jitter ops in the crop's order; ``last`` (elementwise) is
        applied after the last one, inside its branches (fused)."""
        f = p["factors"]
        perm = p["perm"]
        shape = x.shape
        kinds = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        ops = [(kinds[op], op) for op in self.jitter_ops]
        if not self._unroll_jitter:
            # Compiles each op once, but XLA copies the crop into the
            # loop-carried buffer after every slot.
            def slot(i, y):
                y = tf.switch_case(perm[i], [lambda fn=fn, op=op: fn(y, f[op]) for fn, op in ops])
                y.set_shape(shape)
                return i + 1, y

            _, x = tf.while_loop(lambda i, _: i < len(ops), slot, (tf.constant(0), x))
            return last(x) if last is not None else x
        for i in range(len(ops)):
            epilogue = last if (last is not None and i == len(ops) - 1) else (lambda y: y)
            x = tf.switch_case(perm[i], [lambda fn=fn, op=op, y=x, e=epilogue: e(fn(y, f[op])) for fn, op in ops])
            x.set_shape(shape)
        return x

    @staticmethod
    def applied(params, shape):
        """int32 ``[*shape, 4]`` flags (jitter, grayscale, blur, solarize)
        for params of crops with leading shape ``shape``."""
        zeros = tf.zeros(shape, tf.bool)
        flags = [params.get(k, zeros) for k in ("jitter", "grayscale", "blur", "solarize")]
        return tf.cast(tf.stack(flags, axis=-1), tf.int32)


def color_jitter(
    image,
    seed,
    brightness=0.4,
    contrast=0.4,
    saturation=0.2,
    hue=0.1,
    random_order=True,
):
    """torchvision ``ColorJitter`` on one image ``[H, W, 3]`` in [0, 1]
    (always applied; see :class:`Photometric` for the semantics)."""
    chain = Photometric(
        (brightness, contrast, saturation, hue), jitter_p=1.0, random_order=random_order, grayscale_p=0.0
    )
    return chain.apply(image[None], chain.sample(seed, 1, blur_p=0.0))[0]


def photometric_augment(
    image,
    seed,
    *,
    color_jitter_strength=(0.4, 0.4, 0.2, 0.1),
    jitter_p=0.8,
    jitter_random_order=True,
    grayscale_p=0.2,
    blur_p=0.5,
    blur_sigma=(0.1, 2.0),
    solarize_p=0.0,
    ops=None,
):
    """DINO photometric chain on one image ``[H, W, 3]`` in [0, 1].

    Returns:
        ``(image, applied)``: float32 ``[H, W, 3]`` and int32 ``[4]`` flags for
        (jitter, grayscale, blur, solarize).
    """
    chain = Photometric(color_jitter_strength, jitter_p, jitter_random_order, grayscale_p, blur_sigma, ops)
    params = chain.sample(seed, 1, blur_p=blur_p, solarize_p=solarize_p)
    return chain.apply(image[None], params)[0], chain.applied(params, [1])[0]
