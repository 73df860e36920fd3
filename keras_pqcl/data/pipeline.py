"""``pretrain_dataset``: source → multi-crop → batches, all in ``tf.data``.

Order of operations::

    load_source (shuffled at the cheapest point: indices / file names)
      → repeat (optional)
      → zip with a per-example random key (tf.data.Dataset.random)
      → map per example:
          MultiCrop.sample: boxes, crops (uint8), masks, queries and every
            random choice, stateless RNG seeded by the key
      → batch(drop_remainder=True)
      → map per batch: MultiCrop.finish, XLA-compiled: flips, colour, blur,
          solarize, normalisation (float32)
      → prefetch

The photometric stage runs per batch rather than per example: the crops are
batched as uint8 (a quarter of the bytes of float32), and one compiled call
per batch replaces one per example. (With ``jit_compile=False`` it stays per
example, before the batching.) ``keras_pqcl.data.tune_input_pipeline`` sets
up TensorFlow's allocator and thread pool for this work.

Reproducibility: every random draw of the augmentation is a
``tf.random.stateless_*`` op whose seed comes from the example's key. The
keys come from ``Dataset.random(seed=seed, rerandomize_each_iteration=True)``
so a seeded pipeline gives the same batches every time it is built, yet each
new iteration over it (each ``fit`` epoch without ``repeat``) draws new
crops. Parallel ``map`` keeps element order (``deterministic=True``) when a
seed is given; the keys travel with the examples, so the parallelism cannot
change which example gets which key.

The output works unchanged under any ``KERAS_BACKEND``: ``fit`` accepts a
``tf.data.Dataset`` on JAX and PyTorch too.
"""

import tensorflow as tf

from keras_pqcl.data.multicrop import MultiCrop, MultiCropConfig
from keras_pqcl.data.sources import SourceInfo, load_source

__all__ = ["pretrain_dataset", "steps_per_epoch"]


def _as_source(data, shuffle, seed, source_kwargs):
    if isinstance(data, tf.data.Dataset):
        card = int(data.cardinality())
        info = SourceInfo(name="tf.data.Dataset",
                          num_examples=card if card >= 0 else None,
                          class_names=None)
        if shuffle:
            data = data.shuffle(10_000, seed=seed,
                                reshuffle_each_iteration=True)
        return data, info
    return load_source(data, shuffle=shuffle, seed=seed, **source_kwargs)


def pretrain_dataset(
    data="synthetic_scenes",
    crops=None,
    batch_size=64,
    shuffle=True,
    seed=None,
    repeat=False,
    num_parallel_calls=tf.data.AUTOTUNE,
    *,
    photometric=True,
    masks=None,
    queries=None,
    jit_compile=True,
    record_augmentations=False,
    return_info=False,
    source_kwargs=None,
):
    """Builds the batched multi-crop pre-training dataset.

    Args:
        data: anything :func:`keras_pqcl.data.load_source` accepts
            (``"synthetic_scenes[:N]"``, a folder, ``"tfds:NAME"``, numpy
            arrays), or a ``tf.data.Dataset`` of ``(image uint8 [H, W, 3],
            label int32)`` pairs.
        crops: :class:`MultiCropConfig`; ``None`` = ``MultiCropConfig()``
            (DINO defaults: 2 x 224 px global, 8 x 96 px local).
        batch_size: examples per batch B; the last partial batch is dropped
            so every batch has the same static shape (no JAX/XLA retrace).
        shuffle: shuffle the source each iteration.
        seed: int or None. With a seed the pipeline is reproducible.
        repeat: repeat the source forever (then ``steps_per_epoch`` is None
            and ``fit`` needs ``steps_per_epoch``).
        num_parallel_calls: parallelism of the per-example map.
        photometric: False disables colour/blur/solarize (geometry only).
        masks: :class:`~keras_pqcl.data.MaskConfig` for iBOT block masks
            (``global_masks``), or None.
        queries: :class:`~keras_pqcl.data.QueryConfig` for PQCL query
            coordinates (``query_coords``, optionally ``query_tables``), or
            None.
        jit_compile: compile the photometric stage with XLA (several times
            faster on CPU). False runs the same ops without XLA.
        record_augmentations: add ``global_augs`` / ``local_augs`` keys.
        return_info: also return the source's :class:`SourceInfo`.
        source_kwargs: extra keyword arguments for ``load_source`` (e.g.
            ``{"verify": "decode"}`` or ``{"data_dir": ...}``).

    Returns:
        ``tf.data.Dataset`` of dicts (see :mod:`keras_pqcl.data.multicrop`)
        with a leading batch axis ``B`` on every entry, e.g.
        ``global_crops`` float32 ``[B, n_global, S_g, S_g, 3]``,
        ``global_boxes`` float32 ``[B, n_global, 4]``, ``label`` int32
        ``[B]``. With ``return_info=True``: ``(dataset, info)``.

    Raises:
        ValueError: if the source holds fewer than ``batch_size`` examples.
    """
    crops = crops if crops is not None else MultiCropConfig()
    if not isinstance(crops, MultiCropConfig):
        raise TypeError(
            f"crops must be a MultiCropConfig, got {type(crops).__name__}."
        )
    transform = MultiCrop(crops, photometric=photometric,
                          record_augmentations=record_augmentations,
                          masks=masks, queries=queries)
    ds, info = batched_examples(
        data, transform, batch_size, shuffle=shuffle, seed=seed, repeat=repeat,
        num_parallel_calls=num_parallel_calls, jit_compile=jit_compile,
        source_kwargs=source_kwargs)
    ds = finalize(ds, seed)
    return (ds, info) if return_info else ds


