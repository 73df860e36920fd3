"""PQCL positional-query loss (Zhang et al., ICML 2023): queries predict the teacher's local patches."""

import keras
from keras import ops

from keras_pqcl.losses.centering import CenteredTeacherLoss


def query_agreement(student_scores, teacher_scores):
    """Argmax agreement of query-averaged scores, the reference's "acc" monitor.

    For each global view ``g`` and image ``b``: average the student's scores over the ``T``
    queries and the teacher's over the ``T`` local patches, take the argmax over ``K`` of
    each, and count a hit when they agree. Returns the hit rate over ``(G, B)``.

    The scores may be probabilities or logits; the reference passes the raw head logits
    of the first global view, i.e. ``query_agreement(student_logits[:1], teacher_logits)``
    (with one local crop; with ``n`` crops it also keeps only the first ``B / n`` images).

    Args:
        student_scores: ``(G, B, T, K)``.
        teacher_scores: ``(B, T, K)``.

    Returns:
        float32 scalar in [0, 1]. Not differentiable (a monitor, not a loss).
    """
    student_pred = ops.argmax(ops.mean(ops.cast(student_scores, "float32"), axis=2), axis=-1)  # (G, B)
    teacher_pred = ops.argmax(ops.mean(ops.cast(teacher_scores, "float32"), axis=1), axis=-1)  # (B,)
    hits = ops.cast(ops.equal(student_pred, teacher_pred[None]), "float32")
    return ops.mean(hits)


@keras.saving.register_keras_serializable(package="keras_pqcl")
class QueryLoss(CenteredTeacherLoss):
    """Cross-entropy of the student's positional queries against the teacher's local patches.

    Query ``t`` of global view ``g`` stands at the position of local patch ``t`` (row-major
    within each local crop, the crops one after another, ``T = n_local * L * L``), so the
    targets correspond one to one::

        P      = stop_gradient(softmax((T_loc - center) / tau_q))           (B, T, K)
        l_g    = mean_{b, t} -sum_k P[b, t, k] log softmax(S_g[b, t] / tau_s)_k
        L      = mean_g l_g

    Every query counts (no masking). The center ``(1, 1, K)`` is PQCL's third center,
    separate from iBOT's CLS and patch centers; after the loss it moves towards the mean
    over ``(B, T)`` of the raw teacher local-patch logits.

    Args:
        out_dim: logits size ``K`` (8192, the head's ``last_layer``).
        student_temp: ``tau_s`` (0.1).
        center_momentum: EMA momentum of the center (0.9).

    Call args:
        student_queries: ``(G, B, T, K)`` student logits of the query tokens of each
            global view.
        teacher_local_patches: ``(B, T, K)`` teacher logits of the local crops' patch
            tokens (CLS dropped), the crops concatenated along the token axis.
        teacher_temp: keyword-only ``tau_q`` (its own schedule, 0.04 -> 0.07).
        update_center: update the center after computing the loss (default True).

    Returns:
        scalar float32 loss.
    """

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9, **kwargs):
        super().__init__(
            out_dim, student_temp=student_temp, center_momentum=center_momentum, center_shape=(1, 1, out_dim), **kwargs
        )

    @staticmethod
    def _check(student_queries, teacher_local_patches):
        s, t = tuple(student_queries.shape), tuple(teacher_local_patches.shape)
        if len(s) != 4 or len(t) != 3 or s[2] != t[1]:
            raise ValueError(
                "Expected student_queries (G, B, T, K) and teacher_local_patches (B, T, K) with "
                f"the same T; got {s} and {t}."
            )

    def call(self, student_queries, teacher_local_patches, *, teacher_temp, update_center=True):
        self._check(student_queries, teacher_local_patches)
        p = self.teacher_probs(teacher_local_patches, teacher_temp)
        log_q = self.student_log_probs(student_queries)
        ce = -ops.einsum("btk,gbtk->gbt", p, log_q)
        loss = ops.mean(ce)  # equal sizes: mean over (b, t), then over g
        if update_center:
            self.update_center(teacher_local_patches, axes=(0, 1))
        return loss

    def agreement(self, student_queries, teacher_local_patches, *, teacher_temp):
        """Monitor: :func:`query_agreement` of the distributions the loss compares.

        Per global view and image, the argmax of the mean over the ``T`` queries of
        ``softmax(S_g / tau_s)`` against the argmax of the mean over the ``T`` local
        patches of ``softmax((T_loc - center) / tau_q)``; the hit rate over views and
        images. It reads the *current* center: call it before the loss (or with the loss's
        ``update_center=False``) to use the center the loss used.
        """
        self._check(student_queries, teacher_local_patches)
        p = self.teacher_probs(teacher_local_patches, teacher_temp)
        q = ops.exp(self.student_log_probs(ops.stop_gradient(student_queries)))
        return query_agreement(q, p)
