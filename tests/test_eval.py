"""Evaluation protocols: k-NN, linear and dense probes, mIoU, attention maps, KNNMonitor.

References are written here in plain NumPy (brute-force k-NN, IoU by set counts, attention
mass); probes are checked on toy data a linear model must solve.
"""

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops
from PIL import Image

import keras_pqcl as kp
from keras_pqcl import eval as ev

from tests.helpers import no_random_init, randomize, to_numpy
from tests.scripts import tiny_setup as ts


# ------------------------------------------------------------------------------- fixtures
class ColourBackbone:
    """Stand-in with the ViT feature interface: a patch token is its patch's mean colour
    through a fixed projection; CLS is the mean token. A linear probe then sees colours."""

    patch_size = 4
    depth = 2

    def __init__(self, dim=6):
        self.proj = np.random.default_rng(0).normal(size=(3, dim)).astype("float32")

    def forward_features(self, images, training=False, n_last_blocks=1, return_attention=False):
        p = self.patch_size
        h, w = images.shape[1] // p, images.shape[2] // p
        x = ops.reshape(images, (-1, h, p, w, p, 3))
        x = ops.reshape(ops.mean(x, axis=(2, 4)), (-1, h * w, 3))
        tokens = ops.matmul(x, ops.convert_to_tensor(self.proj))
        cls = ops.mean(tokens, axis=1)
        sequence = ops.concatenate([cls[:, None], tokens], axis=1)
        return {"cls": cls, "patches": tokens, "last_blocks": [sequence] * n_last_blocks}


COLOURS = np.array([[230, 30, 30], [30, 200, 40], [40, 40, 220], [220, 210, 30]], np.float32)


