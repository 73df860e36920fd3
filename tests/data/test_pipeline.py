"""pretrain_dataset, MultiCropConfig, augmentations and sources."""

import ast
import itertools
import os
import pathlib
import warnings

import numpy as np
import pytest
import tensorflow as tf

from keras_pqcl.data import (
    MultiCrop,
    MultiCropConfig,
    load_source,
    pretrain_dataset,
    steps_per_epoch,
)
from keras_pqcl.data import augment as A

SMALL = dict(global_size=32, local_size=16, n_local=3, use_keras_cv=False)


def _np(batch):
    return {k: v.numpy() for k, v in batch.items()}


# ---------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------
def test_config_defaults_are_dino():
    c = MultiCropConfig()
    assert (c.global_size, c.local_size, c.n_global, c.n_local) == (224, 96, 2, 8)
    assert c.global_scale == (0.4, 1.0) and c.local_scale == (0.05, 0.4)
    assert c.global_blur_p == (1.0, 0.1) and c.local_blur_p == 0.5
    assert c.solarize_p == (0.0, 0.2)
    assert c.color_jitter == (0.4, 0.4, 0.2, 0.1)
    assert (c.jitter_p, c.grayscale_p, c.flip_p) == (0.8, 0.2, 0.5)
    assert c.mean == (0.485, 0.456, 0.406) and c.std == (0.229, 0.224, 0.225)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="global_size"):
        MultiCropConfig(global_size=0)
    with pytest.raises(ValueError, match="local_size"):
        MultiCropConfig(local_size=-3)
    with pytest.raises(ValueError, match="n_local"):
        MultiCropConfig(n_local=-1)
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropConfig(global_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="jitter_p"):
        MultiCropConfig(jitter_p=1.5)
    with pytest.raises(ValueError, match="global_blur_p.*n_global=3"):
        MultiCropConfig(n_global=3)
    with pytest.raises(ValueError, match="solarize_p.*n_global=3"):
        MultiCropConfig(n_global=3, global_blur_p=1.0)
    c = MultiCropConfig(n_global=3, global_blur_p=0.5, solarize_p=0.0)
    assert c.global_blur_p == (0.5, 0.5, 0.5)


def test_check_patch_size():
    MultiCropConfig(global_size=224, local_size=96).check_patch_size(16)
    with pytest.raises(ValueError, match=r"local_size=100.*96 or 112"):
        MultiCropConfig(global_size=224, local_size=100).check_patch_size(16)
    with pytest.raises(ValueError, match=r"global_size=30.*24 or 32"):
        MultiCropConfig(global_size=30, local_size=16).check_patch_size(8)


# ---------------------------------------------------------------------------
# batch format and determinism
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_images():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 40, 36, 3), dtype=np.uint8)
    labels = np.arange(12, dtype=np.int32) % 3
    return images, labels


def _small_pipeline(data, seed, **kw):
    return pretrain_dataset(data, MultiCropConfig(**SMALL), batch_size=4, seed=seed, **kw)


@pytest.fixture(scope="module")
def seeded(small_images):
    """Two pipelines with seed 3 and one with seed 4 (built once: building
    a pipeline costs seconds of tracing on a small CPU)."""
    return (_small_pipeline(small_images, 3), _small_pipeline(small_images, 3), _small_pipeline(small_images, 4))


def test_batch_dict_keys_shapes_dtypes(small_images, seeded):
    ds = seeded[2]  # seeds 3 are kept fresh for the determinism test
    cfg = MultiCropConfig(**SMALL)
    assert steps_per_epoch(ds) == 3
    batches = [_np(b) for b in ds]
    assert len(batches) == 3
    b = batches[0]
    expected = {
        "global_crops": ((4, 2, 32, 32, 3), np.float32),
        "local_crops": ((4, 3, 16, 16, 3), np.float32),
        "global_boxes": ((4, 2, 4), np.float32),
        "global_flips": ((4, 2), np.int32),
        "local_boxes": ((4, 3, 4), np.float32),
        "local_flips": ((4, 3), np.int32),
        "image_size": ((4, 2), np.int32),
        "label": ((4,), np.int32),
    }
    assert set(b) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert b[key].shape == shape, key
        assert b[key].dtype == dtype, key
        assert ds.element_spec[key].shape.as_list() == list(shape), key
    assert np.all(b["image_size"] == [40, 36])
    # Boxes lie inside the source image.
    for kind in ("global", "local"):
        box = b[f"{kind}_boxes"]
        assert np.all(box[..., :2] >= 0)
        assert np.all(box[..., 0] + box[..., 2] <= 40)
        assert np.all(box[..., 1] + box[..., 3] <= 36)
    # Normalised: within the image of [0, 1] under (x - mean) / std.
    g = b["global_crops"]
    lo = (0 - np.array(cfg.mean)) / np.array(cfg.std)
    hi = (1 - np.array(cfg.mean)) / np.array(cfg.std)
    assert np.all(g >= lo - 1e-4) and np.all(g <= hi + 1e-4)
    # Every example seen once per epoch (shuffled labels keep their counts).
    labels = np.concatenate([x["label"] for x in batches])
    assert sorted(labels.tolist()) == sorted(small_images[1].tolist())


