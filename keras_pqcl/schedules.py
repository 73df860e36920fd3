"""Per-iteration schedules of DINO/iBOT, evaluated in-graph from the step counter.

All functions take a scalar tensor ``step`` so they run inside compiled train steps on every
backend; the formulas are those of the reference ``cosine_scheduler`` and the teacher
temperature warm-up (a ``linspace`` over epochs, endpoint included, then constant).
"""

import math

import keras
from keras import ops


def cosine(step, total_steps, start, end, warmup_steps=0, warmup_start=0.0):
    """Linear warm-up ``warmup_start -> start`` then cosine ``start -> end``.

    Matches DINO's ``cosine_scheduler``: warm-up values are ``linspace(warmup_start, start,
    warmup_steps)`` (both ends included) and step ``i`` after warm-up gets
    ``end + 0.5 (start - end) (1 + cos(pi i / (total_steps - warmup_steps)))``. Steps past
    the end hold ``end``.
    """
    step = ops.cast(step, "float32")
    total = ops.cast(total_steps, "float32")
    warm = float(warmup_steps)
    decay_steps = ops.maximum(total - warm, 1.0)
    progress = ops.clip((step - warm) / decay_steps, 0.0, 1.0)
    value = end + 0.5 * (start - end) * (1.0 + ops.cos(math.pi * progress))
    if warmup_steps > 0:
        denom = max(warm - 1.0, 1.0)
        ramp = warmup_start + (start - warmup_start) * ops.minimum(step, warm - 1.0) / denom
        value = ops.where(step < warm, ramp, value)
    return value


def warmup_then_constant(epoch, start, end, warmup_epochs):
    """``linspace(start, end, warmup_epochs)[epoch]`` for early epochs, then ``end``.

    This is the teacher-temperature schedule of DINO/iBOT/PQCL, indexed by epoch.
    """
    epoch = ops.cast(epoch, "float32")
    if warmup_epochs <= 1:
        return ops.where(epoch < warmup_epochs, start, end) if warmup_epochs == 1 else ops.cast(end, "float32")
    ramp = start + (end - start) * epoch / (warmup_epochs - 1)
    return ops.where(epoch < warmup_epochs, ramp, end)


@keras.saving.register_keras_serializable(package="keras_pqcl")
class EpochRamp:
    """A per-epoch schedule: ``linspace(start, end, warmup_epochs)[e]``, then ``end``, where
    ``e`` counts epochs from ``start_epoch`` (held at ``start`` before it).

    The teacher temperatures of DINO, iBOT and PQCL (0.04 -> 0.07 over 30 epochs); iBOT's
    patch temperature and PQCL's query temperature start their warm-up at the first epoch
    with masked image modelling (``start_epoch``).
    """

    def __init__(self, start, end, warmup_epochs, start_epoch=0):
        self.start, self.end = float(start), float(end)
        self.warmup_epochs, self.start_epoch = int(warmup_epochs), int(start_epoch)

    def __call__(self, epoch):
        """The value at ``epoch`` (a float32 scalar tensor, floored)."""
        if self.start_epoch:
            epoch = ops.maximum(epoch - float(self.start_epoch), 0.0)
        return warmup_then_constant(epoch, self.start, self.end, self.warmup_epochs)

    def get_config(self):
        return dict(start=self.start, end=self.end, warmup_epochs=self.warmup_epochs, start_epoch=self.start_epoch)

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_pqcl")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Learning-rate (or weight-decay) schedule: linear warm-up, then cosine decay.

    Args:
        start: value reached at the end of warm-up (the base learning rate).
        end: final value (``min_lr``).
        total_steps: epochs x steps per epoch.
        warmup_steps: warm-up length in steps (DINO: 10 epochs).
        warmup_start: value at step 0 (DINO: 0).
    """

    def __init__(self, start, end, total_steps, warmup_steps=0, warmup_start=0.0):
        self.start = float(start)
        self.end = float(end)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start = float(warmup_start)

    def __call__(self, step):
        return cosine(step, self.total_steps, self.start, self.end, self.warmup_steps, self.warmup_start)

    def get_config(self):
        return dict(
            start=self.start,
            end=self.end,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            warmup_start=self.warmup_start,
        )
