"""MCL montages: 8 augmented views per image, tiled into multi-scale montages per batch.

MCL (Guo et al. 2023) contrasts each image's full view with *sub-images*:
copies of other views of the batch images downsampled by ``r`` = 2, 4 or 8 and tiled
``r x r`` into canvases of the full view's size. A sub-image downsampled by ``r`` then covers
exactly one ``t x t`` block of FPN cells at stride ``32 / r`` (``t = image_size / 32``, 7 at
224 px), so the model pools its region by a reshape.

Views (per image, :meth:`MontageConfig.multicrop_config`): RandomResizedCrop (scale 0.2-1) →
flip → colour jitter (0.4, 0.4, 0.2, 0.1; p 0.8) → grayscale (p 0.2) → blur → solarize →
ImageNet normalisation. The first half of the views use pipeline A (blur p 1, solarize p 0),
the second half pipeline B (blur p 0.1, solarize p 0.2). Branch ``q`` uses view ``j`` for its
``j``-th level and branch ``k`` view ``L + j`` (``L`` = views per branch = 1 + number of
montage ratios, 4 by default), so every level of every branch gets a fresh augmentation.

Montages (per batch of ``N`` images, :class:`Montage`), for each ratio ``r`` with ``B_r``
montages and ``r^2 B_r`` slots:

1. downsample the ``N`` views of the level by nearest neighbour, ``x[:, ::r, ::r]`` (what
   PyTorch's default nearest interpolation at scale ``1/r`` picks; TF's "nearest" resize uses
   half-pixel centres and would pick another phase);
2. draw a random permutation of the ``r^2 B_r`` slots and take it modulo ``N``: the source
   image of each slot;
3. slot ``s`` of montage ``b`` is at row ``s // r``, column ``s % r`` (row-major);
4. the sources are listed montage-major, then row-major: the order of the model's tiles.

The two branches draw independent permutations. With the reference's ``N`` (a multiple of
32) ``B_r = uses_r N / r^2``: ``N/4``, ``N/16`` and ``N/32`` montages, every image filling one
slot at r = 2 and 4 and two at r = 8. For other ``N``, ``B_r = ceil(uses_r N / r^2)`` (at
least 1) and the ``r^2 B_r mod N`` rule spreads the extra slots over the images.

Batch entries (:func:`mcl_dataset`), ``S`` = ``image_size``, ``V`` = views per image:

=========================  ===============================  =================================
key                        shape                            what
=========================  ===============================  =================================
``full_images``            ``[N, 2, S, S, 3]`` float32      the full views of branch q, k
                                                            (views 0 and L): level 0 (P5)
``montages_r{r}``          ``[B_r, 2, S, S, 3]`` float32    montages of ratio r, per branch
``montage_sources_r{r}``   ``[r^2 B_r, 2]`` int32           source image (0..N-1) per slot
``view_boxes``             ``[N, V, 4]`` float32            crop boxes (top, left, h, w)
``view_flips``             ``[N, V]`` int32                 1 where the view was mirrored
``image_size``, ``label``  ``[N, 2]``, ``[N]`` int32        source size, class (-1 if none)
``views``                  ``[N, V, S, S, 3]`` float32      all views (``keep_views=True``)
=========================  ===============================  =================================

``r`` runs over ``MontageConfig.ratios`` (2, 4, 8). The montage entries have their own
leading axes (``B_r``, ``r^2 B_r``), not ``N``: the montages are a function of the whole
batch. The pipeline therefore suits one device, or JAX's one-program data parallelism
with ``B_r`` divisible by the device count; ``tf.distribute`` replicas would each need their
own montages (not supported).
"""

import dataclasses
import math
from typing import Tuple

import tensorflow as tf

from keras_pqcl.data import augment as aug
from keras_pqcl.data.multicrop import MultiCrop, MultiCropConfig
from keras_pqcl.data.pipeline import batched_examples, finalize, keyed_map, plan_stream

__all__ = ["MontageConfig", "MontageLevel", "Montage", "assemble_montages", "mcl_dataset"]


