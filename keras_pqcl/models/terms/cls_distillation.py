"""DINO's term: CLS self-distillation across views (Caron et al., ICCV 2021)."""

import keras
from keras import ops

from keras_pqcl.backend import cross_replica_mean
from keras_pqcl.losses.dino_loss import DINOLoss
from keras_pqcl.models.terms.base import DistillationTerm


def mean_output_entropy(teacher_logits, center, temp):
    """Entropy (nats) of the teacher distribution averaged over the global batch: a collapse
    monitor, near 0 for collapse to one prototype and near ``ln K`` for uniform collapse.
    (Averaged over the replicas before the entropy, so every process logs, and the collapse
    guard reads, the one-process value.)"""
    t = ops.stop_gradient(ops.cast(teacher_logits, "float32"))
    p = cross_replica_mean(ops.mean(ops.softmax((t - center) / temp, axis=-1), axis=0))
    return -ops.sum(p * ops.log(p + 1e-12))


@keras.saving.register_keras_serializable(package="keras_pqcl")
class CLSDistillation(DistillationTerm):
    """Every student crop's CLS distribution against every other global view's teacher CLS
    (:class:`~keras_pqcl.losses.DINOLoss`, its own center ``(1, K)``).

    Args:
        out_dim: prototypes ``K``.
        student_temp: 0.1.
        teacher_temp: an :class:`~keras_pqcl.schedules.EpochRamp` (0.04 -> 0.07 over 30
            epochs).
        center_momentum: 0.9.
        local_crops: the student also encodes the local crops, unmasked, and their CLS join
            the loss (DINO's multi-crop; PQCL's code leaves them out).
        weight: ``lambda1``.

    Logs: ``cls`` (epoch mean), ``teacher_temp`` and ``teacher_entropy``.
    """

    log_name = "cls"
    temperature_name = "teacher_temp"
    loss_class = DINOLoss
    loss_name = "dino_loss"

    def __init__(self, out_dim, student_temp=0.1, teacher_temp=None, center_momentum=0.9, local_crops=True, **kwargs):
        super().__init__(out_dim, student_temp, teacher_temp, center_momentum, **kwargs)
        self.local_crops = self.local_cls = bool(local_crops)

    def loss(self, outputs, values):
        n_global, batch, k = outputs.n_global, outputs.batch, self.out_dim
        crops = outputs.student_crops_cls
        every_crop = self.local_crops and crops is not None
        student = crops if every_crop else outputs.student["cls"]
        temp = values[self.temperature_name]
        teacher = outputs.teacher["cls"]
        value = self.distillation(
            ops.reshape(student, (outputs.n_crops if every_crop else n_global, batch, k)),
            ops.reshape(teacher, (n_global, batch, k)),
            teacher_temp=temp,
        )
        # After the loss, as the monitor has always read the updated center.
        return value, {self.log_name: value, "teacher_entropy": mean_output_entropy(teacher, self.center, temp)}

    def get_config(self):
        config = super().get_config()
        config.update(local_crops=self.local_crops)
        return config