def test_seed_determinism(seeded):
    a, b, c = (_np(next(iter(ds))) for ds in seeded)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.array_equal(a["global_boxes"], c["global_boxes"])
    assert not np.allclose(a["global_crops"], c["global_crops"])
    # Iterating the same dataset again draws new crops (new epoch), and
    # that sequence is reproducible as well.
    a2, b2 = (_np(next(iter(ds))) for ds in seeded[:2])
    assert not np.array_equal(a["global_boxes"], a2["global_boxes"])
    for key in a2:
        np.testing.assert_array_equal(a2[key], b2[key], err_msg=key)


def test_geometry_only_no_local_crops(small_images):
    cfg = MultiCropConfig(global_size=16, local_size=8, n_local=0, use_keras_cv=False)
    ds = pretrain_dataset(small_images[0], cfg, batch_size=4, shuffle=False, photometric=False)
    spec = ds.element_spec
    assert "local_crops" not in spec and "local_boxes" not in spec
    assert spec["global_crops"].shape.as_list() == [4, 2, 16, 16, 3]
    b = _np(next(iter(ds)))
    assert np.all(b["label"] == -1)


def test_too_few_examples_for_batch(small_images):
    with pytest.raises(ValueError, match="batch_size=16"):
        pretrain_dataset(small_images, MultiCropConfig(**SMALL), batch_size=16)


def test_synthetic_source_and_repeat():
    cfg = MultiCropConfig(global_size=16, local_size=8, n_local=1, use_keras_cv=False)
    ds, info = pretrain_dataset(
        "synthetic_scenes:24:32", cfg, batch_size=8, repeat=True, seed=0, return_info=True, photometric=False
    )
    assert steps_per_epoch(ds) is None  # infinite
    assert info.num_examples == 24 and len(info.class_names) == 10
    batches = list(ds.take(4))  # more than one epoch
    assert batches[-1]["global_crops"].shape == (8, 2, 16, 16, 3)
    assert np.all(batches[0]["image_size"].numpy() == [32, 32])


# ---------------------------------------------------------------------------
# augmentations
# ---------------------------------------------------------------------------
def test_augmentation_probabilities():
    n = 400
    cfg = MultiCropConfig(global_size=12, local_size=8, n_global=2, n_local=2, use_keras_cv=False)
    mc = MultiCrop(cfg, record_augmentations=True)
    colourful = tf.constant(np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8))
    ds = tf.data.Dataset.range(n).map(
        lambda i: mc(colourful, -1, tf.stack([i, tf.constant(9, tf.int64)])),
        num_parallel_calls=2,
    )
    out = _np(next(iter(ds.batch(n))))
    g, loc = out["global_augs"], out["local_augs"]  # [n, crops, 4]

    def close(x, p):  # within 4.5 standard deviations
        return abs(x.mean() - p) <= 4.5 * np.sqrt(p * (1 - p) / x.size) + 1e-9

    # (jitter, grayscale, blur, solarize)
    assert close(g[..., 0], 0.8) and close(loc[..., 0], 0.8)
    assert close(g[..., 1], 0.2) and close(loc[..., 1], 0.2)
    assert np.all(g[:, 0, 2] == 1)  # blur p = 1.0 on global crop 1
    assert close(g[:, 1, 2], 0.1)
    assert close(loc[..., 2], 0.5)
    assert np.all(g[:, 0, 3] == 0)  # solarize only on the 2nd global crop
    assert close(g[:, 1, 3], 0.2)
    assert np.all(loc[..., 3] == 0)
    # Grayscale is visible in the pixels: equal channels after un-normalising.
    mean, std = np.array(cfg.mean), np.array(cfg.std)
    rgb = out["local_crops"] * std + mean
    equal = np.abs(rgb[..., 0] - rgb[..., 1]).max(axis=(-1, -2)) < 1e-4
    np.testing.assert_array_equal(equal, loc[..., 1] == 1)