@dataclasses.dataclass(frozen=True)
class MontageLevel:
    """Static layout of one pyramid level for a batch of ``N`` images.

    Attributes:
        level: index ``i = log2(r)``: 0 is the full image (P5), 3 the 8x montages (P2).
        ratio: downsampling ratio ``r``.
        num_montages: ``B_r`` (``N`` for level 0: the images themselves).
        num_slots: ``r^2 B_r``: sub-images, hence region embeddings, of the level.
        view_q, view_k: the view index each branch uses for this level.
    """

    level: int
    ratio: int
    num_montages: int
    num_slots: int
    view_q: int
    view_k: int


@dataclasses.dataclass
class MontageConfig:
    """MCL's views and montages (defaults: the official code).

    Attributes:
        image_size: side of every view and montage; a multiple of 32 so that each
            sub-image covers whole FPN cells (224: 7 x 7 cells per sub-image).
        ratios: downsampling ratios of the montage levels (2, 4, 8 -> P4, P3, P2). Any
            subset of them works (e.g. ``(2,)`` for small runs; ``()``: full images only).
        uses: how often each image fills a slot, per ratio ((1, 1, 2): 8x8 montages use
            every image twice). Left at the default with other ratios, it keeps each
            ratio's default count (e.g. ``ratios=(2, 8)`` -> ``uses=(1, 2)``).
        scale: RandomResizedCrop area range (0.2, 1.0).
        ratio: aspect-ratio range (3/4, 4/3).
        flip_p: horizontal flip probability (0.5).
        color_jitter: brightness, contrast, saturation, hue (0.4, 0.4, 0.2, 0.1).
        jitter_p: 0.8. jitter_random_order: torchvision's random order (True).
        grayscale_p: 0.2.
        blur_p: blur probability of pipeline A and pipeline B ((1.0, 0.1)).
        solarize_p: solarize probability of pipeline A and B ((0.0, 0.2)).
        blur_sigma: (0.1, 2.0) pixels. solarize_threshold: 128 (0..255 scale).
        mean, std: ImageNet normalisation.
        use_keras_cv, antialias: as in :class:`~keras_pqcl.data.MultiCropConfig`.
    """

    image_size: int = 224
    ratios: Tuple[int, ...] = (2, 4, 8)
    uses: Tuple[int, ...] = (1, 1, 2)
    scale: Tuple[float, float] = (0.2, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    color_jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    jitter_random_order: bool = True
    grayscale_p: float = 0.2
    blur_p: Tuple[float, float] = (1.0, 0.1)
    solarize_p: Tuple[float, float] = (0.0, 0.2)
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_threshold: float = 128.0
    mean: Tuple[float, float, float] = aug.IMAGENET_MEAN
    std: Tuple[float, float, float] = aug.IMAGENET_STD
    use_keras_cv: bool = True
    antialias: bool = False

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 32:
            raise ValueError(
                f"MontageConfig.image_size must be a positive multiple of 32 (the backbone's "
                f"stride, so that sub-images cover whole FPN cells); got {size!r}. The paper "
                "uses 224."
            )
        ratios = tuple(int(r) for r in self.ratios)
        if any(r not in (2, 4, 8) for r in ratios) or len(set(ratios)) != len(ratios):
            raise ValueError(
                f"MontageConfig.ratios must be distinct values among 2, 4, 8 (P4, P3, P2); got {self.ratios!r}."
            )
        uses = tuple(int(u) for u in self.uses)
        if len(uses) == 3 and len(ratios) != 3 and tuple(self.uses) == (1, 1, 2):
            # The default uses follow the default ratios: keep those of the chosen ratios.
            uses = tuple({2: 1, 4: 1, 8: 2}[r] for r in ratios)
        if len(uses) != len(ratios) or any(u < 1 for u in uses):
            raise ValueError(f"MontageConfig.uses needs one positive count per ratio {ratios}; got {self.uses!r}.")
        self.ratios, self.uses = ratios, uses
        for name in ("blur_p", "solarize_p"):
            value = tuple(getattr(self, name))
            if len(value) != 2:
                raise ValueError(f"MontageConfig.{name} is (pipeline A, pipeline B); got {value!r}.")
            setattr(self, name, tuple(float(v) for v in value))
        # The remaining fields are checked by MultiCropConfig.
        self.multicrop_config()

    @property
    def views_per_branch(self):
        """Full view plus one view per montage ratio (4 by default)."""
        return 1 + len(self.ratios)

    @property
    def num_views(self):
        """Views per image: 8 by default (4 of pipeline A, then 4 of pipeline B)."""
        return 2 * self.views_per_branch

    @property
    def tile_size(self):
        """Side, in FPN cells, of every sub-image on its level (7 at 224 px)."""
        return self.image_size // 32

    def multicrop_config(self):
        """The :class:`MultiCropConfig` that draws the views (as ``n_global`` views)."""
        k = self.views_per_branch
        shared = {f.name for f in dataclasses.fields(MultiCropConfig)} - {"solarize_p"}  # (A, B) here, per view there
        args = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in shared}
        args = {name: tuple(v) if isinstance(v, list) else v for name, v in args.items()}
        return MultiCropConfig(
            global_size=self.image_size,
            local_size=self.image_size,
            n_global=self.num_views,
            n_local=0,
            global_scale=tuple(self.scale),
            global_blur_p=(self.blur_p[0],) * k + (self.blur_p[1],) * k,
            solarize_p=(self.solarize_p[0],) * k + (self.solarize_p[1],) * k,
            **args,
        )

    def layout(self, num_images):
        """The :class:`MontageLevel` of each level, level 0 first, for ``num_images`` = N."""
        n = int(num_images)
        k = self.views_per_branch
        levels = [MontageLevel(0, 1, n, n, 0, k)]
        for j, (r, uses) in enumerate(zip(self.ratios, self.uses), start=1):
            montages = max(1, math.ceil(uses * n / (r * r)))
            levels.append(MontageLevel(int(math.log2(r)), r, montages, montages * r * r, j, k + j))
        return tuple(levels)


