"""Three DINO (or iBOT+PQCL) steps on one global batch of 8, in one torch process or as one
rank of a ``torch.distributed`` group.

Usage::

    python tests/scripts/torch_ddp_step.py {dino,pqcl} OUT.npz

Without ``WORLD_SIZE`` (or with 1) the process trains on the whole batch: the reference.
With the ``torchrun`` variables set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) it joins the group through
``keras_pqcl.backend.init_torch_distributed`` and rank ``r`` of ``W`` trains on examples
``[r * 8 / W, (r + 1) * 8 / W)``. Every process builds the same batch from the same seed
(``pretrain_dataset`` on synthetic scenes; DINO's with local crops, PQCL's also with iBOT
masks and PQCL query coordinates) and the same model from the same seed.

Written to OUT.npz: ``names``; ``init/<i>`` and ``final/<i>`` (student, teacher and center
values in ``names`` order, before and after the steps); ``loss`` (the logged loss of each of
the 3 epochs of 1 step, i.e. per step); ``batch_sum`` (a checksum of the global batch, equal
in every process); ``queue_entries`` / ``queue_pointer`` (a DenseCL ``Queue`` after 3
enqueues of this process's share of 3 global batches of 6 keys); ``world`` and ``rank``.
"""

import os
import sys

if len(sys.argv) != 3 or sys.argv[1] not in ("dino", "pqcl"):
    raise SystemExit(__doc__)
METHOD, OUT = sys.argv[1:]
os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

import keras_pqcl as kp  # noqa: E402
from keras_pqcl.backend import init_torch_distributed  # noqa: E402
from keras_pqcl.data import MaskConfig, MultiCropConfig, QueryConfig  # noqa: E402
from keras_pqcl.losses.info_nce import Queue  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_setup import tracked  # noqa: E402

BATCH, STEPS, PATCH = 8, 3, 8
HEAD = dict(out_dim=32, hidden_dim=32, bottleneck_dim=16)
KEYS = ("global_crops", "local_crops", "global_masks", "query_coords")


def global_batch():
    """The one global batch ``{key: (8, ...)}`` as NumPy, identical in every process."""
    crops = MultiCropConfig(global_size=16, local_size=8, n_local=2, flip_local=False)
    extra = {}
    if METHOD == "pqcl":
        extra = dict(masks=MaskConfig(PATCH), queries=QueryConfig(PATCH))
    ds = kp.data.pretrain_dataset(
        "synthetic_scenes:8:32", crops=crops, batch_size=BATCH, seed=0, photometric=False, **extra
    )
    return {k: v.numpy() for k, v in next(iter(ds)).items() if k in KEYS}


def build():
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
    # DINO's optimizer over the 3 steps, with a learning rate that moves the weights well
    # past the tolerance, and Adam's epsilon raised from 1e-8 to 1e-3: with 1e-8 the update
    # g / (|g| + eps) hardly depends on the gradient's scale, so a wrongly scaled gradient
    # sum would go unnoticed (see tests/scripts/dist_step.py).
    optimizer = kp.optimizers.dino_adamw(BATCH, STEPS, 1, base_lr=0.1, warmup_epochs=1)
    optimizer.epsilon = 1e-3
    model.compile(optimizer=optimizer)


def queue_check(rank, world):
    """A small Queue fed 3 global batches of 6 keys, this process enqueueing its share."""
    keras.utils.set_random_seed(0)
    queue = Queue(size=10, dim=4)
    keys = np.random.default_rng(1).normal(size=(STEPS, 6, 4)).astype("float32")
    share = 6 // world
    for k in keys:
        queue.enqueue(ops.convert_to_tensor(k[rank * share : (rank + 1) * share]))
    return np.array(ops.convert_to_numpy(queue.entries)), np.array(ops.convert_to_numpy(queue.pointer))


def main():
    rank, world = init_torch_distributed(timeout_s=120)
    data = global_batch()
    batch_sum = np.array([float(np.asarray(v, "float64").sum()) for v in data.values()])
    share = BATCH // world
    local = {k: v[rank * share : (rank + 1) * share] for k, v in data.items()}

    model = build()
    compile_model(model)
    out = {"world": np.array(world), "rank": np.array(rank), "batch_sum": batch_sum}
    names = [n for n, _ in tracked(model)]
    out["names"] = np.array(names)
    for i, (_, v) in enumerate(tracked(model)):
        out[f"init/{i}"] = np.array(ops.convert_to_numpy(v))
    # One step per epoch: the history's epoch means are the per-step losses.
    history = model.fit(tf.data.Dataset.from_tensors(local), epochs=STEPS, verbose=0)
    for i, (_, v) in enumerate(tracked(model)):
        out[f"final/{i}"] = np.array(ops.convert_to_numpy(v))
    out["loss"] = np.array(history.history["loss"])
    out["iterations"] = np.array(int(ops.convert_to_numpy(model.optimizer.iterations)))
    out["queue_entries"], out["queue_pointer"] = queue_check(rank, world)
    np.savez(OUT, **out)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
