"""iBOT: image BERT pre-training with an online tokenizer (Zhou et al., ICLR 2022)."""

import keras

from keras_pqcl.models.self_distillation import NamedMethod, base_terms


@keras.saving.register_keras_serializable(package="keras_pqcl")
class IBOT(NamedMethod):
    """DINO's CLS term plus masked image modelling: ``[CLSDistillation,
    MaskedPatchDistillation]``, ``loss = lambda1 * L_cls + lambda2 * L_mim``.

    The student sees its global views with some patches replaced by the mask token and must
    predict, at those patches, the teacher's distribution from the unmasked view; its local
    crops, unmasked, join the CLS term. Before ``pred_start_epoch`` the masks are off and the
    patch temperature's warm-up has not begun.

    Args:
        backbone: the student backbone, built with ``use_mask_token=True``.
        out_dim: CLS prototypes ``K`` (8192).
        patch_out_dim: patch prototypes ``K_p``; None means ``out_dim``. Must equal
            ``out_dim`` when ``shared_head``.
        shared_head: one last layer for CLS and patch tokens (True, the published recipes).
        hidden_dim, bottleneck_dim, head_layers, norm_last_layer, student_temp: as :class:`DINO`.
        warmup_teacher_temp, teacher_temp: CLS teacher temperature 0.04 -> 0.07.
        warmup_teacher_patch_temp, teacher_patch_temp: patch teacher temperature 0.04 -> 0.07.
        warmup_teacher_temp_epochs: length of both warm-ups (30 epochs).
        lambda1, lambda2: weights of ``L_cls`` and ``L_mim`` (1, 1).
        pred_start_epoch: first epoch with masked image modelling (0).
        center_momentum: 0.9 for both centers.
        **kwargs: as :class:`DINO`.

    Data: ``"global_crops"`` ``(B, G, S, S, 3)``, ``"global_masks"`` bool
        ``(B, G, S/p, S/p)`` (``pretrain_dataset(..., masks=MaskConfig(p))``) and optionally
        ``"local_crops"``.

    Logs: ``loss``, ``cls``, ``mim`` (epoch means), ``teacher_temp``,
        ``teacher_patch_temp``, ``teacher_entropy``, ``masked_fraction`` and the schedules.
    """

    def __init__(
        self,
        backbone,
        out_dim=8192,
        patch_out_dim=None,
        shared_head=True,
        hidden_dim=2048,
        bottleneck_dim=256,
        head_layers=3,
        norm_last_layer=True,
        student_temp=0.1,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_patch_temp=0.04,
        teacher_patch_temp=0.07,
        warmup_teacher_temp_epochs=30,
        lambda1=1.0,
        lambda2=1.0,
        pred_start_epoch=0,
        center_momentum=0.9,
        **kwargs,
    ):
        self._setup(locals(), kwargs)

    @staticmethod
    def make_terms(args):
        return base_terms(args, "ibot")
