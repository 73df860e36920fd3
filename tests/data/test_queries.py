"""PQCL query coordinates and tables against NumPy formulas and
against the pixels of a coordinate-encoded image."""

import numpy as np
import pytest
import tensorflow as tf

from keras_pqcl.data import (
    MaskConfig,
    MultiCrop,
    MultiCropConfig,
    QueryConfig,
    pretrain_dataset,
    query_coords,
    sincos_tables,
)

from tests import helpers


def _spec_coords(gbox, gflip, lbox, lflip, G, L, flip_correct):
    """PQCL's query coordinates (the module docstring's formula, flips included), written
    out for one (global, local) pair: [L*L, 2]."""
    ig, jg, hg, wg = gbox
    il, jl, hl, wl = lbox
    kx, ky = wg / G, hg / G
    dx, dy = (jl - jg) / kx, (il - ig) / ky
    sx, sy = (wl / L) / kx, (hl / L) / ky
    out = []
    for a in range(L):
        for b in range(L):
            col = (L - 1 - b) if (flip_correct and lflip) else b
            x = dx + col * sx
            y = dy + a * sy
            if flip_correct and gflip:
                x = G - x - sx
            out.append((x, y))
    return np.array(out)


def test_query_coords_match_spec_formula_with_and_without_flips():
    rng = np.random.default_rng(0)
    gboxes = np.array([[10, 20, 150, 180], [0, 5, 200, 160]], np.float32)
    lboxes = np.array([[40, 60, 50, 70], [100, 0, 64, 48], [5, 170, 30, 30]], np.float32)
    for gflips, lflips in [([0, 0], [0, 0, 0]), ([1, 0], [0, 1, 0]), ([1, 1], [1, 1, 1])]:
        for flip_correct in (True, False):
            ours = query_coords(gboxes, gflips, lboxes, lflips, 14, 6, flip_correct).numpy()
            assert ours.shape == (2, 3, 36, 2)
            for g in range(2):
                for l in range(3):
                    ref = _spec_coords(gboxes[g], gflips[g], lboxes[l], lflips[l], 14, 6, flip_correct)
                    np.testing.assert_allclose(ours[g, l], ref, atol=1e-4)
    # Unflipped, the official and the corrected coordinates agree.
    a = query_coords(gboxes, [0, 0], lboxes, [0, 0, 0], 14, 6, True)
    b = query_coords(gboxes, [0, 0], lboxes, [0, 0, 0], 14, 6, False)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    del rng


def test_local_crop_equal_to_global_view_gives_the_global_grid():
    box = np.array([[8, 8, 64, 64]], np.float32)
    c = query_coords(box, [0], box, [0], 4, 4).numpy()[0, 0]
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    np.testing.assert_allclose(c[:, 0], cols.ravel(), atol=1e-6)
    np.testing.assert_allclose(c[:, 1], rows.ravel(), atol=1e-6)
    # Both flipped: the mirrored local crop over the mirrored view is again
    # the identity on output tokens.
    c = query_coords(box, [1], box, [1], 4, 4).numpy()[0, 0]
    np.testing.assert_allclose(c[:, 0], cols.ravel(), atol=1e-6)


def test_sincos_tables_match_numpy_formula():
    coords = np.random.default_rng(1).uniform(-3, 16, size=(2, 5, 2))
    dim = 16
    ours = sincos_tables(coords.astype(np.float32), dim).numpy()
    w = 1.0 / 10000 ** (np.arange(4) / 4)
    x, y = coords[..., :1] * w, coords[..., 1:] * w
    ref = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], -1)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_tables(coords, 6)


def test_sincos_tables_agree_with_the_backbone_grid():
    # A query on an integer grid point gets the backbone's own table row.
    from keras_pqcl.layers.pos_embed import sincos_grid

    grid = sincos_grid(3, 5, 32, cls_token=False)
    coords = np.array([[4.0, 2.0], [0.0, 1.0]], np.float32)  # (x=col, y=row)
    tables = sincos_tables(coords, 32).numpy()
    np.testing.assert_allclose(tables[0], grid[2 * 5 + 4], atol=1e-5)
    np.testing.assert_allclose(tables[1], grid[1 * 5 + 0], atol=1e-5)


_coord_image, _bilinear = helpers.coord_image, helpers.bilinear


