"""Checkpoint atomicity, NaN guard and teacher-momentum argument checks."""

import math

import pytest

from keras_pqcl.callbacks import NaNGuard
from keras_pqcl.schedules import Schedules


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_guard_stops_with_a_clear_message(bad):
    guard = NaNGuard()
    guard.on_train_batch_end(0, {"loss": 1.0})
    with pytest.raises(FloatingPointError, match="learning rate"):
        guard.on_train_batch_end(1, {"loss": bad})
    guard.on_epoch_begin(4)
    with pytest.raises(FloatingPointError, match="at batch 3 of epoch 5"):
        guard.on_train_batch_end(2, {"loss": bad})


def test_schedules_reject_momentum_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Schedules(teacher_momentum=1.5)
