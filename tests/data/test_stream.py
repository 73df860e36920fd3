"""The resumable stream: ``pretrain_dataset`` / ``mcl_dataset`` with ``epochs=E``."""

import numpy as np
import pytest
import tensorflow as tf

from keras_pqcl.data import (
    MaskConfig,
    MultiCrop,
    MultiCropConfig,
    QueryConfig,
    plan_stream,
    pretrain_dataset,
)
from keras_pqcl.data.montage import MontageConfig, mcl_dataset

CROPS = dict(global_size=16, local_size=8, n_local=1, use_keras_cv=False)
N, B, S, E = 24, 4, 4, 3  # 24 examples, 4 of 6 full batches per epoch


def _np(batch):
    return {k: v.numpy() for k, v in batch.items()}


def _all(ds):
    return [_np(b) for b in ds]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def labelled():
    """Images with their index as label: the labels of a batch say which
    source examples it holds."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 20, 18, 3), dtype=np.uint8)
    return images, np.arange(N, dtype=np.int32)


def _stream(data, seed=3, **kw):
    kw.setdefault("epochs", E)
    kw.setdefault("steps_per_epoch", S)
    return pretrain_dataset(
        data,
        MultiCropConfig(**CROPS),
        batch_size=B,
        seed=seed,
        masks=MaskConfig(patch_size=8, ratio=0.3, ratio_var=0.0),
        queries=QueryConfig(patch_size=8, embed_dim=8),
        **kw,
    )


@pytest.fixture(scope="module")
def streams(labelled):
    """Built once (tracing costs seconds): seed 3 twice, seed 4, and seed 3
    resumed at epoch 2, step 1 (in a process whose global seed differs)."""
    out = {
        "full": _all(_stream(labelled)),
        "again": _all(_stream(labelled)),
        "other": _all(_stream(labelled, seed=4)),
    }
    tf.random.set_seed(99)
    out["resumed"] = _stream(labelled, start=(2, 1))
    return out


def test_resume_equals_uninterrupted_stream(streams):
    full = streams["full"]
    resumed = _all(streams["resumed"])
    assert len(full) == E * S and len(resumed) == E * S - 2 * S - 1
    assert {"global_masks", "query_coords", "query_tables"} <= set(full[0])
    _assert_same(resumed, full[2 * S + 1 :])


def test_cardinality_is_static_and_follows_the_formula(streams, labelled):
    assert int(streams["resumed"].cardinality()) == E * S - 2 * S - 1
    # Default S = N // B = 6.
    ds = pretrain_dataset(
        labelled, MultiCropConfig(**CROPS), batch_size=B, seed=0, epochs=2, start=(1, 4), photometric=False
    )
    assert int(ds.cardinality()) == 2 * 6 - 1 * 6 - 4
    plan = plan_stream(0, 5, None, (3, 2), 50, 8)
    assert plan.steps_per_epoch == 6 and plan.num_batches == 5 * 6 - 3 * 6 - 2


def test_epochs_differ_seeds_reproduce(streams):
    full, again, other = streams["full"], streams["again"], streams["other"]
    _assert_same(full, again)
    labels = [np.concatenate([b["label"] for b in full[e * S : (e + 1) * S]]) for e in range(E)]
    assert not np.array_equal(labels[0], labels[1])
    assert not np.array_equal(full[0]["global_boxes"], full[S]["global_boxes"])
    assert not np.array_equal(full[0]["label"], other[0]["label"])
    assert not np.array_equal(full[0]["global_boxes"], other[0]["global_boxes"])


def test_each_epoch_visits_an_index_at_most_once(streams):
    full = streams["full"]
    for e in range(E):
        labels = np.concatenate([b["label"] for b in full[e * S : (e + 1) * S]])
        assert len(labels) == S * B and len(set(labels.tolist())) == S * B
    # The index permutation of an epoch covers 0..n-1 exactly once.
    plan = plan_stream(3, 2, None, (0, 0), 10, 5)
    for e in range(2):
        order = [int(plan.source_index(tf.constant(e, tf.int64), tf.constant(p, tf.int64))) for p in range(10)]
        assert sorted(order) == list(range(10))


def test_stream_argument_errors(labelled):
    cfg = MultiCropConfig(**CROPS)
    with pytest.raises(ValueError, match="needs a seed"):
        pretrain_dataset(labelled, cfg, batch_size=B, epochs=2)
    with pytest.raises(ValueError, match="steps_per_epoch=7.*6 full batches"):
        pretrain_dataset(labelled, cfg, batch_size=B, seed=0, epochs=2, steps_per_epoch=7)
    with pytest.raises(ValueError, match=r"start=\(2, 0\) is outside"):
        pretrain_dataset(labelled, cfg, batch_size=B, seed=0, epochs=2, start=(2, 0))
    with pytest.raises(ValueError, match=r"step in \[0, 6\)"):
        pretrain_dataset(labelled, cfg, batch_size=B, seed=0, epochs=2, start=(0, 6))
    with pytest.raises(ValueError, match="exclude each other"):
        pretrain_dataset(labelled, cfg, batch_size=B, seed=0, epochs=2, repeat=True)
    with pytest.raises(ValueError, match="need epochs"):
        pretrain_dataset(labelled, cfg, batch_size=B, seed=0, start=(1, 0))


@pytest.fixture
def count_samples(monkeypatch):
    """Counts the examples that reach ``MultiCrop.sample`` (the augmentation)."""
    calls = []
    original = MultiCrop.sample

    def counted(self, image, label=-1, seed=None):
        out = original(self, image, label, seed)
        tick = tf.numpy_function(lambda: calls.append(1) or np.int32(0), [], tf.int32)
        out["label"] = out["label"] + tick  # keeps the counter in the graph
        return out

    monkeypatch.setattr(MultiCrop, "sample", counted)
    return calls


@pytest.mark.parametrize("in_order", [False, True])
def test_resume_skips_without_augmenting(labelled, count_samples, in_order):
    data = tf.data.Dataset.from_tensor_slices(labelled) if in_order else labelled
    ds = pretrain_dataset(
        data,
        MultiCropConfig(**CROPS),
        batch_size=B,
        seed=1,
        epochs=2,
        steps_per_epoch=3,
        start=(1, 1),
        photometric=False,
    )
    assert len(list(ds)) == 2
    assert len(count_samples) == 2 * B


def test_in_order_source_stream(labelled):
    """A tf.data.Dataset (no random access): per-epoch seeded shuffle."""

    def build(**kw):
        return pretrain_dataset(
            tf.data.Dataset.from_tensor_slices(labelled),
            MultiCropConfig(**CROPS),
            batch_size=B,
            seed=5,
            epochs=2,
            steps_per_epoch=S,
            photometric=False,
            **kw,
        )

    full = build()
    assert int(full.cardinality()) == 2 * S
    full = _all(full)
    tf.random.set_seed(99)  # the order must not depend on the global seed
    _assert_same(_all(build(start=(1, 2))), full[S + 2 :])
    labels = [np.concatenate([b["label"] for b in full[e * S : (e + 1) * S]]) for e in range(2)]
    assert all(len(set(lab.tolist())) == S * B for lab in labels)
    assert not np.array_equal(labels[0], labels[1])


def test_mcl_dataset_stream():
    cfg = MontageConfig(image_size=32, ratios=(2,))

    def build(**kw):
        return mcl_dataset(
            "synthetic_scenes:16:40", cfg, batch_size=4, seed=2, photometric=False, epochs=2, steps_per_epoch=2, **kw
        )

    full = build()
    assert int(full.cardinality()) == 4
    full = _all(full)
    resumed = build(start=(1, 1))
    assert int(resumed.cardinality()) == 1
    _assert_same(_all(resumed), full[3:])
    # Epochs draw new montage permutations and crops.
    assert not np.array_equal(full[0]["montage_sources_r2"], full[2]["montage_sources_r2"])
    assert not np.array_equal(full[0]["view_boxes"], full[2]["view_boxes"])


def test_folder_stream(tmp_path):
    from PIL import Image

    for k, cls in enumerate(("a", "b", "c")):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((12, 14, 3), 40 * k + 10 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    # Valid header, corrupt data: a decode check keeps it out of the count,
    # so the stream never runs short.
    good = (tmp_path / "a" / "0.png").read_bytes()
    (tmp_path / "c" / "broken.png").write_bytes(good[:40])

    def build(**kw):
        return pretrain_dataset(
            str(tmp_path),
            MultiCropConfig(**CROPS),
            batch_size=2,
            seed=0,
            epochs=2,
            photometric=False,
            return_info=True,
            **kw,
        )

    with pytest.warns(UserWarning, match="broken.png"):
        full, info = build()
    assert info.num_examples == 6 and info.verified
    assert int(full.cardinality()) == 6
    full = _all(full)
    for e in range(2):
        labels = np.concatenate([b["label"] for b in full[3 * e : 3 * e + 3]])
        assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    with pytest.warns(UserWarning, match="broken.png"):
        resumed, _ = build(start=(1, 1))
    _assert_same(_all(resumed), full[4:])
