"""MCL model: region tiles, loss, target BN,
EMA, fit and saving. References are short NumPy formulas written here."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_pqcl.backbones.resnet import ResNet
from keras_pqcl.data.montage import Montage, MontageConfig
from keras_pqcl.models.mcl import MCL, contrastive_level_loss, region_tiles
from tests.helpers import IGNORE_NUMPY2_COPY_WARNING, f64, to_numpy

pytestmark = IGNORE_NUMPY2_COPY_WARNING

SIZE, N = 64, 4  # 64 px: 2x2 cells per sub-image on its level


@keras.saving.register_keras_serializable(package="test_mcl")
class PoolPyramid(keras.Model):
    """A few-op stand-in for a ResNet (C2..C5 at strides 4..32): the wiring test runs eagerly,
    and on JAX every eager op compiles, so a real ResNet would cost a minute there."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.out_channels = {f"C{i}": 4 for i in range(2, 6)}
        self.proj = keras.layers.Conv2D(4, 1, name="proj")
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        self.proj.build((None, None, None, 3))
        self.built = True

    def call(self, images, training=None):
        x = self.proj(keras.ops.average_pool(images, 4, 4))
        out = {"C2": x}
        for level in (3, 4, 5):
            x = keras.ops.average_pool(x, 2, 2)
            out[f"C{level}"] = x
        return out


def tiny_mcl(backbone=None, **kwargs):
    args = dict(
        fpn_channels=16, neck_convs=1, neck_channels=16, hidden_dim=32, projection_dim=16, predictor_hidden_dim=32
    )
    args.update(kwargs)
    return MCL(backbone or ResNet(depths=(1, 1, 1, 1), width=8), **args)


def montage_batch(seed=0, ratios=(2, 4, 8)):
    cfg = MontageConfig(image_size=SIZE, ratios=ratios)
    views = np.random.default_rng(seed).normal(size=(N, cfg.num_views, SIZE, SIZE, 3)).astype(np.float32)
    out = Montage(cfg)({"views": tf.constant(views)}, tf.constant([seed, 1]))
    return {k: v.numpy() for k, v in out.items()}


