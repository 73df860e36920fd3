"""Checkpoint atomicity, NaN guard and TeacherEMA argument checks."""

import math
import os

import pytest

from keras_pqcl.callbacks import NaNGuard, TeacherEMA
from keras_pqcl.callbacks.checkpoint import _atomic_write


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "checkpoint.keras")
    _atomic_write(path, lambda tmp: open(tmp, "w").write("old"))

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt  # e.g. the job is killed mid-save

    with pytest.raises(KeyboardInterrupt):
        _atomic_write(path, crash)
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["checkpoint.keras"]  # no temporary left behind


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_guard_stops_with_a_clear_message(bad):
    guard = NaNGuard()
    guard.on_train_batch_end(0, {"loss": 1.0})
    with pytest.raises(FloatingPointError, match="learning rate"):
        guard.on_train_batch_end(1, {"loss": bad})


def test_teacher_ema_rejects_momentum_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        TeacherEMA(1.5)
