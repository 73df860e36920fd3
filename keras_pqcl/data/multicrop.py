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
``global_masks``   ``[n_global, S_g/p, S_g/p]`` (iBOT, optional) bool
``query_coords``   ``[n_global, n_local, L*L, 2]`` (PQCL, opt.)  float32
``query_tables``   ``[n_global, n_local, L*L, D]`` (PQCL, opt.)  float32
=================  ===========================================  =========

The ``local_*`` keys are present only when ``n_local > 0``; the mask and
query keys only when a :class:`~keras_pqcl.data.MaskConfig` /
:class:`~keras_pqcl.data.QueryConfig` is given (``p`` = patch size,
``L`` = local crop size / p, ``D`` = ``QueryConfig.embed_dim``). Boxes are in
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
from keras_pqcl.data import masks as masks_lib
from keras_pqcl.data import queries as queries_lib

__all__ = ["MultiCropConfig", "MultiCrop"]


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_num(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass
class MultiCropConfig:
    """Multi-crop augmentation settings (defaults = DINO's code).

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
            The official PQCL pipeline never flips them (False); flipped local
            crops need ``QueryConfig(flip_correct=True)``, whose
            ``query_coords`` read a flipped crop's patches mirrored.
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
        antialias: low-pass filter when a crop is shrunk, as PIL's bicubic
            resize does (PIL-exact to about one grey level). Default False:
            plain bicubic is about 2.5x faster and the shrink factors of
            multi-crop are small (global crops of 256-500 px images to 224 px
            shrink by at most ~2); see ``benchmarks/pipeline.py``.
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
    antialias: bool = False

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
                f"MultiCropConfig.n_global must be an int >= 1, got {self.n_global!r}; DINO/iBOT/PQCL use n_global=2."
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
        self.global_blur_p = self._per_global("global_blur_p", self.global_blur_p)
        self.solarize_p = self._per_global("solarize_p", self.solarize_p)
        cj = tuple(self.color_jitter)
        if len(cj) != 4 or not all(_is_num(v) and v >= 0 for v in cj):
            raise ValueError(
                "MultiCropConfig.color_jitter must be 4 non-negative numbers "
                f"(brightness, contrast, saturation, hue), got {self.color_jitter!r}"
                "; DINO uses (0.4, 0.4, 0.2, 0.1)."
            )
        if cj[3] > 0.5:
            raise ValueError(f"MultiCropConfig.color_jitter hue strength must be <= 0.5 (a half turn), got {cj[3]!r}.")
        self.color_jitter = tuple(float(v) for v in cj)
        for name in ("mean", "std"):
            v = tuple(getattr(self, name))
            if len(v) != 3 or not all(_is_num(x) for x in v):
                raise ValueError(
                    f"MultiCropConfig.{name} must be 3 numbers (one per RGB channel), got {getattr(self, name)!r}."
                )
            setattr(self, name, tuple(float(x) for x in v))
        if any(x <= 0 for x in self.std):
            raise ValueError(f"MultiCropConfig.std must be > 0 per channel, got {self.std!r}.")
        if not _is_num(self.solarize_threshold) or not (0 <= self.solarize_threshold <= 256):
            raise ValueError(
                "MultiCropConfig.solarize_threshold is on the 0..255 scale; "
                f"got {self.solarize_threshold!r} (DINO uses 128)."
            )

    # -- validation helpers -------------------------------------------------
    @staticmethod
    def _prob(name, p):
        if not _is_num(p) or not (0.0 <= p <= 1.0):
            raise ValueError(f"MultiCropConfig.{name} must be a probability in [0, 1], got {p!r}.")
        return float(p)

    @staticmethod
    def _range(name, value, upper):
        try:
            lo, hi = value
        except (TypeError, ValueError):
            raise ValueError(f"MultiCropConfig.{name} must be a (min, max) pair, got {value!r}.") from None
        ok = _is_num(lo) and _is_num(hi) and 0 < lo <= hi
        if ok and upper is not None:
            ok = hi <= upper
        if not ok:
            bound = f"0 < min <= max <= {upper}" if upper else "0 < min <= max"
            raise ValueError(f"MultiCropConfig.{name} must satisfy {bound}, got {value!r}.")
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
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}.")
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
    """Multi-crop transform, in two stages so that the heavy part compiles.

    * :meth:`sample` (per example, in ``Dataset.map``): samples every box,
      flip and photometric choice of one image from its seed, cuts and
      resizes the crops (bicubic; ``[n, S, S, C]`` per kind, on the input's
      0..255 scale for uint8), and adds iBOT masks and PQCL query
      coordinates when asked. The crops are not yet flipped or coloured.
    * :meth:`finish` (per example, or per batch of examples): flips,
      photometric augmentation and normalisation of the crops, which now
      have static shapes. It compiles with XLA (``pretrain_dataset`` does
      so), which fuses the elementwise ops of the chain and makes it several
      times faster on CPU. The crops of a kind go through one loop, so XLA
      compiles the chain once per crop size (seconds) rather than once per
      crop, and each crop computes only the expensive ops it drew (see
      :class:`~keras_pqcl.data.Photometric`).

    Calling the transform directly (``transform(image, label, seed)``) runs
    both stages on one image, which is what tests and notebooks want.

    Each crop: RandomResizedCrop (box sampled in source pixels) → horizontal
    flip (recorded) → photometric augmentation → ImageNet normalisation.
    Global crop ``g`` uses ``global_blur_p[g]`` and ``solarize_p[g]``; local
    crops use ``local_blur_p`` and no solarize.

    Args:
        config: :class:`MultiCropConfig` (default: DINO).
        photometric: apply colour jitter / grayscale / blur / solarize.
            ``False`` leaves only geometry (useful to test geometry).
        normalize: apply mean/std normalisation. With ``normalize=False`` and
            ``photometric=False``, float inputs pass through with their own
            values, unclipped (e.g. coordinate-encoded test images);
            otherwise crops are clipped to [0, 1].
        record_augmentations: add ``global_augs`` / ``local_augs`` keys.
        masks: :class:`keras_pqcl.data.MaskConfig` to add iBOT block masks
            ``global_masks`` (bool ``[n_global, S_g / p, S_g / p]``).
        queries: :class:`keras_pqcl.data.QueryConfig` to add PQCL
            ``query_coords`` (float32 ``[n_global, n_local, L * L, 2]``) and,
            with ``embed_dim`` set, ``query_tables``
            (``[n_global, n_local, L * L, embed_dim]``).

    Call:
        ``transform(image, label=-1, seed=None)`` with ``image`` uint8
        ``[H, W, 3]`` (scaled to [0, 1]) or float ``[H, W, C]`` (kept as is)
        and ``seed`` an int ``[2]`` tensor (``None`` = non-reproducible
        random seed). Returns the dict described in the module docstring.
    """

    def __init__(
        self, config=None, photometric=True, normalize=True, record_augmentations=False, masks=None, queries=None
    ):
        self.config = cfg = config if config is not None else MultiCropConfig()
        self.photometric = photometric
        self.normalize = normalize
        self.record_augmentations = record_augmentations
        self.masks = masks
        self.queries = queries
        if masks is not None:
            self._mask_grid = masks.grid(cfg.global_size)
        if queries is not None:
            cfg.check_patch_size(queries.patch_size)
            if cfg.n_local < 1:
                raise ValueError(
                    "PQCL queries come from local crops, but n_local=0; set "
                    "MultiCropConfig(n_local=1) or more (the PQCL recipe uses 1)."
                )
            if not queries.flip_correct and cfg.flip_local and cfg.flip_p > 0:
                # Uncorrected coordinates take each local patch where it was cut, so
                # a mirrored local crop would give its tokens mirrored targets; the
                # official pipeline, which flip_correct=False reproduces, never
                # flips local crops.
                raise ValueError(
                    "QueryConfig(flip_correct=False) reproduces the official PQCL "
                    "queries, which assume unflipped local crops, but "
                    f"MultiCropConfig(flip_local=True, flip_p={cfg.flip_p}) flips "
                    "them. Set MultiCropConfig(flip_local=False) as the official "
                    "pipeline does, or QueryConfig(flip_correct=True)."
                )
        # Built eagerly here, never while tracing a map function.
        self._chain = (
            aug.Photometric(
                cfg.color_jitter,
                cfg.jitter_p,
                cfg.jitter_random_order,
                cfg.grayscale_p,
                cfg.blur_sigma,
                aug.make_ops(cfg.use_keras_cv, cfg.solarize_threshold),
            )
            if photometric
            else None
        )

    def _kinds(self):
        cfg = self.config
        yield ("global", cfg.n_global, cfg.global_size, cfg.global_scale, cfg.flip_p, cfg.global_blur_p, cfg.solarize_p)
        if cfg.n_local > 0:
            yield (
                "local",
                cfg.n_local,
                cfg.local_size,
                cfg.local_scale,
                cfg.flip_p if cfg.flip_local else 0.0,
                cfg.local_blur_p,
                0.0,
            )

    def sample(self, image, label=-1, seed=None):
        """Stage 1 for one image: geometry, raw crops and random choices.

        Returns the final dict's geometry keys plus raw, unflipped
        ``*_crops`` (uint8 on the 0..255 scale for a uint8 image, float
        values as they are otherwise) and private ``_*_aug`` entries that
        :meth:`finish` consumes.
        """
        cfg = self.config
        image = tf.convert_to_tensor(image)
        if image.shape.rank != 3:
            raise ValueError(f"MultiCrop expects one image [H, W, C], got shape {image.shape}")
        if image.dtype not in (tf.uint8, tf.float16, tf.float32, tf.float64):
            image = tf.cast(image, tf.float32)
        if seed is None:
            seed = tf.random.uniform([2], maxval=2**62, dtype=tf.int64)
        seeds = crops_lib.split_seed(seed, 8)
        height, width = tf.shape(image)[0], tf.shape(image)[1]

        out = {}
        for k, (kind, num, size, scale, flip_p, blur_p, sol_p) in enumerate(self._kinds()):
            boxes = crops_lib.sample_crop_boxes(seeds[3 * k], height, width, num, scale, cfg.ratio)
            if flip_p > 0:
                flips = tf.random.stateless_uniform([num], seeds[3 * k + 1]) < flip_p
            else:
                flips = tf.zeros([num], tf.bool)
            # uint8 on the 0..255 scale for uint8 input: finish() scales
            # them in its compiled pass, which saves a pass over every pixel
            # here, and uint8 is a quarter of the bytes to batch.
            out[f"{kind}_crops"] = crops_lib.crop_and_resize_many(image, boxes, size, antialias=cfg.antialias)
            out[f"{kind}_boxes"] = boxes
            out[f"{kind}_flips"] = tf.cast(flips, tf.int32)
            if self._chain is not None:
                out[f"_{kind}_aug"] = self._chain.sample(seeds[3 * k + 2], num, blur_p=blur_p, solarize_p=sol_p)
        if self.masks is not None:
            out["global_masks"] = masks_lib.sample_masks(seeds[6], self.masks, cfg.global_size, cfg.n_global)
        if self.queries is not None:
            q = self.queries
            coords = queries_lib.query_coords(
                out["global_boxes"],
                out["global_flips"],
                out["local_boxes"],
                out["local_flips"],
                cfg.global_size // q.patch_size,
                cfg.local_size // q.patch_size,
                flip_correct=q.flip_correct,
            )
            out["query_coords"] = coords
            if q.embed_dim is not None:
                out["query_tables"] = queries_lib.sincos_tables(coords, q.embed_dim)
        out["image_size"] = tf.shape(image)[:2]
        out["label"] = tf.cast(tf.reshape(label, []), tf.int32)
        return out

    def finish(self, example):
        """Stage 2 on :meth:`sample` output: flips, photometric augmentation,
        normalisation. XLA-compilable.

        Works on one example or on a batch of them (every entry with the
        same leading batch axes), so it can run after ``Dataset.batch``.
        """
        cfg = self.config
        out = dict(example)
        clip = self.photometric or self.normalize
        chain = self._chain
        if self.normalize:
            mean = tf.constant(cfg.mean, tf.float32)
            inv_std = tf.constant([1.0 / s for s in cfg.std], tf.float32)

        def one(crop, item):
            flip, params = item

            def pre(c):
                # A select rather than a tf.cond: under XLA a cond copies
                # the crop, while the reversed read fuses into the pass.
                c = tf.where(flip > 0, tf.reverse(c, axis=[1]), c)
                # uint8 crops (of a uint8 image) are on the 0..255 scale.
                c = tf.cast(c, tf.float32) * (1.0 / 255.0 if c.dtype == tf.uint8 else 1.0)
                if clip:
                    # Bicubic overshoots the [0, 1] range a little; PIL
                    # saturates at 0/255 too. (Only raw float geometry
                    # tests skip this.)
                    c = tf.clip_by_value(c, 0.0, 1.0)
                return c

            def post(c):
                return (c - mean) * inv_std if self.normalize else c

            if params:
                return chain.apply_one(crop, params, pre=pre, post=post)
            return post(pre(crop))

        for kind, *_ in self._kinds():
            flips = out[f"{kind}_flips"]  # [..., n]
            params = out.pop(f"_{kind}_aug", None) or {}
            crops = out[f"{kind}_crops"]  # [..., n, S, S, C]
            lead = flips.shape.rank
            flat = tf.reshape(crops, [-1] + crops.shape[lead:].as_list())
            flat_params = {k: tf.reshape(v, [-1] + v.shape[lead:].as_list()) for k, v in params.items()}
            done = aug.map_crops(one, flat, (tf.reshape(flips, [-1]), flat_params))
            done = tf.reshape(done, tf.shape(crops))
            done.set_shape(crops.shape)
            out[f"{kind}_crops"] = done
            if self.record_augmentations:
                out[f"{kind}_augs"] = aug.Photometric.applied(params, tf.shape(flips))
        return out

    def __call__(self, image, label=-1, seed=None):
        return self.finish(self.sample(image, label, seed))
