"""Crop geometry: RandomResizedCrop box sampling, crop + resize, flips."""

import math

import numpy as np
import pytest
import tensorflow as tf

from keras_pqcl.data import MultiCrop, MultiCropConfig
from keras_pqcl.data import crops as C


def _boxes(height, width, scale, ratio, n=2000, salt=7):
    """n boxes with seeds (i, salt), drawn in one tf.data pass (fast)."""
    ds = tf.data.Dataset.range(n).map(
        lambda i: C.sample_crop_box(
            tf.stack([i, tf.constant(salt, tf.int64)]),
            height,
            width,
            scale=scale,
            ratio=ratio,
        )
    )
    return next(iter(ds.batch(n))).numpy()


def _coord_image(height, width):
    """float32 [H, W, 3]: channel 0 = row index, 1 = column index, 2 = 0."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.float32)


@pytest.mark.parametrize(
    "height,width,scale",
    [(200, 200, (0.08, 1.0)), (120, 300, (0.4, 1.0)), (300, 90, (0.05, 0.4))],
)
def test_box_sampling_ranges(height, width, scale):
    ratio = (3 / 4, 4 / 3)
    b = _boxes(height, width, scale, ratio)
    top, left, h, w = b.T
    # Integer pixel boxes inside the image.
    assert np.all(b == np.round(b))
    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + h <= height) and np.all(left + w <= width)
    assert np.all(h >= 1) and np.all(w >= 1)
    # Area fraction and aspect ratio in range, up to the rounding of w and h.
    area = height * width
    slack = 0.5 * (h + w) + 0.25
    assert np.all(h * w >= scale[0] * area - slack)
    assert np.all(h * w <= scale[1] * area + slack)
    ar = w / h
    tol = 0.5 / h + 0.5 / w + 1e-6
    assert np.all(ar >= ratio[0] * (1 - tol)) and np.all(ar <= ratio[1] * (1 + tol))
    # Log-uniform ratio: the whole range is used, and on a square image the
    # accepted ratios stay symmetric around 1 (on other shapes rejection
    # favours the ratios that fit, as in torchvision).
    log_ar = np.log(ar)
    if height == width:
        assert abs(np.mean(log_ar > 0) - 0.5) < 0.06
        assert log_ar.min() < math.log(ratio[0]) + 0.05
    assert log_ar.max() > math.log(ratio[1]) - 0.05
    # Offsets are spread over the free range (not always centred).
    assert len(np.unique(top)) > 10


def test_box_scale_is_uniform_when_always_accepted():
    # Small scales on a square image are always accepted on the first try, so
    # the area fraction is U(scale) up to rounding.
    b = _boxes(400, 400, (0.05, 0.25), (3 / 4, 4 / 3), n=3000)
    frac = b[:, 2] * b[:, 3] / (400 * 400)
    assert abs(frac.mean() - 0.15) < 0.006
    assert abs(np.quantile(frac, 0.25) - 0.10) < 0.01


def test_box_fallback_paths():
    # Impossible aspect ratio on a square image: centre crop with the ratio
    # clamped to its range (torchvision): w = W, h = round(W / 10).
    b = _boxes(10, 10, (0.5, 1.0), (10.0, 20.0), n=50)
    np.testing.assert_array_equal(b, np.tile([4.0, 0.0, 1.0, 10.0], (50, 1)))
    # Very tall image, scale too big for the width: w = W, h = round(W / (3/4)).
    b = _boxes(100, 20, (0.9, 1.0), (3 / 4, 4 / 3), n=50)
    np.testing.assert_array_equal(b, np.tile([36.0, 0.0, 27.0, 20.0], (50, 1)))
    # Very wide image: h = H, w = round(H * 4/3).
    b = _boxes(20, 100, (0.9, 1.0), (3 / 4, 4 / 3), n=50)
    np.testing.assert_array_equal(b, np.tile([0.0, 36.0, 20.0, 27.0], (50, 1)))
    # Ratio range containing the image ratio: the whole image.
    b = _boxes(30, 40, (2.0, 3.0), (3 / 4, 4 / 3), n=5)
    np.testing.assert_array_equal(b, np.tile([0.0, 0.0, 30.0, 40.0], (5, 1)))


def test_box_seed_determinism():
    a = C.sample_crop_box(tf.constant([3, 4]), 100, 80).numpy()
    b = C.sample_crop_box(tf.constant([3, 4]), 100, 80).numpy()
    c = _boxes(100, 80, (0.08, 1.0), (3 / 4, 4 / 3), n=20)
    np.testing.assert_array_equal(a, b)
    assert len({tuple(r) for r in c}) > 10


def test_crop_same_size_is_exact_slice():
    img = np.random.default_rng(0).uniform(size=(30, 40, 3)).astype(np.float32)
    out = C.crop_and_resize(img, tf.constant([5.0, 7.0, 16.0, 16.0]), 16)
    np.testing.assert_allclose(out.numpy(), img[5:21, 7:23], atol=1e-5)


@pytest.mark.parametrize("size", [12, 40])
def test_bicubic_antialias_resize_matches_pil(size):
    # DINO crops with PIL bicubic; tf bicubic + antialias agrees to ~1 level.
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    small = rng.uniform(0, 255, (8, 8, 3))
    img = tf.image.resize(small, [60, 50], "bicubic").numpy()
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    box = tf.constant([5.0, 3.0, 48.0, 40.0])
    ours = C.crop_and_resize(img, box, size).numpy()
    ref = Image.fromarray(img[5:53, 3:43]).resize((size, size), Image.BICUBIC)
    diff = np.abs(np.clip(np.round(ours), 0, 255) - np.asarray(ref, float))
    assert diff.mean() < 0.5 and diff.max() <= 3


def _check_crop_matches_box(crop, box, flipped):
    """Coordinate-image crop vs its box: corner pixels within one pixel."""
    top, left, h, w = box
    crop = np.asarray(crop)
    if flipped:
        cols = crop[..., 1]
        # Mirrored: columns decrease left to right.
        assert cols[:, 0].mean() > cols[:, -1].mean()
        crop = crop[:, ::-1]
    back = tf.image.resize(crop, [int(h), int(w)], method="bilinear").numpy()
    assert abs(back[0, 0, 0] - top) <= 1.0 and abs(back[0, 0, 1] - left) <= 1.0
    assert abs(back[-1, -1, 0] - (top + h - 1)) <= 1.0
    assert abs(back[-1, -1, 1] - (left + w - 1)) <= 1.0
    # The crop's mean coordinate is the box centre.
    assert abs(crop[..., 0].mean() - (top + (h - 1) / 2)) <= 0.5
    assert abs(crop[..., 1].mean() - (left + (w - 1) / 2)) <= 0.5


def test_random_resized_crop_pixels_agree_with_box_and_flip():
    img = tf.constant(_coord_image(40, 48))
    seen_flip = {False: 0, True: 0}
    for i in range(24):
        crop, box, flipped = C.random_resized_crop(img, tf.constant([i, 11]), 32, scale=(0.25, 1.0))
        assert crop.shape == (32, 32, 3)
        seen_flip[bool(flipped)] += 1
        _check_crop_matches_box(crop.numpy(), box.numpy(), bool(flipped))
    assert seen_flip[True] > 0 and seen_flip[False] > 0


def test_multicrop_geometry_without_photometric():
    cfg = MultiCropConfig(
        global_size=24, local_size=12, n_global=2, n_local=3, global_scale=(0.3, 1.0), local_scale=(0.05, 0.3)
    )
    mc = MultiCrop(cfg, photometric=False, normalize=False)
    img = _coord_image(36, 30)
    for s in range(4):
        out = mc(img, 3, seed=tf.constant([s, 5]))
        assert out["image_size"].numpy().tolist() == [36, 30]
        assert int(out["label"]) == 3
        for kind in ("global", "local"):
            crops = out[f"{kind}_crops"].numpy()
            boxes = out[f"{kind}_boxes"].numpy()
            flips = out[f"{kind}_flips"].numpy()
            for crop, box, flip in zip(crops, boxes, flips):
                _check_crop_matches_box(crop, box, bool(flip))


def test_flip_rate_and_flip_local_false():
    cfg = MultiCropConfig(global_size=8, local_size=8, n_global=2, n_local=4, flip_local=False)
    mc = MultiCrop(cfg, photometric=False)
    img = tf.zeros([20, 20, 3], tf.uint8)
    ds = tf.data.Dataset.range(200).map(lambda i: mc(img, -1, tf.stack([i, tf.constant(1, tf.int64)])))
    out = next(iter(ds.batch(200)))
    rate = out["global_flips"].numpy().mean()
    assert abs(rate - 0.5) < 0.08
    assert out["local_flips"].numpy().sum() == 0


def _keys_taps(in_size, out_size, a=-0.5):
    """Bicubic taps of TF's ResizeBicubic (half-pixel centres): 4 source
    indices and weights per output position. Like the kernel, the fractional
    position is rounded to 1/1024 (its weight table) and taps falling outside
    the source get weight 0, the others being renormalised."""
    scale = np.float32(in_size) / np.float32(out_size)
    pos = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    base = np.floor(pos)
    t = np.round((pos - base) * 1024.0) / 1024.0
    dist = np.stack([t + 1, t, 1 - t, 2 - t], -1).astype(np.float64)
    near = ((a + 2) * dist - (a + 3)) * dist * dist + 1
    far = ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a
    w = np.where(dist <= 1, near, far)
    idx = base[:, None].astype(int) + np.arange(-1, 3)
    inside = (idx >= 0) & (idx < in_size)
    w = np.where(inside, w, 0.0)
    w /= w.sum(1, keepdims=True)
    return np.clip(idx, 0, in_size - 1), w


def _numpy_bicubic(crop, size):
    """Separable Keys (a = -0.5) resize of ``crop [h, w, C]`` in float64."""
    yi, yw = _keys_taps(crop.shape[0], size)
    xi, xw = _keys_taps(crop.shape[1], size)
    rows = np.einsum("yk,ykwc->ywc", yw, crop.astype(np.float64)[yi])
    return np.einsum("xk,yxkc->yxc", xw, rows[:, xi])


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_crop_and_resize_many_matches_tf_and_numpy_bicubic(dtype):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (57, 71, 3)).astype(dtype)
    # Shrinking, enlarging, same size, a 1-pixel-wide box and a whole-image one.
    boxes = np.array([[3, 5, 40, 52], [10, 20, 7, 9], [0, 0, 24, 24], [30, 70, 20, 1], [0, 0, 57, 71]], np.float32)
    out = C.crop_and_resize_many(img, tf.constant(boxes), 24, antialias=False)
    # uint8 in, uint8 out (rounded and saturated, as PIL resizes uint8 images).
    assert out.shape == (5, 24, 24, 3) and out.dtype == tf.as_dtype(dtype)
    for got, (top, left, h, w) in zip(out.numpy(), boxes.astype(int)):
        crop = img[top : top + h, left : left + w]
        ref = tf.image.resize(crop, (24, 24), method="bicubic").numpy()
        exact = _numpy_bicubic(crop, 24)
        one = C.crop_and_resize(img, tf.constant([top, left, h, w], tf.float32), 24, antialias=False).numpy()
        if dtype == np.uint8:
            np.testing.assert_array_equal(got, np.clip(np.floor(ref + np.float32(0.5)), 0, 255))
            assert np.abs(got - np.clip(exact, 0, 255)).max() <= 0.5 + 1e-3
            one = np.clip(np.floor(one + np.float32(0.5)), 0, 255)
        else:
            np.testing.assert_allclose(got, ref, atol=1e-4)
            np.testing.assert_allclose(got, exact, atol=1e-4)
        # And the same numbers as the one-box function.
        np.testing.assert_array_equal(got, one)


def test_crop_and_resize_many_antialias_matches_one_box():
    img = np.random.default_rng(4).integers(0, 256, (60, 50, 3), np.uint8)
    boxes = tf.constant([[5, 3, 48, 40], [0, 0, 60, 50]], tf.float32)
    out = C.crop_and_resize_many(img, boxes, 12, antialias=True).numpy()
    for got, box in zip(out, boxes):
        ref = C.crop_and_resize(img, box, 12, antialias=True).numpy()
        np.testing.assert_array_equal(got, np.clip(np.floor(ref + np.float32(0.5)), 0, 255))
