"""DINOLoss vs NumPy."""

import numpy as np
import pytest
from keras import ops

from keras_pqcl.losses import DINOLoss

from tests import helpers as H

to_numpy = H.to_numpy
pytestmark = H.IGNORE_NUMPY2_COPY_WARNING

V, B, K, G = 5, 3, 7, 2


def numpy_dino_loss(student, teacher, center, student_temp, teacher_temp):
    """Mean over the 2V-2 pairs (q global, v != q) of the batch-mean cross-entropy."""
    total, pairs = 0.0, 0
    for q in range(teacher.shape[0]):
        p = H.softmax((teacher[q] - center) / teacher_temp)
        for v in range(student.shape[0]):
            if v == q:
                continue
            log_q = H.log_softmax(student[v] / student_temp)
            total += np.mean(-np.sum(p * log_q, axis=-1))
            pairs += 1
    assert pairs == 2 * student.shape[0] - 2
    return total / pairs


def numpy_center(center, teacher, momentum=0.9):
    return momentum * center + (1 - momentum) * teacher.reshape(-1, teacher.shape[-1]).mean(0, keepdims=True)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(V, B, K)).astype("float32")
    teacher = (rng.normal(size=(G, B, K)) * 0.2).astype("float32")
    center = (rng.normal(size=(1, K)) * 0.1).astype("float32")
    return student, teacher, center


def test_dino_loss_matches_numpy_and_updates_center():
    student, teacher, center = _data()
    loss_fn = DINOLoss(out_dim=K, student_temp=0.1, center_momentum=0.9)
    assert tuple(loss_fn.center.shape) == (1, K)
    np.testing.assert_array_equal(to_numpy(loss_fn.center), np.zeros((1, K)))
    loss_fn.center.assign(center)
    # teacher_temp as a tensor, as DINO.ssl_forward passes it (keyword-only).
    temp = ops.convert_to_tensor(0.04, dtype="float32")
    loss = loss_fn(ops.convert_to_tensor(student), ops.convert_to_tensor(teacher), teacher_temp=temp)
    assert tuple(loss.shape) == ()
    ref = numpy_dino_loss(student.astype(np.float64), teacher.astype(np.float64), center, 0.1, 0.04)
    np.testing.assert_allclose(float(to_numpy(loss)), ref, rtol=1e-5)
    # Center after the call: 0.9 c + 0.1 mean of the raw teacher logits over all 2B samples.
    new_center = numpy_center(center.astype(np.float64), teacher.astype(np.float64))
    np.testing.assert_allclose(to_numpy(loss_fn.center), new_center, rtol=1e-5, atol=1e-7)
    # The next step is centred with the updated center (update *after* the loss).
    loss2 = loss_fn(ops.convert_to_tensor(student), ops.convert_to_tensor(teacher), teacher_temp=0.07)
    ref2 = numpy_dino_loss(student.astype(np.float64), teacher.astype(np.float64), new_center, 0.1, 0.07)
    np.testing.assert_allclose(float(to_numpy(loss2)), ref2, rtol=1e-5)


def test_dino_loss_without_center_update():
    student, teacher, center = _data(1)
    loss_fn = DINOLoss(out_dim=K, student_temp=0.2)
    loss_fn.center.assign(center)
    loss = loss_fn(
        ops.convert_to_tensor(student), ops.convert_to_tensor(teacher), teacher_temp=0.05, update_center=False
    )
    ref = numpy_dino_loss(student.astype(np.float64), teacher.astype(np.float64), center, 0.2, 0.05)
    np.testing.assert_allclose(float(to_numpy(loss)), ref, rtol=1e-5)
    np.testing.assert_array_equal(to_numpy(loss_fn.center), center)


def test_dino_loss_only_globals_and_custom_momentum():
    """V = G = 2: only the two cross pairs (0, 1) and (1, 0)."""
    student, teacher, center = _data(2)
    loss_fn = DINOLoss(out_dim=K, center_momentum=0.5)
    loss_fn.center.assign(center)
    loss = loss_fn(ops.convert_to_tensor(student[:2]), ops.convert_to_tensor(teacher), teacher_temp=0.04)
    s, t = student[:2].astype(np.float64), teacher.astype(np.float64)
    ce = [
        np.mean(-np.sum(H.softmax((t[q] - center) / 0.04) * H.log_softmax(s[v] / 0.1), -1)) for q, v in ((0, 1), (1, 0))
    ]
    np.testing.assert_allclose(float(to_numpy(loss)), np.mean(ce), rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(loss_fn.center), numpy_center(center.astype(np.float64), t, 0.5), rtol=1e-5, atol=1e-7
    )


def test_dino_loss_needs_global_crops():
    student, teacher, _ = _data()
    with pytest.raises(ValueError, match="global crops"):
        DINOLoss(out_dim=K)(ops.convert_to_tensor(student[:1]), ops.convert_to_tensor(teacher), teacher_temp=0.04)
