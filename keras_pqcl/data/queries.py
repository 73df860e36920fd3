"""PQCL positional queries: where each local-crop patch lies in each global view.

PQCL (Positional-Query Contrastive Learning) asks the student, given a global
view, to predict the teacher's output for every patch of a local crop, from a
query token that carries only the patch's position in that global view. This
module computes those positions from the crop boxes that the multi-crop
pipeline records:

for local crop ``l`` (box ``i_l, j_l, h_l, w_l`` in source pixels, grid
``L x L``) and global view ``g`` (box ``i_g, j_g, h_g, w_g``, grid ``G x G``),
in units of global patches with the top-left-corner convention::

    k_x = w_g / G             (source pixels per global patch, horizontally)
    dx  = (j_l - j_g) / k_x   s_x = (w_l / L) / k_x
    x(a, b) = dx + b * s_x    (same for y with rows: i, h and a)

Nothing is clipped: a local patch outside the global view gets a coordinate
below 0 or above ``G`` and the sin-cos embedding extrapolates.

Flips. The official code records the boxes before the horizontal flip of the
global views and ignores it, so half of its queries point at the mirrored
place. With ``flip_correct=True`` (the default) a flipped global view maps
``x -> G - x - s_x`` (the patch's left edge in the mirrored frame), and a
flipped local crop reads its patch columns right to left; the query order stays
row-major over the local crop's *output* tokens, which is the order of the
teacher's patch tokens. ``flip_correct=False`` reproduces the official code,
which never flips local crops: it therefore requires
``MultiCropConfig(flip_local=False)`` (or ``flip_p=0``), and
:class:`~keras_pqcl.data.MultiCrop` raises otherwise.

Reference: Zhang et al., "Patch-level Contrastive Learning via Positional Query
for Visual Pre-training", ICML 2023 (PQCL).
"""

import dataclasses
import numbers
from typing import Optional

import tensorflow as tf
import tensorflow.experimental.numpy as tnp

from keras_pqcl.layers import sincos as sincos_lib

__all__ = ["QueryConfig", "query_coords", "sincos_tables"]


@dataclasses.dataclass
class QueryConfig:
    """Positional-query tables for PQCL (defaults = the PQCL code, fixed).

    Attributes:
        patch_size: the backbone's patch size; the global and local crop
            sizes must be multiples of it. Default 16.
        flip_correct: account for horizontal flips (see the module
            docstring). Default True; False reproduces the official code and
            needs unflipped local crops, as the official pipeline has:
            ``MultiCropConfig(flip_local=False)`` (or ``flip_p=0``), else
            :class:`~keras_pqcl.data.MultiCrop` raises.
        embed_dim: when set, the pipeline also emits ``query_tables``, the
            2-D sin-cos embedding of the coordinates (divisible by 4; 384 for
            ViT-S). Default None: only ``query_coords`` (the model embeds
            them, which costs nothing and keeps batches small).
    """

    patch_size: int = 16
    flip_correct: bool = True
    embed_dim: Optional[int] = None

    def __post_init__(self):
        if (
            not isinstance(self.patch_size, numbers.Integral)
            or isinstance(self.patch_size, bool)
            or self.patch_size <= 0
        ):
            raise ValueError(
                f"QueryConfig.patch_size must be a positive int, got "
                f"{self.patch_size!r}; use the backbone's patch size (e.g. 16)."
            )
        if self.embed_dim is not None and (
            not isinstance(self.embed_dim, numbers.Integral) or self.embed_dim <= 0 or self.embed_dim % 4
        ):
            raise ValueError(
                f"QueryConfig.embed_dim must be a positive multiple of 4 (the "
                f"2-D sin-cos layout), got {self.embed_dim!r}; use the "
                "backbone's embed_dim (384 for ViT-S) or None."
            )


def query_coords(global_boxes, global_flips, local_boxes, local_flips, global_grid, local_grid, flip_correct=True):
    """Coordinates of every local-crop patch in every global view's grid.

    Args:
        global_boxes: float ``[G, 4]`` ``(top, left, height, width)`` in source
            pixels, one per global view.
        global_flips: int/bool ``[G]``, 1 where the view was mirrored.
        local_boxes: float ``[N, 4]``, one per local crop.
        local_flips: int/bool ``[N]``.
        global_grid: Python int, patches per side of a global view.
        local_grid: Python int, patches per side of a local crop (``L``).
        flip_correct: see the module docstring.

    Returns:
        float32 ``[G, N, L * L, 2]``: ``(x, y)`` = (column, row) of the
        top-left corner of local patch ``a * L + b`` in units of global
        patches of view ``g``.
    """
    gb = tf.cast(global_boxes, tf.float32)[:, None, :]  # [G, 1, 4]
    lb = tf.cast(local_boxes, tf.float32)[None, :, :]  # [1, N, 4]
    px_x = gb[..., 3] / global_grid  # [G, 1]
    px_y = gb[..., 2] / global_grid
    dx = (lb[..., 1] - gb[..., 1]) / px_x  # [G, N]
    dy = (lb[..., 0] - gb[..., 0]) / px_y
    sx = lb[..., 3] / local_grid / px_x
    sy = lb[..., 2] / local_grid / px_y

    steps = tf.range(local_grid, dtype=tf.float32)
    cols = tf.tile(steps[None, :], [local_grid, 1])  # b of token a*L+b
    rows = tf.tile(steps[:, None], [1, local_grid])  # a
    cols, rows = tf.reshape(cols, [-1]), tf.reshape(rows, [-1])
    if flip_correct:
        # A mirrored local crop shows its source columns right to left.
        lflip = tf.cast(local_flips, tf.bool)[None, :, None]  # [1, N, 1]
        cols = tf.where(lflip, local_grid - 1.0 - cols, cols)
    x = dx[..., None] + cols * sx[..., None]  # [G, N, L*L]
    y = dy[..., None] + rows * sy[..., None]
    if flip_correct:
        gflip = tf.cast(global_flips, tf.bool)[:, None, None]
        x = tf.where(gflip, global_grid - x - sx[..., None], x)
    return tf.stack([x, y], axis=-1)


def sincos_tables(coords, dim):
    """2-D sin-cos embedding (MAE layout) of ``coords [..., 2]`` = (x, y).

    With ``F = dim / 4`` and ``w_k = 10000 ** (-k / F)``, a point is
    ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` (x = column first), the
    layout of the fixed position table of the PQCL backbone
    (:func:`keras_pqcl.layers.pos_embed.sincos_grid`).

    Returns:
        float32 ``[..., dim]``.
    """
    # TF's own NumPy namespace runs in tf.data's graph under every Keras
    # backend. The frequencies are float32 TF ops (not the NumPy float64
    # constants), which is what the pipeline has always produced.
    omega = sincos_lib.frequencies(dim, tnp, tf.float32)
    coords = tf.cast(coords, tf.float32)
    return sincos_lib.sincos(coords[..., 0:1], coords[..., 1:2], omega, tnp)
