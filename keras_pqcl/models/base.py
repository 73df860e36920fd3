"""Student/teacher machinery shared by every self-supervised method.

A method subclasses :class:`SelfSupervisedModel` and writes, with ``keras.ops`` only:

* ``__init__``: the student modules (trained) and their teacher copies, registered with
  :meth:`add_teacher` so the EMA pairs them;
* ``ssl_forward(data, step, training)``: teacher and student forward passes and the loss,
  returning ``(loss, logs)``; losses update their own centers;
* its declarations, read by the runner and the callbacks instead of the method's name:
  :meth:`~SelfSupervisedModel.needs` (backbone and batches, from the constructor
  arguments), ``transfer`` (the network to evaluate), ``loss_terms`` (the per-term logs)
  and :attr:`~SelfSupervisedModel.collapse_terms` (the terms that are cross-entropies over
  ``K`` prototypes).

The per-backend gradient step comes from :mod:`keras_pqcl.backend`; the EMA of the teacher
runs inside that compiled step, after the optimizer update. Schedules are evaluated in-graph
from the optimizer's step counter, with the clock (steps per epoch, total steps) and the
momentum range stored in non-trainable variables so that they are saved and resumed.
"""

import contextlib
import sys

import keras
from keras import ops

from keras_pqcl import schedules
from keras_pqcl.backend import TrainStep, distributable, ema_update
from keras_pqcl.models.needs import Needs


def _is_seed_state(variable):
    return "seed_generator" in variable.path or variable.name.endswith("seed_generator_state")


