"""Integration tests of DINO training with ``fit`` on the current backend.

A tiny ViT (patch 8, 32 px, depth 2, width 32) and a fixed set of 8 structured images give
2 steps per epoch; every expectation is recomputed in NumPy from the formulas of the DINO
reference (loss, centre, schedules), not from library code.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_pqcl as kp
from tests.scripts import tiny_setup as ts

BACKEND = keras.backend.backend()


def _np(x):
    return np.array(ops.convert_to_numpy(x))


def _relative(layer):
    """``{path inside layer: numpy value}``; the first path component (the layer's own,
    possibly uniquified, name) is dropped so that student and teacher keys coincide."""
    return {v.path.split("/", 1)[1]: _np(v) for v in layer.weights if "seed_generator" not in v.path}


def _networks(model):
    student = {"backbone/" + k: v for k, v in _relative(model.student_backbone).items()}
    student.update({"head/" + k: v for k, v in _relative(model.student_head).items()})
    teacher = {"backbone/" + k: v for k, v in _relative(model.teacher_backbone).items()}
    teacher.update({"head/" + k: v for k, v in _relative(model.teacher_head).items()})
    return student, teacher


class Recorder(keras.callbacks.Callback):
    """Snapshots student, teacher, center, step counter and logs after every batch."""

    def __init__(self):
        super().__init__()
        self.steps = []
        self.initial = None

    def snapshot(self):
        model = self.model
        student, teacher = _networks(model)
        return dict(
            student=student,
            teacher=teacher,
            center=_np(model.term("cls").center),
            iterations=int(_np(model.optimizer.iterations)),
        )

    def on_train_begin(self, logs=None):
        self.initial = self.snapshot()

    def on_train_batch_end(self, batch, logs=None):
        snap = self.snapshot()
        snap["logs"] = {k: float(_np(v)) for k, v in (logs or {}).items()}
        self.steps.append(snap)


# ------------------------------------------------------------------------------ fixtures
# The reference run: the DINO optimizer with its schedules, 3 epochs x 2 steps.
EPOCHS, STEPS = 3, 2
TOTAL = EPOCHS * STEPS
M0 = 0.9  # low teacher momentum so the EMA is clearly visible within a few steps
BASE_LR = 0.064  # x batch 4 / 256 = 1e-3
MIN_LR = 1e-5
WD0, WD1 = 0.04, 0.4
TEMP0, TEMP1, TEMP_EPOCHS = 0.04, 0.07, 3


@pytest.fixture(scope="module")
def scheduled_run():
    keras.utils.set_random_seed(0)
    data = ts.crops(8)
    model = ts.dino(
        teacher_momentum=M0,
        warmup_teacher_temp=TEMP0,
        teacher_temp=TEMP1,
        warmup_teacher_temp_epochs=TEMP_EPOCHS,
        freeze_last_layer=1,
    )
    # Center expected after the first step: 0.9 * 0 + 0.1 * mean of the initial teacher's
    # logits over the 2 x 4 global crops of batch 0 (a plain forward pass, before fit).
    first = ops.convert_to_tensor(data["global_crops"][: ts.BATCH])
    teacher_logits = model.teacher_head(model.teacher_backbone(kp.models.crop_major(first), training=False)["cls"])
    expected_center = 0.1 * _np(teacher_logits).astype(np.float64).mean(axis=0, keepdims=True)
    model.compile(
        optimizer=kp.optimizers.dino_adamw(
            ts.BATCH,
            EPOCHS,
            STEPS,
            base_lr=BASE_LR,
            min_lr=MIN_LR,
            warmup_epochs=1,
            weight_decay=WD0,
            weight_decay_end=WD1,
        )
    )
    recorder = Recorder()
    history = model.fit(ts.dataset(data), epochs=EPOCHS, verbose=0, callbacks=[recorder])
    return dict(model=model, rec=recorder, history=history, expected_center=expected_center)


# Distillation run for the loss: center frozen (center_momentum=1) and teacher temperature
# constant, so the target distribution is (nearly) fixed and the cross-entropy must fall.
# Global crops only (no "local_crops" key, which is optional): half the compile time.
# With the default center momentum the center's anti-collapse drift flattens the teacher on
# 8 images within ~10 steps and the loss floor (teacher entropy) rises: not a learning signal.
@pytest.fixture(scope="module")
def distill_run():
    keras.utils.set_random_seed(1)
    model = ts.dino(
        center_momentum=1.0,
        warmup_teacher_temp=0.04,
        teacher_temp=0.04,
        warmup_teacher_temp_epochs=0,
        freeze_last_layer=0,
        teacher_momentum=0.99,
    )
    model.compile(optimizer=kp.optimizers.AdamW(learning_rate=3e-3, weight_decay=0.0))
    history = model.fit(
        ts.dataset(ts.crops(8, n_local=0)),
        epochs=6,
        verbose=0,
    )
    return dict(model=model, history=history)


@pytest.fixture(scope="module")
def fresh_model():
    """Compiled, never trained: used by tests that expect fit to fail."""
    keras.utils.set_random_seed(2)
    model = ts.dino()
    model.compile(optimizer=kp.optimizers.AdamW(learning_rate=1e-3))
    return model


# ------------------------------------------------------------------------------- tests
def test_fit_lowers_dino_loss(distill_run):
    losses = distill_run["history"].history["loss"]
    assert len(losses) == 6 and np.all(np.isfinite(losses)), losses
    # Epoch means (2 steps each): first vs last.
    assert losses[-1] < 0.5 * losses[0], losses
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses


def test_model_owns_the_teacher_momentum_schedule(distill_run):
    model, history = distill_run["model"], distill_run["history"]
    assert model.get_config()["teacher_momentum"] == pytest.approx(0.99)
    assert model.schedules.get_config() == dict(teacher_momentum=0.99, teacher_momentum_end=1.0, freeze_last_layer=0)
    # Logged momentum at the last step of epoch 0 (step 1 of 12) follows 0.99 -> 1.
    expected = 1.0 - (1.0 - 0.99) * (1.0 + math.cos(math.pi * 1 / 12)) / 2.0
    assert history.history["teacher_momentum"][0] == pytest.approx(expected, abs=1e-6)


def test_step_counter_and_clock(scheduled_run):
    model, rec = scheduled_run["model"], scheduled_run["rec"]
    assert [s["iterations"] for s in rec.steps] == list(range(1, TOTAL + 1))
    assert float(_np(model.schedules.steps_per_epoch)) == STEPS
    assert float(_np(model.schedules.total_steps)) == TOTAL


def test_teacher_is_ema_of_student(scheduled_run):
    rec = scheduled_run["rec"]
    init = rec.initial
    assert init["student"].keys() == init["teacher"].keys()
    # The teacher starts as an exact copy of the student.
    for key, value in init["student"].items():
        np.testing.assert_array_equal(init["teacher"][key], value, err_msg=key)

    teacher = {k: v.astype(np.float64) for k, v in init["teacher"].items()}
    for i, snap in enumerate(rec.steps):
        # Momentum at iteration i (the index before the update), cosine M0 -> 1 over TOTAL.
        m = 1.0 - (1.0 - M0) * (1.0 + math.cos(math.pi * i / TOTAL)) / 2.0
        assert snap["logs"]["teacher_momentum"] == pytest.approx(m, abs=1e-6)
        moved = 0.0
        for key in teacher:
            # EMA with the student *after* this step's optimizer update.
            teacher[key] = m * teacher[key] + (1.0 - m) * snap["student"][key].astype(np.float64)
            np.testing.assert_allclose(
                snap["teacher"][key],
                teacher[key],
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"teacher {key} after step {i}",
            )
            moved = max(moved, np.abs(snap["teacher"][key] - init["teacher"][key]).max())
        if i >= 1:  # step 0 has learning rate 0 (warm-up starts at 0)
            assert moved > 2e-5, f"teacher did not move at step {i}"


def test_teacher_not_trained_by_optimizer(scheduled_run):
    model = scheduled_run["model"]
    teacher_vars = model.teacher_backbone.weights + model.teacher_head.weights
    teacher_ids = {id(v) for v in teacher_vars}
    assert not teacher_ids & {id(v) for v in model.trainable_variables}
    assert not any(v.trainable for v in teacher_vars)
    student_trainable = model.student_backbone.trainable_variables + model.student_head.trainable_variables
    assert {id(v) for v in model.trainable_variables} == {id(v) for v in student_trainable}
    opt = model.optimizer
    assert not teacher_ids & {id(v) for v in opt._trainable_variables}
    assert len(opt._trainable_variables) == len(student_trainable)
    # No optimizer slot (Adam moments) was made for a teacher variable; slots are named
    # after their variable's path.
    slots = [v.path for v in opt.variables]
    assert any("student_head" in p for p in slots), slots
    assert not [p for p in slots if "teacher" in p]


def test_last_layer_frozen_during_first_epoch(scheduled_run):
    rec = scheduled_run["rec"]
    key = "head/last_layer/kernel"
    init = rec.initial["student"][key]
    for i, snap in enumerate(rec.steps):
        if i < STEPS:  # epoch 0: exactly unchanged
            np.testing.assert_array_equal(snap["student"][key], init, err_msg=f"step {i}")
        else:
            assert np.abs(snap["student"][key] - init).max() > 1e-5, f"last layer frozen at step {i}"
    # Meanwhile the rest of the head was trained during epoch 0 (lr > 0 at step 1).
    other = "head/mlp_0/kernel"
    assert np.abs(rec.steps[STEPS - 1]["student"][other] - rec.initial["student"][other]).max() > 1e-5


def test_center_update(scheduled_run):
    rec = scheduled_run["rec"]
    np.testing.assert_array_equal(rec.initial["center"], 0.0)
    center1 = rec.steps[0]["center"]
    assert np.abs(center1).max() > 1e-6
    np.testing.assert_allclose(center1, scheduled_run["expected_center"], rtol=1e-4, atol=1e-6)
    for a, b in zip(rec.steps, rec.steps[1:]):
        assert not np.array_equal(a["center"], b["center"])


def _expected_schedules(i):
    warm = STEPS  # one warm-up epoch
    base = BASE_LR * ts.BATCH / 256.0
    if i < warm:
        lr = np.linspace(0.0, base, warm)[i]
    else:
        j, n = i - warm, TOTAL - warm
        lr = MIN_LR + 0.5 * (base - MIN_LR) * (1.0 + math.cos(math.pi * j / n))
    wd = WD1 + 0.5 * (WD0 - WD1) * (1.0 + math.cos(math.pi * i / TOTAL))
    momentum = 1.0 - (1.0 - M0) * (1.0 + math.cos(math.pi * i / TOTAL)) / 2.0
    temp = np.linspace(TEMP0, TEMP1, TEMP_EPOCHS)[i // STEPS]
    return dict(learning_rate=lr, weight_decay=wd, teacher_momentum=momentum, teacher_temp=temp)


def test_logged_schedules_match_formulas(scheduled_run):
    rec, history = scheduled_run["rec"], scheduled_run["history"]
    for i, snap in enumerate(rec.steps):
        expected = _expected_schedules(i)
        for name, value in expected.items():
            assert name in snap["logs"], (name, sorted(snap["logs"]))
            assert snap["logs"][name] == pytest.approx(value, rel=1e-5, abs=1e-8), (name, i)
    # Epoch-end logs carry the value of the epoch's last step.
    for epoch in range(EPOCHS):
        expected = _expected_schedules(epoch * STEPS + STEPS - 1)
        for name, value in expected.items():
            assert history.history[name][epoch] == pytest.approx(value, rel=1e-5, abs=1e-8), (name, epoch)
    for value in history.history["loss"]:
        assert np.isfinite(value)


def test_unknown_dataset_length_needs_steps_per_epoch(fresh_model):
    ds = ts.dataset(ts.crops(4))
    for bad in (ds.repeat(), ds.filter(lambda x: True)):
        assert int(bad.cardinality()) < 0
        with pytest.raises(ValueError, match="steps_per_epoch"):
            fresh_model.fit(bad, epochs=1, verbose=0)


def test_missing_global_crops_is_a_clear_error(fresh_model):
    data = ts.crops(4)
    ds = tf.data.Dataset.from_tensor_slices({"local_crops": data["local_crops"]}).batch(4, drop_remainder=True)
    with pytest.raises(ValueError, match="global_crops"):
        fresh_model.fit(ds, epochs=1, verbose=0)