@pytest.mark.parametrize("flip_correct", [True, False])
def test_queries_point_at_the_pixels_of_their_local_patch(flip_correct):
    """End to end through MultiCrop on an image whose pixels are their own
    source coordinates: the global view's pixels at a query's position show
    the same source pixels as the local patch the query stands for."""
    patch = 8
    # Uncorrected (official) coordinates come with unflipped local crops, as in
    # the official pipeline; global views are flipped either way.
    cfg = MultiCropConfig(
        global_size=64,
        local_size=32,
        n_global=2,
        n_local=3,
        global_scale=(0.5, 1.0),
        local_scale=(0.1, 0.3),
        flip_local=flip_correct,
    )
    mc = MultiCrop(cfg, photometric=False, normalize=False, queries=QueryConfig(patch, flip_correct=flip_correct))
    img = _coord_image(120, 100)
    G, L = 64 // patch, 32 // patch
    errors = {True: [], False: []}
    for s in range(12):
        out = {k: v.numpy() for k, v in mc(img, -1, tf.constant([s, 1])).items()}
        coords = out["query_coords"]
        for g in range(2):
            flipped = bool(out["global_flips"][g] or out["local_flips"].any())
            view = out["global_crops"][g]
            for l in range(3):
                local = out["local_crops"][l]
                for q in range(L * L):
                    a, b = divmod(q, L)
                    want = local[a * patch : (a + 1) * patch, b * patch : (b + 1) * patch, :2].mean((0, 1))
                    x, y = coords[g, l, q]
                    lb, gb = out["local_boxes"][l], out["global_boxes"][g]
                    sx = (lb[3] / L) / (gb[3] / G)
                    sy = (lb[2] / L) / (gb[2] / G)
                    # Centre of the query's cell, in view pixels.
                    cx = (x + sx / 2) * patch
                    cy = (y + sy / 2) * patch
                    if not (0 <= cx <= 64 and 0 <= cy <= 64):
                        continue  # outside the view: nothing to compare
                    got = _bilinear(view[..., :2], cy, cx)
                    errors[flipped].append(np.abs(got - want).max())
    # Correct geometry: within ~1.5 source pixels (resampling blur). The
    # official coordinates are as good without flips and wrong with them.
    assert len(errors[False]) > 50 and len(errors[True]) > 50
    assert np.percentile(errors[False], 95) < 1.5
    if flip_correct:
        assert np.percentile(errors[True], 95) < 1.5
    else:
        assert np.median(errors[True]) > 5.0


def test_pipeline_emits_masks_and_queries():
    images = np.random.default_rng(3).integers(0, 256, (8, 48, 40, 3), np.uint8)
    cfg = MultiCropConfig(global_size=32, local_size=16, n_local=2, flip_local=False, use_keras_cv=False)
    ds = pretrain_dataset(
        images,
        cfg,
        batch_size=4,
        seed=0,
        masks=MaskConfig(patch_size=8, ratio=0.3, ratio_var=0.0),
        queries=QueryConfig(patch_size=8, embed_dim=16),
    )
    spec = ds.element_spec
    assert spec["global_masks"].shape.as_list() == [4, 2, 4, 4]
    assert spec["global_masks"].dtype == tf.bool
    assert spec["query_coords"].shape.as_list() == [4, 2, 2, 4, 2]
    assert spec["query_tables"].shape.as_list() == [4, 2, 2, 4, 16]
    b = next(iter(ds))
    assert int(tf.reduce_sum(tf.cast(b["global_masks"], tf.int32))) > 0
    # The tables are the sin-cos of the coordinates.
    np.testing.assert_allclose(b["query_tables"].numpy(), sincos_tables(b["query_coords"], 16).numpy(), atol=1e-5)
    assert not any(k.startswith("_") for k in spec)


def test_config_errors():
    with pytest.raises(ValueError, match="embed_dim"):
        QueryConfig(embed_dim=30)
    with pytest.raises(ValueError, match="patch_size"):
        QueryConfig(patch_size=0)
    with pytest.raises(ValueError, match="n_local=0"):
        MultiCrop(MultiCropConfig(n_local=0), queries=QueryConfig())
    with pytest.raises(ValueError, match="local_size=100"):
        MultiCrop(MultiCropConfig(local_size=100), queries=QueryConfig(16))


def test_uncorrected_queries_need_unflipped_local_crops():
    """flip_correct=False reproduces the official queries, which assume local
    crops are never flipped: a pipeline that may flip them is refused."""
    small = dict(global_size=32, local_size=16, n_local=2)
    official = QueryConfig(patch_size=8, flip_correct=False)
    with pytest.raises(ValueError, match=r"flip_local=False.*flip_correct=True"):
        MultiCrop(MultiCropConfig(**small), queries=official)  # flip_local=True
    with pytest.raises(ValueError, match="flip_local=False"):
        pretrain_dataset(np.zeros((4, 40, 40, 3), np.uint8), MultiCropConfig(**small), batch_size=2, queries=official)
    # Unflipped local crops (or no flips at all) are fine, and so is the
    # corrected geometry with flipped local crops.
    MultiCrop(MultiCropConfig(**small, flip_local=False), queries=official)
    MultiCrop(MultiCropConfig(**small, flip_p=0.0), queries=official)
    MultiCrop(MultiCropConfig(**small), queries=QueryConfig(patch_size=8))
    out = MultiCrop(MultiCropConfig(**small, flip_local=False), queries=official)(
        np.zeros((40, 40, 3), np.uint8), -1, tf.constant([0, 1])
    )
    assert not out["local_flips"].numpy().any()
