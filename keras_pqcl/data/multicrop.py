"""Multi-crop transform (DINO / iBOT / PQCL) producing the per-example dict.

``MultiCrop(config)(image, label, seed)`` turns one source image into the
dict the models read (before ``.batch``):

=================  ===========================================  =========
key                shape                                        dtype
=================  ===========================================  =========
``global_crops``   ``[n_global, global_size, global_size, 3]``  float32
``local_crops``    ``[n_local, local_size, local_size, 3]``     float32
``global_boxes``   ``[n_global, 4]`` (top, left, height, width) float32
``global_flips``   ``[n_global]`` (1 = mirrored after cropping) int32
``local_boxes``    ``[n_local, 4]``                             float32
``local_flips``    ``[n_local]``                                int32
``image_size``     ``[2]`` (source height, width)               int32
``label``          ``[]`` (-1 when unknown)                     int32
=================  ===========================================  =========

The ``local_*`` keys are present only when ``n_local > 0``. Boxes are in
pixels of the source image; crops are ImageNet-normalised. With
``record_augmentations=True`` two more keys, ``global_augs`` and
``local_augs`` (int32 ``[n, 4]``: jitter, grayscale, blur, solarize applied),
are added for debugging and tests.
"""

import dataclasses
import numbers
from typing import Tuple, Union

import tensorflow as tf

from keras_pqcl.data import augment as aug
from keras_pqcl.data import crops as crops_lib

