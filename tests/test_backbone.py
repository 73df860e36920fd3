"""VisionTransformer vs a NumPy forward pass."""

import importlib

import keras
import numpy as np
import pytest
from keras import ops

from keras_pqcl.backbones.vit import VIT_PRESETS, VisionTransformer, vit, vit_small
from keras_pqcl.layers import sincos_grid

from tests import helpers as H

to_numpy = H.to_numpy
pytestmark = H.IGNORE_NUMPY2_COPY_WARNING
# The package re-exports the function ``vit``, which shadows the submodule attribute.
vit_module = importlib.import_module("keras_pqcl.backbones.vit")

DIM, HEADS, PATCH, SIZE = 16, 2, 8, 32  # grid 4 x 4 at 32 px


def tiny(seed=0, randomize=True, **kwargs):
    args = dict(patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=HEADS, image_size=SIZE)
    args.update(kwargs)
    model = VisionTransformer(**args)
    if randomize:
        H.randomize(model, np.random.default_rng(seed), scale=0.2)
    return model


def images(batch, height, width=None, seed=0):
    width = width or height
    return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype("float32")


def numpy_vit(model, imgs, masks=None, queries=None):
    """Reference forward: returns (per-block outputs after the final LN, queries, last attn)."""
    b, h, w, _ = imgs.shape
    p, dim, g = model.patch_size, model.embed_dim, model.grid_size
    kernel = H.f64(model.patch_embed.proj.kernel).reshape(p * p * 3, dim)
    x = H.patchify(imgs.astype(np.float64), p) @ kernel + H.f64(model.patch_embed.proj.bias)
    if masks is not None:
        m = np.asarray(masks, bool).reshape(b, -1, 1)
        x = np.where(m, H.f64(model.mask_token)[None], x)  # before the position embedding
    cls = np.broadcast_to(H.f64(model.cls_token), (b, 1, dim))
    x = np.concatenate([cls, x], axis=1)
    pos = H.f64(model.pos_embed)[0]
    patch_pos = H.interpolate_pos(pos[1:], (g, g), (h // p, w // p))
    x = x + np.concatenate([pos[:1], patch_pos], axis=0)[None]
    gamma, beta = H.f64(model.norm.gamma), H.f64(model.norm.beta)
    outs, probs = [], None
    for blk in model.blocks:
        x, queries, probs = H.block(x, H.block_weights(blk), queries=queries)
        outs.append(H.layer_norm(x, gamma, beta, 1e-6))
    q_out = None if queries is None else H.layer_norm(queries, gamma, beta, 1e-6)
    return outs, q_out, probs


TOL = dict(rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- architecture
def test_vit_small_param_count():
    with H.no_random_init():  # the count depends on shapes only
        model = vit_small(16)
    assert model.count_params() == 21_665_664
    assert model.embed_dim == 384 and model.num_heads == 6 and len(model.blocks) == 12
    blk = model.blocks[0]
    assert blk.attn.num_heads == 6 and blk.attn.head_dim == 64 and blk.mlp.hidden_dim == 1536
    assert tuple(model.pos_embed.shape) == (1, 1 + 14 * 14, 384)


@pytest.mark.parametrize(
    "name, dim, depth, heads",
    [("vit_tiny", 192, 12, 3), ("vit_small", 384, 12, 6), ("vit_base", 768, 12, 12), ("vit_large", 1024, 24, 16)],
)
def test_presets(monkeypatch, name, dim, depth, heads):
    assert VIT_PRESETS[name] == dict(embed_dim=dim, depth=depth, num_heads=heads)
    # Check what the builders pass on without building (random init of ViT-L is slow).
    monkeypatch.setattr(vit_module, "VisionTransformer", lambda **kwargs: kwargs)
    args = vit(name, patch_size=16)
    assert (args["embed_dim"], args["depth"], args["num_heads"]) == (dim, depth, heads)
    assert args["patch_size"] == 16 and args["name"] == name
    assert vit(name, depth=1)["depth"] == 1  # overrides win over the preset
    builder = getattr(vit_module, name)
    assert builder(8)["patch_size"] == 8 and builder()["embed_dim"] == dim
    with pytest.raises(ValueError, match="Unknown ViT preset"):
        vit("vit_huge")


def test_init_follows_reference():
    model = tiny(randomize=False, use_mask_token=True, drop_path_rate=0.3, depth=4)
    np.testing.assert_allclose([b.drop.rate for b in model.blocks], np.linspace(0, 0.3, 4), atol=1e-7)
    np.testing.assert_array_equal(to_numpy(model.mask_token), np.zeros((1, DIM)))
    blk = model.blocks[0]
    np.testing.assert_array_equal(to_numpy(blk.attn.qkv.bias), np.zeros(3 * DIM))
    np.testing.assert_array_equal(to_numpy(blk.norm1.gamma), np.ones(DIM))
    np.testing.assert_array_equal(to_numpy(blk.norm1.beta), np.zeros(DIM))
    kernels = np.concatenate([to_numpy(b.attn.qkv.kernel).ravel() for b in model.blocks])
    assert abs(kernels.std() - 0.02) < 0.002  # N(0, 0.02^2), not Glorot
    assert model.norm.epsilon == 1e-6


def test_output_shapes():
    model = tiny()
    out = model(images(2, 32))
    assert set(out) == {"cls", "patches"}
    assert tuple(out["cls"].shape) == (2, DIM) and tuple(out["patches"].shape) == (2, 16, DIM)
    out = model(images(2, 16))
    assert tuple(out["cls"].shape) == (2, DIM) and tuple(out["patches"].shape) == (2, 4, DIM)
    out = model(images(2, 16, 24))
    assert tuple(out["patches"].shape) == (2, 6, DIM)


# ------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
@pytest.mark.parametrize("hw", [(32, 32), (16, 24)])
def test_forward_matches_numpy(pos_embed, hw):
    """Depth 2 (covers depth 1): includes bicubic position interpolation when hw != 32."""
    model = tiny(pos_embed=pos_embed)
    imgs = images(2, *hw)
    feats = model.forward_features(imgs, n_last_blocks=2)
    outs, _, _ = numpy_vit(model, imgs)
    np.testing.assert_allclose(to_numpy(feats["cls"]), outs[-1][:, 0], **TOL)
    np.testing.assert_allclose(to_numpy(feats["patches"]), outs[-1][:, 1:], **TOL)
    assert len(feats["last_blocks"]) == 2
    for got, ref in zip(feats["last_blocks"], outs):
        np.testing.assert_allclose(to_numpy(got), ref, **TOL)
    inter = model.get_intermediate_layers(imgs, n=2)
    np.testing.assert_array_equal(to_numpy(inter[-1])[:, 0], to_numpy(feats["cls"]))


def test_forward_depth_one_matches_numpy():
    model = tiny(depth=1, seed=3)
    imgs = images(2, 16)
    out = model(imgs)
    outs, _, _ = numpy_vit(model, imgs)
    np.testing.assert_allclose(to_numpy(out["cls"]), outs[-1][:, 0], **TOL)
    np.testing.assert_allclose(to_numpy(out["patches"]), outs[-1][:, 1:], **TOL)


def test_masks_replace_patch_embeddings_before_pos_embed():
    model = tiny(use_mask_token=True, seed=1)
    assert np.abs(to_numpy(model.mask_token)).sum() > 0  # randomised, so masking is visible
    imgs = images(2, 32)
    masks = np.random.default_rng(4).random((2, 4, 4)) < 0.4
    masks[0, 0, 0], masks[1, 0, 0] = True, False
    out = model(imgs, masks=masks)
    outs, _, _ = numpy_vit(model, imgs, masks=masks)
    np.testing.assert_allclose(to_numpy(out["patches"]), outs[-1][:, 1:], **TOL)
    np.testing.assert_allclose(to_numpy(out["cls"]), outs[-1][:, 0], **TOL)
    # The flat (batch, num_patches) form gives the same tokens.
    flat = model(imgs, masks=masks.reshape(2, 16))
    np.testing.assert_array_equal(to_numpy(flat["patches"]), to_numpy(out["patches"]))
    # Embedding level: a masked token is exactly mask_token + pos_embed[p].
    emb = to_numpy(model.embed(imgs, ops.convert_to_tensor(masks)))
    pos = to_numpy(model.pos_embed)[0]
    np.testing.assert_allclose(emb[0, 1], to_numpy(model.mask_token)[0] + pos[1], rtol=1e-6, atol=1e-6)
    unmasked = model(imgs)
    assert not np.allclose(to_numpy(unmasked["patches"]), to_numpy(out["patches"]))


def test_queries_leave_image_tokens_bitwise_and_match_numpy():
    model = tiny(use_mask_token=True, seed=2)
    imgs = images(2, 32)
    tables = ops.convert_to_tensor(np.random.default_rng(5).normal(size=(2, 3, DIM)).astype("float32"))
    queries = model.positional_queries(tables)
    np.testing.assert_allclose(
        to_numpy(queries), to_numpy(tables) + to_numpy(model.mask_token)[None], rtol=1e-6, atol=1e-6
    )
    plain = model(imgs)
    with_q = model(imgs, queries=queries)
    assert set(with_q) == {"cls", "patches", "queries"}
    assert np.array_equal(to_numpy(with_q["cls"]), to_numpy(plain["cls"]))
    assert np.array_equal(to_numpy(with_q["patches"]), to_numpy(plain["patches"]))
    _, q_ref, _ = numpy_vit(model, imgs, queries=to_numpy(queries).astype(np.float64))
    assert tuple(with_q["queries"].shape) == (2, 3, DIM)
    np.testing.assert_allclose(to_numpy(with_q["queries"]), q_ref, **TOL)


def test_last_selfattention():
    model = tiny()
    imgs = images(2, 32)
    attn = to_numpy(model.get_last_selfattention(imgs))
    assert attn.shape == (2, HEADS, 17, 17)
    np.testing.assert_allclose(attn.sum(-1), np.ones((2, HEADS, 17)), atol=1e-5)
    _, _, ref = numpy_vit(model, imgs)
    np.testing.assert_allclose(attn, ref, rtol=1e-4, atol=1e-5)


def test_sincos_pos_embed_is_fixed_table():
    model = tiny(pos_embed="sincos")
    assert not model.pos_embed.trainable
    assert all(v is not model.pos_embed for v in model.trainable_weights)
    assert any(v is model.pos_embed for v in model.non_trainable_weights)
    table = to_numpy(model.pos_embed)
    np.testing.assert_array_equal(table, sincos_grid(4, 4, DIM)[None])
    rows, cols = np.divmod(np.arange(16), 4)
    np.testing.assert_allclose(table[0, 1:], H.mae_sincos(cols, rows, DIM), atol=1e-6)
    np.testing.assert_array_equal(table[0, 0], np.zeros(DIM))
    learned = tiny(randomize=False)
    assert learned.pos_embed.trainable


# ------------------------------------------------------------------------------- errors
def test_clear_errors():
    model = tiny(randomize=False)
    with pytest.raises(ValueError, match="rank 3"):
        model(np.zeros((32, 32, 3), "float32"))
    with pytest.raises(ValueError, match="3 channels"):
        model(np.zeros((2, 32, 32, 1), "float32"))
    with pytest.raises(ValueError, match="not a multiple of the patch size 8.*16 or 24"):
        model(np.zeros((2, 20, 32, 3), "float32"))
    with pytest.raises(ValueError, match="width 36 .*32 or 40"):
        model(np.zeros((2, 32, 36, 3), "float32"))
    with pytest.raises(ValueError, match="mask token"):
        model(np.zeros((2, 32, 32, 3), "float32"), masks=np.zeros((2, 4, 4), bool))
    with pytest.raises(ValueError, match="mask token"):
        model.positional_queries(np.zeros((2, 3, DIM), "float32"))
    with pytest.raises(ValueError, match="pos_embed"):
        VisionTransformer(patch_size=8, embed_dim=DIM, depth=1, num_heads=2, pos_embed="rope")
    with pytest.raises(ValueError, match="image_size=36 .*32 or 40"):
        VisionTransformer(patch_size=8, embed_dim=DIM, depth=1, num_heads=2, image_size=36)


# ------------------------------------------------------------------------ serialisation
@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_keras_save_load_round_trip(tmp_path, pos_embed):
    model = tiny(use_mask_token=True, pos_embed=pos_embed, seed=6)
    imgs = images(2, 32)
    masks = np.random.default_rng(7).random((2, 4, 4)) < 0.3
    before = model(imgs, masks=masks)
    path = str(tmp_path / "vit.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, VisionTransformer)
    assert loaded.get_config() == model.get_config()
    assert len(loaded.trainable_weights) == len(model.trainable_weights)
    assert loaded.pos_embed.trainable == (pos_embed == "learned")
    after = loaded(imgs, masks=masks)
    for key in ("cls", "patches"):
        np.testing.assert_array_equal(to_numpy(after[key]), to_numpy(before[key]))
    for a, b in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
