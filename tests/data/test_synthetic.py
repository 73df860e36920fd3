"""synthetic_scenes: shapes, determinism, labels/masks consistency."""

import numpy as np
import pytest

from keras_pqcl.data import SYNTHETIC_CLASS_NAMES, synthetic_scenes


@pytest.fixture(scope="module")
def scenes():
    return synthetic_scenes(300, image_size=32, num_classes=10, seed=5)


def test_shapes_and_dtypes(scenes):
    assert scenes["images"].shape == (300, 32, 32, 3)
    assert scenes["images"].dtype == np.uint8
    assert scenes["labels"].shape == (300,) and scenes["labels"].dtype == np.int32
    assert scenes["masks"].shape == (300, 32, 32)
    assert scenes["masks"].dtype in (np.uint8, np.int32)
    assert scenes["object_classes"].shape == (300, 4)
    assert len(SYNTHETIC_CLASS_NAMES) == 10
    assert scenes["labels"].min() >= 0 and scenes["labels"].max() < 10
    assert scenes["masks"].max() <= 10


def test_deterministic_by_seed():
    a = synthetic_scenes(40, image_size=24, seed=1)
    b = synthetic_scenes(40, image_size=24, seed=1)
    c = synthetic_scenes(40, image_size=24, seed=2)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["images"], c["images"])


def test_masks_and_labels_agree_with_objects(scenes):
    inst = scenes["instance_masks"].astype(np.int64)
    classes = scenes["object_classes"]
    # Class mask = class of the topmost object (via the instance mask).
    lookup = np.concatenate([np.zeros((len(classes), 1), np.int64), classes + 1], axis=1)
    expected = np.take_along_axis(lookup, inst.reshape(len(inst), -1), axis=1).reshape(inst.shape)
    np.testing.assert_array_equal(scenes["masks"], expected)
    # Instances only use drawn slots; 1-4 objects per image.
    n_obj = (classes >= 0).sum(1)
    assert n_obj.min() >= 1 and n_obj.max() <= 4
    assert np.all(inst.max(axis=(1, 2)) <= n_obj)
    # Label = class of the object with the largest visible region.
    areas = np.stack([(inst == j + 1).sum((1, 2)) for j in range(4)], 1)
    np.testing.assert_array_equal(areas, scenes["object_areas"])
    largest = np.argmax(areas, axis=1)
    np.testing.assert_array_equal(scenes["labels"], classes[np.arange(len(classes)), largest])
    # The labelled object covers a real part of the image.
    assert np.median(areas.max(1)) > 0.05 * 32 * 32


def test_classes_balanced_and_mean_colour_uninformative(scenes):
    labels = scenes["labels"]
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 10  # every class present, no class dominates
    assert counts.max() <= 3 * 30
    # Nearest-centroid on the mean RGB colour: close to chance (10 %).
    feats = scenes["images"].reshape(len(labels), -1, 3).mean(1)
    train, test = slice(0, 200), slice(200, 300)
    cents = np.stack([feats[train][labels[train] == k].mean(0) for k in range(10)])
    pred = np.argmin(((feats[test][:, None] - cents[None]) ** 2).sum(-1), 1)
    assert (pred == labels[test]).mean() < 0.25


def test_num_classes_subset_and_validation():
    d = synthetic_scenes(50, image_size=16, num_classes=3, seed=0)
    assert set(np.unique(d["labels"])) <= {0, 1, 2}
    assert d["masks"].max() <= 3
    with pytest.raises(ValueError, match="num_classes"):
        synthetic_scenes(5, num_classes=11)
    with pytest.raises(ValueError, match="image_size"):
        synthetic_scenes(5, image_size=8)


def test_layout_knobs_for_experiments(monkeypatch):
    """The private layout dict that benchmarks/synthetic_difficulty.py overrides does what it says."""
    from keras_pqcl.data import synthetic

    monkeypatch.setitem(synthetic._LAYOUT, "max_distractors", 0)
    monkeypatch.setitem(synthetic._LAYOUT, "greyscale", True)
    monkeypatch.setitem(synthetic._LAYOUT, "palette", 2)
    data = synthetic_scenes(30, image_size=24, seed=3)
    # One object per image, and it is the label.
    assert (data["object_classes"][:, 1:] == -1).all()
    np.testing.assert_array_equal(data["labels"], data["object_classes"][:, 0])
    # Grey levels up to the per-channel sensor noise (sigma 4 on 0..255).
    images = data["images"].astype(np.float32)
    assert np.abs(images - images.mean(-1, keepdims=True)).mean() < 6.0


def test_repeat_main_knob_labels_by_class_area(monkeypatch):
    """repeat_main=1: every object shares the main class, and the label is the class covering
    the most visible pixels summed over its instances."""
    from keras_pqcl.data import synthetic

    monkeypatch.setitem(synthetic._LAYOUT, "repeat_main", 1.0)
    data = synthetic_scenes(40, image_size=24, seed=5)
    classes = data["object_classes"]
    active = classes >= 0
    assert (active.sum(1) > 1).any()
    np.testing.assert_array_equal(np.where(active, classes, classes[:, :1]), np.repeat(classes[:, :1], 4, axis=1))
    np.testing.assert_array_equal(data["labels"], classes[:, 0])

    monkeypatch.setitem(synthetic._LAYOUT, "repeat_main", 0.5)
    data = synthetic_scenes(200, image_size=24, seed=6)
    per_class = np.stack([(data["masks"] == k + 1).sum(axis=(1, 2)) for k in range(10)], axis=1)
    np.testing.assert_array_equal(data["labels"], per_class.argmax(1))
