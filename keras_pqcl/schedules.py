"""Per-iteration schedules of DINO/iBOT, evaluated in-graph from the step counter.

All functions take a scalar tensor ``step`` so they run inside compiled train steps on every
backend; the formulas are those of the reference ``cosine_scheduler`` and the teacher
temperature warm-up (a ``linspace`` over epochs, endpoint included, then constant).
"""

import math
import warnings

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
        self._total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start = float(warmup_start)
        self._run_steps = None

    def bind(self, run_steps):
        """Read the run length from ``run_steps`` (a model's clock variable, see
        :class:`Schedules`) instead of the ``total_steps`` given here."""
        self._run_steps = run_steps

    @property
    def total_steps(self):
        if self._run_steps is None:
            return self._total_steps
        return int(ops.convert_to_numpy(self._run_steps))

    def __call__(self, step):
        total = self._total_steps if self._run_steps is None else self._run_steps
        return cosine(step, total, self.start, self.end, self.warmup_steps, self.warmup_start)

    def get_config(self):
        return dict(
            start=self.start,
            end=self.end,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            warmup_start=self.warmup_start,
        )


@keras.saving.register_keras_serializable(package="keras_pqcl")
class Schedules:
    """Every per-step value of a self-supervised model's run, each listed once, evaluated
    in-graph from the optimizer's step counter.

    The run length is stored once, in the model's clock: ``steps_per_epoch`` and
    ``total_steps``, non-trainable variables saved with every checkpoint (:meth:`bind`).
    Every schedule over steps reads its length from there, the optimizer's learning rate and
    weight decay included, so they cannot disagree; :meth:`configure` sets it.

    Entries (:meth:`values` returns them by log name):

    * ``learning_rate``, ``weight_decay``: the optimizer's schedules (DINO: linear warm-up,
      then cosine), taken from it by :meth:`attach`;
    * ``teacher_momentum``: cosine from ``teacher_momentum`` to ``teacher_momentum_end``
      over the run (DINO: 0.996 -> 1); equal ends give a constant (DenseCL's 0.999);
    * ``temperatures``: ``{log name: EpochRamp}``, each loss term's teacher temperature, as
      the term declares it (serialised with the term);
    * ``freeze_last_layer``: epochs during which the variables given to :meth:`attach` (the
      head's last layer) get no update at all (DINO: 1).

    Args:
        teacher_momentum, teacher_momentum_end, freeze_last_layer: as above.
    """

    def __init__(self, teacher_momentum=0.996, teacher_momentum_end=1.0, freeze_last_layer=1):
        if not (0.0 <= teacher_momentum <= 1.0 and 0.0 <= teacher_momentum_end <= 1.0):
            raise ValueError(f"teacher momentum must lie in [0, 1]; got {teacher_momentum} -> {teacher_momentum_end}.")
        self.teacher_momentum = float(teacher_momentum)
        self.teacher_momentum_end = float(teacher_momentum_end)
        self.freeze_last_layer = int(freeze_last_layer)
        self.temperatures = {}
        self.learning_rate = self.weight_decay = None
        self.optimizer, self.frozen = None, []
        self.steps_per_epoch = self.total_steps = self.momentum = None

    def bind(self, steps_per_epoch, total_steps, momentum_start, momentum_end):
        """The model's clock and momentum variables: scalar float32 ``keras.Variable`` s."""
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.momentum = (momentum_start, momentum_end)

    def attach(self, optimizer, frozen=()):
        """Take ``optimizer``'s learning-rate and weight-decay schedules into this object
        (they then read the run length from the clock) and freeze ``frozen`` with it."""
        self.optimizer, self.frozen = optimizer, [v for v in frozen if v.trainable]
        self.learning_rate = getattr(optimizer, "_learning_rate", None)
        self.weight_decay = getattr(optimizer, "decay", getattr(optimizer, "weight_decay", None))
        for schedule in (self.learning_rate, self.weight_decay):
            if isinstance(schedule, WarmupCosine):
                schedule.bind(self.total_steps)

    def configure(self, epochs, steps_per_epoch):
        """Set the run length (``epochs x steps_per_epoch`` steps) and the freeze."""
        self.steps_per_epoch.assign(float(steps_per_epoch))
        self.total_steps.assign(float(epochs * steps_per_epoch))
        if not (self.frozen and self.freeze_last_layer):
            return
        if not hasattr(self.optimizer, "freeze"):
            warnings.warn(
                "freeze_last_layer needs keras_pqcl.optimizers.AdamW; with "
                f"{type(self.optimizer).__name__} the last layer is trained from step 0.",
                stacklevel=4,
            )
            return
        self.optimizer.freeze(self.frozen, self.freeze_last_layer * steps_per_epoch)

    def epoch_at(self, step):
        """Epoch index (float, floored) of a step: drives the per-epoch schedules."""
        return ops.floor(ops.cast(step, "float32") / ops.maximum(self.steps_per_epoch, 1.0))

    def teacher_momentum_at(self, step):
        return cosine(step, self.total_steps, *self.momentum)

    def values(self, step):
        """``{log name: float32 scalar}`` of every entry at ``step``."""
        out = {"teacher_momentum": self.teacher_momentum_at(step)}
        for name, schedule in (("learning_rate", self.learning_rate), ("weight_decay", self.weight_decay)):
            if schedule is not None:
                out[name] = ops.cast(schedule(step) if callable(schedule) else schedule, "float32")
        epoch = self.epoch_at(step)
        out.update({name: ramp(epoch) for name, ramp in self.temperatures.items()})
        return out

    def get_config(self):
        """The entries this object owns; the temperatures are serialised with their terms and
        the learning rate and weight decay with the optimizer."""
        return dict(
            teacher_momentum=self.teacher_momentum,
            teacher_momentum_end=self.teacher_momentum_end,
            freeze_last_layer=self.freeze_last_layer,
        )

    @classmethod
    def from_config(cls, config):
        return cls(**config)