def _direct_jitter(x, order, factors):
    b, c, s, h = factors
    ops = [
        lambda y: A.adjust_brightness(y, b),
        lambda y: A.adjust_contrast(y, c),
        lambda y: A.adjust_saturation(y, s),
        lambda y: A.adjust_hue(y, h),
    ]
    for i in order:
        x = ops[i](x)
    return x.numpy()


def test_color_jitter_is_a_permutation_of_torchvision_ops():
    img = tf.constant(np.random.default_rng(2).uniform(size=(6, 6, 3)), tf.float32)
    # Strong factors and clipping make the orders distinguishable.
    strengths = (0.9, 0.9, 0.9, 0.3)
    chain = A.Photometric(strengths, jitter_p=1.0, grayscale_p=0.0)
    for k in range(4):
        params = chain.sample(tf.constant([k, 3], tf.int64), 1, blur_p=0.0)
        p = {key: v.numpy()[0] for key, v in params.items()}
        out = chain.apply(img[None], params)[0].numpy()
        ref = _direct_jitter(img, list(p["perm"]), p["factors"])
        np.testing.assert_allclose(out, ref, atol=1e-5)
        # Another order gives another image (so the check above has teeth).
        other = _direct_jitter(img, list(p["perm"])[::-1], p["factors"])
        assert np.abs(other - out).max() > 1e-3
    fixed = A.Photometric(strengths, jitter_p=1.0, random_order=False)
    params = fixed.sample(tf.constant([1, 3]), 1, blur_p=0.0)
    np.testing.assert_array_equal(params["perm"].numpy(), [[0, 1, 2, 3]])
    # The 24 orders are equally likely (torchvision: randperm(4)); factors
    # are uniform on their ranges.
    chain = A.Photometric(strengths, jitter_p=1.0)
    params = chain.sample(tf.constant([7, 7]), 4800, blur_p=0.0)
    perms = [tuple(p) for p in params["perm"].numpy()]
    counts = np.array([perms.count(p) for p in itertools.permutations(range(4))])
    assert counts.min() > 200 * 0.7 and counts.max() < 200 * 1.3
    f = params["factors"].numpy()
    assert f[:, :3].min() >= 0.1 and f[:, :3].max() <= 1.9
    assert f[:, 3].min() >= -0.3 and f[:, 3].max() <= 0.3
    np.testing.assert_allclose(f.mean(0), [1.0, 1.0, 1.0, 0.0], atol=0.03)


def test_photometric_apply_per_crop_matches_ops():
    # apply() with per-crop choices equals the primitive ops composed by hand.
    rng = np.random.default_rng(8)
    imgs = tf.constant(rng.uniform(size=(6, 10, 10, 3)), tf.float32)
    chain = A.Photometric(jitter_p=0.0, grayscale_p=0.5, blur_sigma=(0.5, 1.5))
    params = chain.sample(tf.constant([1, 2]), 6, blur_p=0.5, solarize_p=0.5)
    out = tf.function(chain.apply, jit_compile=True)(imgs, params).numpy()
    p = {k: v.numpy() for k, v in params.items()}
    for i in range(6):
        ref = imgs[i]
        if p["grayscale"][i]:
            ref = A.to_grayscale(ref)
        if p["blur"][i]:
            ref = A.gaussian_blur(ref, p["sigma"][i], chain.radius)
        if p["solarize"][i]:
            ref = A.solarize(ref)
        np.testing.assert_allclose(out[i], ref.numpy(), atol=1e-5)
    assert 0 < p["blur"].sum() < 6 or 0 < p["solarize"].sum() < 6


def test_gaussian_blur_matches_numpy_formula():
    # Truncated Gaussian (radius 6), renormalised over the taps inside the
    # image, applied along rows then columns.
    rng = np.random.default_rng(10)
    img = rng.uniform(size=(2, 9, 11, 3)).astype(np.float32)
    sigmas = np.array([0.7, 1.6], np.float32)

    def blur_1d(x, sigma, axis):
        n = x.shape[axis]
        d = np.arange(n)[:, None] - np.arange(n)[None, :]
        m = np.exp(-(d**2) / (2 * sigma**2)) * (np.abs(d) <= 6)
        m /= m.sum(1, keepdims=True)
        return np.moveaxis(np.tensordot(m, np.moveaxis(x, axis, 0), 1), 0, axis)

    ours = A.gaussian_blur(img, sigmas).numpy()
    for i in range(2):
        ref = blur_1d(blur_1d(img[i], sigmas[i], 0), sigmas[i], 1)
        np.testing.assert_allclose(ours[i], ref, atol=1e-5)


