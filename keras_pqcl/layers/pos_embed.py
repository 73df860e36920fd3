"""Position embeddings: fixed 2-D sin-cos tables and PyTorch-exact bicubic resampling.

The sin-cos convention is the MAE one used by PQCL (x = column first, then y = row); the
bicubic resampling reproduces DINO's ``interpolate_pos_encoding`` (PyTorch ``bicubic`` with
Keys a = -0.75, ``align_corners=False`` and the ``+0.1`` scale-factor trick), so that
weights imported from the reference code give the same tokens on 96 px crops, and DINOv2's
two conventions (that one, and resampling by size with PyTorch's antialiased kernel).

The sin-cos formula itself is :mod:`keras_pqcl.layers.sincos`, which the tf.data query tables
share; the functions here only choose the library and the precision.
"""

import math

import numpy as np
from keras import ops

from keras_pqcl.layers import sincos as sincos_lib


def sincos_from_coords(x, y, dim):
    """2-D sin-cos embedding of arbitrary (possibly fractional) positions.

    Args:
        x: array ``(...,)``, column coordinates (horizontal), in patch units.
        y: array ``(...,)``, row coordinates (vertical), same shape as ``x``.
        dim: embedding size; must be divisible by 4.

    Returns:
        float32 array ``(..., dim)`` laid out ``[sin(x w), cos(x w), sin(y w), cos(y w)]``
        with ``w_k = 10000 ** (-k / (dim / 4))``.
    """
    # float64 throughout, rounded once at the end: the table is built once, off the step.
    omega = sincos_lib.frequencies(dim, np, np.float64)
    x = np.asarray(x, dtype=np.float64)[..., None]
    y = np.asarray(y, dtype=np.float64)[..., None]
    return sincos_lib.sincos(x, y, omega, np).astype(np.float32)


def sincos_grid(grid_h, grid_w, dim, cls_token=True):
    """Fixed sin-cos table for a ``grid_h x grid_w`` patch grid, row-major.

    Returns:
        float32 array ``(1 + grid_h * grid_w, dim)`` (CLS row of zeros first) or
        ``(grid_h * grid_w, dim)`` when ``cls_token=False``.
    """
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    table = sincos_from_coords(cols.reshape(-1), rows.reshape(-1), dim)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim), np.float32), table], axis=0)
    return table


def _cubic(t, a=-0.75):
    """Keys cubic convolution kernel (PyTorch uses a = -0.75)."""
    t = abs(t)
    if t <= 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0


def _antialias_taps(d, in_size, ratio):
    """PyTorch's antialiased bicubic taps for output index ``d``: ``{source index: weight}``.

    The kernel is Keys' cubic with a = -0.5 (PIL's), stretched by ``ratio`` when shrinking;
    taps beyond the border are dropped (not clamped) and the rest renormalised to sum to 1.
    """
    support = 2.0 * ratio if ratio >= 1.0 else 2.0
    stretch = 1.0 / ratio if ratio >= 1.0 else 1.0
    center = (d + 0.5) * ratio
    # int() truncates toward zero, as PyTorch's cast does.
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    taps = {j: _cubic((j - center + 0.5) * stretch, a=-0.5) for j in range(lo, hi)}
    total = sum(taps.values())
    return {j: w / total for j, w in taps.items()} if total else taps


def bicubic_matrix(in_size, out_size, scale_factor=None, antialias=False):
    """Matrix ``(out_size, in_size)`` of PyTorch's 1-D bicubic resampling (``align_corners=False``).

    ``scale_factor`` is the factor handed to ``F.interpolate``; PyTorch then maps output
    index ``d`` to source ``(d + 0.5) / scale_factor - 0.5``. Without it, ``in_size / out_size``
    is used, as for ``size=``. Without ``antialias`` the 4 taps use Keys a = -0.75 and are
    clamped to the border; with it (``antialias=True``) see :func:`_antialias_taps`.
    """
    ratio = (1.0 / scale_factor) if scale_factor else in_size / out_size
    mat = np.zeros((out_size, in_size), np.float64)
    for d in range(out_size):
        if antialias:
            for idx, weight in _antialias_taps(d, in_size, ratio).items():
                mat[d, idx] += weight
            continue
        src = (d + 0.5) * ratio - 0.5
        base = math.floor(src)
        frac = src - base
        for k in range(-1, 3):
            idx = min(max(base + k, 0), in_size - 1)
            mat[d, idx] += _cubic(k - frac)
    return mat.astype(np.float32)


