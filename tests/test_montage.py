"""MCL montages: layout, slot -> source mapping, the tf.data pipeline.

Expected values are written out in NumPy here: a slot of montage b at ratio r holds source
view ``views[src, v, ::r, ::r]`` at rows ``(s // r) S/r`` and columns ``(s % r) S/r``.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_pqcl.data.montage import Montage, MontageConfig, mcl_dataset


def coordinate_views(n, num_views, size):
    """views[i, v, y, x] = (i, v, y * size + x): every pixel says where it comes from."""
    i, v, y, x = np.meshgrid(np.arange(n), np.arange(num_views), np.arange(size), np.arange(size), indexing="ij")
    return np.stack([i, v, y * size + x], axis=-1).astype(np.float32)


def expected_montage(views, view, sources, r):
    """NumPy montage: slot s of montage b = views[sources[b r^2 + s], view, ::r, ::r]."""
    size = views.shape[2]
    h = size // r
    out = np.zeros((len(sources) // (r * r), size, size, views.shape[-1]), views.dtype)
    for k, src in enumerate(sources):
        b, s = divmod(k, r * r)
        row, col = divmod(s, r)
        out[b, row * h : (row + 1) * h, col * h : (col + 1) * h] = views[src, view, ::r, ::r]
    return out


def test_layout_and_views_follow_the_spec():
    cfg = MontageConfig()
    layout = cfg.layout(128)
    assert [lv.ratio for lv in layout] == [1, 2, 4, 8]
    assert [lv.level for lv in layout] == [0, 1, 2, 3]
    assert [lv.num_montages for lv in layout] == [128, 32, 8, 4]  # N, N/4, N/16, N/32
    assert [lv.num_slots for lv in layout] == [128, 128, 128, 256]  # r=8 uses each image twice
    assert [lv.view_q for lv in layout] == [0, 1, 2, 3]
    assert [lv.view_k for lv in layout] == [4, 5, 6, 7]
    assert 128 + sum(lv.num_montages for lv in layout[1:]) == 172  # one branch batch
    assert cfg.num_views == 8 and cfg.tile_size == 7

    mc = cfg.multicrop_config()
    assert mc.n_global == 8 and mc.n_local == 0 and mc.global_size == 224
    assert mc.global_scale == (0.2, 1.0)
    assert mc.color_jitter == (0.4, 0.4, 0.2, 0.1)  # saturation 0.2
    assert (mc.jitter_p, mc.grayscale_p, mc.flip_p) == (0.8, 0.2, 0.5)
    assert mc.global_blur_p == (1.0,) * 4 + (0.1,) * 4  # pipeline A, then B
    assert mc.solarize_p == (0.0,) * 4 + (0.2,) * 4

    # Fewer ratios: views per branch shrink, default uses follow the ratios.
    small = MontageConfig(image_size=64, ratios=(2, 8))
    assert small.uses == (1, 2) and small.num_views == 6
    assert [(lv.ratio, lv.num_montages, lv.num_slots, lv.view_q, lv.view_k) for lv in small.layout(4)] == [
        (1, 4, 4, 0, 3),
        (2, 1, 4, 1, 4),
        (8, 1, 64, 2, 5),
    ]


@pytest.mark.parametrize(
    "kwargs", [dict(image_size=100), dict(ratios=(3,)), dict(ratios=(2, 2)), dict(uses=(1,)), dict(blur_p=(1.0,))]
)
def test_config_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        MontageConfig(**kwargs)


def test_montage_slots_map_back_to_their_source_views():
    n, size = 32, 32
    cfg = MontageConfig(image_size=size)
    views = coordinate_views(n, cfg.num_views, size)
    out = Montage(cfg)({"views": tf.constant(views), "label": tf.range(n)}, tf.constant([3, 4]))
    out = {k: v.numpy() for k, v in out.items()}
    assert "views" not in out and out["label"].shape == (n,)
    np.testing.assert_array_equal(out["full_images"][:, 0], views[:, 0])
    np.testing.assert_array_equal(out["full_images"][:, 1], views[:, 4])
    for j, (r, count) in enumerate([(2, 8), (4, 2), (8, 1)], start=1):
        montages, sources = out[f"montages_r{r}"], out[f"montage_sources_r{r}"]
        assert montages.shape == (count, 2, size, size, 3) and montages.dtype == np.float32
        assert sources.shape == (count * r * r, 2) and sources.dtype == np.int32
        uses = 2 if r == 8 else 1
        for branch, view in ((0, j), (1, 4 + j)):
            src = sources[:, branch]
            np.testing.assert_array_equal(np.bincount(src, minlength=n), np.full(n, uses))
            np.testing.assert_array_equal(montages[:, branch], expected_montage(views, view, src, r))
            # Read the coordinates back: slot (row, col) of montage b, pixel (y, x) of it.
            h = size // r
            b, s = divmod(5, r * r)
            row, col = divmod(s, r)
            patch = montages[b, branch, row * h : (row + 1) * h, col * h : (col + 1) * h]
            yy, xx = np.meshgrid(np.arange(h), np.arange(h), indexing="ij")
            assert np.all(patch[..., 0] == src[5]) and np.all(patch[..., 1] == view)
            np.testing.assert_array_equal(patch[..., 2], (yy * r) * size + xx * r)  # stride-r pick
        assert not np.array_equal(sources[:, 0], sources[:, 1])  # independent draws


def test_mcl_dataset_end_to_end_geometry():
    n_images, n, size = 12, 8, 32
    rng = np.random.default_rng(0)
    # Float images whose first channel is the image id: it survives crop and resize exactly.
    images = rng.uniform(0, 1, (n_images, 48, 40, 3)).astype(np.float32)
    images[..., 0] = np.arange(n_images)[:, None, None]
    source = tf.data.Dataset.from_tensor_slices((images, np.arange(n_images, dtype=np.int32)))
    cfg = MontageConfig(image_size=size)

    def build():
        return mcl_dataset(
            source, cfg, batch_size=n, seed=7, photometric=False, normalize=False, keep_views=True, jit_compile=False
        )

    ds = build()
    assert ds.cardinality() == 1
    batch = {k: v.numpy() for k, v in next(iter(ds)).items()}
    assert batch["views"].shape == (n, 8, size, size, 3)
    assert batch["view_boxes"].shape == (n, 8, 4) and batch["view_flips"].shape == (n, 8)
    assert batch["montages_r2"].shape == (2, 2, size, size, 3)
    assert batch["montages_r4"].shape == (1, 2, size, size, 3)  # ceil(8 / 16) = 1: 16 slots
    assert batch["montages_r8"].shape == (1, 2, size, size, 3)  # ceil(2 * 8 / 64) = 1
    assert batch["montage_sources_r8"].shape == (64, 2)
    views, labels = batch["views"], batch["label"]
    np.testing.assert_allclose(views[..., 0], np.broadcast_to(labels[:, None, None, None], views.shape[:4]), atol=1e-4)
    np.testing.assert_array_equal(batch["full_images"], views[:, [0, 4]])
    for j, r in enumerate((2, 4, 8), start=1):
        for branch, view in ((0, j), (1, 4 + j)):
            src = batch[f"montage_sources_r{r}"][:, branch]
            assert src.min() >= 0 and src.max() < n
            np.testing.assert_array_equal(batch[f"montages_r{r}"][:, branch], expected_montage(views, view, src, r))
    # Seeded: the same batches when rebuilt.
    again = next(iter(build()))
    for key in ("montages_r4", "montage_sources_r8", "view_boxes"):
        np.testing.assert_array_equal(again[key].numpy(), batch[key])


def test_mcl_dataset_photometric_smoke():
    cfg = MontageConfig(image_size=32, ratios=(2,))
    ds = mcl_dataset("synthetic_scenes:8:40", cfg, batch_size=4, seed=0, jit_compile=False)
    batch = next(iter(ds))
    assert sorted(batch) == [
        "full_images",
        "image_size",
        "label",
        "montage_sources_r2",
        "montages_r2",
        "view_boxes",
        "view_flips",
    ]
    assert batch["full_images"].shape == (4, 2, 32, 32, 3)
    assert batch["montages_r2"].shape == (1, 2, 32, 32, 3)
    assert np.all(np.isfinite(batch["montages_r2"].numpy()))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        mcl_dataset("synthetic_scenes:8:40", cfg, batch_size=16)