def test_adjust_hue_matches_tf_image():
    img = tf.constant(np.random.default_rng(9).uniform(size=(8, 8, 3)), tf.float32)
    for delta in (-0.3, 0.07, 0.5):
        ref = tf.clip_by_value(tf.image.adjust_hue(img, delta), 0.0, 1.0)
        np.testing.assert_allclose(A.adjust_hue(img, delta).numpy(), ref.numpy(), atol=1e-5)


def test_adjust_hue_matches_hsv_round_trip_per_image():
    # One delta per image, gray pixels (no hue) and ties between channels.
    rng = np.random.default_rng(12)
    img = rng.uniform(size=(3, 6, 7, 3)).astype(np.float32)
    img[0, 0, :] = 0.4  # gray
    img[1, 1, :, :2] = img[1, 1, :, 2:3]  # r == g == b
    img[2, 2, :, 0] = img[2, 2, :, 1]  # r == g
    deltas = np.array([-0.5, 0.03, 0.45], np.float32)
    ours = A.adjust_hue(tf.constant(img), tf.constant(deltas)).numpy()
    hsv = tf.image.rgb_to_hsv(img)
    hue = tf.math.floormod(hsv[..., :1] + deltas[:, None, None, None], 1.0)
    ref = tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], -1)).numpy()
    np.testing.assert_allclose(ours, np.clip(ref, 0, 1), atol=1e-5)
    np.testing.assert_array_equal(ours[0, 0], img[0, 0])


def test_map_crops_is_a_loop_over_crops():
    crops = tf.constant(np.random.default_rng(13).uniform(size=(4, 5, 6, 3)), tf.float32)
    scale = tf.constant([1.0, 2.0, 3.0, 4.0])
    out = A.map_crops(lambda c, s: c * s, crops, scale).numpy()
    np.testing.assert_allclose(out, crops.numpy() * np.arange(1, 5)[:, None, None, None])


def test_apply_one_pre_post_equal_composition():
    # pre/post are fused into the chain's branches; the numbers are those of
    # applying them around it.
    rng = np.random.default_rng(14)
    imgs = tf.constant(rng.uniform(size=(6, 10, 10, 3)), tf.float32)
    chain = A.Photometric(blur_sigma=(0.5, 1.5))
    params = chain.sample(tf.constant([5, 6]), 6, blur_p=0.5, solarize_p=0.5)
    pre = lambda x: tf.clip_by_value(tf.reverse(x, [-2]) * 1.3, 0.0, 1.0)
    post = lambda x: A.normalize(x)
    run = tf.function(
        lambda x, p: A.map_crops(lambda c, q: chain.apply_one(c, q, pre=pre, post=post), x, p), jit_compile=True
    )
    out = run(imgs, params).numpy()
    ref = post(chain.apply(pre(imgs), params)).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_finish_on_a_batch_equals_per_example(small_images):
    cfg = MultiCropConfig(**SMALL)
    mc = MultiCrop(cfg, record_augmentations=True)
    images = tf.constant(small_images[0][:3])
    samples = [mc.sample(images[i], i, tf.constant([i, 9])) for i in range(3)]
    single = [mc.finish(s) for s in samples]
    batch = tf.nest.map_structure(lambda *t: tf.stack(t), *samples)
    batched = tf.function(mc.finish, jit_compile=True)(batch)
    for key in batched:
        np.testing.assert_allclose(
            batched[key].numpy(), np.stack([s[key].numpy() for s in single]), atol=1e-5, err_msg=key
        )