def colour_images(n, size=16, seed=0):
    """Class = colour of the whole image (4 classes), with pixel noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(COLOURS), n)
    images = COLOURS[labels][:, None, None] + rng.normal(0, 20, (n, size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def colour_scenes(n, size=16, block=8, seed=0):
    """Regions of ``block`` pixels (whole patches) coloured by class 0..2: images and masks."""
    rng = np.random.default_rng(seed)
    g = size // block
    classes = rng.integers(0, 3, (n, g, g))
    masks = np.repeat(np.repeat(classes, block, axis=1), block, axis=2)
    images = COLOURS[masks] + rng.normal(0, 15, masks.shape + (3,))
    return np.clip(images, 0, 255).astype(np.uint8), masks.astype(np.uint8)


@pytest.fixture(scope="module")
def vit():
    with no_random_init():  # every weight is overwritten below
        backbone = kp.backbones.vit_tiny(8, depth=2, embed_dim=32, num_heads=2, image_size=16)
    # Default init (std 0.02) gives near-uniform attention; random weights make it peaked.
    randomize(backbone, np.random.default_rng(0), scale=0.3)
    return backbone


# ------------------------------------------------------------------------------------ k-NN
def brute_force_knn(train_x, train_y, test_x, k, temperature, num_classes):
    """One test row at a time in float64: cosine, top-k (ties -> lower index), exp(sim/T) votes."""
    train_x = np.asarray(train_x, np.float64)
    test_x = np.asarray(test_x, np.float64)
    train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    test_x = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    preds, top5 = [], []
    for row in test_x:
        sims = train_x @ row
        neighbours = sorted(range(len(sims)), key=lambda j: (-sims[j], j))[:k]
        votes = np.zeros(num_classes)
        for j in neighbours:
            votes[train_y[j]] += np.exp(sims[j] / temperature)
        ranked = sorted(range(num_classes), key=lambda c: (-votes[c], c))
        preds.append(ranked[0])
        top5.append(ranked[:5])
    return np.array(preds), np.array(top5)


@pytest.mark.parametrize("k,batch_size", [(1, 256), (5, 7), (20, 1), (60, 10)])
def test_knn_matches_brute_force(k, batch_size):
    rng = np.random.default_rng(k)
    train_x, test_x = rng.normal(size=(50, 8)), rng.normal(size=(23, 8))
    train_y, test_y = rng.integers(0, 7, 50), rng.integers(0, 7, 23)
    expected, expected_top5 = brute_force_knn(train_x, train_y, test_x, min(k, 50), 0.07, 7)
    preds, top5 = ev.knn_classify(
        train_x * 3.0, train_y, test_x, k=k, num_classes=7, batch_size=batch_size, return_top5=True
    )
    np.testing.assert_array_equal(preds, expected)
    np.testing.assert_array_equal(top5, expected_top5)
    scores = ev.knn_accuracy(train_x, train_y, test_x, test_y, k=k, num_classes=7, batch_size=batch_size)
    assert scores["top1"] == pytest.approx(100.0 * np.mean(expected == test_y))
    assert scores["top5"] == pytest.approx(100.0 * np.mean((expected_top5 == test_y[:, None]).any(1)))


def test_knn_ties_are_deterministic():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    # Equal similarities at the k boundary: the lower train index is taken.
    train = np.stack([b, a, a, a, a])
    labels = np.array([0, 3, 1, 2, 2])
    for batch_size in (1, 4):
        assert ev.knn_classify(train, labels, a[None], k=1, batch_size=batch_size)[0] == 3
        # k=2 takes indices 1 and 2: equal votes for classes 3 and 1 -> the lower class id.
        assert ev.knn_classify(train, labels, a[None], k=2, batch_size=batch_size)[0] == 1
        # k=4 takes 1..4: class 2 has two votes.
        assert ev.knn_classify(train, labels, a[None], k=4, batch_size=batch_size)[0] == 2
    # A scaled copy has the same cosine: the duplicate tie is still broken by index.
    assert ev.knn_classify(np.stack([2 * a, a]), np.array([4, 0]), a[None], k=1)[0] == 4


def test_knn_temperature_weights_votes():
    # Two far neighbours of class 0 against one close neighbour of class 1: a low
    # temperature lets the close one win, a high one lets the majority win.
    train = np.array([[1.0, 0.05], [0.3, 1.0], [0.3, -1.0]])
    labels = np.array([1, 0, 0])
    test = np.array([[1.0, 0.0]])
    assert ev.knn_classify(train, labels, test, k=3, temperature=0.07)[0] == 1
    assert ev.knn_classify(train, labels, test, k=3, temperature=100.0)[0] == 0


def test_knn_input_errors():
    x, y = np.ones((4, 3)), np.zeros(4, int)
    with pytest.raises(ValueError, match="differ in width"):
        ev.knn_classify(x, y, np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        ev.knn_classify(x, np.zeros(3, int), x)
    with pytest.raises(ValueError, match="negative"):
        ev.knn_classify(x, -np.ones(4, int), x)
    with pytest.raises(ValueError, match="2-D"):
        ev.knn_classify(np.ones(4), y, x)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        ev.knn_accuracy(x, y, x[:2], np.zeros(3, int))


# -------------------------------------------------------------------------------- features
def test_extract_features_pools_like_the_reference(vit):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 16, 16, 3)).astype("float32")
    out = vit.forward_features(ops.convert_to_tensor(x), n_last_blocks=2)
    blocks = [to_numpy(b) for b in out["last_blocks"]]
    cls = np.concatenate([b[:, 0] for b in blocks], axis=-1)
    mean_patch = blocks[-1][:, 1:].mean(axis=1)
    # Mode 2 is modes 0 and 1 side by side. Batch 3 over 7 images: two full batches and a padded one.
    got = ev.extract_features(vit, x, batch_size=3, n_last_blocks=2, avgpool_patchtokens=2, preprocess=False)
    np.testing.assert_allclose(got, np.concatenate([cls, mean_patch], axis=-1), rtol=1e-4, atol=1e-4)
    clipped = ev.features.FeatureExtractor(vit, n_last_blocks=5, avgpool_patchtokens=True)
    assert (clipped.n_last_blocks, clipped.avgpool_patchtokens) == (2, 2)  # depth 2; DINO's True = CLS + mean
    patches = ev.extract_features(vit, x, patches=True, preprocess=False)
    np.testing.assert_allclose(patches, to_numpy(out["patches"]).reshape(7, 2, 2, 32), rtol=1e-4, atol=1e-4)


def test_eval_preprocess_and_datasets_agree(vit):
    images, labels = colour_images(5, size=24)
    x = ev.eval_preprocess(images, 16)
    manual = tf.image.resize(images.astype("float32") / 255.0, (16, 16), method="bicubic").numpy()
    manual = (np.clip(manual, 0, 1) - np.array(kp.data.IMAGENET_MEAN)) / np.array(kp.data.IMAGENET_STD)
    np.testing.assert_allclose(x, manual, atol=1e-5)
    np.testing.assert_allclose(ev.eval_preprocess(images / 255.0, 16), x, atol=1e-5)
    # The reference 256 -> 224: short side to size / 0.875, then a centre crop.
    assert ev.eval_preprocess(np.zeros((1, 40, 60, 3), np.uint8), 16, crop_fraction=0.875).shape == (1, 16, 16, 3)

    # One extractor and one batch shape: one compile for the three inputs.
    extractor = ev.features.FeatureExtractor(vit)
    from_arrays = extractor.extract((images, labels), return_labels=True)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    for data in (dataset, dataset.batch(2)):
        features, got_labels = extractor.extract(data, return_labels=True)
        np.testing.assert_allclose(features, from_arrays[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(got_labels, labels)

    # The compiled forward pass reads the current weights (KNNMonitor relies on it): doubling
    # the final LayerNorm's scale and shift doubles the CLS features.
    saved = [to_numpy(v) for v in vit.norm.weights]
    try:
        for v in vit.norm.weights:
            v.assign(2.0 * to_numpy(v))
        np.testing.assert_allclose(extractor.extract(images), 2.0 * from_arrays[0], rtol=1e-4, atol=1e-4)
    finally:
        for v, value in zip(vit.norm.weights, saved):
            v.assign(value)


def test_feature_input_errors(vit):
    with pytest.raises(ValueError, match="3 channels.*alpha"):
        ev.extract_features(vit, np.zeros((2, 16, 16, 4), np.uint8))
    with pytest.raises(ValueError, match="batch axis"):
        ev.extract_features(vit, np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        ev.extract_features(vit, np.zeros((2, 16, 16, 3), np.uint8), image_size=20)
    with pytest.raises(ValueError, match="normalised already"):
        ev.extract_features(vit, -np.ones((2, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="labels are needed"):
        ev.extract_features(vit, np.zeros((2, 16, 16, 3), np.uint8), return_labels=True)
    with pytest.raises(ValueError, match="avgpool_patchtokens"):
        ev.extract_features(vit, np.zeros((2, 16, 16, 3), np.uint8), avgpool_patchtokens=3)


# ---------------------------------------------------------------------------------- probes
def test_linear_probe_separates_colours():
    train, test = colour_images(64, seed=1), colour_images(32, seed=2)
    result = ev.linear_probe(ColourBackbone(), train, test, epochs=15, lr=0.5, batch_size=16)
    assert result["top1"] >= 95.0, result
    assert result["n_last_blocks"] == 2 and result["feature_dim"] == 2 * 6
    assert len(result["history"]["top1"]) == 15
    assert result["top1"] == max(result["history"]["top1"]) >= result["last_top1"]
    assert result["top5"] == 100.0  # 4 classes: top-5 holds them all
    # The reference's per-epoch augmentation (random resized crops + flips keep the colour).
    augmented = ev.linear_probe(
        ColourBackbone(), train, test, epochs=3, lr=0.5, batch_size=16, augment=True, image_size=16
    )
    assert augmented["augment"] and len(augmented["history"]["top1"]) == 3 and augmented["top1"] >= 75.0


def test_linear_probe_lr_sweep_returns_the_best_rate():
    train, test = colour_images(64, seed=1), colour_images(32, seed=2)
    args = dict(epochs=3, batch_size=16)
    single = {lr: ev.linear_probe(ColourBackbone(), train, test, lr=lr, **args)["top1"] for lr in (1e-4, 0.5)}
    swept = ev.linear_probe(ColourBackbone(), train, test, lr=[1e-4, 0.5], **args)
    best = max(single, key=single.get)
    assert single[0.5] > single[1e-4]  # the sweep has a rate to find
    assert swept["lr"] == pytest.approx(best) and swept["top1"] == single[best]
    with pytest.raises(ValueError, match="empty list"):
        ev.linear_probe(ColourBackbone(), train, test, lr=[], **args)


def test_linear_probe_default_lr_rule_and_label_errors():
    x = np.random.default_rng(0).normal(size=(8, 4))
    result = ev.train_linear_classifier(x, np.arange(8) % 2, x, np.arange(8) % 2, epochs=1, batch_size=4)
    assert result["lr"] == pytest.approx(1e-3 * 4 / 256)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ev.train_linear_classifier(x, np.arange(8) % 2, x, np.arange(8) % 3, num_classes=2, epochs=1)


def test_dense_probe_and_ignore_index():
    train_images, train_masks = colour_scenes(24, seed=1)
    test_images, test_masks = colour_scenes(12, seed=2)
    # Unlabelled pixels are left out of the loss and the scores.
    train_masks[:, :2] = 255
    test_masks[:, -2:] = 255
    result = ev.dense_probe(
        ColourBackbone(), train_images, train_masks, test_images, test_masks, epochs=20, lr=5e-2, batch_size=8
    )
    assert result["num_classes"] == 3 and result["grid"] == (4, 4)
    assert result["pixel_acc"] >= 95.0 and result["miou"] >= 95.0, result
    with pytest.raises(ValueError, match="must match the images"):
        ev.dense_probe(ColourBackbone(), train_images, train_masks[:, :8], test_images, test_masks)
    with pytest.raises(ValueError, match="outside"):
        ev.dense_probe(ColourBackbone(), train_images, train_masks, test_images, test_masks, num_classes=2)


def test_miou_matches_numpy_formula():
    rng = np.random.default_rng(3)
    pred = rng.integers(0, 5, (3, 10, 10))
    target = rng.integers(0, 5, (3, 10, 10))
    target[target == 4] = 255  # class 4 only ever predicted: IoU 0, still counted
    target[0, 0, :3] = 255
    valid = target != 255
    ious = []
    for c in range(5):
        inter = np.sum((pred == c) & (target == c) & valid)
        union = np.sum(((pred == c) | (target == c)) & valid)
        if union:
            ious.append(inter / union)
    assert ev.miou(pred, target, 5, ignore_index=255) == pytest.approx(100.0 * np.mean(ious))
    scores = ev.segmentation_scores(ev.confusion_matrix(pred, target, 5))
    assert scores["pixel_acc"] == pytest.approx(100.0 * np.mean(pred[valid] == target[valid]))
    assert scores["iou"][4] == 0.0
    # A class absent from both has no IoU and does not count.
    only_zero = ev.confusion_matrix(np.zeros(4, int), np.zeros(4, int), 3)
    assert ev.segmentation_scores(only_zero)["iou"] == [100.0, None, None]
    with pytest.raises(ValueError, match="same shape"):
        ev.miou(pred, target[0], 5)


def test_load_segmentation_folder_pairs_by_name(tmp_path):
    images_dir, masks_dir = tmp_path / "images", tmp_path / "masks"
    (images_dir / "sub").mkdir(parents=True)
    (masks_dir / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("b", "a", "sub/c"):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(images_dir / f"{name}.jpg")
    Image.fromarray(np.full((12, 12), 2, np.uint8)).save(masks_dir / "a.png")
    Image.fromarray(np.full((12, 12), 255, np.uint8)).save(masks_dir / "b.png")
    palette = Image.fromarray(np.eye(12, dtype=np.uint8) * 3, "P")  # palette PNG: indices are the ids
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
    palette.save(masks_dir / "sub" / "c.png")
    data = ev.load_segmentation_folder(str(images_dir), str(masks_dir))
    assert data["names"] == ["a", "b", "sub/c"]
    assert data["images"].shape == (3, 12, 12, 3) and data["masks"].shape == (3, 12, 12)
    assert data["masks"][0].max() == 2 and data["masks"][1].min() == 255
    np.testing.assert_array_equal(data["masks"][2], np.eye(12) * 3)
    assert ev.load_segmentation_folder(str(images_dir), str(masks_dir), size=8)["masks"].shape == (3, 8, 8)

    (masks_dir / "b.png").unlink()
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(masks_dir / "z.png")
    unpaired = r"do not pair up: 1 image\(s\) without a mask \(e.g. b\); 1 mask\(s\) without an image \(e.g. z\)"
    with pytest.raises(ValueError, match=unpaired):
        ev.load_segmentation_folder(str(images_dir), str(masks_dir))
    (masks_dir / "z.png").unlink()
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(masks_dir / "b.png")
    with pytest.raises(ValueError, match="must have its image's size"):
        ev.load_segmentation_folder(str(images_dir), str(masks_dir))
    Image.fromarray(rng.integers(0, 9, (12, 12, 3), dtype=np.uint8)).save(masks_dir / "b.png")
    with pytest.raises(ValueError, match="single-channel"):
        ev.load_segmentation_folder(str(images_dir), str(masks_dir))
    with pytest.raises(FileNotFoundError, match="masks folder not found"):
        ev.load_segmentation_folder(str(images_dir), str(tmp_path / "nope"))


# ------------------------------------------------------------------------------ attention
def test_attention_maps_shapes_sums_and_threshold(vit, tmp_path):
    image = np.random.default_rng(1).integers(0, 255, (20, 17, 3), dtype=np.uint8)  # cropped to 16 x 16
    maps = ev.attention_maps(vit, image)
    assert maps.shape == (2, 16, 16)
    shown = ev.prepare_image(image, 8)
    x = np.asarray(kp.data.normalize(shown))[None]
    row = ev.cls_attention(vit, x)[0]  # (heads, 1 + N)
    np.testing.assert_allclose(row.sum(-1), 1.0, atol=1e-5)
    # Nearest upsampling: every 8 x 8 block holds its patch's weight.
    np.testing.assert_allclose(maps[:, ::8, ::8].reshape(2, 4), row[:, 1:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps.sum((1, 2)) / 64 + row[:, 0], 1.0, atol=1e-5)
    assert np.ptp(row[:, 1:]) > 1e-3  # peaked enough for the threshold test to mean something

    masks = ev.attention_maps(vit, image, threshold=0.6)
    assert set(np.unique(masks)) <= {0.0, 1.0}
    np.testing.assert_array_equal(masks[:, ::8, ::8].reshape(2, 4), ev.threshold_attention(row[:, 1:], 0.6))
    mass = row[:, 1:] / row[:, 1:].sum(-1, keepdims=True)
    weights = np.random.default_rng(2).dirichlet(np.ones(30) * 0.3, size=5)
    for attention, threshold in [(mass, 0.3), (mass, 0.6), (mass, 0.9), (weights, 0.6), (weights, 0.95)]:
        keep = ev.threshold_attention(attention, threshold)
        for head_mass, head_keep in zip(attention, keep):
            kept = head_mass[head_keep]
            assert kept.sum() >= threshold - 1e-6
            assert kept.sum() - kept.min() < threshold  # minimal: without its smallest it falls short
            assert kept.min() >= head_mass[~head_keep].max(initial=0.0)  # the largest weights are kept

    path = ev.save_attention_png(str(tmp_path / "out" / "attention.png"), shown, maps)
    with Image.open(path) as png:
        assert png.size == (3 * 16, 16)
    pca = ev.feature_pca(vit, image)
    assert pca.shape == (2, 2, 3) and pca.min() >= 0.0 and pca.max() <= 1.0
    with Image.open(ev.save_pca_png(str(tmp_path / "pca.png"), shown, pca)) as png:
        assert png.size == (2 * 16, 16)
    with pytest.raises(ValueError, match="3 channels"):
        ev.attention_maps(vit, np.zeros((16, 16, 4), np.uint8))
    with pytest.raises(ValueError, match="threshold"):
        ev.attention_maps(vit, image, threshold=1.5)


# ----------------------------------------------------------------------------- KNNMonitor
def test_knn_monitor_logs_on_its_schedule_before_the_log(tmp_path):
    keras.utils.set_random_seed(0)
    model = ts.dino()
    model.compile(optimizer=kp.optimizers.AdamW(learning_rate=1e-3))
    scenes = kp.data.synthetic_scenes(12, image_size=32, seed=1)
    held_out = (scenes["images"], scenes["labels"])
    # every=3 over 3 epochs: epoch 0 (always) and epoch 2 ((2 + 1) % 3 == 0); not epoch 1.
    monitor = kp.callbacks.KNNMonitor(held_out, held_out, every=3, k=3)
    before, after = str(tmp_path / "before.csv"), str(tmp_path / "after.csv")
    callbacks = [kp.callbacks.EpochLog(before), monitor, kp.callbacks.EpochLog(after)]
    history = model.fit(ts.dataset(ts.crops(8, n_local=0)), epochs=3, verbose=0, callbacks=callbacks)

    with open(after) as f:
        rows = list(csv.DictReader(f))
    assert [r["knn_top1"] for r in rows][1] == "NA"
    top1 = float(rows[0]["knn_top1"])
    # The bank is the test set itself, so each image's nearest neighbour is itself.
    assert top1 == monitor.history[0][1] and top1 > 50.0
    with open(before) as f:
        assert "knn_top1" not in f.readline()  # a logger listed before the monitor never sees it
    assert history.history["knn_top1"] == [top1, monitor.history[1][1]]
    assert [epoch for epoch, *_ in monitor.history] == [0, 2]
    # The schedule depends on the epoch number alone (a resumed run evaluates the same
    # epochs), and the run's last epoch can be added.
    assert [e for e in range(7) if monitor.due(e)] == [0, 2, 5]
    last = kp.callbacks.KNNMonitor(held_out, held_out, every=3, last_epoch=6)
    assert [e for e in range(7) if last.due(e)] == [0, 2, 5, 6]

    with pytest.raises(ValueError, match="teacher"):
        kp.callbacks.KNNMonitor(held_out, held_out, use="ema")


def test_resnet_features_are_pooled_c5_and_its_map():
    """The probes read a ResNet too: pooled features = spatial mean of C5, patches = the C5 map."""
    backbone = kp.backbones.resnet("resnet_tiny", width=4)
    images = np.random.default_rng(0).uniform(-1, 1, (3, 64, 64, 3)).astype("float32")
    c5 = np.asarray(keras.ops.convert_to_numpy(backbone(images, training=False)["C5"]))
    pooled = ev.features.FeatureExtractor(backbone)(images)
    patches = ev.features.FeatureExtractor(backbone, output="patches")(images)
    np.testing.assert_allclose(pooled, c5.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(patches, c5, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="attention maps need a ViT"):
        ev.features.FeatureExtractor(backbone, output="attention")(images)