def interpolate_grid(pos, in_hw, out_hw, offset=0.1, antialias=False):
    """Resample patch position embeddings from one grid to another, like DINO / DINOv2.

    DINO (and DINOv2's models without registers) pass ``scale_factor=(out + 0.1) / in`` to a
    bicubic ``F.interpolate``: the 0.1 guards floor() and moves the sampling positions
    slightly, so it is part of the reference numbers. DINOv2's models with registers use
    ``offset=0`` (``size=out``, i.e. the exact ratio) and ``antialias=True``.

    Args:
        pos: tensor ``(1, in_h * in_w, dim)`` (patch rows only, no CLS).
        in_hw: ``(in_h, in_w)`` the grid ``pos`` was made for.
        out_hw: ``(out_h, out_w)`` the grid of the current input: ints, or scalar tensors
            when the height and width are only known at run time (an exported model).
        offset: added to the output size in the scale factor; 0 means resample by size.
        antialias: PyTorch's antialiased bicubic kernel (a = -0.5, renormalised at borders).

    Returns:
        tensor ``(1, out_h * out_w, dim)``; ``pos`` itself when the grids agree.
    """
    (in_h, in_w), (out_h, out_w) = in_hw, out_hw
    if not all(isinstance(size, int) for size in (out_h, out_w)):
        if offset != 0.1 or antialias:
            raise ValueError(
                "a grid known only at run time is resampled with DINO's convention (offset 0.1, no antialiasing), "
                f"not this backbone's (offset {offset}, antialias {antialias}); export it with a fixed --image-size."
            )
        return _interpolate_traced(pos, in_hw, out_hw)
    if (in_h, in_w) == (out_h, out_w):
        return pos
    mat_h = bicubic_matrix(in_h, out_h, (out_h + offset) / in_h if offset else None, antialias)
    mat_w = bicubic_matrix(in_w, out_w, (out_w + offset) / in_w if offset else None, antialias)
    dim = ops.shape(pos)[-1]
    grid = ops.reshape(pos, (in_h, in_w, dim))
    mat_h = ops.convert_to_tensor(mat_h, dtype=pos.dtype)
    mat_w = ops.convert_to_tensor(mat_w, dtype=pos.dtype)
    grid = ops.einsum("oh,hwd->owd", mat_h, grid)
    grid = ops.einsum("pw,owd->opd", mat_w, grid)
    return ops.reshape(grid, (1, out_h * out_w, dim))


def _bicubic_matrix_traced(in_size, positions):
    """:func:`bicubic_matrix` with DINO's ``scale_factor = (out + 0.1) / in`` for an output
    size known only when the graph runs (an exported model with free height and width).

    Args:
        in_size: int, the table's side.
        positions: float32 tensor ``(out,)``, ``arange(out)``.

    Returns:
        float32 tensor ``(out, in_size)``.
    """
    # The size as a tensor, counted rather than cast: a traced dimension (a torch.export
    # SymInt, a jax2tf symbolic size) cannot be cast on every backend, a count can.
    out_size = ops.sum(ops.ones_like(positions))
    src = (positions + 0.5) * (in_size / (out_size + 0.1)) - 0.5
    base = ops.floor(src)
    frac = src - base
    base = ops.cast(base, "int32")
    a = -0.75
    mat = 0.0
    # Tap k sits at distance |k - frac|: within 1 for k = 0, 1 and in [1, 2] for k = -1, 2,
    # so each tap has one branch of the Keys kernel (which is 0 at distance 2).
    for k in range(-1, 3):
        t = ops.abs(k - frac)
        if k in (0, 1):
            weight = ((a + 2) * t - (a + 3)) * t * t + 1
        else:
            weight = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        idx = ops.clip(base + k, 0, in_size - 1)
        mat = mat + ops.one_hot(idx, in_size, dtype="float32") * weight[:, None]
    return mat, out_size


