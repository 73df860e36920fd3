"""Per-process shards of the pre-training pipeline: disjoint, covering, equal to the one-process batch.

A seeded source of 24 images labelled with their own index: with a global batch of 6 and 3
processes, each step's shards hold disjoint images that together are the one-process batch,
in process order, with the same augmentations. Checked on the plain pipeline (``epochs=None``,
the in-memory source) and on the resumable stream (``epochs=E``, resumed mid-epoch). Pure
``tf.data``: the same under every backend.
"""

import numpy as np
import pytest

from keras_pqcl.data import MultiCropConfig, Shard, pretrain_dataset

N, BATCH, PROCESSES = 24, 6, 3
CROPS = MultiCropConfig(global_size=16, local_size=8, n_local=1)


def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (N, 20, 20, 3), dtype=np.uint8), np.arange(N, dtype=np.int32)


def batches(shard=None, **kwargs):
    # Geometry only, without XLA: the photometric stage is a per-example function of the same
    # seeds, and compiling it would cost most of this test's time.
    ds = pretrain_dataset(
        images(), crops=CROPS, batch_size=BATCH, seed=7, shard=shard, photometric=False, jit_compile=False, **kwargs
    )
    return [{k: v.numpy() for k, v in b.items()} for b in ds]


@pytest.mark.parametrize("kwargs", [{}, dict(epochs=2, start=(0, 2))], ids=["plain", "stream"])
def test_shards_are_disjoint_and_form_the_one_process_batch(kwargs):
    full = batches(**kwargs)
    shards = [batches(Shard(i, PROCESSES), **kwargs) for i in range(PROCESSES)]
    assert full and all(len(s) == len(full) for s in shards)
    for step, whole in enumerate(full):
        parts = [s[step] for s in shards]
        labels = [p["label"] for p in parts]
        assert all(len(x) == BATCH // PROCESSES for x in labels)
        # Disjoint: no image fed by two processes in one step; covering: together the batch.
        assert len(set(np.concatenate(labels))) == BATCH
        for key, value in whole.items():
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value, err_msg=key)
    # Over the whole plain epoch, every image is read exactly once across the processes.
    if not kwargs:
        seen = np.concatenate([b["label"] for s in shards for b in s])
        assert sorted(seen) == list(range(N // BATCH * BATCH))


def test_every_shard_has_the_same_number_of_batches_and_knows_it():
    """25 examples, batch 6: the 25th is dropped in every process (a lone local batch in
    process 0 would leave it waiting for the others), and Keras can read the length."""
    from keras_pqcl.data import steps_per_epoch

    data = (np.zeros((25, 20, 20, 3), np.uint8), np.arange(25, dtype=np.int32))
    for i in range(PROCESSES):
        ds = pretrain_dataset(
            data, crops=CROPS, batch_size=BATCH, seed=7, shard=Shard(i, PROCESSES), photometric=False, jit_compile=False
        )
        assert steps_per_epoch(ds) == 4 and len(list(ds)) == 4


def test_one_shard_is_the_whole_batch():
    assert Shard().local_batch(BATCH) == BATCH and Shard(0, 1).select("unchanged", BATCH) == "unchanged"


@pytest.mark.parametrize(
    "args, match",
    [
        ((2, 2), r"index must be an int in \[0, 2\)"),
        ((0, 0), "count must be a positive int"),
    ],
)
def test_bad_shard_fails_with_one_line(args, match):
    with pytest.raises(ValueError, match=match):
        Shard(*args)


def test_batch_not_dividing_by_processes_fails_with_one_line():
    with pytest.raises(ValueError, match="global batch_size=6 does not divide by the 4 processes"):
        pretrain_dataset(images(), crops=CROPS, batch_size=BATCH, seed=7, shard=Shard(1, 4))
