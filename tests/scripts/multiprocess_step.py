"""Three DINO (or iBOT+PQCL) steps on one global batch of 8, in one process or as one process
of a multi-process JAX or TensorFlow run.

Usage::

    python tests/scripts/multiprocess_step.py {jax,tensorflow} METHODS OUT

``METHODS``: ``dino``, ``pqcl`` or ``dino,pqcl`` (both in one process, which saves a start
and a rendezvous); each writes ``OUT_<method>.npz``.

* ``jax``: with ``KERAS_PQCL_NUM_PROCESSES`` > 1 (and ``KERAS_PQCL_COORDINATOR``,
  ``KERAS_PQCL_PROCESS_ID``) the process joins ``jax.distributed`` through
  ``keras_pqcl.backend.init_jax_distributed``; without, it is the one-process reference.
* ``tensorflow``: with ``TF_CONFIG`` naming 2 workers the model is built under
  ``tf.distribute.MultiWorkerMirroredStrategy``; without, under the default strategy.

Every process builds its part of the global batch with ``pretrain_dataset(...,
shard=process_shard())`` on synthetic scenes (process ``i`` of ``N`` gets examples ``[i 8 / N,
(i + 1) 8 / N)``, the one-process run all 8), and the same model from the same seed.

Written to OUT_<method>.npz: ``names``; ``init/<i>`` and ``final/<i>`` (student, teacher and center
values in ``names`` order, before and after the steps); ``loss`` (the logged loss of each of
the 3 epochs of 1 step, i.e. per step); ``batch_sum`` (checksums of this process's examples,
whose sum over the processes is the one-process checksum); ``queue_entries`` /
``queue_pointer`` (a DenseCL ``Queue`` after 3 enqueues of 3 global batches of 6 keys, this
process contributing its share); ``world``, ``rank`` and ``iterations``.
"""

import os
import sys

MODE = sys.argv[1] if len(sys.argv) > 1 else ""
METHODS = sys.argv[2].split(",") if len(sys.argv) > 2 else []
if len(sys.argv) != 4 or MODE not in ("jax", "tensorflow") or not set(METHODS) <= {"dino", "pqcl"} or not METHODS:
    raise SystemExit(__doc__)
OUT = sys.argv[3]
METHOD = None  # the method being run
os.environ["KERAS_BACKEND"] = MODE

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

from keras_pqcl import backend  # noqa: E402

BATCH, STEPS, PATCH = 8, 3, 8
HEAD = dict(out_dim=32, hidden_dim=32, bottleneck_dim=16)
KEYS = ("global_crops", "local_crops", "global_masks", "query_coords")


def start():
    """Joins the multi-process run; returns the TensorFlow strategy (the default one without
    TF_CONFIG), or None under JAX."""
    if MODE == "jax":
        backend.init_jax_distributed()
        return None
    return backend.init_tf_multiworker() or tf.distribute.get_strategy()


def scope(strategy):
    import contextlib

    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def local_dataset():
    """This process's share of the one global batch, as a dataset of one batch."""
    import keras_pqcl as kp
    from keras_pqcl.data import MaskConfig, MultiCropConfig, QueryConfig

    # tf.data pairs its op seeds with TensorFlow's global seed, which
    # keras.distribution.initialize sets (to a seed agreed by the processes); the same
    # global seed in every run makes the one-process batch comparable.
    keras.utils.set_random_seed(0)
    crops = MultiCropConfig(global_size=16, local_size=8, n_local=2, flip_local=False)
    extra = {}
    if METHOD == "pqcl":
        extra = dict(masks=MaskConfig(PATCH), queries=QueryConfig(PATCH))
    ds = kp.data.pretrain_dataset(
        "synthetic_scenes:8:32",
        crops=crops,
        batch_size=BATCH,
        seed=0,
        photometric=False,
        shard=backend.process_shard(),
        **extra,
    )
    batch = {k: v.numpy() for k, v in next(iter(ds)).items() if k in KEYS}
    return batch, tf.data.Dataset.from_tensors(batch)


