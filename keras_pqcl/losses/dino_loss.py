"""DINO self-distillation loss (Caron et al., ICCV 2021)."""

import keras
from keras import ops

from keras_pqcl.losses.centering import CenteredTeacherLoss


@keras.saving.register_keras_serializable(package="keras_pqcl")
class DINOLoss(CenteredTeacherLoss):
    """Cross-entropy of every student crop against every teacher global crop but its own.

    ``L = 1 / n_pairs * sum_{q < G} sum_{v != q} mean_b(-sum_k P_q[b, k] log Q_v[b, k])``
    with ``P_q = softmax((t_q - c) / tau_t)`` and ``Q_v = softmax(s_v / tau_s)``; the pairs
    with ``v == q`` are skipped (for 2 globals and 10 crops: 18 pairs).

    Args:
        out_dim: logits size ``K``.
        student_temp: ``tau_s`` (0.1).
        center_momentum: EMA momentum of the center (0.9).

    Call args:
        student_logits: ``(V, B, K)``, crop-major: the ``G`` global crops first.
        teacher_logits: ``(G, B, K)`` for the global crops.
        teacher_temp: keyword-only scalar ``tau_t`` (follows its schedule; see ``schedules``).
        update_center: update the center after computing the loss (default True).

    Returns:
        scalar float32 loss, the mean over pairs of per-pair batch means.
    """

    def call(self, student_logits, teacher_logits, *, teacher_temp, update_center=True):
        n_global = teacher_logits.shape[0]
        n_crops = student_logits.shape[0]
        if n_crops < n_global:
            raise ValueError(f"The student must see at least the {n_global} global crops; got {n_crops} crops.")
        log_q = self.student_log_probs(student_logits)
        p = self.teacher_probs(teacher_logits, teacher_temp)
        batch = ops.cast(ops.shape(p)[1], "float32")
        # cross[q, v] = mean_b CE(teacher crop q, student crop v): one contraction for all pairs.
        cross = -ops.einsum("qbk,vbk->qv", p, log_q) / batch
        keep = 1.0 - ops.eye(n_global, n_crops, dtype="float32")
        loss = ops.sum(cross * keep) / ops.sum(keep)
        if update_center:
            self.update_center(teacher_logits, axes=(0, 1))
        return loss