def test_photometric_primitives():
    rng = np.random.default_rng(3)
    img = tf.constant(rng.uniform(size=(20, 20, 3)), tf.float32)
    # Solarize: invert pixels >= 128 / 255.
    x = tf.constant([[[0.2, 0.5, 0.9]]])
    np.testing.assert_allclose(A.solarize(x).numpy(), [[[0.2, 0.5, 0.1]]], atol=1e-6)
    g = A.to_grayscale(img).numpy()
    assert g.shape == (20, 20, 3) and np.allclose(g[..., 0], g[..., 2])
    # Blur keeps constants (no dark borders) and the mean, and smooths.
    const = tf.fill([20, 20, 3], 0.7)
    np.testing.assert_allclose(A.gaussian_blur(const, 2.0).numpy(), 0.7, atol=1e-5)
    blurred = A.gaussian_blur(img, 2.0).numpy()
    assert blurred.std() < 0.5 * img.numpy().std()
    np.testing.assert_allclose(A.gaussian_blur(img, 0.1).numpy(), img.numpy(), atol=1e-4)
    norm = A.normalize(tf.constant([[[0.485, 0.456, 0.406]]]))
    np.testing.assert_allclose(norm.numpy(), 0.0, atol=1e-6)


def test_photometric_ops_match_pil():
    # torchvision applies these ops to PIL images in DINO; compare with PIL
    # within its uint8 rounding.
    Image = pytest.importorskip("PIL.Image")
    ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
    ImageOps = pytest.importorskip("PIL.ImageOps")
    rng = np.random.default_rng(5)
    u8 = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    pil = Image.fromarray(u8)
    x = tf.constant(u8, tf.float32) / 255.0

    def same(ours, theirs, tol=1.5):
        diff = np.abs(np.round(ours.numpy() * 255.0) - np.asarray(theirs, float))
        assert diff.max() <= tol, diff.max()

    same(A.adjust_brightness(x, 1.3), ImageEnhance.Brightness(pil).enhance(1.3))
    same(A.adjust_saturation(x, 0.7), ImageEnhance.Color(pil).enhance(0.7))
    # PIL rounds the mean luma to an integer first.
    same(A.adjust_contrast(x, 1.4), ImageEnhance.Contrast(pil).enhance(1.4), tol=2.5)
    same(A.solarize(x), ImageOps.solarize(pil, 128), tol=0)
    gray = np.asarray(pil.convert("L"))[..., None].repeat(3, -1)
    same(A.to_grayscale(x), gray)


def test_keras_cv_ops_match_tf_ops():
    pytest.importorskip("keras_cv")
    img = tf.constant(np.random.default_rng(4).uniform(size=(8, 8, 3)), tf.float32)
    kcv, ref = A.make_ops(True), A.make_ops(False)
    assert kcv["impl"] == "keras_cv"
    np.testing.assert_allclose(kcv["grayscale"](img).numpy(), ref["grayscale"](img).numpy(), atol=1e-5)
    np.testing.assert_allclose(kcv["solarize"](img).numpy(), ref["solarize"](img).numpy(), atol=1e-5)
    # And inside tf.data with the default config (keras-cv on).
    cfg = MultiCropConfig(
        global_size=16, local_size=8, n_local=1, solarize_p=(1.0, 1.0), global_blur_p=0.0, jitter_p=0.0, grayscale_p=1.0
    )
    a = _np(next(iter(pretrain_dataset((np.full((2, 20, 20, 3), 200, np.uint8),), cfg, batch_size=2, seed=0))))
    rgb = a["global_crops"] * np.array(cfg.std) + np.array(cfg.mean)
    # 200/255 (gray) is solarized to 55/255.
    np.testing.assert_allclose(rgb, 55 / 255, atol=1e-3)


# ---------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------
def _write_png(path, value, size=(10, 12)):
    img = np.full(size + (3,), value, np.uint8)
    with open(path, "wb") as f:
        f.write(tf.io.encode_png(img).numpy())


def test_folder_with_classes_and_corrupt_file(tmp_path):
    for cls, n in (("cats", 3), ("dogs", 2)):
        (tmp_path / cls / "sub").mkdir(parents=True)
        for i in range(n):
            _write_png(tmp_path / cls / "sub" / f"{i}.png", 10 * i)
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"not an image at all")
    (tmp_path / "cats" / "notes.txt").write_text("ignored: not an image ext")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds, info = load_source(str(tmp_path))
    msgs = [str(w.message) for w in rec if "skipped" in str(w.message)]
    assert len(msgs) == 1 and "skipped 1 of 6" in msgs[0]
    assert info.num_examples == 5 and info.num_skipped == 1
    assert info.class_names == ("cats", "dogs")
    items = [(im.numpy(), int(lab)) for im, lab in ds]
    assert sorted(lab for _, lab in items) == [0, 0, 0, 1, 1]
    assert all(im.shape == (10, 12, 3) and im.dtype == np.uint8 for im, _ in items)
    # Through the whole pipeline (folder of 5 images, batch 2).
    cfg = MultiCropConfig(global_size=8, local_size=8, n_local=0, use_keras_cv=False)
    with pytest.warns(UserWarning, match="skipped 1 of 6"):
        ds = pretrain_dataset(str(tmp_path), cfg, batch_size=2, seed=0, photometric=False)
    assert steps_per_epoch(ds) is None  # files may still fail at decode
    batches = list(ds)
    assert len(batches) == 2