def _interpolate_traced(pos, in_hw, out_hw):
    """:func:`interpolate_grid` for a grid whose side is a tensor: the resampling matrices
    are built in the graph, and the table is kept as it is when the grids agree, as DINO does."""
    (in_h, in_w), (out_h, out_w) = in_hw, out_hw
    dim = ops.shape(pos)[-1]
    grid = ops.reshape(pos, (in_h, in_w, dim))
    rows = ops.arange(out_h, dtype="float32")  # dtype given: a SymInt has none to infer
    cols = ops.arange(out_w, dtype="float32")
    mat_h, size_h = _bicubic_matrix_traced(in_h, rows)
    mat_w, size_w = _bicubic_matrix_traced(in_w, cols)
    same = ops.logical_and(ops.equal(size_h, in_h), ops.equal(size_w, in_w))
    # Where out == in the identity: ones where row == column, in the (out, in) shape of the
    # resampling matrix, so that both branches of the select share one shape.
    eye_h = ops.cast(ops.equal(rows[:, None], ops.arange(in_h, dtype="float32")[None]), "float32")
    eye_w = ops.cast(ops.equal(cols[:, None], ops.arange(in_w, dtype="float32")[None]), "float32")
    mat_h = ops.cast(ops.where(same, eye_h, mat_h), pos.dtype)
    mat_w = ops.cast(ops.where(same, eye_w, mat_w), pos.dtype)
    grid = ops.einsum("oh,hwd->owd", mat_h, grid)
    grid = ops.einsum("pw,owd->opd", mat_w, grid)
    return ops.reshape(grid, (1, out_h * out_w, dim))


def sincos_embedding(coords, dim):
    """2-D sin-cos embedding of positions, in ``keras.ops`` (runs inside compiled steps).

    The same layout as :func:`sincos_from_coords` and the PQCL backbone's fixed table, so a
    PQCL query built from a local patch's coordinates in a global view carries exactly the
    position code of the global-view patch found at that place.

    Args:
        coords: tensor ``(..., 2)``: ``(x, y)`` = (column, row) in patch units, possibly
            fractional, negative or beyond the grid (sin-cos extrapolates).
        dim: embedding size; must be divisible by 4.

    Returns:
        float32 tensor ``(..., dim)`` laid out ``[sin(x w), cos(x w), sin(y w), cos(y w)]``
        with ``w_k = 10000 ** (-k / (dim / 4))``.
    """
    # The frequencies are constants: computed once in float64, like the NumPy table.
    omega = ops.convert_to_tensor(sincos_lib.frequencies(dim, np, np.float64).astype(np.float32))
    coords = ops.cast(coords, "float32")
    return sincos_lib.sincos(coords[..., 0:1], coords[..., 1:2], omega, ops)


def sample_table(table, coords):
    """A position table read at arbitrary positions by bilinear interpolation, in ``keras.ops``.

    The learned-table counterpart of :func:`sincos_embedding`: where a sin-cos code can be
    evaluated anywhere, a learned table exists only at its cells, so a position between cells
    mixes the four around it, and a position beyond the grid takes the border's value. At a
    cell centre the result is that cell's row exactly, so a query placed on a patch of the view
    carries the position code of that patch's image token.

    Args:
        table: ``(h, w, D)``, one row per patch of the grid (no CLS row).
        coords: ``(..., 2)``: ``(x, y)`` = (column, row) in patch units, as for
            :func:`sincos_embedding`.

    Returns:
        ``(..., D)`` in the table's dtype.
    """
    h, w, dim = table.shape
    flat = ops.reshape(table, (h * w, dim))
    coords = ops.cast(coords, "float32")
    x = ops.clip(coords[..., 0], 0.0, float(w - 1))
    y = ops.clip(coords[..., 1], 0.0, float(h - 1))
    x0, y0 = ops.floor(x), ops.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    x0, y0 = ops.cast(x0, "int32"), ops.cast(y0, "int32")
    x1, y1 = ops.minimum(x0 + 1, w - 1), ops.minimum(y0 + 1, h - 1)

    def at(row, col):
        return ops.cast(ops.take(flat, row * w + col, axis=0), "float32")

    top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx
    return ops.cast(top * (1.0 - fy) + bottom * fy, table.dtype)
