"""iBOT loss (Zhou et al., ICLR 2022): DINO on the CLS token plus masked-patch distillation."""

import keras
from keras import ops

from keras_pqcl.losses.centering import CenteredTeacherLoss
from keras_pqcl.losses.dino_loss import DINOLoss


@keras.saving.register_keras_serializable(package="keras_pqcl")
class MaskedPatchLoss(CenteredTeacherLoss):
    """iBOT's masked image modelling term: same-view distillation at the masked patches.

    With ``P = softmax((t_patch_q - center) / teacher_patch_temp)`` (the teacher saw the
    unmasked view) and ``CE[b, p] = -sum_k P[b, p, k] log softmax(s_patch_q[b, p] / tau_s)_k``::

        l_q[b] = sum_p m[b, p] CE[b, p] / max(1, sum_p m[b, p])
        L_mim  = mean_q mean_b l_q[b]

    An image without masked patches contributes 0 but still counts in the batch mean. After
    the loss the center ``(1, 1, K_p)`` moves towards the mean over ``(G, B, N)`` of *all* raw
    teacher patch logits, masked or not.

    Call args:
        student_patches: ``(G, B, N, K_p)`` from the masked global views.
        teacher_patches: ``(G, B, N, K_p)`` from the unmasked global views.
        masks: ``(G, B, N)`` or ``(G, B, h, w)`` with ``h * w = N`` (row-major), bool or 0/1.
        teacher_temp: keyword-only patch teacher temperature ``tau_p``.
        update_center: update the center after computing the loss (default True).
    """

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9, **kwargs):
        super().__init__(
            out_dim, student_temp=student_temp, center_momentum=center_momentum, center_shape=(1, 1, out_dim), **kwargs
        )

    def call(self, student_patches, teacher_patches, masks, *, teacher_temp, update_center=True):
        if (
            len(student_patches.shape) != 4
            or len(teacher_patches.shape) != 4
            or student_patches.shape[0] != teacher_patches.shape[0]
        ):
            raise ValueError(
                "student_patches and teacher_patches must both be (G, B, N, K_p); got "
                f"{tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}."
            )
        n_global, n_patches = student_patches.shape[0], student_patches.shape[2]
        log_q = self.student_log_probs(student_patches)
        p = self.teacher_probs(teacher_patches, teacher_temp)
        ce = -ops.einsum("gbnk,gbnk->gbn", p, log_q)
        m = ops.reshape(ops.cast(masks, "float32"), (n_global, -1, n_patches))
        per_image = ops.sum(ce * m, axis=-1) / ops.maximum(ops.sum(m, axis=-1), 1.0)
        loss = ops.mean(per_image)
        if update_center:
            self.update_center(teacher_patches, axes=(0, 1, 2))
        return loss


@keras.saving.register_keras_serializable(package="keras_pqcl")
class iBOTLoss(keras.layers.Layer):
    """CLS self-distillation across views and masked-patch (MIM) distillation within a view.

    Two terms, each with its own teacher center (never shared):

    * ``L_cls``: the DINO loss (:class:`DINOLoss`) over the pairs (teacher global ``q``,
      student crop ``v != q``), centered with ``center`` ``(1, K)`` at ``teacher_temp``.
    * ``L_mim``: same-view pairs only (``v == q``, global views): :class:`MaskedPatchLoss`
      with ``center2`` ``(1, 1, K_p)`` at ``teacher_patch_temp``.

    After the loss both centers move with momentum ``center_momentum``: ``center`` towards
    the mean over ``(G, B)`` of the raw teacher CLS logits, ``center2`` towards the mean
    over ``(G, B, N)`` of *all* raw teacher patch logits, masked or not.

    The terms are returned unweighted; the caller forms ``lambda1 * cls + lambda2 * mim``
    (both 1 in iBOT and PQCL).

    Args:
        out_dim: CLS logits size ``K``.
        patch_out_dim: patch logits size ``K_p``; ``None`` means ``out_dim``.
        student_temp: ``tau_s`` for both terms (0.1).
        center_momentum: EMA momentum of both centers (0.9).

    Call args:
        student_cls: ``(V, B, K)``, crop-major, the ``G`` global crops first (``V = G`` when
            the student sees no local crops, as in PQCL).
        teacher_cls: ``(G, B, K)``.
        student_patches: ``(G, B, N, K_p)`` from the masked global views.
        teacher_patches: ``(G, B, N, K_p)`` from the unmasked global views.
        masks: ``(G, B, N)`` or ``(G, B, h, w)`` with ``h * w = N`` (row-major), bool or 0/1:
            true where the student's patch was replaced by the mask token.
        teacher_temp: keyword-only CLS teacher temperature ``tau_t``.
        teacher_patch_temp: keyword-only patch teacher temperature ``tau_p``.
        update_center: update both centers after computing the loss (default True).

    Returns:
        ``{"cls": L_cls, "mim": L_mim}``, float32 scalars.
    """

    def __init__(self, out_dim, patch_out_dim=None, student_temp=0.1, center_momentum=0.9, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.out_dim = out_dim
        self.patch_out_dim = out_dim if patch_out_dim is None else patch_out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        # The centers are created here, not in build: scope them under this layer's name
        # (paths ``<name>/cls_loss/center`` and ``<name>/patch_loss/center``).
        with keras.name_scope(self.name):
            self.cls_loss = DINOLoss(
                out_dim, student_temp=student_temp, center_momentum=center_momentum, name="cls_loss"
            )
            self.patch_loss = MaskedPatchLoss(
                self.patch_out_dim, student_temp=student_temp, center_momentum=center_momentum, name="patch_loss"
            )
        self.built = True

    @property
    def center(self):
        """CLS center ``(1, K)``."""
        return self.cls_loss.center

    @property
    def center2(self):
        """Patch center ``(1, 1, K_p)``."""
        return self.patch_loss.center

    def call(
        self,
        student_cls,
        teacher_cls,
        student_patches,
        teacher_patches,
        masks,
        *,
        teacher_temp,
        teacher_patch_temp,
        update_center=True,
    ):
        if teacher_cls.shape[0] != student_patches.shape[0]:
            raise ValueError(
                f"teacher_cls has {teacher_cls.shape[0]} global views but student_patches "
                f"{student_patches.shape[0]}; both must be the G global views."
            )
        cls = self.cls_loss(student_cls, teacher_cls, teacher_temp=teacher_temp, update_center=update_center)
        mim = self.patch_loss(
            student_patches, teacher_patches, masks, teacher_temp=teacher_patch_temp, update_center=update_center
        )
        return {"cls": cls, "mim": mim}

    def get_config(self):
        config = super().get_config()
        config.update(
            out_dim=self.out_dim,
            patch_out_dim=self.patch_out_dim,
            student_temp=self.student_temp,
            center_momentum=self.center_momentum,
        )
        return config