def build():
    import keras_pqcl as kp

    # Low teacher momentum and no frozen last layer so that every variable moves.
    keras.utils.set_random_seed(0)
    kwargs = dict(HEAD, teacher_momentum=0.9, freeze_last_layer=0)
    if METHOD == "pqcl":
        net = kp.backbones.vit(
            "vit_tiny",
            patch_size=PATCH,
            image_size=16,
            embed_dim=32,
            depth=1,
            num_heads=2,
            drop_path_rate=0.0,
            pos_embed="sincos",
            use_mask_token=True,
        )
        return kp.models.PQCL(net, base="ibot", **kwargs)
    net = kp.backbones.vit(
        "vit_tiny", patch_size=PATCH, image_size=16, embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.0
    )
    return kp.models.DINO(net, **kwargs)


def compile_model(model):
    import keras_pqcl as kp

    # A learning rate that moves the weights well past the tolerance, and Adam's epsilon
    # raised to 1e-3 so that a wrongly scaled gradient sum changes the update.
    optimizer = kp.optimizers.dino_adamw(BATCH, STEPS, 1, base_lr=0.1, warmup_epochs=1)
    optimizer.epsilon = 1e-3
    model.compile(optimizer=optimizer)


def to_numpy(x):
    """A replicated value as NumPy; a JAX array spanning several processes is read from this
    process's own copy (the whole value, since it is replicated)."""
    x = getattr(x, "value", x)
    if MODE == "jax" and not getattr(x, "is_fully_addressable", True):
        x = x.addressable_data(0)
    return np.array(ops.convert_to_numpy(x))


def queue_check(rank, world, strategy):
    """A small Queue fed 3 global batches of 6 keys; this process holds its share of each."""
    from keras_pqcl.losses.info_nce import Queue

    keras.utils.set_random_seed(0)
    with scope(strategy):
        queue = Queue(size=10, dim=4)
    keys = np.random.default_rng(1).normal(size=(STEPS, 6, 4)).astype("float32")
    share = 6 // world
    for k in keys:
        local = k[rank * share : (rank + 1) * share]
        if world == 1:
            queue.enqueue(local)
        elif MODE == "jax":
            # One GSPMD program over the global batch: the processes' shares form one array.
            layout = keras.distribution.distribution().get_data_layout(k.shape)
            queue.enqueue(_jax_global(local, layout))
        else:
            # Each worker's replica enqueues its share; the queue gathers them in order.
            tf.function(lambda keys: strategy.run(queue.enqueue, args=(keys,)))(local)
    return to_numpy(queue.entries), to_numpy(queue.pointer)


def _jax_global(local, layout):
    import jax

    return jax.make_array_from_process_local_data(layout.backend_layout, local)


def main():
    global METHOD

    strategy = start()
    for METHOD in METHODS:
        run_method(strategy, f"{OUT}_{METHOD}.npz")


def run_method(strategy, path):
    from tiny_setup import tracked

    rank, world = backend.process_index(), backend.process_count()
    batch, dataset = local_dataset()
    batch_sum = np.array([float(np.asarray(v, "float64").sum()) for v in batch.values()])
    with scope(strategy):
        model = build()
        compile_model(model)
    out = {"world": np.array(world), "rank": np.array(rank), "batch_sum": batch_sum}
    out["names"] = np.array([n for n, _ in tracked(model)])
    for i, (_, v) in enumerate(tracked(model)):
        out[f"init/{i}"] = to_numpy(v)
    if MODE == "tensorflow" and world > 1:
        # A distributed dataset has no length: the same batch repeated, one step per epoch.
        local = dataset.repeat()
        dataset, steps = backend.per_worker_dataset(lambda: local), 1
    else:
        steps = None
    # One step per epoch: the history's epoch means are the per-step losses.
    history = model.fit(dataset, epochs=STEPS, steps_per_epoch=steps, verbose=0)
    for i, (_, v) in enumerate(tracked(model)):
        out[f"final/{i}"] = to_numpy(v)
    out["loss"] = np.array(history.history["loss"])
    out["iterations"] = np.array(int(to_numpy(model.optimizer.iterations)))
    out["queue_entries"], out["queue_pointer"] = queue_check(rank, world, strategy)
    np.savez(path, **out)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
