"""iBOT masks: ratio sampling, block-wise (BEiT) and random masks, config."""

import math

import numpy as np
import pytest
import tensorflow as tf

from keras_pqcl.data import masks as M


def _seed(i, salt=11):
    return tf.constant([i, salt], tf.int64)


def _map(fn, n, salt=11):
    """fn(seed) for seeds (i, salt), i < n, in one tf.data pass (graph mode)."""
    ds = tf.data.Dataset.range(n).map(lambda i: fn(tf.stack([i, tf.constant(salt, tf.int64)])))
    return next(iter(ds.batch(n))).numpy()


def _reference_block(draws, H, W, ratio, min_aspect=0.3, min_area=None):
    """BEiT / iBOT block masking written out as Python loops.

    The random calls are replaced by the uniforms in ``draws[k, j]`` (round k,
    retry j): random.uniform(a, b) = a + (b - a) * u and randint(0, n) =
    floor(u * (n + 1)). Returns the mask and the accepted (h, w) sizes.
    """
    low = (min(H, W) // 3) ** 2 if min_area is None else min_area
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    target = ratio * H * W
    mask = np.zeros((H, W), bool)
    count, k, sizes = 0, 0, []
    while count < target:
        budget = target - count
        added = 0
        for j in range(10):
            u_area, u_aspect, u_top, u_left = draws[k, j]
            area = low + (budget - low) * u_area
            aspect = math.exp(log_lo + (log_hi - log_lo) * u_aspect)
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < H and w < W:
                top = min(int(u_top * (H - h + 1)), H - h)
                left = min(int(u_left * (W - w + 1)), W - w)
                new = h * w - mask[top : top + h, left : left + w].sum()
                if 0 < new <= budget:
                    mask[top : top + h, left : left + w] = True
                    added = new
                    sizes.append((h, w))
            if added > 0:
                break
        if added == 0:
            break
        count += added
        k += 1
    return mask, sizes


@pytest.mark.parametrize(
    "H,W,min_aspect,min_area",
    [(14, 14, 0.3, None), (6, 6, 0.3, None), (8, 20, 0.3, None), (14, 14, 0.5, 4), (14, 14, 0.3, 30)],
)
def test_block_mask_matches_python_reference(H, W, min_aspect, min_area):
    fn = tf.function(lambda s, r: (M.block_mask(s, H, W, r, min_aspect, min_area), M.block_draws(s, H, W, r)))
    rng = np.random.default_rng(H * W)
    for i in range(12):
        # A batch of masks: each must evolve as if alone (finished ones frozen).
        ratios = rng.choice([0.0, 0.05, 0.1, 0.3, 0.5, rng.uniform(0.1, 0.5)], 3)
        masks, draws = fn(_seed(i), tf.constant(ratios, tf.float64))
        assert masks.shape == (3, H, W) and draws.shape[1:] == (3, 10, 4)
        for b, ratio in enumerate(ratios):
            ref, sizes = _reference_block(draws.numpy()[:, b], H, W, float(ratio), min_aspect, min_area)
            np.testing.assert_array_equal(masks[b].numpy(), ref, err_msg=f"seed {i}, mask {b}")
            assert ref.sum() <= ratio * H * W
            for h, w in sizes:  # rounding moves the aspect by <= half a patch
                assert (h + 0.5) / (w - 0.5) >= min_aspect - 1e-9
                assert (h - 0.5) / (w + 0.5) <= 1 / min_aspect + 1e-9
    # The scalar form is the same loop with n = 1.
    mask, draws = fn(_seed(99), tf.constant(0.4, tf.float64))
    assert mask.shape == (H, W)
    ref = _reference_block(draws.numpy()[:, 0], H, W, 0.4, min_aspect, min_area)[0]
    np.testing.assert_array_equal(mask.numpy(), ref)


def test_block_mask_statistics():
    H = W = 14
    ratio, n = 0.3, 600
    target = ratio * H * W
    masks = _map(lambda s: M.block_mask(s, H, W, ratio), n)
    counts = masks.reshape(n, -1).sum(1)
    # Accepted blocks never exceed the remaining budget ...
    assert counts.max() <= math.floor(target)
    # ... and the loop stops only after 10 failed retries, close to the target.
    assert np.mean(counts >= target - 16) > 0.99
    assert counts.mean() > 0.95 * target
    assert len({m.tobytes() for m in masks}) == n
    # Blocks reach every border (randint bounds are inclusive), symmetrically.
    rows, cols = masks.mean((0, 2)), masks.mean((0, 1))
    assert min(rows[0], rows[-1], cols[0], cols[-1]) > 0.05
    assert abs(rows[0] - rows[-1]) < 0.05 and abs(cols[0] - cols[-1]) < 0.05

    # Same distribution as the reference loop fed by an independent RNG.
    rng = np.random.default_rng(0)
    ref = np.stack([_reference_block(rng.random((H * W + 1, 10, 4)), H, W, ratio)[0] for _ in range(n)])
    assert abs(ref.reshape(n, -1).sum(1).mean() - counts.mean()) < 1.0
    np.testing.assert_allclose(rows, ref.mean((0, 2)), atol=0.06)
    np.testing.assert_allclose(cols, ref.mean((0, 1)), atol=0.06)


def test_determinism_and_zero_ratio():
    cfg = M.MaskConfig()
    a = M.sample_masks(_seed(3), cfg, 224, 4).numpy()
    b = M.sample_masks(_seed(3), cfg, 224, 4).numpy()
    np.testing.assert_array_equal(a, b)
    block = [M.block_mask(_seed(i), 14, 14, 0.3).numpy().tobytes() for i in range(8)]
    assert len(set(block)) == 8
    for fn in (M.block_mask, M.random_mask):
        assert not fn(_seed(1), 14, 14, 0.0).numpy().any()
        assert not fn(_seed(2), 6, 6, tf.constant(0.0)).numpy().any()
    cfg0 = M.MaskConfig(ratio=0.0, ratio_var=0.0)
    assert not M.sample_masks(_seed(4), cfg0, 96, 8).numpy().any()


def test_ratio_sampling_recipe_statistics():
    r = _map(lambda s: M.sample_mask_ratio(s, (0.0, 0.3), (0.0, 0.2)), 2000)
    assert r.dtype == np.float32
    zero = r == 0
    assert abs(zero.mean() - 0.5) < 0.04
    nz = r[~zero]
    assert nz.min() >= 0.1 and nz.max() <= 0.5
    assert abs(nz.mean() - 0.3) < 0.015
    hist = np.histogram(nz, bins=4, range=(0.1, 0.5))[0] / nz.size
    np.testing.assert_allclose(hist, 0.25, atol=0.05)
    # A single entry, a fixed ratio, and a scalar ratio_var broadcast.
    r1 = _map(lambda s: M.sample_mask_ratio(s, (0.3,), 0.1), 500)
    assert r1.min() >= 0.2 and r1.max() <= 0.4 and r1.std() > 0.04
    assert np.all(_map(lambda s: M.sample_mask_ratio(s, 0.25, 0.0), 50) == 0.25)
    r3 = _map(lambda s: M.sample_mask_ratio(s, (0.1, 0.2, 0.4), 0.0), 900)
    np.testing.assert_allclose([np.mean(np.isclose(r3, v)) for v in (0.1, 0.2, 0.4)], 1 / 3, atol=0.06)


@pytest.mark.parametrize("H,W,ratio", [(14, 14, 0.3), (6, 6, 0.5), (7, 9, 0.999)])
def test_random_mask_exact_count(H, W, ratio):
    masks = _map(lambda s: M.random_mask(s, H, W, ratio), 200)
    np.testing.assert_array_equal(masks.reshape(200, -1).sum(1), math.floor(ratio * H * W))
    n = math.floor(ratio * H * W)
    assert len({m.tobytes() for m in masks}) >= min(150, math.comb(H * W, n) // 2)
    assert masks.mean(0).min() > 0  # every position can be picked
    cfg = M.MaskConfig(patch_size=8, ratio=ratio - 0.001, ratio_var=0.0, shape="rand")
    m = M.sample_mask(_seed(0), cfg, (8 * H, 8 * W)).numpy()
    assert m.shape == (H, W) and m.sum() == math.floor((ratio - 0.001) * H * W)


def test_in_tf_data_and_tf_function():
    cfg = M.MaskConfig()

    def fn(i):
        s = tf.stack([i, tf.constant(5, tf.int64)])
        return {"g": M.sample_masks(s, cfg, 224, 2), "l": M.sample_masks(s, cfg, 96, 8)}

    ds = tf.data.Dataset.range(6).map(fn)
    assert ds.element_spec["g"].shape == (2, 14, 14)
    assert ds.element_spec["l"].shape == (8, 6, 6)
    assert ds.element_spec["g"].dtype == tf.bool
    got = list(ds.batch(6))[0]
    compiled = tf.function(fn, jit_compile=False)
    for i in range(6):
        out = compiled(tf.constant(i, tf.int64))
        np.testing.assert_array_equal(got["g"][i], out["g"])
        np.testing.assert_array_equal(got["l"][i], out["l"])
    # Eager (while_loop run op by op) agrees with graph mode too.
    eager = M.sample_masks(_seed(5, salt=5), cfg, 224, 2)
    np.testing.assert_array_equal(got["g"][5], eager)
    assert M.sample_masks(_seed(0), cfg, 224, 0).shape == (0, 14, 14)


def test_crops_are_independent():
    masks = _map(lambda s: M.sample_masks(s, M.MaskConfig(), 224, 2), 400)
    empty = ~masks.reshape(400, 2, -1).any(-1)
    assert abs(empty.mean() - 0.5) < 0.07
    assert abs(np.mean(empty[:, 0] & empty[:, 1]) - 0.25) < 0.07
    assert np.mean([not np.array_equal(a, b) for a, b in masks]) > 0.6


def test_config_defaults_and_grid():
    cfg = M.MaskConfig()
    assert (cfg.patch_size, cfg.ratio, cfg.ratio_var, cfg.shape) == (16, (0.0, 0.3), (0.0, 0.2), "block")
    assert cfg.min_aspect == 0.3 and cfg.min_area is None
    assert cfg.grid(224) == (14, 14) and cfg.grid((224, 96)) == (14, 6)
    c = M.MaskConfig(ratio=(0.1, 0.3), ratio_var=0.05)
    assert c.ratio == (0.1, 0.3) and c.ratio_var == (0.05, 0.05)
    with pytest.raises(ValueError, match="100 .*patch_size=16; use 96 or 112"):
        cfg.grid(100)
    with pytest.raises(ValueError, match="use 16"):
        cfg.grid(8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(patch_size=0), "patch_size must be a positive int"),
        (dict(ratio=(0.1, 0.3), ratio_var=(0.0,)), "one entry per ratio"),
        (dict(ratio=1.0, ratio_var=0.0), r"lie in \[0, 1\)"),
        (dict(ratio=0.1, ratio_var=0.2), r"lie in \[0, 1\)"),
        (dict(ratio=0.3, ratio_var=-0.1), "ratio_var >= 0"),
        (dict(ratio="0.3"), "ratio must be a float"),
        (dict(shape="grid"), "shape must be 'block' or 'rand'"),
        (dict(min_aspect=0.0), r"min_aspect must be in \(0, 1\]"),
        (dict(min_aspect=2.0), r"min_aspect must be in \(0, 1\]"),
        (dict(min_area=-1), "min_area must be None or an int >= 0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.MaskConfig(**kwargs)
