"""Segmentation fine-tuning (kp.tasks): pyramid, decoders, segmenter, loss and metrics."""

import contextlib

import keras
import numpy as np
import pytest

import keras_pqcl as kp
from keras_pqcl import tasks
from tests.helpers import IGNORE_NUMPY2_COPY_WARNING, no_random_init, randomize, to_numpy

pytestmark = IGNORE_NUMPY2_COPY_WARNING

IGNORE = 255


@contextlib.contextmanager
def shape_only_init():
    """:func:`no_random_init` that also zeroes the variance-scaling (He, Glorot) kernels:
    on JAX each random shape drawn eagerly costs an XLA compile."""
    saved = keras.initializers.VarianceScaling.__call__
    keras.initializers.VarianceScaling.__call__ = lambda self, shape, dtype=None: keras.ops.zeros(
        shape, dtype=dtype or "float32"
    )
    try:
        with no_random_init():
            yield
    finally:
        keras.initializers.VarianceScaling.__call__ = saved


def tiny_vit(**kwargs):
    return kp.backbones.vit_tiny(8, depth=2, embed_dim=16, num_heads=2, image_size=32, **kwargs)


def tiny_resnet():
    return kp.backbones.resnet("resnet_tiny", width=4)


# ------------------------------------------------------------------------------- metrics
def numpy_scores(pred, target, num_classes, ignore_index):
    """mmsegmentation's IoUMetric: per-class areas summed over the set, then nan-means."""
    keep = target != ignore_index
    p, t = pred[keep], target[keep]
    inter = np.array([np.sum((p == c) & (t == c)) for c in range(num_classes)], np.float64)
    area_p = np.array([np.sum(p == c) for c in range(num_classes)], np.float64)
    area_t = np.array([np.sum(t == c) for c in range(num_classes)], np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (area_p + area_t - inter)
        acc = inter / area_t
    return {"mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc), "aAcc": inter.sum() / area_t.sum()}


def test_metrics_match_numpy_confusion_formula():
    rng = np.random.default_rng(0)
    c = 5
    # Class 4 never appears in the targets but is predicted (IoU 0, no Acc); class 3 appears
    # in neither (no IoU, no Acc); a quarter of the pixels are ignored.
    target = rng.choice([0, 1, 2], size=(2, 3, 6, 7))
    target[rng.uniform(size=target.shape) < 0.25] = IGNORE
    pred_ids = rng.choice([0, 1, 2, 4], size=target.shape)
    logits = np.eye(c, dtype=np.float32)[pred_ids] + rng.normal(0, 0.01, pred_ids.shape + (c,)).astype(np.float32)
    metrics = tasks.segmentation_metrics(c, ignore_index=IGNORE)
    for batch in range(2):  # accumulated over two batches
        for metric in metrics:
            metric.update_state(target[batch], logits[batch])
    expected = numpy_scores(pred_ids, target, c, IGNORE)
    for metric in metrics:
        np.testing.assert_allclose(float(to_numpy(metric.result())), expected[metric.name], rtol=1e-6)
    metrics[0].reset_state()
    assert float(to_numpy(metrics[0].result())) == 0.0


def test_pixel_cross_entropy_skips_ignored_pixels():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 4, 5))
    labels[0, :2] = IGNORE
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    keep = labels != IGNORE
    expected = -np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0][keep].mean()
    got = float(to_numpy(tasks.PixelCrossEntropy(IGNORE)(labels, logits)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


# ------------------------------------------------------------------------ pyramid, decoders
@pytest.fixture(scope="module")
def backbones():
    with shape_only_init():
        return {"vit": tiny_vit(), "resnet": tiny_resnet()}


@pytest.mark.parametrize("kind,source", [("vit", "last"), ("vit", "blocks"), ("resnet", "last")])
def test_pyramid_levels_and_strides(backbones, kind, source):
    with shape_only_init():
        pyramid = tasks.FeaturePyramid(backbones[kind], source=source)
        maps = pyramid(np.zeros((1, 48, 64, 3), "float32"))
    assert sorted(maps) == ["P2", "P3", "P4", "P5"]
    for level, stride in (("P2", 4), ("P3", 8), ("P4", 16), ("P5", 32)):
        assert tuple(maps[level].shape) == (1, -(-48 // stride), -(-64 // stride), pyramid.channels[level])


@pytest.mark.parametrize("kind", ["vit", "resnet"])
@pytest.mark.parametrize("decoder", ["linear", "fpn", "upernet"])
def test_decoder_output_shape_at_other_sizes(backbones, kind, decoder):
    # The ViT was made for 32 px; 48 x 64 and 24 x 40 need a resampled position table. The
    # symbolic call traces the same code as a real one (which the fit and saving tests run)
    # without running it: on JAX every eager op of a new shape is an XLA compile.
    with shape_only_init():
        seg = tasks.SemanticSegmenter(backbones[kind], num_classes=3, decoder=decoder, channels=8)
    for size in ((48, 64), (24, 40)):
        logits = seg(keras.KerasTensor((2,) + size + (3,), dtype="float32"))
        assert tuple(logits.shape) == (2,) + size + (3,)
    if decoder == "linear":  # reads the backbone's own patch features only
        assert seg.pyramid.levels == (("P3",) if kind == "vit" else ("P5",))


def test_bad_arguments_are_one_clear_error(backbones):
    with pytest.raises(ValueError, match="ignore_index=2 is a class id"):
        tasks.SemanticSegmenter(backbones["vit"], num_classes=3, ignore_index=2)
    with pytest.raises(ValueError, match="decoder must be one of"):
        tasks.SemanticSegmenter(backbones["vit"], num_classes=3, decoder="deeplab")
    with pytest.raises(ValueError, match="block_indices must be 4"):
        tasks.FeaturePyramid(backbones["vit"], source="blocks", block_indices=(0, 1, 5, 1))
    with shape_only_init(), pytest.raises(ValueError, match="patch size must be 4, 8, 16 or 32"):
        tasks.FeaturePyramid(kp.backbones.vit_tiny(14, depth=1, embed_dim=16, num_heads=2, image_size=28))
    with pytest.raises(ValueError, match="channels last"):
        tasks.SemanticSegmenter(backbones["resnet"], num_classes=3, decoder="linear")(np.zeros((1, 3, 32, 32)))


# ----------------------------------------------------------------------- training, saving
def synthetic_batch(n, size=32, seed=0):
    """``synthetic_scenes`` images normalised roughly to zero mean, masks 0..2 (3 classes)."""
    from keras_pqcl.data.synthetic import synthetic_scenes

    data = synthetic_scenes(n, image_size=size, num_classes=2, seed=seed)
    return ((data["images"] / 255.0 - 0.45) / 0.25).astype("float32"), data["masks"].astype("int32")


def numpy_init(model, rng):
    """Kernels N(0, 1/fan_in), tables N(0, 0.02^2), the rest as built: drawn in NumPy, so a
    model built under :func:`shape_only_init` trains without per-shape RNG compiles on JAX."""
    for v in model.trainable_weights:
        if len(v.shape) in (2, 4):  # dense and conv kernels: fan-in is every axis but the last
            v.assign((rng.normal(size=v.shape) / np.sqrt(np.prod(v.shape[:-1]))).astype(v.dtype))
        elif len(v.shape) == 3:  # cls token, position table
            v.assign((rng.normal(size=v.shape) * 0.02).astype(v.dtype))


def test_fit_lowers_the_loss_and_beats_the_majority_class():
    keras.utils.set_random_seed(0)
    images, masks = synthetic_batch(32)
    masks[:, :2] = IGNORE  # a labelled-pixels-only loss must not mind
    test_images, test_masks = synthetic_batch(16, seed=1)  # held out
    with shape_only_init():
        seg = tasks.SemanticSegmenter(tiny_vit(), num_classes=3, decoder="linear")
    numpy_init(seg, np.random.default_rng(0))
    seg.compile(
        optimizer=kp.optimizers.finetune_adamw(
            seg, lr=1e-2, layer_decay=0.75, weight_decay=0.01, warmup_steps=2, total_steps=32, min_lr=1e-3
        )
    )
    history = seg.fit(images, masks, batch_size=8, epochs=8, verbose=0).history
    assert history["loss"][-1] < 0.7 * history["loss"][0], history["loss"]
    assert {"mIoU", "mAcc", "aAcc"} <= set(history)
    # The constant predictor: the training set's majority class (background) everywhere.
    majority = np.bincount(masks[masks != IGNORE]).argmax()
    constant = numpy_scores(np.full_like(test_masks, majority), test_masks, 3, IGNORE)
    learned = numpy_scores(seg.segment(test_images), test_masks, 3, IGNORE)
    assert learned["aAcc"] > constant["aAcc"] + 0.05, (learned, constant)
    assert learned["mIoU"] > constant["mIoU"] + 0.15, (learned, constant)


def test_keras_round_trip(tmp_path):
    seg = tasks.SemanticSegmenter(
        tiny_vit(use_mask_token=True),
        num_classes=3,
        decoder="upernet",
        channels=8,
        pyramid="blocks",
        block_indices=(0, 0, 1, 1),
    )
    seg.compile(optimizer=kp.optimizers.finetune_adamw(seg, lr=1e-3, layer_decay=0.5, total_steps=10))
    seg.optimizer.build(seg.trainable_variables)  # as after training: its state is saved and restored
    images, _ = synthetic_batch(2, size=24)
    path = str(tmp_path / "segmenter.keras")
    seg.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, tasks.SemanticSegmenter) and loaded.block_indices == (0, 0, 1, 1)
    # compile() is replayed on load: the layer-decay optimizer, loss and metrics come back.
    assert loaded.optimizer.lr_multipliers == seg.optimizer.lr_multipliers and loaded.optimizer.lr_multipliers
    assert loaded.loss.ignore_index == IGNORE
    np.testing.assert_allclose(to_numpy(loaded(images)), to_numpy(seg(images)), atol=1e-5)
    assert not loaded.backbone.mask_token.trainable  # no gradient reaches it


def test_sliding_window_covers_the_image_like_whole_inference():
    with shape_only_init():
        seg = tasks.SemanticSegmenter(tiny_resnet(), num_classes=3, decoder="linear")
    randomize(seg, np.random.default_rng(0))  # drawn in NumPy: no per-shape RNG compiles on JAX
    images, _ = synthetic_batch(2, size=32)
    # One window the size of the image is whole-image inference.
    np.testing.assert_allclose(seg.predict_logits(images, window=32), seg.predict_logits(images), atol=1e-5)
    ids = seg.segment(images[:, :, :], window=(32, 16), stride=8)
    assert ids.shape == (2, 32, 32) and ids.dtype == np.int32


# ------------------------------------------------------------------ layer-wise lr decay
def test_layer_decay_multipliers_follow_the_formula(backbones):
    decay = 0.5
    with shape_only_init():
        vit_seg = tasks.SemanticSegmenter(backbones["vit"], num_classes=3, decoder="linear")
        res_seg = tasks.SemanticSegmenter(backbones["resnet"], num_classes=3, decoder="linear")
    vit, res = backbones["vit"], backbones["resnet"]
    # ViT with L = 2 blocks: embeddings are layer 0, block j layer j + 1, the rest layer L + 1.
    expected = {
        vit.patch_embed.weights[0].path: decay**3,
        vit.pos_embed.path: decay**3,
        vit.blocks[0].weights[0].path: decay**2,
        vit.blocks[1].weights[-1].path: decay**1,
    }
    got = kp.optimizers.layer_decay_multipliers(vit_seg, decay)
    for path, value in expected.items():
        assert got[path] == pytest.approx(value), path
    assert vit.norm.weights[0].path not in got  # final norm and decoder keep the full rate
    # ResNet: stem 0, stage C(s+2) layer s + 1, the rest layer 5.
    got = kp.optimizers.layer_decay_multipliers(res_seg, decay)
    assert got[res.conv1.weights[0].path] == pytest.approx(decay**5)
    assert got[res.stages[0][0].weights[0].path] == pytest.approx(decay**4)
    assert got[res.stages[3][0].weights[0].path] == pytest.approx(decay**1)

    # One AdamW step on unit gradients moves each weight by lr x multiplier (Adam's first step
    # is lr * g / |g|); no weight decay here.
    lr = 0.1
    opt = kp.optimizers.finetune_adamw(vit_seg, lr=lr, layer_decay=decay, weight_decay=0.0, total_steps=10)
    variables = [vit.patch_embed.weights[0], vit.blocks[0].weights[0], vit_seg.decoder.classifier.kernel]
    before = [to_numpy(v).copy() for v in variables]
    opt.apply_gradients([(keras.ops.ones(v.shape), v) for v in variables])
    for v, b, mult in zip(variables, before, (decay**3, decay**2, 1.0)):
        np.testing.assert_allclose(b - to_numpy(v), lr * mult, rtol=1e-4)


def test_finetune_schedules():
    poly = kp.optimizers.WarmupPoly(1.0, 0.1, total_steps=12, warmup_steps=2, power=0.9)
    steps = np.array([0, 1, 2, 7, 12, 20])
    t = np.clip((steps - 2) / 10, 0, 1)
    expected = np.where(steps < 2, steps / 2, 0.1 + 0.9 * (1 - t) ** 0.9)
    np.testing.assert_allclose([float(to_numpy(poly(s))) for s in steps], expected, rtol=1e-5)
    seg_args = dict(lr=1e-3, total_steps=10)
    with pytest.raises(ValueError, match="schedule must be one of"):
        kp.optimizers.finetune_adamw(None, schedule="step", **seg_args)
    with pytest.raises(ValueError, match="layer-wise decay needs a keras_pqcl ViT or ResNet"):
        kp.optimizers.finetune_adamw(keras.Sequential([keras.layers.Dense(2)]), **seg_args)
