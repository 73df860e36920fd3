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

Resumable stream (``epochs=E``): a rebuilt pipeline above replays epoch 0,
so a run resumed after epoch 3 would see epoch 0's batches again. With
``epochs=E`` the dataset instead holds epochs ``start[0] .. E-1``, ``S``
batches each, and every batch is a pure function of ``(seed, e, s)``
(epoch ``e``, step ``s``). Example position ``p = s B + b`` of epoch ``e``
(``b``: slot in the batch) gets

* the source index ``index_shuffle(p, seed=k(seed, e), max_index=n - 1)``, a
  stateless permutation of ``0..n-1`` of which the epoch uses the first
  ``S B`` entries (so no index twice per epoch, and ``start`` jumps straight
  to ``p = start_step B`` without reading the examples before it);
* the augmentation seed ``fold_in(fold_in([seed, salt], e), p)``,

and per-batch randomness (MCL's montages) uses ``(seed, e, s)`` the same
way. Sources without random access (``"tfds:NAME"``, a ``tf.data.Dataset``)
are read in order from their beginning each epoch through
``shuffle(10_000, seed=k(seed, e))``; the first epoch skips ``start_step B``
examples before the augmentation.

The output works unchanged under any ``KERAS_BACKEND``: ``fit`` accepts a
``tf.data.Dataset`` on JAX and PyTorch too.
"""

import dataclasses
from typing import Optional, Tuple

import tensorflow as tf

from keras_pqcl.data.multicrop import MultiCrop, MultiCropConfig
from keras_pqcl.data.sharding import Shard
from keras_pqcl.data.sources import SourceInfo, indexed_source, load_source

__all__ = ["StreamPlan", "plan_stream", "pretrain_dataset", "steps_per_epoch"]

# Shuffle buffer of the sources read in order (TFDS, a tf.data.Dataset).
_SHUFFLE_BUFFER = 10_000

# Second words of the stream's base seeds [seed, salt]: one independent
# random stream per use (arbitrary distinct constants).
_PERMUTATION_SALT = 0x51F7
_EXAMPLE_SALT = 0xE4A3
_BATCH_SALT = 0xBA7C


def _as_source(data, shuffle, seed, source_kwargs):
    if isinstance(data, tf.data.Dataset):
        card = int(data.cardinality())
        info = SourceInfo(name="tf.data.Dataset", num_examples=card if card >= 0 else None, class_names=None)
        if shuffle:
            data = data.shuffle(_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
        return data, info
    return load_source(data, shuffle=shuffle, seed=seed, **source_kwargs)


# ---------------------------------------------------------------------------
# resumable stream
# ---------------------------------------------------------------------------
def _fold_in(seed, data):
    """Stateless seed ``[2]`` int64 derived from ``seed`` ``[2]`` and ``data``.

    Philox is named rather than left to ``auto_select``, which may pick
    another algorithm on another device.
    """
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(data, tf.int64), alg="philox")


def _to_key(seed):
    """One int64 scalar (full range) drawn from a stateless seed ``[2]``."""
    return tf.random.stateless_uniform([], seed, minval=None, maxval=None, dtype=tf.int64, alg="philox")


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """Layout and seeds of a resumable stream (``pretrain_dataset(..., epochs=E)``).

    Epoch ``e`` has ``S = steps_per_epoch`` batches of ``B = batch_size``
    examples; global step ``g = e S + s``; example position ``p = s B + b``
    within the epoch. The stream holds steps ``first_step .. E S - 1``.

    Attributes:
        seed: the pipeline seed (int).
        epochs: ``E``. steps_per_epoch: ``S``. batch_size: ``B``.
        start: ``(epoch, step)`` of the first batch.
        num_examples: ``n``, examples of the source (None: unknown).
    """

    seed: int
    epochs: int
    steps_per_epoch: int
    batch_size: int
    start: Tuple[int, int] = (0, 0)
    num_examples: Optional[int] = None

    @property
    def examples_per_epoch(self):
        """``S B``: the examples one epoch uses."""
        return self.steps_per_epoch * self.batch_size

    @property
    def first_step(self):
        """Global step of the first batch: ``start[0] S + start[1]``."""
        return self.start[0] * self.steps_per_epoch + self.start[1]

    @property
    def num_batches(self):
        """Batches in the stream: ``E S - start[0] S - start[1]``."""
        return self.epochs * self.steps_per_epoch - self.first_step

    def epoch_seed(self, salt, epoch):
        """Stateless seed ``[2]`` int64 of epoch ``epoch`` for one use (``salt``)."""
        return _fold_in(tf.constant([self.seed, salt], tf.int64), epoch)

    def example_seed(self, epoch, position):
        """Augmentation seed ``[2]`` int64 of example ``position`` of ``epoch``."""
        return _fold_in(self.epoch_seed(_EXAMPLE_SALT, epoch), position)

    def source_index(self, epoch, position):
        """Source index (int64 scalar) of example ``position`` of ``epoch``:
        entry ``position`` of a stateless permutation of ``0..n-1``."""
        return tf.random.experimental.index_shuffle(
            position, self.epoch_seed(_PERMUTATION_SALT, epoch), tf.constant(self.num_examples - 1, tf.int64)
        )

    def positions(self):
        """``Dataset`` of ``(epoch, position)`` int64 pairs, one per example of
        the stream, in order; its cardinality is ``num_batches B``."""
        per_epoch = self.examples_per_epoch
        first = self.first_step * self.batch_size

        @tf.autograph.experimental.do_not_convert
        def split(g):
            return g // per_epoch, g % per_epoch

        return tf.data.Dataset.range(first, self.epochs * per_epoch).map(split)

    def batch_keys(self):
        """``Dataset`` of int64 scalar keys, one per batch: a pure function of
        ``(seed, e, s)`` (for per-batch randomness, e.g. MCL montages)."""
        steps = self.steps_per_epoch

        @tf.autograph.experimental.do_not_convert
        def key(g):
            return _to_key(_fold_in(self.epoch_seed(_BATCH_SALT, g // steps), g % steps))

        return tf.data.Dataset.range(self.first_step, self.epochs * steps).map(key)


def _check_stream_args(seed, epochs, steps_per_epoch, start, repeat):
    """Checks the stream arguments that need no source (before loading it)."""
    if epochs is None:
        if steps_per_epoch is not None or tuple(start) != (0, 0):
            raise ValueError(
                "steps_per_epoch and start need epochs=E (the resumable "
                f"stream); got epochs=None, steps_per_epoch={steps_per_epoch!r}, "
                f"start={start!r}."
            )
        return
    if not _is_int(epochs) or epochs < 1:
        raise ValueError(f"epochs must be a positive int or None, got {epochs!r}.")
    if seed is None:
        raise ValueError(
            f"epochs={epochs} needs a seed: every batch of the stream is a "
            "function of (seed, epoch, step), so pass seed=<int>."
        )
    if repeat:
        raise ValueError(
            "repeat=True and epochs=E exclude each other: the stream already "
            "holds every epoch (fit with epochs=E and no steps_per_epoch)."
        )
    if steps_per_epoch is not None and (not _is_int(steps_per_epoch) or steps_per_epoch < 1):
        raise ValueError(f"steps_per_epoch must be a positive int or None, got {steps_per_epoch!r}.")
    if not isinstance(start, (tuple, list)) or len(start) != 2 or not all(_is_int(x) for x in start):
        raise ValueError(f"start must be a pair (epoch, step) of ints, got {start!r}.")


def plan_stream(seed, epochs, steps_per_epoch, start, num_examples, batch_size):
    """The :class:`StreamPlan` of the stream arguments, or None when ``epochs`` is None.

    ``S = steps_per_epoch``, or ``num_examples // batch_size`` when None.

    Raises:
        ValueError: no seed, ``steps_per_epoch`` above ``num_examples //
            batch_size`` (or unknown ``num_examples`` without
            ``steps_per_epoch``), or ``start`` outside ``[0, E) x [0, S)``.
    """
    _check_stream_args(seed, epochs, steps_per_epoch, start, False)
    if epochs is None:
        return None
    full = None if num_examples is None else num_examples // batch_size
    if steps_per_epoch is None:
        if full is None:
            raise ValueError("the source's number of examples is unknown; pass steps_per_epoch=S with epochs=E.")
        steps_per_epoch = full
    elif full is not None and steps_per_epoch > full:
        raise ValueError(
            f"steps_per_epoch={steps_per_epoch} exceeds the {full} full "
            f"batches of the source ({num_examples} examples // batch_size="
            f"{batch_size}); an epoch never reuses an example."
        )
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch of {num_examples} examples holds no full batch of {batch_size}.")
    epoch, step = (int(x) for x in start)
    if not (0 <= epoch < epochs and 0 <= step < steps_per_epoch):
        raise ValueError(
            f"start={tuple(start)} is outside the stream: the epoch must lie "
            f"in [0, {epochs}) and the step in [0, {steps_per_epoch})."
        )
    return StreamPlan(
        seed=int(seed),
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        start=(epoch, step),
        num_examples=num_examples,
    )


def _stream_examples(
    data,
    per_example,
    batch_size,
    shuffle,
    seed,
    epochs,
    steps_per_epoch,
    start,
    source_kwargs,
    num_parallel_calls,
    shard,
):
    """``(dataset, info, plan)``: ``per_example(example, seed [2])`` over the
    examples of the stream (of ``shard``'s part of each batch), in order (not
    batched)."""
    local = shard.local_batch(batch_size)
    kwargs = dict(source_kwargs)
    # The stream must never run short: count a folder by decoding it.
    kwargs.setdefault("verify", "decode")
    indexed = None if isinstance(data, tf.data.Dataset) else indexed_source(data, **kwargs)
    if indexed is not None:
        fetch, info = indexed
        _check_count(info, batch_size)
        plan = plan_stream(seed, epochs, steps_per_epoch, start, info.num_examples, batch_size)

        @tf.autograph.experimental.do_not_convert
        def one(epoch, position):
            index = plan.source_index(epoch, position) if shuffle else position
            return per_example(fetch(index), plan.example_seed(epoch, position))

        # Positions, not examples, are dropped: another shard's examples are
        # never read.
        ds = shard.select(plan.positions(), batch_size, lambda e, p: p)
        ds = ds.apply(tf.data.experimental.assert_cardinality(plan.num_batches * local))
        ds = ds.map(one, num_parallel_calls=num_parallel_calls, deterministic=True)
        return ds, info, plan

    # In-order sources: each epoch reads the source from its beginning.
    source, info = _as_source(data, False, seed, kwargs)
    _check_count(info, batch_size)
    plan = plan_stream(seed, epochs, steps_per_epoch, start, info.num_examples, batch_size)
    per_epoch = plan.examples_per_epoch
    first_epoch, first_step = plan.start

    @tf.autograph.experimental.do_not_convert
    def epoch_examples(epoch):
        # Dataset.shuffle pairs its seed with TensorFlow's global seed
        # (tf.random.set_seed); clearing it in this function's graph keeps
        # the order a function of (seed, epoch) alone.
        tf.compat.v1.get_default_graph().seed = None
        d = source
        if shuffle:
            d = d.shuffle(
                _SHUFFLE_BUFFER, seed=_to_key(plan.epoch_seed(_PERMUTATION_SALT, epoch)), reshuffle_each_iteration=False
            )
        skip = tf.where(epoch == first_epoch, tf.constant(first_step * batch_size, tf.int64), tf.constant(0, tf.int64))
        # The skipped examples are read but never augmented.
        d = d.take(per_epoch).skip(skip)
        where = tf.data.Dataset.range(skip, per_epoch).map(
            tf.autograph.experimental.do_not_convert(lambda position: (epoch, position))
        )
        return tf.data.Dataset.zip((d, where))

    ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(epoch_examples)
    # flat_map hides the count that Keras reads; a source shorter than
    # S B examples fails here at the end of the stream instead of silently
    # running short.
    ds = ds.apply(tf.data.experimental.assert_cardinality(plan.num_batches * batch_size))
    if shard.count > 1:
        ds = shard.select(ds, batch_size, lambda example, where: where[1])
        ds = ds.apply(tf.data.experimental.assert_cardinality(plan.num_batches * local))

    @tf.autograph.experimental.do_not_convert
    def one(example, where):
        return per_example(example, plan.example_seed(*where))

    ds = ds.map(one, num_parallel_calls=num_parallel_calls, deterministic=True)
    return ds, info, plan


def _check_count(info, batch_size):
    if info.num_examples is not None and info.num_examples < batch_size:
        raise ValueError(
            f"the source {info.name!r} has {info.num_examples} examples, fewer "
            f"than batch_size={batch_size}, so no full batch can be made "
            f"(batches drop the remainder). Use batch_size <= "
            f"{info.num_examples} or more data."
        )


# ---------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------
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
    epochs=None,
    steps_per_epoch=None,
    start=(0, 0),
    shard=None,
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
        shuffle: shuffle the source each iteration (each epoch with
            ``epochs``).
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
        epochs: None (default): one pass per iteration, new crops on each
            new iteration, as described in the module docstring. An int
            ``E`` (needs ``seed``): the finite, resumable stream of epochs
            ``start[0] .. E-1``, every batch a pure function of ``(seed,
            epoch, step)``; ``fit(ds, epochs=E - start[0])`` without
            ``steps_per_epoch`` consumes it. A folder is then counted by
            decoding every file (``verify="decode"``) unless
            ``source_kwargs`` sets ``verify``; with a weaker check a corrupt
            file stops the stream with a decode error, since dropping it
            would shift every later batch.
        steps_per_epoch: batches per epoch ``S`` of the stream; default
            ``num_examples // batch_size`` (at most that).
        start: ``(epoch, step)`` of the stream's first batch, to resume:
            the stream then holds ``E S - start[0] S - start[1]`` batches,
            equal to the uninterrupted stream's from that point.
        shard: :class:`~keras_pqcl.data.Shard` of a multi-process run
            (``keras_pqcl.backend.process_shard()``): ``batch_size`` stays the
            global batch ``B`` and this process gets its ``B / N`` examples
            of each batch, exactly those of the one-process batch. None: the
            whole batch.

    Returns:
        ``tf.data.Dataset`` of dicts (see :mod:`keras_pqcl.data.multicrop`)
        with a leading batch axis ``B`` on every entry, e.g.
        ``global_crops`` float32 ``[B, n_global, S_g, S_g, 3]``,
        ``global_boxes`` float32 ``[B, n_global, 4]``, ``label`` int32
        ``[B]``. With ``return_info=True``: ``(dataset, info)``.

    Raises:
        ValueError: if the source holds fewer than ``batch_size`` examples,
            or bad stream arguments (see :func:`plan_stream`).
    """
    crops = crops if crops is not None else MultiCropConfig()
    if not isinstance(crops, MultiCropConfig):
        raise TypeError(f"crops must be a MultiCropConfig, got {type(crops).__name__}.")
    transform = MultiCrop(
        crops, photometric=photometric, record_augmentations=record_augmentations, masks=masks, queries=queries
    )
    ds, info = batched_examples(
        data,
        transform,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        repeat=repeat,
        num_parallel_calls=num_parallel_calls,
        jit_compile=jit_compile,
        source_kwargs=source_kwargs,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        start=start,
        shard=shard,
    )
    ds = finalize(ds, seed)
    return (ds, info) if return_info else ds


def batched_examples(
    data,
    transform,
    batch_size,
    shuffle=True,
    seed=None,
    repeat=False,
    num_parallel_calls=tf.data.AUTOTUNE,
    jit_compile=True,
    source_kwargs=None,
    select=None,
    *,
    epochs=None,
    steps_per_epoch=None,
    start=(0, 0),
    shard=None,
):
    """``(dataset, info)``: the source mapped through ``transform`` per example and batched.

    The front every pre-training pipeline shares (:func:`pretrain_dataset`, MCL's
    ``mcl_dataset``): checks, source (shuffled), optional repeat, then per example
    ``transform.sample(image, label, seed)`` with one stateless seed per example drawn
    from ``Dataset.random(seed)`` (second seed word 0), ``batch(batch_size,
    drop_remainder=True)``, and per batch ``transform.finish`` compiled with XLA, with
    ``select`` applied to its dict. With ``jit_compile=False`` the finish stage and
    ``select`` run per example, before the batching.

    With ``epochs=E`` the examples and their seeds come from the stream of
    :func:`plan_stream` instead (module docstring); the result then has the
    static cardinality ``E S - start[0] S - start[1]``.

    ``shard`` (a :class:`~keras_pqcl.data.Shard`): ``batch_size`` stays the
    global batch ``B``; the dataset holds only this process's part of each
    batch, ``B / N`` examples, each with the seed it has in the one-process
    pipeline. The examples are selected before they are augmented.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    _check_stream_args(seed, epochs, steps_per_epoch, start, repeat)
    source_kwargs = dict(source_kwargs or {})
    shard = shard if shard is not None else Shard()
    local = shard.local_batch(batch_size)

    finish = tf.function(transform.finish, jit_compile=jit_compile, autograph=False)

    # Plain TF ops with explicit tf.cond: skip autograph's (slow) conversion.
    @tf.autograph.experimental.do_not_convert
    def sample(example, example_seed):
        image, label = example
        return transform.sample(image, label, example_seed)

    @tf.autograph.experimental.do_not_convert
    def to_views(batch):
        out = finish(batch)
        return select(out) if select is not None else out

    if jit_compile:
        per_example = sample
    else:
        # Without XLA the crop loop runs op by op; over each example's crops
        # in parallel map calls it is faster than over a whole batch (18 vs
        # 15 images/s per core in benchmarks/pipeline.py).
        @tf.autograph.experimental.do_not_convert
        def per_example(example, example_seed):
            return to_views(sample(example, example_seed))

    if epochs is None:
        ds, info = _as_source(data, shuffle, seed, source_kwargs)
        _check_count(info, batch_size)
        if repeat:
            ds = ds.repeat()

        @tf.autograph.experimental.do_not_convert
        def keyed(example, key):
            return per_example(example, tf.stack([key, tf.zeros([], tf.int64)]))

        ds, count = _whole_batches(ds, batch_size, shard, info)
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        # Keys are drawn for every example, so a shard's examples keep the
        # keys they have in the one-process pipeline.
        ds = shard.select(tf.data.Dataset.zip((ds, keys)), batch_size)
        if count is not None:
            ds = ds.apply(tf.data.experimental.assert_cardinality(count))
        ds = ds.map(keyed, num_parallel_calls=num_parallel_calls, deterministic=_deterministic(seed))
    else:
        ds, info, _ = _stream_examples(
            data,
            per_example,
            batch_size,
            shuffle,
            seed,
            epochs,
            steps_per_epoch,
            start,
            source_kwargs,
            num_parallel_calls,
            shard,
        )
    ds = ds.batch(local, drop_remainder=True)
    if jit_compile:
        ds = ds.map(to_views, num_parallel_calls=num_parallel_calls, deterministic=_deterministic(seed))
    return ds, info


def _whole_batches(ds, batch_size, shard, info):
    """``(ds, count)``: for a shard of several, the source cut to whole global
    batches, and the number of examples the shard keeps (None: infinite).

    Without the cut the examples of a last, partial global batch would give
    the first processes one local batch more than the others, which would
    then wait for them at the next collective.
    """
    if shard.count == 1:
        return ds, None
    card = int(ds.cardinality())
    if card == tf.data.INFINITE_CARDINALITY:
        return ds, None
    if card < 0:
        raise ValueError(
            f"the source {info.name!r} has an unknown number of examples, so "
            "its last global batch cannot be cut off evenly for the "
            f"{shard.count} processes; pass epochs=E and seed=<int> (the "
            "resumable stream counts the source) or repeat=True."
        )
    batches = card // batch_size
    return ds.take(batches * batch_size), batches * shard.local_batch(batch_size)


def keyed_map(ds, fn, seed, num_parallel_calls=tf.data.AUTOTUNE, keys=None):
    """``ds.map(lambda x: fn(x, key))`` with a fresh int64 ``key`` per element from
    ``Dataset.random(seed)`` (new keys each epoch); deterministic order with a seed.

    ``keys``: a ``Dataset`` of int64 scalars to use instead (e.g.
    :meth:`StreamPlan.batch_keys`), zipped element by element.
    """
    if keys is None:
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return tf.data.Dataset.zip((ds, keys)).map(
        fn, num_parallel_calls=num_parallel_calls, deterministic=_deterministic(seed)
    )


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
    is exhausted. A stream (``epochs=E``) gives its whole length,
    ``E S - start[0] S - start[1]``, not one epoch's ``S``.
    """
    card = int(dataset.cardinality())
    return card if card >= 0 else None
