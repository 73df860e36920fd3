"""Teacher centering and sharpening shared by the DINO, iBOT and PQCL losses."""

import keras
from keras import ops

from keras_pqcl.backend import cross_replica_mean


class CenteredTeacherLoss(keras.layers.Layer):
    """Base for cross-entropy losses against a centered, sharpened EMA teacher.

    Owns one ``center`` of shape ``center_shape`` (float32, non-trainable). The center is
    updated *after* the loss with the raw teacher logits' global batch mean,
    ``c <- m c + (1 - m) mean(t)``, so step ``t`` is centered with the center of step
    ``t - 1``, as in the reference code.
    """

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9, center_shape=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center = self.add_weight(
            name="center",
            shape=center_shape or (1, out_dim),
            initializer="zeros",
            trainable=False,
            dtype="float32",
        )
        self.built = True

    def teacher_probs(self, teacher_logits, teacher_temp):
        """``softmax((t - center) / teacher_temp)`` in float32, without gradient."""
        t = ops.stop_gradient(ops.cast(teacher_logits, "float32"))
        return ops.softmax((t - self.center) / teacher_temp, axis=-1)

    def student_log_probs(self, student_logits):
        """``log_softmax(s / student_temp)`` in float32."""
        return ops.log_softmax(ops.cast(student_logits, "float32") / self.student_temp, axis=-1)

    def update_center(self, teacher_logits, axes):
        """EMA of the global (cross-replica) mean of raw teacher logits over ``axes``."""
        t = ops.stop_gradient(ops.cast(teacher_logits, "float32"))
        batch_center = cross_replica_mean(ops.mean(t, axis=axes))
        batch_center = ops.reshape(batch_center, self.center.shape)
        m = self.center_momentum
        self.center.assign(self.center * m + batch_center * (1.0 - m))

    def get_config(self):
        config = super().get_config()
        config.update(
            out_dim=self.out_dim,
            student_temp=self.student_temp,
            center_momentum=self.center_momentum,
        )
        return config
