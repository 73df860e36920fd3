"""DenseCL vs NumPy restatements of its formulas: heads, matching, both InfoNCE terms, the
queues, the key encoder's BatchNorm and EMA, fit, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_pqcl as kp
from keras_pqcl.data.views import densecl_crops
from keras_pqcl.heads.densecl_head import DenseCLDenseHead, DenseCLGlobalHead
from keras_pqcl.losses.info_nce import Queue, info_nce
from keras_pqcl.models.densecl import DenseCL, dense_correspondence, gather_positions

from tests import helpers as H
from tests.test_resnet import np_resnet, numpy_init

pytestmark = H.IGNORE_NUMPY2_COPY_WARNING
to_numpy, f64 = H.to_numpy, H.f64
BATCH, SIZE, DIM, QUEUE = 4, 64, 8, 40  # C5 is 2 x 2 at 64 px


def normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_info_nce(q, k, negatives, tau):
    logits = np.concatenate([(q * k).sum(-1, keepdims=True), q @ negatives.T], axis=1) / tau
    top = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return np.mean(lse - logits[:, 0])


def make(compile=True, **kwargs):
    args = dict(hidden_dim=16, projection_dim=DIM, queue_size=QUEUE, seed=0)
    args.update(kwargs)
    bn_splits = args.pop("bn_splits", 1)
    with numpy_init():
        backbone = kp.backbones.ResNet(depths=(1, 1, 1, 1), width=4, bn_splits=bn_splits)
        model = DenseCL(backbone, **args)
    if compile:  # ssl_forward logs the learning rate
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    return model


def two_views(batch=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    return {"global_crops": rng.normal(size=(batch, 2, SIZE, SIZE, 3)).astype("float32")}


# ----------------------------------------------------------------------------- pieces
def test_info_nce_matches_numpy():
    rng = np.random.default_rng(0)
    q, k = normalize(rng.normal(size=(6, 5))), normalize(rng.normal(size=(6, 5)))
    negatives = normalize(rng.normal(size=(11, 5)))
    for tau in (0.2, 0.07):
        got = float(to_numpy(info_nce(q.astype("float32"), k.astype("float32"), negatives.astype("float32"), tau)))
        np.testing.assert_allclose(got, np_info_nce(q, k, negatives, tau), rtol=1e-5)


def test_dense_correspondence_matches_numpy():
    rng = np.random.default_rng(1)
    bq, bk = rng.normal(size=(3, 9, 6)), rng.normal(size=(3, 7, 6)) * rng.uniform(0.1, 5, size=(3, 7, 1))
    idx = to_numpy(dense_correspondence(bq.astype("float32"), bk.astype("float32")))
    ref = np.argmax(np.einsum("bic,bjc->bij", normalize(bq), normalize(bk)), axis=-1)  # cosine, not dot
    np.testing.assert_array_equal(idx, ref)
    # Key positions that are a shuffled, rescaled copy of the query positions are found back.
    perm = rng.permutation(9)
    idx = to_numpy(dense_correspondence(bq.astype("float32"), (3.0 * bq[:, perm]).astype("float32")))
    np.testing.assert_array_equal(idx, np.broadcast_to(np.argsort(perm), (3, 9)))
    values = rng.normal(size=(3, 7, 4))
    got = to_numpy(gather_positions(values.astype("float32"), ref))
    np.testing.assert_allclose(got, values[np.arange(3)[:, None], ref], rtol=1e-6)


def test_heads_match_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 3, 6)).astype("float32")
    with numpy_init():
        g, d = DenseCLGlobalHead(hidden_dim=10, out_dim=4), DenseCLDenseHead(hidden_dim=10, out_dim=4)
        g.build(x.shape), d.build(x.shape)
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    pooled = x.astype(np.float64).mean(axis=(1, 2))
    ref = relu(pooled @ f64(g.fc1.kernel) + f64(g.fc1.bias)) @ f64(g.fc2.kernel) + f64(g.fc2.bias)
    np.testing.assert_allclose(to_numpy(g(x)), ref, rtol=1e-5, atol=1e-5)
    dense, mean = d(x)
    hidden = relu(x @ f64(d.conv1.kernel)[0, 0] + f64(d.conv1.bias))
    ref = hidden @ f64(d.conv2.kernel)[0, 0] + f64(d.conv2.bias)
    np.testing.assert_allclose(to_numpy(dense), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(mean), ref.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)  # before any norm


def test_queue_is_fifo_and_wraps_around():
    queue = Queue(size=10, dim=3)
    start = to_numpy(queue.entries).copy()
    np.testing.assert_allclose(np.linalg.norm(start, axis=1), 1.0, rtol=1e-5)  # random unit rows
    expected = start.copy()
    pointer = 0
    rng = np.random.default_rng(3)
    for _ in range(4):  # 16 keys into 10 rows: the 3rd and 4th batches wrap
        keys = rng.normal(size=(4, 3)).astype("float32")
        queue.enqueue(keys)
        for row in keys:
            expected[pointer] = row
            pointer = (pointer + 1) % 10
        np.testing.assert_allclose(to_numpy(queue.entries), expected, rtol=1e-6)
        assert int(to_numpy(queue.pointer)) == pointer
    assert pointer == 6
    with pytest.raises(ValueError, match="does not fit"):
        queue.enqueue(np.zeros((11, 3), "float32"))


# ----------------------------------------------------------------------------- the model
def test_loss_and_queues_match_numpy():
    model = make()
    batch = two_views()
    g0 = f64(model.global_loss.queue.entries)
    d0 = f64(model.dense_loss.queue.entries)
    x_q, x_k = batch["global_crops"][:, 0], batch["global_crops"][:, 1]
    # Both encoders run with batch statistics, so these equal what ssl_forward sees.
    qf, qg, qd, _ = (
        f64(t)
        for t in model.encode(x_q, model.query_backbone, model.query_global_head, model.query_dense_head, training=True)
    )
    kf, kg, kd, _ = (
        f64(t)
        for t in model.encode(x_k, model.key_backbone, model.key_global_head, model.key_dense_head, training=True)
    )
    loss, logs = model.ssl_forward(batch, 0, training=True)

    ref_global = np_info_nce(normalize(qg), normalize(kg), g0, 0.2)
    match = np.argmax(np.einsum("bic,bjc->bij", normalize(qf), normalize(kf)), axis=-1)
    positives = normalize(kd)[np.arange(BATCH)[:, None], match]
    ref_dense = np_info_nce(normalize(qd).reshape(-1, DIM), positives.reshape(-1, DIM), d0, 0.2)
    np.testing.assert_allclose(float(to_numpy(logs["global"])), ref_global, rtol=1e-4)
    np.testing.assert_allclose(float(to_numpy(logs["dense"])), ref_dense, rtol=1e-4)
    np.testing.assert_allclose(float(to_numpy(loss)), 0.5 * ref_global + 0.5 * ref_dense, rtol=1e-4)

    # Enqueued after the loss: normalised global keys, and ONE pooled dense key per image
    # (mean of the unnormalised dense map, then normalised); the other rows untouched.
    g1, d1 = f64(model.global_loss.queue.entries), f64(model.dense_loss.queue.entries)
    np.testing.assert_allclose(g1[:BATCH], normalize(kg), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d1[:BATCH], normalize(kd.mean(axis=1)), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(g1[BATCH:], g0[BATCH:])
    np.testing.assert_array_equal(d1[BATCH:], d0[BATCH:])
    assert int(to_numpy(model.global_loss.queue.pointer)) == BATCH
    assert int(to_numpy(model.dense_loss.queue.pointer)) == BATCH


def test_lambda_switch():
    model = make(lambda_start_step=5)
    assert float(to_numpy(model.loss_lambda_at(4))) == 0.0
    assert float(to_numpy(model.loss_lambda_at(5))) == 0.5
    assert float(to_numpy(make().loss_lambda_at(0))) == 0.5


def test_key_encoder_uses_batch_statistics():
    model = make()
    key_vars = {id(v) for m in (model.key_backbone, model.key_global_head, model.key_dense_head) for v in m.weights}
    trainable = model.trainable_variables
    assert not key_vars & {id(v) for v in trainable}  # never reaches the optimizer
    assert len(trainable) == len(model.query_backbone.trainable_weights) + 4 + 4
    assert all(layer.trainable for layer in model.key_backbone._flatten_layers())

    x = two_views()["global_crops"][:, 1]
    feats = to_numpy(model.encode_keys(x, training=True)[0])
    ref = np_resnet(model.key_backbone, x.astype(np.float64))["C5"]
    np.testing.assert_allclose(feats, ref.reshape(BATCH, -1, ref.shape[-1]), rtol=2e-4, atol=2e-4)
    # Moving statistics play no part in training mode.
    for layer in model.key_backbone._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(layer.moving_mean + 3.0)
            layer.moving_variance.assign(layer.moving_variance * 7.0)
    np.testing.assert_allclose(to_numpy(model.encode_keys(x, training=True)[0]), feats, rtol=1e-5, atol=1e-5)


def test_fit_ema_of_params_only_and_loss_falls():
    """One step: key parameters <- m key + (1 - m) query (query after the optimizer step); key
    BN moving statistics are the key encoder's own train-mode update, not averaged. Then
    instance discrimination of 8 fixed images (two noisy views each, split BN with the key
    shuffle): with a queue of one batch the negatives are the other images' previous keys."""
    model = make(queue_size=8, bn_splits=2, teacher_momentum=0.9)
    rng = np.random.default_rng(5)
    view = rng.normal(size=(8, 1, 48, 48, 3)).astype("float32")  # C5: 2 x 2
    batch = {"global_crops": np.concatenate([view, view + 0.3 * rng.normal(size=view.shape).astype("float32")], 1)}
    data = tf.data.Dataset.from_tensors(batch)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))

    query, key = model.query_backbone, model.key_backbone
    k0 = [f64(v) for v in key.weights]
    first = model.fit(data, epochs=1, verbose=0).history
    assert int(to_numpy(model.optimizer.iterations)) == 1
    moved = 0.0
    for k, q, before in zip(key.weights, query.weights, k0):
        if q.trainable:
            np.testing.assert_allclose(f64(k), 0.9 * before + 0.1 * f64(q), rtol=1e-4, atol=1e-6, err_msg=k.path)
            moved = max(moved, np.abs(f64(k) - before).max())
        else:
            assert np.abs(f64(k) - before).max() > 1e-4, k.path
            assert np.abs(f64(k) - (0.9 * before + 0.1 * f64(q))).max() > 1e-5, k.path
    assert moved > 1e-4
    assert int(to_numpy(model.global_loss.queue.pointer)) == 0  # 8 keys into 8 rows
    np.testing.assert_allclose(first["teacher_momentum"], 0.9, rtol=1e-6)  # constant schedule

    history = model.fit(data.repeat(4), epochs=4, verbose=0).history
    losses = history["loss"]  # (the first step, against random queue entries, is easier)
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0] - 0.1, losses  # measured: 1.96 -> 1.25 (TensorFlow)
    assert set(history) >= {"loss", "global", "dense", "loss_lambda", "teacher_momentum"}


