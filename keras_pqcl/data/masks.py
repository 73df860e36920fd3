"""iBOT masked-image-modelling masks, sampled inside ``tf.data``.

The algorithm is iBOT's per-crop mask generator (Zhou et al., "iBOT: Image
BERT Pre-Training with Online Tokenizer", ICLR 2022), whose block-wise
masking comes from BEiT (Bao et al., "BEiT: BERT Pre-Training of Image
Transformers", ICLR 2022). This is a fresh TensorFlow version.

A mask is a bool ``[H', W']`` grid over the patches of one crop (True =
masked: the student sees the mask token there). Like ``crops.py`` it uses
only ``tf.random.stateless_*`` ops seeded by an int ``[2]`` tensor, so it runs
in ``tf.data.Dataset.map`` under any ``KERAS_BACKEND`` and a seed always gives
the same mask.

Block masking is iBOT's two nested loops: rounds (each adds one rectangle)
of up to 10 retries. A failed retry leaves the mask unchanged, so the 10
retries of a round are evaluated together and the first acceptable one is
kept, which is the same as trying them in order. Only rounds are sequential,
so the ``tf.while_loop`` runs a handful of iterations per mask. Round ``k``
reads row ``k`` of one table of uniforms (:func:`block_draws`), which lets
tests replay the loop in NumPy on the same draws.
"""

import dataclasses
import math
import numbers
from typing import Optional, Tuple, Union

import tensorflow as tf

from keras_pqcl.data.crops import split_seed

__all__ = [
    "MaskConfig",
    "block_mask",
    "block_draws",
    "random_mask",
    "sample_mask",
    "sample_mask_ratio",
    "sample_masks",
]

NUM_TRIES = 10  # retries per round, as in BEiT / iBOT


def _ratio_lists(ratio, ratio_var, where="ratio"):
    """Validated ``(means, vars)`` tuples of floats of equal length."""
    means = tuple(ratio) if isinstance(ratio, (tuple, list)) else (ratio,)
    var = ratio_var if isinstance(ratio_var, (tuple, list)) else ((ratio_var,) * len(means))
    if not means or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in means + tuple(var)):
        raise ValueError(
            f"{where}: ratio must be a float or a non-empty tuple of floats and "
            f"ratio_var likewise, got ratio={ratio!r}, ratio_var={ratio_var!r}."
        )
    if len(var) != len(means):
        raise ValueError(
            f"{where}: ratio_var must be a scalar or have one entry per ratio "
            f"entry ({len(means)}), got {ratio_var!r}; e.g. ratio=(0.0, 0.3), "
            "ratio_var=(0.0, 0.2)."
        )
    for m, v in zip(means, var):
        if v < 0 or m - v < 0 or m + v >= 1:
            raise ValueError(
                f"{where}: every ratio +- ratio_var must lie in [0, 1) with "
                f"ratio_var >= 0, got ratio={m!r}, ratio_var={v!r}; iBOT uses "
                "ratio=(0.0, 0.3), ratio_var=(0.0, 0.2)."
            )
    return tuple(float(m) for m in means), tuple(float(v) for v in var)


