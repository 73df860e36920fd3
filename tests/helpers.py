"""Small NumPy references shared by the unit tests.

Everything here is an independent restatement of the reference formulas (DINO/iBOT/PQCL
code); nothing calls library code except to read weights.
"""

import contextlib
import math

import keras
import numpy as np
import pytest

_erf = np.vectorize(math.erf, otypes=[np.float64])

# keras.ops.convert_to_numpy calls np.array on backend tensors whose __array__ predates
# NumPy 2's ``copy`` keyword; the DeprecationWarning comes from the backends, not the code
# under test.
IGNORE_NUMPY2_COPY_WARNING = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def to_numpy(x):
    """Backend tensor or ``keras.Variable`` -> NumPy array, dtype kept."""
    if isinstance(x, keras.Variable):
        x = x.value
    return np.asarray(keras.ops.convert_to_numpy(x))


def f64(x):
    return to_numpy(x).astype(np.float64)


@contextlib.contextmanager
def no_random_init():
    """Build layers with zeros instead of random draws (shape-only checks).

    On JAX every new random shape costs an XLA compile (~0.2-0.5 s on 2 cores); use this
    where only shapes matter or every weight is overwritten afterwards.
    """
    classes = (keras.initializers.RandomNormal, keras.initializers.RandomUniform)
    saved = [cls.__call__ for cls in classes]

    def zeros(self, shape, dtype=None):
        return keras.ops.zeros(shape, dtype=dtype or "float32")

    try:
        for cls in classes:
            cls.__call__ = zeros
        yield
    finally:
        for cls, call in zip(classes, saved):
            cls.__call__ = call


def randomize(layer, rng, scale=0.3):
    """Replace every trainable weight by N(0, scale^2) (LayerNorm gains around 1).

    Default initialisations (std 0.02, zero biases) make attention nearly uniform and
    hide layout mistakes; random weights make every term count.
    """
    for v in layer.trainable_weights:
        value = rng.normal(size=v.shape) * scale
        if v.name == "gamma":
            value = 1.0 + value
        v.assign(value.astype(v.dtype))


def gelu(x):
    """Exact (erf) GELU."""
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def layer_norm(x, gamma, beta, eps=1e-6):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def dense_weights(layer):
    """(kernel, bias) of a keras Dense as float64 numpy (bias may be None)."""
    kernel = f64(layer.kernel)
    bias = f64(layer.bias) if layer.bias is not None else None
    return kernel, bias


def linear(x, kernel, bias=None):
    y = np.asarray(x, np.float64) @ kernel
    return y if bias is None else y + bias


def attention_weights(attn):
    """Numpy weights of a keras_pqcl Attention layer: dict wqkv, bqkv, wproj, bproj."""
    wqkv, bqkv = dense_weights(attn.qkv)
    if bqkv is None:
        bqkv = np.zeros(wqkv.shape[1])
    wproj, bproj = dense_weights(attn.proj)
    return dict(wqkv=wqkv, bqkv=bqkv, wproj=wproj, bproj=bproj)


def _split_heads(x, w, heads):
    """(B, T, D) -> q, k, v each (B, heads, T, hd), fused layout (3, heads, hd)."""
    b, t, _ = x.shape
    qkv = linear(x, w["wqkv"], w["bqkv"])
    d = qkv.shape[-1] // 3
    qkv = qkv.reshape(b, t, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def mha(x, w, heads, queries=None):
    """Reference ViT attention. Returns (x_out, queries_out or None, attention probs).

    Image tokens attend to image tokens only; query tokens attend to [x; queries].
    """
    x = np.asarray(x, np.float64)
    b, t, dim = x.shape
    hd = dim // heads
    q, k, v = _split_heads(x, w, heads)
    probs = softmax(q @ k.transpose(0, 1, 3, 2) * hd**-0.5)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, dim)
    x_out = linear(out, w["wproj"], w["bproj"])
    q_out = None
    if queries is not None:
        queries = np.asarray(queries, np.float64)
        lq = queries.shape[1]
        qq, kq, vq = _split_heads(queries, w, heads)
        keys = np.concatenate([k, kq], axis=2)
        vals = np.concatenate([v, vq], axis=2)
        pq = softmax(qq @ keys.transpose(0, 1, 3, 2) * hd**-0.5)
        oq = (pq @ vals).transpose(0, 2, 1, 3).reshape(b, lq, dim)
        q_out = linear(oq, w["wproj"], w["bproj"])
    return x_out, q_out, probs


