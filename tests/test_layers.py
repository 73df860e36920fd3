"""Layers vs independent NumPy references."""

import math

import numpy as np
import pytest
from keras import ops

from keras_pqcl.layers import (
    Attention,
    Block,
    DropPath,
    Mlp,
    PatchEmbed,
    bicubic_matrix,
    interpolate_grid,
    sincos_from_coords,
    sincos_grid,
)

from tests import helpers as H

to_numpy = H.to_numpy
pytestmark = H.IGNORE_NUMPY2_COPY_WARNING


# ----------------------------------------------------------------------------- pos_embed
def test_sincos_from_coords_matches_mae_formula():
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 17, size=(2, 5))  # fractional, negative and beyond the grid
    y = rng.uniform(-3, 17, size=(2, 5))
    out = sincos_from_coords(x, y, 16)
    assert out.shape == (2, 5, 16)
    assert out.dtype == np.float32
    ref = H.mae_sincos(x, y, 16).reshape(2, 5, 16)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_sincos_grid_is_x_column_first_with_zero_cls():
    gh, gw, dim = 3, 5, 32
    table = sincos_grid(gh, gw, dim)
    assert table.shape == (1 + gh * gw, dim)
    np.testing.assert_array_equal(table[0], np.zeros(dim))
    rows, cols = np.divmod(np.arange(gh * gw), gw)  # token r * W + c has (x, y) = (c, r)
    np.testing.assert_allclose(table[1:], H.mae_sincos(cols, rows, dim), atol=1e-6)
    # The x half of token (r=0, c=1) differs from token (r=1, c=0): x really is the column.
    np.testing.assert_allclose(table[1 + 1, : dim // 2], H.mae_sincos([1], [0], dim)[0, : dim // 2], atol=1e-6)
    no_cls = sincos_grid(gh, gw, dim, cls_token=False)
    np.testing.assert_array_equal(no_cls, table[1:])


def test_sincos_needs_dim_multiple_of_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_from_coords([0.0], [0.0], 18)


def _torch_bicubic_matrix(in_size, out_size, scale):
    """Direct PyTorch bicubic (a=-0.75, align_corners=False): apply to the identity."""
    return H.bicubic_1d(np.eye(in_size), out_size, scale)


def test_bicubic_matrix_14_to_6_matches_pytorch_formula():
    scale = (6 + 0.1) / 14
    mat = bicubic_matrix(14, 6, scale)
    assert mat.shape == (6, 14)
    ref = _torch_bicubic_matrix(14, 6, scale)
    np.testing.assert_allclose(mat, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(mat.sum(axis=1), np.ones(6), atol=1e-6)  # partition of unity


def test_bicubic_matrix_upsampling_and_default_scale():
    np.testing.assert_allclose(bicubic_matrix(4, 7, 7.1 / 4), _torch_bicubic_matrix(4, 7, 7.1 / 4), atol=1e-6)
    # Without scale_factor the ratio in/out is used (PyTorch's size= path).
    np.testing.assert_allclose(bicubic_matrix(14, 6), _torch_bicubic_matrix(14, 6, 6 / 14), atol=1e-6)


def test_bicubic_identity_when_sizes_equal():
    np.testing.assert_allclose(bicubic_matrix(14, 14), np.eye(14), atol=1e-7)
    pos = np.random.default_rng(1).normal(size=(1, 16, 8)).astype("float32")
    out = interpolate_grid(ops.convert_to_tensor(pos), (4, 4), (4, 4))
    np.testing.assert_array_equal(to_numpy(out), pos)


@pytest.mark.parametrize("out_hw", [(6, 6), (6, 4), (16, 9)])
def test_interpolate_grid_matches_numpy(out_hw):
    rng = np.random.default_rng(2)
    pos = rng.normal(size=(1, 14 * 14, 8)).astype("float32")
    out = to_numpy(interpolate_grid(ops.convert_to_tensor(pos), (14, 14), out_hw))
    assert out.shape == (1, out_hw[0] * out_hw[1], 8)
    ref = H.interpolate_pos(pos[0], (14, 14), out_hw)
    np.testing.assert_allclose(out[0], ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("out_hw", [(6, 6), (6, 4), (16, 9)])
def test_interpolate_grid_matches_torch_interpolate(out_hw):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    dim = 8
    pos = rng.normal(size=(1, 14 * 14, dim)).astype("float32")
    out = to_numpy(interpolate_grid(ops.convert_to_tensor(pos), (14, 14), out_hw))
    grid = torch.from_numpy(pos.reshape(1, 14, 14, dim)).permute(0, 3, 1, 2)
    scale = ((out_hw[0] + 0.1) / 14, (out_hw[1] + 0.1) / 14)
    ref = torch.nn.functional.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    assert tuple(ref.shape[2:]) == out_hw
    ref = ref.permute(0, 2, 3, 1).reshape(1, -1, dim).numpy()
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- PatchEmbed
def test_patch_embed_matches_conv_as_reshape():
    rng = np.random.default_rng(4)
    layer = PatchEmbed(patch_size=8, embed_dim=16)
    layer.build()
    images = rng.normal(size=(2, 16, 24, 3)).astype("float32")  # 2 x 3 grid: row-major check
    out = to_numpy(layer(ops.convert_to_tensor(images)))
    assert out.shape == (2, 6, 16)
    kernel = H.f64(layer.proj.kernel).reshape(8 * 8 * 3, 16)
    ref = H.patchify(images.astype(np.float64), 8) @ kernel + H.f64(layer.proj.bias)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_patch_embed_init_is_pytorch_conv_default():
    layer = PatchEmbed(patch_size=8, embed_dim=16)
    layer.build()
    bound = 1.0 / math.sqrt(3 * 8 * 8)
    kernel, bias = H.f64(layer.proj.kernel), H.f64(layer.proj.bias)
    assert kernel.shape == (8, 8, 3, 16) and bias.shape == (16,)
    assert np.abs(kernel).max() <= bound + 1e-7
    assert np.abs(bias).max() <= bound + 1e-7
    # Uniform on (-b, b) fills the interval: P(max < 0.98 b) = 0.98^3072. Keras' Glorot
    # default would stay below sqrt(6 / (192 + 1024)) = 0.9725 b.
    assert np.abs(kernel).max() > 0.98 * bound
    # ... with the std of a uniform, b / sqrt(3).
    assert abs(kernel.std() - bound / math.sqrt(3)) < 0.05 * bound
    assert np.abs(bias).max() > 0.3 * bound  # bias is not zero-initialised


# ----------------------------------------------------------------------------- Attention
def _attention(rng, dim=16, heads=2, qkv_bias=True):
    layer = Attention(dim, heads, qkv_bias=qkv_bias)
    layer.build()
    H.randomize(layer, rng)
    return layer


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_attention_matches_numpy(qkv_bias):
    rng = np.random.default_rng(5)
    layer = _attention(rng, qkv_bias=qkv_bias)
    assert (layer.qkv.bias is not None) == qkv_bias
    x = rng.normal(size=(2, 5, 16)).astype("float32")
    x_out, q_out, attn = layer(ops.convert_to_tensor(x))
    assert q_out is None and attn is None
    ref, _, _ = H.mha(x, H.attention_weights(layer), 2)
    np.testing.assert_allclose(to_numpy(x_out), ref, rtol=1e-5, atol=1e-5)


def test_attention_query_stream_matches_numpy_and_leaves_image_stream_bitwise():
    rng = np.random.default_rng(6)
    layer = _attention(rng)
    x = ops.convert_to_tensor(rng.normal(size=(2, 5, 16)).astype("float32"))
    y = ops.convert_to_tensor(rng.normal(size=(2, 3, 16)).astype("float32"))
    x_alone, _, _ = layer(x)
    x_out, q_out, _ = layer(x, queries=y)
    # The image tokens never see the queries: exactly the same numbers.
    assert np.array_equal(to_numpy(x_out), to_numpy(x_alone))
    ref_x, ref_q, _ = H.mha(to_numpy(x), H.attention_weights(layer), 2, queries=to_numpy(y))
    np.testing.assert_allclose(to_numpy(x_out), ref_x, rtol=1e-5, atol=1e-5)
    assert to_numpy(q_out).shape == (2, 3, 16)
    np.testing.assert_allclose(to_numpy(q_out), ref_q, rtol=1e-5, atol=1e-5)
    # Queries do attend to each other: changing one query changes the others' outputs.
    y2 = to_numpy(y).copy()
    y2[:, 0] += 1.0
    _, q_out2, _ = layer(x, queries=ops.convert_to_tensor(y2))
    assert not np.allclose(to_numpy(q_out2)[:, 1:], to_numpy(q_out)[:, 1:])


def test_attention_return_attention_is_softmax():
    rng = np.random.default_rng(7)
    layer = _attention(rng)
    x = rng.normal(size=(2, 5, 16)).astype("float32")
    x_out, _, attn = layer(ops.convert_to_tensor(x), return_attention=True)
    attn = to_numpy(attn)
    assert attn.shape == (2, 2, 5, 5)
    np.testing.assert_allclose(attn.sum(-1), np.ones((2, 2, 5)), atol=1e-6)
    ref_x, _, ref_attn = H.mha(x, H.attention_weights(layer), 2)
    np.testing.assert_allclose(attn, ref_attn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(x_out), ref_x, rtol=1e-5, atol=1e-5)


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        Attention(18, 4)


# --------------------------------------------------------------------------- Mlp / Block
def test_mlp_uses_exact_gelu():
    rng = np.random.default_rng(8)
    layer = Mlp(16, 64)
    layer.build()
    H.randomize(layer, rng)
    x = rng.normal(size=(2, 5, 16)).astype("float32")
    out = to_numpy(layer(ops.convert_to_tensor(x)))
    ref = H.linear(H.gelu(H.linear(x, *H.dense_weights(layer.fc1))), *H.dense_weights(layer.fc2))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _block(rng, dim=16, heads=2):
    layer = Block(dim, heads, mlp_ratio=4.0, drop_path=0.0)
    layer.build()
    H.randomize(layer, rng)
    return layer


def test_block_matches_numpy_prenorm_block():
    rng = np.random.default_rng(9)
    layer = _block(rng)
    assert layer.norm1.epsilon == 1e-6 and layer.norm2.epsilon == 1e-6
    x = rng.normal(size=(2, 5, 16)).astype("float32")
    out, q, attn = layer(ops.convert_to_tensor(x), return_attention=True, training=True)
    assert q is None
    ref, _, ref_attn = H.block(x, H.block_weights(layer))
    np.testing.assert_allclose(to_numpy(out), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_numpy(attn), ref_attn, rtol=1e-4, atol=1e-6)


def test_block_layer_norm_epsilon_matters():
    """Small-variance tokens: eps 1e-6 vs Keras' 1e-3 gives visibly different outputs."""
    rng = np.random.default_rng(10)
    layer = _block(rng)
    x = (rng.normal(size=(2, 5, 16)) * 0.01).astype("float32")
    out = to_numpy(layer(ops.convert_to_tensor(x))[0])
    w = H.block_weights(layer)
    np.testing.assert_allclose(out, H.block(x, w)[0], rtol=1e-4, atol=1e-4)
    w["eps"] = 1e-3
    assert not np.allclose(out, H.block(x, w)[0], rtol=1e-3, atol=1e-3)


def test_block_query_stream_matches_numpy_and_image_stream_bitwise():
    rng = np.random.default_rng(11)
    layer = _block(rng)
    x = ops.convert_to_tensor(rng.normal(size=(2, 5, 16)).astype("float32"))
    y = ops.convert_to_tensor(rng.normal(size=(2, 3, 16)).astype("float32"))
    x_alone, _, _ = layer(x)
    x_out, q_out, _ = layer(x, queries=y)
    assert np.array_equal(to_numpy(x_out), to_numpy(x_alone))
    ref_x, ref_q, _ = H.block(to_numpy(x), H.block_weights(layer), queries=to_numpy(y))
    np.testing.assert_allclose(to_numpy(x_out), ref_x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_numpy(q_out), ref_q, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ DropPath
def test_drop_path_identity_at_inference_and_rate_zero():
    x = ops.convert_to_tensor(np.random.default_rng(12).normal(size=(8, 3, 4)).astype("float32"))
    np.testing.assert_array_equal(to_numpy(DropPath(0.5)(x, training=False)), to_numpy(x))
    np.testing.assert_array_equal(to_numpy(DropPath(0.5)(x)), to_numpy(x))
    np.testing.assert_array_equal(to_numpy(DropPath(0.0)(x, training=True)), to_numpy(x))


def test_drop_path_per_sample_keep_and_rescale():
    p = 0.25
    n = 4000
    x_np = np.random.default_rng(13).uniform(0.5, 1.5, size=(n, 3, 2)).astype("float32")
    out = to_numpy(DropPath(p, seed=1)(ops.convert_to_tensor(x_np), training=True))
    dropped = np.all(out == 0.0, axis=(1, 2))
    kept = np.all(np.isclose(out, x_np / (1 - p), rtol=1e-6, atol=0), axis=(1, 2))
    # Every sample is either entirely dropped or entirely kept and rescaled.
    assert np.all(dropped ^ kept)
    frac = kept.mean()
    assert abs(frac - (1 - p)) < 0.03, frac  # std of the estimate ~ 0.007
