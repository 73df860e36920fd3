"""Two-replica DINO (or iBOT+PQCL) steps vs the same steps on one device, in one fresh process.

Usage::

    python tests/scripts/dist_step.py {tensorflow,jax} OUT.npz WORKDIR [dino|pqcl]

``pqcl`` trains iBOT+PQCL with masks and queries, so its three centers (CLS, patch, query)
must also match the one-device run.

* ``tensorflow``: the CPU is split into 2 logical devices before anything else touches
  TensorFlow; run A uses the default strategy (one device), run B
  ``tf.distribute.MirroredStrategy`` over both (model created and compiled in its scope).
* ``jax``: ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` is set before JAX is
  imported; run A has no distribution (device 0), run B
  ``keras.distribution.DataParallel`` over both devices (model created after
  ``set_distribution``).

Both runs start from the same weights (run A's initial weights, saved to and loaded from a
``.weights.h5``), use drop-path 0 and fit the same 2 global batches of 4 (each replica sees
2 images per step). Written to OUT.npz: ``names``; ``init/<i>`` (initial values),
``single/<i>`` and ``dist/<i>`` (student,
teacher and center values in ``names`` order, the distributed ones as read through the
variable); ``replica<r>/<i>`` (each replica's / device's own copy in run B);
``single_loss``/``dist_loss`` (epoch-mean loss); ``replicas`` and ``iterations``.
"""

import os
import sys

MODE = sys.argv[1] if len(sys.argv) > 1 else ""
METHOD = sys.argv[4] if len(sys.argv) > 4 else "dino"
if MODE not in ("tensorflow", "jax") or len(sys.argv) not in (4, 5) or METHOD not in ("dino", "pqcl"):
    raise SystemExit(__doc__)
os.environ["KERAS_BACKEND"] = MODE
if MODE == "jax":
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=2").strip()

import tensorflow as tf  # noqa: E402

if MODE == "tensorflow":
    # Before anything else initialises the TensorFlow runtime.
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_pqcl as kp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_setup as ts  # noqa: E402
from tiny_setup import tracked  # noqa: E402

EPOCHS, STEPS = 1, 2


def build():
    # Low teacher momentum and no frozen last layer so that every variable moves.
    if METHOD == "pqcl":
        return ts.pqcl(teacher_momentum=0.9, freeze_last_layer=0)
    return ts.dino(teacher_momentum=0.9, freeze_last_layer=0)


def compile_model(model):
    # The DINO AdamW (per-tensor clipping, decay groups, lr and wd schedules) with a large
    # epsilon: with eps 1e-8 Adam's update g / (|g| + eps) hardly depends on the gradient's
    # scale, so a wrong cross-replica loss scaling would go unnoticed, and the exactly-zero
    # gradient of the attention key bias turns rounding noise into +-lr steps. With eps 1e-3
    # the update is close to linear in the gradient.
    total = EPOCHS * STEPS
    model.compile(
        optimizer=kp.optimizers.AdamW(
            learning_rate=kp.schedules.WarmupCosine(1e-3, 1e-6, total),
            weight_decay=kp.schedules.WarmupCosine(0.04, 0.4, total),
            epsilon=1e-3,
            clip_per_tensor=3.0,
        )
    )


def per_replica(variable):
    """Each replica's (TF) or device's (JAX) own copy of a variable's value."""
    value = variable.value
    if MODE == "tensorflow":
        inner = getattr(variable, "_value", value)
        copies = getattr(inner, "values", None) or (inner,)
        return [np.array(c.numpy()) for c in copies]
    shards = getattr(value, "addressable_shards", None)
    if not shards:
        return [np.array(value)]
    return [np.array(s.data) for s in shards]


def main(out_path, workdir):
    if METHOD == "pqcl":
        data = ts.pqcl_inputs(ts.crops(STEPS * ts.BATCH, n_local=1))
    else:
        data = ts.crops(STEPS * ts.BATCH, n_local=0)
    dataset = ts.dataset(data)
    init_path = os.path.join(workdir, "init.weights.h5")
    out = {}

    # ---- run A: one device
    keras.utils.set_random_seed(0)
    single = build()
    single.save_weights(init_path)
    for i, (_, v) in enumerate(tracked(single)):
        out[f"init/{i}"] = np.array(ops.convert_to_numpy(v))
    compile_model(single)
    history = single.fit(dataset, epochs=EPOCHS, verbose=0)
    names = [n for n, _ in tracked(single)]
    out["names"] = np.array(names)
    for i, (_, v) in enumerate(tracked(single)):
        out[f"single/{i}"] = np.array(ops.convert_to_numpy(v))
    out["single_loss"] = np.array(history.history["loss"])

    # ---- run B: two replicas
    keras.utils.set_random_seed(1)  # other initial weights: they must come from init_path
    if MODE == "tensorflow":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        replicas = strategy.num_replicas_in_sync
        with strategy.scope():
            dist = build()
            dist.load_weights(init_path)
            compile_model(dist)
    else:
        devices = keras.distribution.list_devices("cpu")
        assert len(devices) == 2, devices
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        replicas = len(devices)
        dist = build()
        dist.load_weights(init_path)
        compile_model(dist)
    history = dist.fit(dataset, epochs=EPOCHS, verbose=0)
    assert [n for n, _ in tracked(dist)] == names
    for i, (_, v) in enumerate(tracked(dist)):
        out[f"dist/{i}"] = np.array(ops.convert_to_numpy(v))
        for r, copy in enumerate(per_replica(v)):
            out[f"replica{r}/{i}"] = copy
    out["dist_loss"] = np.array(history.history["loss"])
    out["replicas"] = np.array(replicas)
    out["iterations"] = np.array([int(ops.convert_to_numpy(m.optimizer.iterations)) for m in (single, dist)])
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[2], sys.argv[3])