def batched_examples(data, transform, batch_size, shuffle=True, seed=None,
                     repeat=False, num_parallel_calls=tf.data.AUTOTUNE,
                     jit_compile=True, source_kwargs=None, select=None):
    """``(dataset, info)``: the source mapped through ``transform`` per example and batched.

    The front every pre-training pipeline shares (:func:`pretrain_dataset`, MCL's
    ``mcl_dataset``): checks, source (shuffled), optional repeat, then per example
    ``transform.sample(image, label, seed)`` with one stateless seed per example drawn
    from ``Dataset.random(seed)`` (second seed word 0), ``batch(batch_size,
    drop_remainder=True)``, and per batch ``transform.finish`` compiled with XLA, with
    ``select`` applied to its dict. With ``jit_compile=False`` the finish stage and
    ``select`` run per example, before the batching.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    ds, info = _as_source(data, shuffle, seed, dict(source_kwargs or {}))
    if info.num_examples is not None and info.num_examples < batch_size:
        raise ValueError(
            f"the source {info.name!r} has {info.num_examples} examples, fewer "
            f"than batch_size={batch_size}, so no full batch can be made "
            f"(batches drop the remainder). Use batch_size <= "
            f"{info.num_examples} or more data."
        )
    if repeat:
        ds = ds.repeat()

    finish = tf.function(transform.finish, jit_compile=jit_compile,
                         autograph=False)

    # Plain TF ops with explicit tf.cond: skip autograph's (slow) conversion.
    @tf.autograph.experimental.do_not_convert
    def sample(example, key):
        image, label = example
        example_seed = tf.stack([key, tf.zeros([], tf.int64)])
        return transform.sample(image, label, example_seed)

    @tf.autograph.experimental.do_not_convert
    def to_views(batch):
        out = finish(batch)
        return select(out) if select is not None else out

    if not jit_compile:
        # Without XLA the crop loop runs op by op; over each example's crops
        # in parallel map calls it is faster than over a whole batch (18 vs
        # 15 images/s per core in benchmarks/pipeline.py).
        ds = keyed_map(ds, lambda example, key: to_views(sample(example, key)),
                       seed, num_parallel_calls)
        return ds.batch(batch_size, drop_remainder=True), info
    ds = keyed_map(ds, sample, seed, num_parallel_calls)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(to_views, num_parallel_calls=num_parallel_calls,
                deterministic=_deterministic(seed))
    return ds, info


def keyed_map(ds, fn, seed, num_parallel_calls=tf.data.AUTOTUNE):
    """``ds.map(lambda x: fn(x, key))`` with a fresh int64 ``key`` per element from
    ``Dataset.random(seed)`` (new keys each epoch); deterministic order with a seed."""
    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return tf.data.Dataset.zip((ds, keys)).map(
        fn, num_parallel_calls=num_parallel_calls, deterministic=_deterministic(seed))


def _deterministic(seed):
    """``map``'s ``deterministic``: keep element order when seeded, else tf.data's default."""
    return True if seed is not None else None


def finalize(ds, seed):
    """Deterministic options when seeded, then prefetch: the tail of every pipeline."""
    if seed is not None:
        options = tf.data.Options()
        options.deterministic = True
        ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(dataset):
    """Number of batches per pass over ``dataset``, or None if unknown/infinite.

    Folder sources give None (undecodable files are dropped on the fly, so
    the count is not known in advance); ``fit`` then runs until the dataset
    is exhausted.
    """
    card = int(dataset.cardinality())
    return card if card >= 0 else None