def assemble_montages(images, sources, ratio):
    """Tiles ``images[sources]``, each downsampled by ``ratio``, into montages.

    Args:
        images: ``[N, S, S, C]``, one view of every image of the batch.
        sources: int ``[r^2 B]``: the source image of each slot, montage-major then
            row-major.
        ratio: ``r`` (Python int dividing ``S``).

    Returns:
        ``[B, S, S, C]``: slot ``s`` of montage ``b`` holds ``images[sources[b r^2 + s],
        ::r, ::r]`` at rows ``(s // r) S/r ...`` and columns ``(s % r) S/r ...``.
    """
    r = int(ratio)
    small = images[:, ::r, ::r, :]  # nearest neighbour, no phase shift
    tiles = tf.gather(small, sources)  # [r^2 B, S/r, S/r, C]
    h, w, c = small.shape[1], small.shape[2], small.shape[3]
    grid = tf.reshape(tiles, [-1, r, r, h, w, c])  # [B, row, col, y, x, C]
    grid = tf.transpose(grid, [0, 1, 3, 2, 4, 5])  # [B, row, y, col, x, C]
    return tf.reshape(grid, [-1, r * h, r * w, c])


class Montage:
    """Builds a batch's montages from its views (runs after ``Dataset.batch``).

    Args:
        config: :class:`MontageConfig`.
        keep_views: keep the ``views`` entry ``[N, V, S, S, 3]`` (tests, visualisation).

    Call:
        ``montage(batch, seed)`` with ``batch["views"]`` ``[N, V, S, S, C]`` (static ``N``)
        and ``seed`` an int ``[2]`` tensor. Returns the batch with ``full_images``,
        ``montages_r{r}`` and ``montage_sources_r{r}`` added (module docstring).
    """

    def __init__(self, config=None, keep_views=False):
        self.config = config if config is not None else MontageConfig()
        self.keep_views = keep_views

    def __call__(self, batch, seed):
        out = dict(batch)
        views = out["views"] if self.keep_views else out.pop("views")
        n = views.shape[0]
        if n is None:
            raise ValueError("Montage needs a static batch size: batch with drop_remainder=True.")
        if views.shape[1] != self.config.num_views:
            raise ValueError(f"Montage expects {self.config.num_views} views per image, got {views.shape[1]}.")
        levels = self.config.layout(n)
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2 * len(levels))
        out["full_images"] = tf.stack([views[:, levels[0].view_q], views[:, levels[0].view_k]], axis=1)
        for j, lvl in enumerate(levels[1:], start=1):
            montages, sources = [], []
            for b, view in enumerate((lvl.view_q, lvl.view_k)):
                u = tf.random.stateless_uniform([lvl.num_slots], seeds[2 * j + b])
                src = tf.math.floormod(tf.argsort(u, stable=True), n)  # randperm(slots) % N
                src = tf.cast(src, tf.int32)
                montages.append(assemble_montages(views[:, view], src, lvl.ratio))
                sources.append(src)
            out[f"montages_r{lvl.ratio}"] = tf.stack(montages, axis=1)
            out[f"montage_sources_r{lvl.ratio}"] = tf.stack(sources, axis=1)
        return out