def test_folder_without_subfolders_and_decode_time_errors(tmp_path):
    for i in range(3):
        _write_png(tmp_path / f"{i}.PNG", 50)
    # Valid PNG signature, truncated data: passes the header check and is
    # dropped by ignore_errors at decode time.
    good = (tmp_path / "0.PNG").read_bytes()
    (tmp_path / "trunc.png").write_bytes(good[:30])
    ds, info = load_source(str(tmp_path))
    assert info.class_names is None
    labels = [int(lab) for _, lab in ds]
    assert labels == [-1, -1, -1]
    # verify="decode" counts it up front.
    with pytest.warns(UserWarning, match="skipped 1 of 4"):
        _, info = load_source(str(tmp_path), verify="decode")
    assert info.num_examples == 3


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_source(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"no image files.*\.jpg"):
        load_source(str(tmp_path))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        load_source(str(tmp_path))
    (tmp_path / "b.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of"):
        load_source(str(tmp_path))


def test_numpy_source_large_array_path(monkeypatch):
    # Arrays above the in-graph limit are read with tf.numpy_function.
    from keras_pqcl.data import sources

    monkeypatch.setattr(sources, "_MAX_IN_GRAPH_BYTES", 0)
    images = np.arange(3 * 4 * 5 * 3, dtype=np.uint8).reshape(3, 4, 5, 3)
    ds, _ = load_source((images, np.array([2, 1, 0])))
    got = [(im.numpy(), int(lab)) for im, lab in ds]
    assert [lab for _, lab in got] == [2, 1, 0]
    np.testing.assert_array_equal(got[1][0], images[1])
    assert ds.element_spec[0].shape.as_list() == [4, 5, 3]


def test_numpy_sources_and_validation():
    gray = np.random.default_rng(0).integers(0, 256, (4, 9, 7), np.uint8)
    ds, info = load_source({"images": gray, "labels": np.arange(4)})
    im, lab = next(iter(ds))
    assert im.shape == (9, 7, 3) and im.dtype == tf.uint8 and lab.dtype == tf.int32
    np.testing.assert_array_equal(im.numpy()[..., 0], gray[0])
    assert info.num_examples == 4
    floats = np.full((2, 5, 5, 1), 0.5, np.float32)
    im, lab = next(iter(load_source((floats,))[0]))
    assert int(im[0, 0, 0]) == 128 and int(lab) == -1
    with pytest.raises(ValueError, match="3 channels"):
        load_source(np.zeros((2, 5, 5, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        load_source(np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_source(np.full((2, 5, 5, 3), 3.0, np.float32))
    with pytest.raises(ValueError, match="labels"):
        load_source((np.zeros((2, 5, 5, 3), np.uint8), np.zeros(3, np.int32)))
    with pytest.raises(ValueError, match="synthetic_scenes:N"):
        load_source("synthetic_scenes:many")


def test_tfds_source_offline():
    tfds = pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        load_source("tfds:mnist", data_dir=os.path.join(os.sep, "nonexistent"))
    if os.environ.get("KERAS_PQCL_SLOW_TESTS"):
        with tfds.testing.mock_data(num_examples=6):
            ds, info = load_source("tfds:mnist")
            im, lab = next(iter(ds))
        assert im.shape == (28, 28, 3) and lab.dtype == tf.int32
        assert info.num_examples == 6 and len(info.class_names) == 10


def test_keras_cv_is_imported_lazily():
    # `import keras_pqcl.data` must stay light: keras_cv may only be imported
    # inside function bodies.
    import keras_pqcl.data as pkg

    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level statements only
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    break
                names = []
                if isinstance(sub, ast.Import):
                    names = [a.name for a in sub.names]
                elif isinstance(sub, ast.ImportFrom):
                    names = [sub.module or ""]
                assert not any(n.startswith("keras_cv") for n in names), path