__all__ = ["MultiCropConfig", "MultiCrop"]


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_num(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass
class MultiCropConfig:
    """Multi-crop augmentation settings (defaults = DINO, spec §3.1).

    Attributes:
        global_size: side of the global crops in pixels. Default 224.
        local_size: side of the local crops. Default 96.
        n_global: number of global crops (>= 1). Default 2.
        n_local: number of local crops (>= 0). Default 8.
        global_scale: RandomResizedCrop area range of global crops.
            Default (0.4, 1.0). iBOT/PQCL recipes use (0.25, 1.0).
        local_scale: area range of local crops. Default (0.05, 0.4).
            iBOT/PQCL recipes use (0.05, 0.25).
        ratio: aspect-ratio (w / h) range. Default (3/4, 4/3).
        flip_p: horizontal flip probability (after the crop). Default 0.5.
        flip_local: whether local crops may be flipped. Default True (DINO).
            PQCL sets it to False so local patch order matches coordinates.
        color_jitter: (brightness, contrast, saturation, hue) strengths.
            Default (0.4, 0.4, 0.2, 0.1).
        jitter_p: probability of applying colour jitter. Default 0.8.
        jitter_random_order: apply the four jitter ops in a random order per
            image (torchvision); False = fixed order b, c, s, h. Default True.
        grayscale_p: grayscale probability (3 channels kept). Default 0.2.
        global_blur_p: blur probability per global crop; one float for all,
            or one per global crop. Default (1.0, 0.1).
        local_blur_p: blur probability of local crops. Default 0.5.
        blur_sigma: Gaussian sigma range in output pixels. Default (0.1, 2.0).
        solarize_p: solarize probability per global crop (float or one per
            global crop). Default (0.0, 0.2). Local crops are never solarized.
        solarize_threshold: on the 0..255 scale. Default 128.
        mean, std: normalisation on [0, 1] images. Default ImageNet
            (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225).
        use_keras_cv: use keras-cv's Grayscale/Solarization layers when it
            imports (same numbers as the tf.image fallback). Default True.
    """

    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 8
    global_scale: Tuple[float, float] = (0.4, 1.0)
    local_scale: Tuple[float, float] = (0.05, 0.4)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    flip_local: bool = True
    color_jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    jitter_random_order: bool = True
    grayscale_p: float = 0.2
    global_blur_p: Union[float, Tuple[float, ...]] = (1.0, 0.1)
    local_blur_p: float = 0.5
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_p: Union[float, Tuple[float, ...]] = (0.0, 0.2)
    solarize_threshold: float = 128.0
    mean: Tuple[float, float, float] = aug.IMAGENET_MEAN
    std: Tuple[float, float, float] = aug.IMAGENET_STD
    use_keras_cv: bool = True

    def __post_init__(self):
        for name in ("global_size", "local_size"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(
                    f"MultiCropConfig.{name} must be a positive int, got {v!r}; "
                    f"pass e.g. {name}={224 if name == 'global_size' else 96}."
                )
        if not _is_int(self.n_global) or self.n_global < 1:
            raise ValueError(
                f"MultiCropConfig.n_global must be an int >= 1, got "
                f"{self.n_global!r}; DINO/iBOT/PQCL use n_global=2."
            )
        if not _is_int(self.n_local) or self.n_local < 0:
            raise ValueError(
                f"MultiCropConfig.n_local must be an int >= 0, got "
                f"{self.n_local!r}; use n_local=0 to disable local crops."
            )
        self.global_scale = self._range("global_scale", self.global_scale, 1.0)
        self.local_scale = self._range("local_scale", self.local_scale, 1.0)
        self.ratio = self._range("ratio", self.ratio, None)
        self.blur_sigma = self._range("blur_sigma", self.blur_sigma, None)
        for name in ("flip_p", "jitter_p", "grayscale_p", "local_blur_p"):
            setattr(self, name, self._prob(name, getattr(self, name)))
        self.global_blur_p = self._per_global("global_blur_p",
                                              self.global_blur_p)
        self.solarize_p = self._per_global("solarize_p", self.solarize_p)
        cj = tuple(self.color_jitter)
        if len(cj) != 4 or not all(_is_num(v) and v >= 0 for v in cj):
            raise ValueError(
                "MultiCropConfig.color_jitter must be 4 non-negative numbers "
                f"(brightness, contrast, saturation, hue), got {self.color_jitter!r}"
                "; DINO uses (0.4, 0.4, 0.2, 0.1)."
            )
        if cj[3] > 0.5:
            raise ValueError(
                f"MultiCropConfig.color_jitter hue strength must be <= 0.5 "
                f"(a half turn), got {cj[3]!r}."
            )
        self.color_jitter = tuple(float(v) for v in cj)
        for name in ("mean", "std"):
            v = tuple(getattr(self, name))
            if len(v) != 3 or not all(_is_num(x) for x in v):
                raise ValueError(
                    f"MultiCropConfig.{name} must be 3 numbers (one per RGB "
                    f"channel), got {getattr(self, name)!r}."
                )
            setattr(self, name, tuple(float(x) for x in v))
        if any(x <= 0 for x in self.std):
            raise ValueError(
                f"MultiCropConfig.std must be > 0 per channel, got {self.std!r}."
            )
        if not _is_num(self.solarize_threshold) or not (
            0 <= self.solarize_threshold <= 256
        ):
            raise ValueError(
                "MultiCropConfig.solarize_threshold is on the 0..255 scale; "
                f"got {self.solarize_threshold!r} (DINO uses 128)."
            )

    # -- validation helpers -------------------------------------------------
    @staticmethod
    def _prob(name, p):
        if not _is_num(p) or not (0.0 <= p <= 1.0):
            raise ValueError(
                f"MultiCropConfig.{name} must be a probability in [0, 1], "
                f"got {p!r}."
            )
        return float(p)

    @staticmethod
    def _range(name, value, upper):
        try:
            lo, hi = value
        except (TypeError, ValueError):
            raise ValueError(
                f"MultiCropConfig.{name} must be a (min, max) pair, got "
                f"{value!r}."
            ) from None
        ok = _is_num(lo) and _is_num(hi) and 0 < lo <= hi
        if ok and upper is not None:
            ok = hi <= upper
        if not ok:
            bound = f"0 < min <= max <= {upper}" if upper else "0 < min <= max"
            raise ValueError(
                f"MultiCropConfig.{name} must satisfy {bound}, got {value!r}."
            )
        return (float(lo), float(hi))

    def _per_global(self, name, value):
        if _is_num(value):
            values = (float(value),) * self.n_global
        else:
            values = tuple(value)
            if len(values) != self.n_global:
                raise ValueError(
                    f"MultiCropConfig.{name} has {len(values)} entries but "
                    f"n_global={self.n_global}; give one probability per "
                    f"global crop (a tuple of length {self.n_global}) or a "
                    "single float for all of them."
                )
        return tuple(self._prob(name, v) for v in values)

    # -- public helpers -----------------------------------------------------
    def check_patch_size(self, patch_size):
        """Raises ValueError unless both crop sizes are multiples of
        ``patch_size`` (a ViT needs a whole number of patches)."""
        if not _is_int(patch_size) or patch_size <= 0:
            raise ValueError(f"patch_size must be a positive int, got "
                             f"{patch_size!r}.")
        for name in ("global_size", "local_size"):
            size = getattr(self, name)
            if size % patch_size:
                lower = (size // patch_size) * patch_size
                upper = lower + patch_size
                near = [s for s in (lower, upper) if s > 0]
                raise ValueError(
                    f"MultiCropConfig.{name}={size} is not a multiple of "
                    f"patch_size={patch_size}; use {' or '.join(map(str, near))}"
                    f" (nearest multiples of {patch_size})."
                )


class MultiCrop:
    """Per-example multi-crop transform (for ``tf.data.Dataset.map``).

    Each crop: RandomResizedCrop (box sampled in source pixels, bicubic with
    antialias) → horizontal flip (recorded) → photometric augmentation →
    ImageNet normalisation. Global crop ``g`` uses ``global_blur_p[g]`` and
    ``solarize_p[g]``; local crops use ``local_blur_p`` and no solarize.

    Args:
        config: :class:`MultiCropConfig` (default: DINO).
        photometric: apply colour jitter / grayscale / blur / solarize.
            ``False`` leaves only geometry (useful to test geometry).
        normalize: apply mean/std normalisation. With ``normalize=False`` and
            ``photometric=False``, float inputs pass through with their own
            values, unclipped (e.g. coordinate-encoded test images);
            otherwise crops are clipped to [0, 1].
        record_augmentations: add ``global_augs`` / ``local_augs`` keys.

    Call:
        ``transform(image, label=-1, seed=None)`` with ``image`` uint8
        ``[H, W, 3]`` (scaled to [0, 1]) or float ``[H, W, C]`` (kept as is)
        and ``seed`` an int ``[2]`` tensor (``None`` = non-reproducible
        random seed). Returns the dict described in the module docstring.
    """

    def __init__(self, config=None, photometric=True, normalize=True,
                 record_augmentations=False):
        self.config = config if config is not None else MultiCropConfig()
        self.photometric = photometric
        self.normalize = normalize
        self.record_augmentations = record_augmentations
        # Built eagerly here, never while tracing a map function.
        self._ops = (
            aug.make_ops(self.config.use_keras_cv,
                         self.config.solarize_threshold)
            if photometric else None
        )
        self._crop_fns = {}

    def _one_crop(self, image, seed, size, scale, flip_p, blur_p, solarize_p):
        cfg = self.config
        seeds = crops_lib.split_seed(seed, 2)
        crop, box, flipped = crops_lib.random_resized_crop(
            image, seeds[0], size, scale=scale, ratio=cfg.ratio, flip_p=flip_p
        )
        applied = tf.zeros([4], tf.int32)
        if self.photometric or self.normalize:
            # Bicubic overshoots the [0, 1] range a little; PIL saturates at
            # 0/255 too. (Only raw float geometry tests skip this.)
            crop = tf.clip_by_value(crop, 0.0, 1.0)
        if self.photometric:
            crop, applied = aug.photometric_augment(
                crop, seeds[1],
                color_jitter_strength=cfg.color_jitter,
                jitter_p=cfg.jitter_p,
                jitter_random_order=cfg.jitter_random_order,
                grayscale_p=cfg.grayscale_p,
                blur_p=blur_p,
                blur_sigma=cfg.blur_sigma,
                solarize_p=solarize_p,
                ops=self._ops,
            )
        if self.normalize:
            crop = aug.normalize(crop, cfg.mean, cfg.std)
        return crop, box, tf.cast(flipped, tf.int32), applied

    def _crop_fn(self, kind):
        """One ``tf.function`` per crop kind, traced once and called for
        every crop of that kind: tracing the photometric chain 10 times
        (2 global + 8 local) made building a pipeline several times slower.
        """
        if kind not in self._crop_fns:
            # autograph=False: the code has no tensor-dependent Python
            # control flow (explicit tf.cond), and conversion is slow.
            self._crop_fns[kind] = tf.function(
                self._one_crop, autograph=False, reduce_retracing=True
            )
        return self._crop_fns[kind]

    def __call__(self, image, label=-1, seed=None):
        cfg = self.config
        image = tf.convert_to_tensor(image)
        if image.shape.rank != 3:
            raise ValueError(
                f"MultiCrop expects one image [H, W, C], got shape {image.shape}"
            )
        image = aug.to_float01(image)
        if seed is None:
            seed = tf.random.uniform([2], maxval=2 ** 62, dtype=tf.int64)
        n_total = cfg.n_global + cfg.n_local
        seeds = crops_lib.split_seed(seed, n_total)

        out = {}
        # Per-crop probabilities that differ between global crops are passed
        # as tensors so all global crops share one trace; equal ones stay
        # Python floats (p = 0 or 1 then needs no tf.cond at all).
        blur_ps = cfg.global_blur_p
        sol_ps = cfg.solarize_p
        if len(set(blur_ps)) > 1:
            blur_ps = [tf.constant(p, tf.float32) for p in blur_ps]
        if len(set(sol_ps)) > 1:
            sol_ps = [tf.constant(p, tf.float32) for p in sol_ps]
        g_fn = self._crop_fn("global")
        g = [
            g_fn(image, seeds[i], cfg.global_size, cfg.global_scale,
                 cfg.flip_p, blur_ps[i], sol_ps[i])
            for i in range(cfg.n_global)
        ]
        self._stack_into(out, "global", g)
        if cfg.n_local > 0:
            flip_p = cfg.flip_p if cfg.flip_local else 0.0
            l_fn = self._crop_fn("local")
            loc = [
                l_fn(image, seeds[cfg.n_global + i], cfg.local_size,
                     cfg.local_scale, flip_p, cfg.local_blur_p, 0.0)
                for i in range(cfg.n_local)
            ]
            self._stack_into(out, "local", loc)
        out["image_size"] = tf.shape(image)[:2]
        out["label"] = tf.cast(tf.reshape(label, []), tf.int32)
        return out

    def _stack_into(self, out, kind, results):
        """Stack per-crop ``(crop, box, flip, augs)`` into ``{kind}_crops|boxes|flips|augs``."""
        names = ["crops", "boxes", "flips"] + (["augs"] if self.record_augmentations else [])
        for i, name in enumerate(names):
            out[f"{kind}_{name}"] = tf.stack([r[i] for r in results])
