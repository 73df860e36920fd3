"""The 2-D sin-cos position code, written once for every array library.

With ``F = dim / 4`` and ``w_k = 10000 ** (-k / F)`` for ``k = 0 .. F - 1``, a point at
column ``x`` and row ``y`` (patch units, possibly fractional) is coded as
``[sin(x w), cos(x w), sin(y w), cos(y w)]``: the MAE layout, x = column first.

The same code is needed in three places that cannot share one library: the backbone's fixed
table (NumPy, float64, built once), PQCL queries inside a compiled train step
(``keras.ops``, any backend) and the query tables of the tf.data pipeline (TensorFlow in
graph mode, where ``keras.ops`` fails under the JAX and PyTorch backends). So the functions
here take the array namespace ``xp`` as an argument (``numpy``, ``keras.ops`` or
``tf.experimental.numpy``) and use only names those three have in common. This module
imports no array library itself: the model tier must stay free of TensorFlow, and the data
tier must not need a Keras backend.
"""


def check_dim(dim):
    """Raises unless ``dim`` splits into the four equal blocks of the layout."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}.")


def frequencies(dim, xp, dtype):
    """The ``dim / 4`` frequencies ``w_k = 10000 ** (-k / (dim / 4))``, in ``xp`` at ``dtype``.

    The dtype is the caller's because it changes the last bit of the result: the NumPy
    table computes them in float64, the tf.data tables in float32.
    """
    check_dim(dim)
    quarter = dim // 4
    return 1.0 / xp.power(10000.0, xp.arange(quarter, dtype=dtype) / quarter)


def sincos(x, y, omega, xp):
    """``[sin(x w), cos(x w), sin(y w), cos(y w)]`` along a new last axis of size ``dim``.

    Args:
        x: column coordinates ``(..., 1)``; the trailing axis broadcasts against ``omega``.
        y: row coordinates, same shape and dtype as ``x``.
        omega: the output of :func:`frequencies` (or the same values as a tensor of
            ``x``'s library), shape ``(dim / 4,)``.
        xp: the array namespace of ``x`` (``sin``, ``cos`` and ``concatenate`` are used).

    Returns:
        array ``(..., dim)`` in the dtype of ``x * omega``.
    """
    x = x * omega
    y = y * omega
    return xp.concatenate([xp.sin(x), xp.cos(x), xp.sin(y), xp.cos(y)], axis=-1)