class SelfSupervisedModel(TrainStep, keras.Model):
    """Base class: EMA teacher, schedule clock, metrics and ``fit`` plumbing.

    Args:
        teacher_momentum: EMA momentum at step 0 (0.996), rising on a cosine over the run to
        teacher_momentum_end: the momentum at the last step (1.0).
        freeze_last_layer: epochs during which :meth:`frozen_variables` get no update (1).

    These and every other per-step value (learning rate, weight decay, the terms' teacher
    temperatures) live in one :class:`~keras_pqcl.schedules.Schedules`, ``model.schedules``.
    """

    #: names of per-term losses the method reports (averaged over the epoch).
    loss_terms = ()

    #: the network to evaluate and fine-tune after pre-training: ``"teacher"`` (the EMA
    #: network) or ``"student"`` (the one the optimizer trains).
    transfer = "teacher"

    @classmethod
    def needs(cls, **method_args):
        """The backbone and batches this method needs with constructor arguments
        ``method_args`` (others at their defaults), without building anything.

        Returns:
            a :class:`~keras_pqcl.models.needs.Needs`; unrelated arguments are ignored.
        """
        return Needs()

    @property
    def collapse_terms(self):
        """``{log name: K}`` of the logged terms that are cross-entropies over ``K``
        prototypes, which sit at ``ln K`` under uniform collapse
        (:class:`~keras_pqcl.callbacks.CollapseGuard`); empty when the method has none."""
        return {}

    def __init__(self, teacher_momentum=0.996, teacher_momentum_end=1.0, freeze_last_layer=1, **kwargs):
        super().__init__(**kwargs)
        self.schedules = schedules.Schedules(teacher_momentum, teacher_momentum_end, freeze_last_layer)
        self._teacher_pairs = []

        # The run's clock, filled in by fit(), and the momentum range: variables, so compiled
        # steps read the current values and checkpoints restore them.
        def scalar(name, value):
            initial = keras.initializers.Constant(value)
            return self.add_weight(name=name, shape=(), initializer=initial, trainable=False, dtype="float32")

        self.schedules.bind(
            scalar("steps_per_epoch", 1.0),
            scalar("total_steps", 1.0),
            scalar("momentum_start", teacher_momentum),
            scalar("momentum_end", teacher_momentum_end),
        )
        self.trackers = {}
        self.add_trackers(("loss",) + (type(self).loss_terms if isinstance(type(self).loss_terms, tuple) else ()))

    def add_trackers(self, names):
        """Epoch means for the logs ``names`` (the per-term losses and monitors)."""
        self.trackers.update({name: keras.metrics.Mean(name=name) for name in names if name not in self.trackers})

    # --------------------------------------------------------------- teacher
    def add_teacher(self, teacher, student, batch_statistics=False):
        """Register ``teacher`` as the EMA of ``student`` and copy the student into it.

        Both must be built with the same architecture; stochastic-depth seed states are
        skipped. No teacher variable ever reaches the optimizer.

        Args:
            batch_statistics: for networks with BatchNorm (the momentum encoders of DenseCL
                and MCL). The reference runs them in train mode without gradients, so their
                BatchNorm normalises with the statistics of the batch they see. Keras'
                BatchNormalization does that only while its *layer* is trainable, so the
                teacher's layers stay trainable and only its *variables* are frozen (the
                optimizer and the JAX step see them as non-trainable state). Only parameters
                (the student's trainable variables) are then averaged; the BatchNorm moving
                statistics are left to each network's own batches, as the reference's buffers.
                False (the ViT methods): the whole teacher is frozen and every variable is
                averaged.
        """
        t_vars = [v for v in teacher.weights if not _is_seed_state(v)]
        s_vars = [v for v in student.weights if not _is_seed_state(v)]
        if len(t_vars) != len(s_vars) or any(t.shape != s.shape for t, s in zip(t_vars, s_vars)):
            raise ValueError(
                f"Teacher {teacher.name} and student {student.name} do not have the same "
                "variables; build the teacher from the student's config."
            )
        if batch_statistics:
            for variable in t_vars:
                variable.trainable = False
        else:
            teacher.trainable = False
        for t, s in zip(t_vars, s_vars):
            # A copy, not the same buffer: JAX refuses to donate one buffer twice.
            t.assign(ops.copy(ops.convert_to_tensor(s)))
            if s.trainable or not batch_statistics:
                self._teacher_pairs.append((t, s))

    def update_teacher(self, step):
        """``teacher <- m teacher + (1 - m) student`` for every registered pair."""
        ema_update(self._teacher_pairs, self.schedules.teacher_momentum_at(step))

    def frozen_variables(self):
        """Student variables frozen during the first ``freeze_last_layer`` epochs."""
        return []

    def configure_schedules(self, epochs, steps_per_epoch):
        """Set the run length in :attr:`schedules`, which then drives the optimizer's schedules
        and the freeze too; ``fit`` calls this for you (a resumed run given more epochs
        follows the new length)."""
        frozen = self.frozen_variables() if self.schedules.freeze_last_layer else []
        if frozen and hasattr(self.optimizer, "freeze"):
            strategy = getattr(self, "distribute_strategy", None)
            with strategy.scope() if strategy is not None else contextlib.nullcontext():
                self.optimizer.build(self.trainable_variables)
        self.schedules.attach(self.optimizer, frozen)
        self.schedules.configure(epochs, steps_per_epoch)

    # -------------------------------------------------------------- metrics
    @property
    def metrics(self):
        return list(self.trackers.values())

    def collect_logs(self, loss, logs):
        """Update epoch averages of the loss terms; pass schedule values through."""
        self.trackers["loss"].update_state(loss)
        out = {"loss": self.trackers["loss"].result()}
        for name, value in logs.items():
            if name in self.trackers:
                self.trackers[name].update_state(value)
                out[name] = self.trackers[name].result()
            else:
                out[name] = value
        return out

    # ------------------------------------------------------------------ fit
    def build(self, input_shape=None):
        self.built = True

    def ssl_forward(self, data, step, training=True):
        raise NotImplementedError

    def require(self, data, key, hint):
        """``data[key]``, or a ValueError naming the key, this model and ``hint``."""
        return require(data, key, type(self).__name__, hint)

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        steps_per_epoch=None,
        run_epochs=None,
        epoch_steps=None,
        **kwargs,
    ):
        """``keras.Model.fit`` that first sets the schedules' clock.

        The number of steps per epoch is read from the dataset's cardinality unless
        ``steps_per_epoch`` is given.

        Args:
            run_epochs, epoch_steps: the whole run's length in epochs and an epoch's length in
                steps, when this ``fit`` covers only part of the run (a resumed run that
                finishes an interrupted epoch first); default ``epochs`` and the steps of
                this ``fit``'s epochs. The schedules run over ``run_epochs x epoch_steps``.
        """
        # First, and with getattr: Keras 3 creates ``self.optimizer`` only in compile(), so
        # any earlier use (the schedules below read it) would raise AttributeError instead.
        if getattr(self, "optimizer", None) is None:
            raise ValueError(
                "Compile the model first, e.g. model.compile(optimizer="
                "kp.optimizers.dino_adamw(batch_size, epochs, steps_per_epoch))."
            )
        steps = steps_per_epoch or _cardinality(x, batch_size)
        if not steps:
            raise ValueError(
                "Cannot tell how many steps an epoch has (the dataset's length is unknown "
                "or infinite); pass steps_per_epoch= to fit so that the learning-rate, "
                "temperature and momentum schedules know their length."
            )
        self.configure_schedules(run_epochs or epochs, epoch_steps or steps)
        if _is_dataset(x):
            kwargs.setdefault("shuffle", False)  # tf.data shuffles itself; avoids Keras' warning
            x = distributable(x, self)
        return super().fit(
            x,
            y,
            batch_size=batch_size,
            epochs=epochs,
            verbose=verbose,
            callbacks=callbacks,
            steps_per_epoch=steps_per_epoch,
            **kwargs,
        )

    #: constructor arguments that ``get_config`` reads back from the attributes of that name.
    config_fields = ()

    def get_config(self):
        """The constructor's arguments; every method takes its student ``backbone`` first."""
        config = super().get_config()
        # Tuples as lists: the config stays plain JSON.
        fields = {name: getattr(self, name) for name in self.config_fields}
        config.update(
            backbone=keras.saving.serialize_keras_object(self.student_backbone),
            **self.schedules.get_config(),
            **{name: list(v) if isinstance(v, tuple) else v for name, v in fields.items()},
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


def _is_dataset(data):
    # A tf.data.Dataset exists only if TensorFlow is already imported; looking it up instead
    # of importing it keeps fit() on arrays under JAX/torch free of TensorFlow.
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(data, tf.data.Dataset)


def _cardinality(data, batch_size=None):
    """Steps of one epoch over ``data``: a dataset's length, or the batches of ``batch_size``
    (Keras' default 32) in arrays or a dict of arrays (whose ``len`` counts its keys)."""
    if _is_dataset(data):
        n = int(data.cardinality())
        return n if n > 0 else None
    if isinstance(data, dict):
        data = next(iter(data.values()), None)
    try:
        return -(-len(data) // (batch_size or 32))
    except TypeError:
        return None


def clone_layer(layer, input_shape=None, **overrides):
    """A new, built layer (or backbone) of ``layer``'s architecture with fresh variables and
    ``overrides`` in its config (its ``name``, a teacher's ``drop_path_rate=0``)."""
    config = layer.get_config()
    config.update(overrides)
    clone = layer.__class__.from_config(config)
    clone.build() if input_shape is None else clone.build(input_shape)
    return clone


def crop_major(x):
    """``(batch, crops, ...)`` -> ``(crops * batch, ...)``: all images of crop 0 first.

    This is the order of DINO's multi-crop wrapper, so ``reshape(out, (crops, batch, ...))``
    recovers per-crop outputs.
    """
    x = ops.swapaxes(x, 0, 1)
    return ops.reshape(x, (-1,) + tuple(x.shape[2:]))


def crops_along_tokens(x, n_crops):
    """``(n_crops * B, T, ...)``, crop-major, -> ``(B, n_crops * T, ...)``: each image's crops
    concatenated along the tokens."""
    x = ops.swapaxes(ops.reshape(x, (n_crops, -1) + tuple(x.shape[1:])), 0, 1)
    return ops.reshape(x, (-1, n_crops * x.shape[2]) + tuple(x.shape[3:]))


def require(data, key, method, hint):
    """``data[key]``, or a ValueError naming the key and how to make the pipeline emit it."""
    if not isinstance(data, dict) or data.get(key) is None:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{method} needs '{key}' in every batch; got {keys}. {hint}")
    return data[key]