def numpy_tiles(x, t):
    b, h, w, c = x.shape
    out = []
    for i in range(b):
        for row in range(h // t):
            for col in range(w // t):
                out.append(x[i, row * t : (row + 1) * t, col * t : (col + 1) * t])
    return np.stack(out)


def numpy_level_loss(p, t, labels, temperature, weight):
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    logits = p @ t.T / temperature
    lse = np.log(np.exp(logits).sum(1))
    ce = lse - logits[np.arange(len(labels)), labels]
    return 2 * temperature * weight * ce.mean()


def test_region_tiles_by_reshape():
    x = np.random.default_rng(0).normal(size=(2, 6, 9, 5)).astype(np.float32)
    np.testing.assert_array_equal(to_numpy(region_tiles(keras.ops.convert_to_tensor(x), 3)), numpy_tiles(x, 3))


@pytest.mark.parametrize("temperature,weight", [(1.0, 0.5), (0.2, 0.125)])
def test_level_loss_vs_numpy(temperature, weight):
    rng = np.random.default_rng(1)
    p, t = rng.normal(size=(7, 5)), rng.normal(size=(3, 5))
    labels = rng.integers(0, 3, 7)
    loss, cos = contrastive_level_loss(
        p.astype("float32"), t.astype("float32"), labels.astype("int32"), temperature, weight
    )
    np.testing.assert_allclose(f64(loss), numpy_level_loss(p, t, labels, temperature, weight), rtol=1e-5)
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    np.testing.assert_allclose(f64(cos), np.mean(np.sum(pn * tn[labels], 1)), rtol=1e-5, atol=1e-6)


def record_calls(layer, log):
    """Make ``layer`` append ``(inputs, outputs)`` of every call to ``log`` (as NumPy)."""
    call = layer.call

    def recording(x, *args, **kwargs):
        out = call(x, *args, **kwargs)
        convert = lambda v: {k: f64(t) for k, t in v.items()} if isinstance(v, dict) else f64(v)
        log.append((convert(x), convert(out)))
        return out

    layer.call = recording


def test_total_loss_wiring_vs_numpy():
    """One forward pass, its intermediate tensors recorded: each level's neck gets the tiles
    of P5, P4, P3, P2 (levels 0..3) of its own slice of the branch batch; the loss is the sum
    over branches and levels of 2 T w_i CE with the slots' source ids as labels against the
    *other* branch's targets (target neck on P5 of the full images); w = (1/2, 1/4, 1/8, 1/8),
    T = 1."""
    model = tiny_mcl(PoolPyramid())
    model.compile(optimizer="sgd")  # the logs read the optimizer's learning rate
    batch = montage_batch()
    fpn_log, neck_log, target_log, pred_logs = [], [], [], [[] for _ in range(4)]
    record_calls(model.student_fpn, fpn_log)
    record_calls(model.student_neck, neck_log)
    record_calls(model.teacher_neck, target_log)
    for head, log in zip(model.predictors, pred_logs):
        record_calls(head, log)
    loss, logs = model.ssl_forward({k: keras.ops.convert_to_tensor(v) for k, v in batch.items()}, 0, training=True)

    levels = [
        (0, N, None),
        (1, len(batch["montages_r2"]), batch["montage_sources_r2"]),
        (2, len(batch["montages_r4"]), batch["montage_sources_r4"]),
        (3, len(batch["montages_r8"]), batch["montage_sources_r8"]),
    ]
    assert len(fpn_log) == 2 and len(target_log) == 2 and len(neck_log) == 8
    expected, per_term = 0.0, {}
    for branch in (0, 1):
        pyramid = fpn_log[branch][1]
        start = 0
        for level, count, sources in levels:
            tiles = numpy_tiles(pyramid[f"P{5 - level}"][start : start + count], 2)
            np.testing.assert_allclose(neck_log[4 * branch + level][0], tiles, rtol=1e-6)
            start += count
            prediction = pred_logs[level][branch][1]
            assert prediction.shape == (count * 4**level, 16)
            labels = np.arange(N) if sources is None else sources[:, branch]
            target = target_log[1 - branch][1]
            assert target.shape == (N, 16)
            term = numpy_level_loss(prediction, target, labels, 1.0, (0.5, 0.25, 0.125, 0.125)[level])
            per_term[level] = per_term.get(level, 0.0) + term
            expected += term
    np.testing.assert_allclose(f64(loss), expected, rtol=2e-5)
    for level in range(4):
        np.testing.assert_allclose(f64(logs[f"level_{level}"]), per_term[level], rtol=2e-5)
    # At initialisation every target is about as likely: level 0 near 2 * (1/2) ln N per branch.
    assert abs(per_term[0] - 2 * math.log(N)) < 0.5


def test_target_batchnorm_uses_batch_statistics_and_stays_frozen():
    model = tiny_mcl()
    teacher_vars = [v for m in (model.teacher_backbone, model.teacher_fpn, model.teacher_neck) for v in m.weights]
    assert teacher_vars and not any(v.trainable for v in teacher_vars)
    trainable = {id(v) for v in model.trainable_variables}
    assert not any(id(v) in trainable for v in teacher_vars)
    assert len(model.trainable_variables) == sum(
        len(m.trainable_variables)
        for m in (model.student_backbone, model.student_fpn, model.student_neck, *model.predictors)
    )

    bn = model.teacher_backbone.bn1
    x = (np.random.default_rng(2).normal(size=(4, 5, 5, bn.gamma.shape[0])) * 3.0 + 2.0).astype("float32")
    moving_before = f64(bn.moving_mean)
    y = f64(bn(x, training=True))
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * f64(bn.gamma) + f64(bn.beta), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f64(bn.moving_mean), 0.9 * moving_before + 0.1 * mean, rtol=1e-5, atol=1e-6)

    # Whole networks: target == online at init in training mode (both on batch statistics).
    images = np.random.default_rng(3).normal(size=(4, SIZE, SIZE, 3)).astype("float32")
    online = f64(model.student_backbone(images, training=True)["C5"])
    target = f64(model.teacher_backbone(images, training=True)["C5"])
    np.testing.assert_allclose(target, online, rtol=1e-4, atol=1e-4)
    target_inference = f64(model.teacher_backbone(images, training=False)["C5"])
    assert np.abs(target_inference - online).max() > 1e-2


def test_ema_covers_parameters_not_batchnorm_statistics():
    model = tiny_mcl()
    model.schedules.total_steps.assign(10.0)
    # Cosine momentum 0.99 -> 1 over 10 steps: m_t = 1 - 0.01 (cos(pi t / 10) + 1) / 2.
    for step in (0, 5, 10):
        expected = 1 - 0.01 * (math.cos(math.pi * step / 10) + 1) / 2
        np.testing.assert_allclose(float(model.schedules.teacher_momentum_at(step)), expected, rtol=1e-6)

    conv_s, conv_t = model.student_neck.convs[0].kernel, model.teacher_neck.convs[0].kernel
    bn_s, bn_t = model.student_backbone.bn1, model.teacher_backbone.bn1
    conv_s.assign(conv_s + 1.0)
    bn_s.moving_mean.assign(bn_s.moving_mean + 5.0)
    t_before, s_now = f64(conv_t), f64(conv_s)
    stats_before = f64(bn_t.moving_mean)
    model.update_teacher(0)  # m = 0.99
    np.testing.assert_allclose(f64(conv_t), 0.99 * t_before + 0.01 * s_now, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(f64(bn_t.moving_mean), stats_before)
    # Every online parameter has its target twin; nothing else is averaged.
    assert len(model._teacher_pairs) == sum(
        len(m.trainable_variables) for m in (model.student_backbone, model.student_fpn, model.student_neck)
    )


# Levels 2 and 3 are absent from this batch, so their predictors and FPN laterals get no
# gradient; the 4-level forward is covered above, the compiled step here (at half the cost).
@pytest.mark.filterwarnings("ignore:Gradients do not exist")
def test_fit_lowers_the_loss_and_backbone_saves(tmp_path):
    model = tiny_mcl()
    kernel_before = f64(model.teacher_backbone.conv1.kernel)
    batch = montage_batch(seed=5, ratios=(2,))
    data = tf.data.Dataset.from_tensors(batch).repeat(3)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = model.fit(data, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0] - 0.02, losses
    assert {"level_0", "level_1", "pos_cos", "teacher_momentum"} <= set(history.history)
    # Inside the compiled step the target moved by EMA and its BN accumulated its own batches.
    assert np.abs(f64(model.teacher_backbone.conv1.kernel) - kernel_before).max() > 0
    assert np.abs(f64(model.teacher_backbone.bn1.moving_mean)).max() > 0

    images = batch["full_images"][:, 0]
    # The target is the network to transfer (its BN statistics are its own batches').
    backbone = model.teacher_backbone
    backbone.save(str(tmp_path / "target.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "target.keras"))
    np.testing.assert_allclose(
        f64(loaded(images, training=False)["C5"]), f64(backbone(images, training=False)["C5"]), rtol=1e-4, atol=1e-5
    )

    clone = MCL.from_config(model.get_config())
    assert clone.level_weights == (0.5, 0.25, 0.125, 0.125) and clone.temperature == 1.0
    assert len(clone.trainable_variables) == len(model.trainable_variables)


def test_c5_only_uses_full_images():
    model = tiny_mcl(fpn=False)
    model.compile(optimizer="sgd")
    assert not hasattr(model, "student_fpn") and len(model.predictors) == 1
    batch = montage_batch(ratios=())
    loss, logs = model.ssl_forward({"full_images": batch["full_images"]}, 0, training=True)
    assert np.isfinite(f64(loss)) and "level_1" not in logs
    np.testing.assert_allclose(f64(loss), f64(logs["level_0"]), rtol=1e-6)
    with pytest.raises(ValueError, match="ratios"):
        model.ssl_forward(montage_batch(), 0, training=True)