@dataclasses.dataclass
class MaskConfig:
    """iBOT masked-image-modelling masks (defaults = iBOT recipe).

    Attributes:
        patch_size: ViT patch side in pixels; the mask grid of a crop of side
            ``s`` is ``s // patch_size``. Default 16.
        ratio: mean masked fraction, a float or a tuple of means; one entry
            is picked uniformly per crop. Default (0.0, 0.3).
        ratio_var: half-width of the uniform around each mean (scalar or one
            per entry; 0 = exactly the mean). Default (0.0, 0.2), so half the
            crops are unmasked and the rest get r ~ U(0.1, 0.5).
        shape: "block" (BEiT block-wise) or "rand" (exactly floor(r*H'*W')
            random patches). Default "block".
        min_aspect: block aspect ratios are log-uniform in
            (min_aspect, 1 / min_aspect). Default 0.3.
        min_area: lower bound of the block area draw in patches; None =
            (min(H', W') // 3) ** 2, i.e. 16 on a 14x14 grid. Default None.

    ``ratio`` and ``ratio_var`` are stored as tuples of equal length.
    """

    patch_size: int = 16
    ratio: Union[float, Tuple[float, ...]] = (0.0, 0.3)
    ratio_var: Union[float, Tuple[float, ...]] = (0.0, 0.2)
    shape: str = "block"
    min_aspect: float = 0.3
    min_area: Optional[int] = None

    def __post_init__(self):
        if (
            not isinstance(self.patch_size, numbers.Integral)
            or isinstance(self.patch_size, bool)
            or self.patch_size <= 0
        ):
            raise ValueError(
                f"MaskConfig.patch_size must be a positive int, got {self.patch_size!r}; ViT-S/16 uses patch_size=16."
            )
        self.ratio, self.ratio_var = _ratio_lists(self.ratio, self.ratio_var, where="MaskConfig")
        if self.shape not in ("block", "rand"):
            raise ValueError(
                f"MaskConfig.shape must be 'block' or 'rand', got {self.shape!r}; iBOT uses shape='block'."
            )
        if not isinstance(self.min_aspect, numbers.Real) or not 0 < self.min_aspect <= 1:
            raise ValueError(
                f"MaskConfig.min_aspect must be in (0, 1], got {self.min_aspect!r}; iBOT uses min_aspect=0.3."
            )
        if self.min_area is not None and (not isinstance(self.min_area, numbers.Integral) or self.min_area < 0):
            raise ValueError(
                f"MaskConfig.min_area must be None or an int >= 0, got "
                f"{self.min_area!r}; None means (min(H', W') // 3) ** 2."
            )

    def grid(self, crop_size):
        """``(H', W')`` patch grid of a crop (int side or ``(height, width)``)."""
        sizes = (crop_size, crop_size) if isinstance(crop_size, numbers.Integral) else tuple(crop_size)
        p = self.patch_size
        for s in sizes:
            if s % p or s <= 0:
                lo, hi = max(p, s // p * p), (s // p + 1) * p
                raise ValueError(
                    f"crop size {s} is not a positive multiple of MaskConfig."
                    f"patch_size={p}; use {lo if lo == hi else f'{lo} or {hi}'}."
                )
        return sizes[0] // p, sizes[1] // p


def sample_mask_ratio(seed, ratio=(0.0, 0.3), ratio_var=(0.0, 0.2), shape=()):
    """Draws mask ratios: U(mu - v, mu + v) per entry, then one entry at random.

    Args:
        seed: int tensor ``[2]``.
        ratio, ratio_var: as in :class:`MaskConfig`.
        shape: shape of independent draws; default one scalar.

    Returns:
        float32 tensor of ``shape``.
    """
    means, var = _ratio_lists(ratio, ratio_var, where="sample_mask_ratio")
    n = len(means)
    u = tf.random.stateless_uniform(list(shape) + [n + 1], seed)
    # v = 0 gives mu exactly, so fixed entries need no branch.
    values = tf.constant(means) - tf.constant(var) + 2.0 * tf.constant(var) * u[..., :n]
    pick = tf.minimum(tf.cast(u[..., n] * n, tf.int32), n - 1)
    return tf.gather(values, pick, batch_dims=len(shape))


def _targets(grid_h, grid_w, ratio):
    # float64 like Python's loop, so rounding decisions match it.
    r = tf.cast(tf.convert_to_tensor(ratio, dtype_hint=tf.float64), tf.float64)
    return tf.reshape(r, [-1]) * (int(grid_h) * int(grid_w)), r.shape.rank == 0


def block_draws(seed, grid_h, grid_w, ratio):
    """The uniforms :func:`block_mask` consumes, for replaying it elsewhere.

    Round ``k``, retry ``j`` of mask ``i`` uses ``[k, i, j]``: (area,
    log-aspect, top, left), each in [0, 1). Each round that goes on adds at
    least one patch and the total stays within the target, so
    ``floor(max(ratio) * H' * W') + 1`` rounds always suffice; they are drawn
    by one Philox call up front rather than per round inside the loop.

    Returns:
        float64 tensor ``[rounds, n, NUM_TRIES, 4]`` (n = 1 for a scalar ratio).
    """
    return _draws(seed, _targets(grid_h, grid_w, ratio)[0])


def _draws(seed, target):
    rounds = tf.cast(tf.floor(tf.maximum(tf.reduce_max(target), 0.0)), tf.int32) + 1
    return tf.random.stateless_uniform(
        tf.stack([rounds, tf.size(target), NUM_TRIES, 4]), tf.cast(seed, tf.int64), dtype=tf.float64
    )


def block_mask(seed, grid_h, grid_w, ratio, min_aspect=0.3, min_area=None):
    """BEiT/iBOT block-wise mask covering at most ``ratio * H' * W'`` patches.

    Rectangles are added until a round of 10 retries adds nothing or the
    target is reached. A rectangle is accepted only if it adds at most the
    remaining budget, so the count never exceeds ``floor(ratio * H' * W')``;
    it usually ends a few patches short of it.

    Args:
        seed: int tensor ``[2]``.
        grid_h, grid_w: Python ints, the patch grid.
        ratio: float scalar (tensor or Python float), the masked fraction; or
            a float ``[n]`` tensor for ``n`` independent masks in one loop
            (much cheaper in ``tf.data`` than ``n`` calls).
        min_aspect: aspect ratios are log-uniform in (min_aspect, 1/min_aspect).
        min_area: lower end of the area draw; None = (min(H', W') // 3) ** 2.

    Returns:
        bool tensor ``[grid_h, grid_w]``, or ``[n, grid_h, grid_w]``.
    """
    H, W = int(grid_h), int(grid_w)
    low = float((min(H, W) // 3) ** 2 if min_area is None else min_area)
    target, scalar = _targets(H, W, ratio)
    u = _draws(seed, target)
    # All that does not depend on the masks is computed for every round before
    # the loop, and shaped [rounds, n, tries, side, 1] so that the body needs
    # no reshapes: tf.data pays about 1 us per op per iteration. Sizes stay
    # float64 (integer valued) to save casts.
    u_area = u[:, :, :, 0, None, None]
    log_lo = math.log(min_aspect)
    aspect = tf.exp(log_lo - 2.0 * log_lo * u[..., 1])
    # (h, w) = round(sqrt(area * (aspect, 1 / aspect))): one op for both sides.
    hw_scale = tf.stack([aspect, 1.0 / aspect], axis=-1)[..., None]
    u_pos = u[..., 2:, None]
    grid = tf.constant([[H], [W]], tf.float64)
    index = tf.range(max(H, W), dtype=tf.float64)
    target = target[:, None, None, None]

    def body(k, masks, count):  # masks [n, 1, H, W]
        budget = target - count
        # Python's random.uniform(a, b) = a + (b - a) * u, also when a > b.
        area = low + (budget - low) * tf.gather(u_area, k)  # [n, tries, 1, 1]
        hw = tf.round(tf.sqrt(area * tf.gather(hw_scale, k)))  # [n, tries, 2, 1]
        span = grid - hw
        # randint[0, span] inclusive; min() guards against u * (span + 1)
        # rounding up to span + 1.
        pos = tf.minimum(tf.floor(tf.gather(u_pos, k) * (span + 1.0)), span)
        offset = index - pos
        inside = (offset >= 0.0) & (offset < hw)  # [n, tries, 2, max(H, W)]
        rect = inside[:, :, 0, :H, None] & inside[:, :, 1, None, :W]
        overlap = tf.reduce_sum(tf.cast(rect & masks, tf.float64), axis=[2, 3], keepdims=True)
        new = tf.reduce_prod(hw, axis=2, keepdims=True) - overlap
        # span > 0 is iBOT's h < H' and w < W'.
        ok = tf.reduce_all(span > 0.0, axis=2, keepdims=True) & (new > 0.0) & (new <= budget)
        # The first accepted retry of each mask (retries are tried in order).
        first = ok & (tf.cumsum(tf.cast(ok, tf.int32), axis=1) == 1)
        masks = masks | tf.reduce_any(rect & first, axis=1, keepdims=True)
        # A round that adds nothing ends that mask: an infinite count leaves
        # no budget, so later rounds cannot touch it.
        added = tf.reduce_sum(tf.where(first, new, 0.0), axis=1, keepdims=True)
        count = tf.where(added > 0.0, count + added, math.inf)
        return k + 1, masks, count

    n = tf.size(target)
    _, masks, _ = tf.while_loop(
        lambda k, masks, count: tf.reduce_any(count < target),
        body,
        (tf.constant(0), tf.zeros(tf.stack([n, 1, H, W]), tf.bool), tf.zeros_like(target)),
        maximum_iterations=tf.shape(u)[0],
    )
    masks = tf.reshape(masks, tf.stack([n, H, W]))
    masks.set_shape(target.shape[:1].concatenate([H, W]))
    return masks[0] if scalar else masks


def random_mask(seed, grid_h, grid_w, ratio):
    """Exactly ``floor(ratio * H' * W')`` masked patches at uniformly random
    positions. ``ratio`` is a scalar or ``[n]`` as in :func:`block_mask`.

    Returns:
        bool tensor ``[grid_h, grid_w]``, or ``[n, grid_h, grid_w]``.
    """
    H, W = int(grid_h), int(grid_w)
    target, scalar = _targets(H, W, ratio)
    count = tf.cast(tf.floor(target), tf.int32)[:, None]
    scores = tf.random.stateless_uniform(tf.stack([tf.size(target), H * W]), seed)
    # Rank of each patch in a random permutation: an exact count even on ties.
    rank = tf.argsort(tf.argsort(scores, axis=-1, stable=True), axis=-1, stable=True)
    masks = tf.reshape(rank < count, tf.stack([-1, H, W]))
    masks.set_shape(target.shape.concatenate([H, W]))
    return masks[0] if scalar else masks


def sample_masks(seed, config, crop_size, num):
    """``num`` independent crop masks, each with its own ratio draw.

    Args:
        seed: int tensor ``[2]``.
        config: :class:`MaskConfig`.
        crop_size: crop side in pixels, or ``(height, width)``.
        num: Python int, number of crops.

    Returns:
        bool tensor ``[num, H', W']`` with ``(H', W') = config.grid(crop_size)``.
    """
    H, W = config.grid(crop_size)
    seeds = split_seed(seed, 2)
    ratios = sample_mask_ratio(seeds[0], config.ratio, config.ratio_var, [num])
    if config.shape == "rand":
        return random_mask(seeds[1], H, W, ratios)
    return block_mask(seeds[1], H, W, ratios, config.min_aspect, config.min_area)


def sample_mask(seed, config, crop_size):
    """One crop's mask: ``sample_masks(seed, config, crop_size, 1)[0]``,
    bool ``[H', W']``."""
    return sample_masks(seed, config, crop_size, 1)[0]
