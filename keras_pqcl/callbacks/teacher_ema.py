"""The teacher-EMA callback."""

import keras


class TeacherEMA(keras.callbacks.Callback):
    """Replaces the model's teacher momentum range for this ``fit``: cosine from ``momentum``
    to ``final_momentum``.

    The model owns the schedule (its ``teacher_momentum`` / ``teacher_momentum_end``
    arguments); this callback is for changing it without rebuilding the model. It sets the
    range when training starts; the EMA itself,
    ``teacher <- m teacher + (1 - m) student``, runs inside the compiled train step after
    the optimizer update (a per-batch Python loop over variables would cost several times
    the step on TensorFlow). DINO uses 0.996 -> 1 over all iterations; the reference help
    text suggests 0.9995 for small batches.
    """

    def __init__(self, momentum=0.996, final_momentum=1.0):
        super().__init__()
        if not 0.0 <= momentum <= 1.0 or not 0.0 <= final_momentum <= 1.0:
            raise ValueError(f"Teacher momentum must lie in [0, 1]; got {momentum} -> {final_momentum}.")
        self.momentum = float(momentum)
        self.final_momentum = float(final_momentum)

    def on_train_begin(self, logs=None):
        if not hasattr(self.model, "set_teacher_momentum"):
            raise TypeError(f"TeacherEMA needs a keras_pqcl self-supervised model, got {type(self.model).__name__}.")
        self.model.set_teacher_momentum(self.momentum, self.final_momentum)

    def on_epoch_begin(self, epoch, logs=None):
        # Again at every epoch: BackupAndRestore restores the saved range after
        # on_train_begin, and the range passed to this fit must win.
        self.model.set_teacher_momentum(self.momentum, self.final_momentum)