def mcl_dataset(
    data="synthetic_scenes",
    config=None,
    batch_size=128,
    shuffle=True,
    seed=None,
    repeat=False,
    num_parallel_calls=tf.data.AUTOTUNE,
    *,
    photometric=True,
    normalize=True,
    keep_views=False,
    jit_compile=True,
    return_info=False,
    source_kwargs=None,
    epochs=None,
    steps_per_epoch=None,
    start=(0, 0),
):
    """The batched MCL pre-training dataset: views per image, montages per batch.

    Order: source (shuffled) → repeat → per example: ``V`` views (MultiCrop with
    ``n_global = V``, photometric stage XLA-compiled) → ``batch(N, drop_remainder=True)`` →
    per batch: montages (:class:`Montage`) → prefetch. Every random draw is stateless and
    seeded from ``Dataset.random(seed)`` (per example for the views, per batch for the
    permutations), so a seeded pipeline is reproducible and each epoch draws anew. With
    ``epochs=E`` the seeds come from the resumable stream instead (per example from
    ``(seed, epoch, position)``, per batch from ``(seed, epoch, step)``, see
    :mod:`keras_pqcl.data.pipeline`).

    Args:
        data: anything :func:`keras_pqcl.data.pretrain_dataset` accepts (a folder,
            ``"synthetic_scenes[:N[:S]]"``, ``"tfds:NAME"``, NumPy arrays, or a
            ``tf.data.Dataset`` of ``(image [H, W, 3], label)``).
        config: :class:`MontageConfig` (default: the paper's).
        batch_size: ``N``, unique images per batch (128 per device in the paper; a
            multiple of 32 gives the reference's exact montage counts).
        shuffle, seed, repeat, num_parallel_calls: as in ``pretrain_dataset``.
        photometric: False keeps geometry only (crops and flips).
        normalize: False skips the mean/std normalisation (with ``photometric=False``,
            float inputs then pass through unclipped: coordinate-encoded test images).
        keep_views: also return every view as ``views``.
        jit_compile: compile the photometric stage with XLA.
        return_info: also return the source's :class:`~keras_pqcl.data.SourceInfo`.
        source_kwargs: extra ``load_source`` arguments.
        epochs, steps_per_epoch, start: the resumable stream, as in ``pretrain_dataset``:
            ``E S - start[0] S - start[1]`` batches (static cardinality), batch ``(e, s)``
            the same whatever ``start`` the stream was built with.

    Returns:
        ``tf.data.Dataset`` of dicts (entries in the module docstring), or
        ``(dataset, info)`` with ``return_info=True``.
    """
    config = config if config is not None else MontageConfig()
    if not isinstance(config, MontageConfig):
        raise TypeError(f"config must be a MontageConfig, got {type(config).__name__}.")
    transform = MultiCrop(config.multicrop_config(), photometric=photometric, normalize=normalize)

    def views_only(out):
        return {
            "views": out["global_crops"],
            "view_boxes": out["global_boxes"],
            "view_flips": out["global_flips"],
            "image_size": out["image_size"],
            "label": out["label"],
        }

    ds, info = batched_examples(
        data,
        transform,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        repeat=repeat,
        num_parallel_calls=num_parallel_calls,
        jit_compile=jit_compile,
        source_kwargs=source_kwargs,
        select=views_only,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        start=start,
    )
    montage = Montage(config, keep_views=keep_views)
    # The stream's per-batch keys; batched_examples has checked these arguments already.
    plan = plan_stream(seed, epochs, steps_per_epoch, start, info.num_examples, batch_size)

    @tf.autograph.experimental.do_not_convert
    def to_montages(batch, key):
        # Second seed word 1: independent of the examples' streams (second word 0).
        return montage(batch, tf.stack([key, tf.ones([], tf.int64)]))

    keys = plan.batch_keys() if plan is not None else None
    ds = finalize(keyed_map(ds, to_montages, seed, num_parallel_calls, keys=keys), seed)
    return (ds, info) if return_info else ds