def block_weights(block):
    return dict(
        n1=(f64(block.norm1.gamma), f64(block.norm1.beta)),
        n2=(f64(block.norm2.gamma), f64(block.norm2.beta)),
        attn=attention_weights(block.attn),
        fc1=dense_weights(block.mlp.fc1),
        fc2=dense_weights(block.mlp.fc2),
        heads=block.num_heads,
        eps=block.layer_norm_epsilon,
    )


def block(x, w, queries=None):
    """Reference pre-norm block (drop-path 0), with the optional query stream."""
    eps = w["eps"]

    def mlp(h):
        return linear(gelu(linear(h, *w["fc1"])), *w["fc2"])

    xn = layer_norm(x, *w["n1"], eps=eps)
    qn = None if queries is None else layer_norm(queries, *w["n1"], eps=eps)
    a_x, a_q, probs = mha(xn, w["attn"], w["heads"], queries=qn)
    x = x + a_x
    x = x + mlp(layer_norm(x, *w["n2"], eps=eps))
    if queries is not None:
        queries = queries + a_q
        queries = queries + mlp(layer_norm(queries, *w["n2"], eps=eps))
    return x, queries, probs


def mae_sincos(x, y, dim):
    """MAE 2-D sin-cos: [sin(x w), cos(x w), sin(y w), cos(y w)], w_k = 10000^(-k/(D/4))."""
    quarter = dim // 4
    omega = np.array([10000.0 ** (-k / quarter) for k in range(quarter)])
    x = np.asarray(x, np.float64).reshape(-1, 1) * omega
    y = np.asarray(y, np.float64).reshape(-1, 1) * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)


def patchify(images, p):
    """(B, H, W, C) -> (B, N, p*p*C) row-major patches, each flattened (row, col, channel)."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def cubic(t, a=-0.75):
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def bicubic_1d(values, out_size, scale):
    """PyTorch 1-D bicubic (align_corners=False) along axis 0 with a scale factor."""
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    out = np.zeros((out_size,) + values.shape[1:])
    for d in range(out_size):
        src = (d + 0.5) / scale - 0.5
        i0 = int(np.floor(src))
        t = src - i0
        for k in (-1, 0, 1, 2):
            idx = min(max(i0 + k, 0), n - 1)
            out[d] += cubic(t - k) * values[idx]
    return out


def interpolate_pos(patch_pos, in_hw, out_hw):
    """DINO interpolate_pos_encoding on (N, D) patch rows, scale (out + 0.1) / in."""
    (ih, iw), (oh, ow) = in_hw, out_hw
    if (ih, iw) == (oh, ow):
        return np.asarray(patch_pos, np.float64)
    dim = patch_pos.shape[-1]
    grid = np.asarray(patch_pos, np.float64).reshape(ih, iw, dim)
    grid = bicubic_1d(grid, oh, (oh + 0.1) / ih)
    grid = bicubic_1d(grid.transpose(1, 0, 2), ow, (ow + 0.1) / iw).transpose(1, 0, 2)
    return grid.reshape(oh * ow, dim)


def coord_image(height, width):
    """Float image whose channels 0 and 1 hold each pixel's own row and column."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.float32)


def bilinear(img, r, c):
    """img [H, W, C] sampled at pixel-centre coordinates (r, c)."""
    h, w = img.shape[:2]
    r = np.clip(r - 0.5, 0, h - 1)
    c = np.clip(c - 0.5, 0, w - 1)
    r0, c0 = int(np.floor(r)), int(np.floor(c))
    r1, c1 = min(r0 + 1, h - 1), min(c0 + 1, w - 1)
    fr, fc = r - r0, c - c0
    top = img[r0, c0] * (1 - fc) + img[r0, c1] * fc
    bot = img[r1, c0] * (1 - fc) + img[r1, c1] * fc
    return top * (1 - fr) + bot * fr
