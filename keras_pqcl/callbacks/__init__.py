"""Callbacks for pre-training."""

from keras_pqcl.callbacks.teacher_ema import TeacherEMA