def test_save_load_round_trip(tmp_path):
    model = make()
    model.ssl_forward(two_views(), 0, training=True)
    path = str(tmp_path / "densecl.keras")
    model.save(path)
    with numpy_init():
        loaded = keras.saving.load_model(path)
    assert isinstance(loaded, DenseCL)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=a.path)
    assert int(to_numpy(loaded.global_loss.queue.pointer)) == BATCH
    assert len(loaded.trainable_variables) == len(model.trainable_variables)
    assert loaded.get_config()["queue_size"] == QUEUE


def test_errors():
    model = make()
    with pytest.raises(ValueError, match="global_crops"):
        model.ssl_forward({"local_crops": np.zeros((2, 1, 8, 8, 3), "float32")}, 0)
    with pytest.raises(ValueError, match="two views"):
        model.ssl_forward({"global_crops": np.zeros((2, 3, SIZE, SIZE, 3), "float32")}, 0)
    with pytest.raises(ValueError, match="out_channels"):
        with numpy_init():
            DenseCL(kp.backbones.vit_tiny(16, depth=1))
    with pytest.raises(ValueError, match="momentum_schedule"):
        make(momentum_schedule="linear")


def test_densecl_crops():
    crops = densecl_crops(96)
    assert (crops.global_size, crops.n_global, crops.n_local) == (96, 2, 0)
    assert crops.global_scale == (0.2, 1.0) and crops.color_jitter == (0.4, 0.4, 0.4, 0.1)
    assert crops.global_blur_p == (0.5, 0.5) and crops.solarize_p == (0.0, 0.0)
    assert (crops.jitter_p, crops.grayscale_p, crops.flip_p) == (0.8, 0.2, 0.5)


_MIRRORED_ENQUEUE = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from keras_pqcl.losses.info_nce import Queue
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    queue = Queue(size=6, dim=2)
keys = np.arange(8, dtype="float32").reshape(4, 2)
data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(keys).batch(4))
step = tf.function(lambda x: strategy.run(queue.enqueue, args=(x,)))
for x in data:
    step(x)
    step(x)
copies = [v.numpy() for v in queue.entries.value.values]
np.save(sys.argv[1], np.stack(copies + [np.full((6, 2), int(queue.pointer.numpy()), "float32")]))
"""


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute; runs in the TensorFlow leg")
def test_enqueue_gathers_the_global_batch_across_replicas(tmp_path):
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        KERAS_BACKEND="tensorflow",
        PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p),
    )
    out = str(tmp_path / "queue.npy")
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED_ENQUEUE, out], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = np.load(out)
    # 2 replicas x 2 keys, twice, into 6 rows: the second global batch wraps around.
    keys = np.arange(8, dtype="float32").reshape(4, 2)
    expected = np.concatenate([keys[2:], keys[2:], keys[:2]])
    for copy in result[:2]:
        np.testing.assert_array_equal(copy, expected)
    assert result[2, 0, 0] == 2  # pointer
