"""PQCL: patch-level contrastive learning via positional queries (Zhang et al., ICML 2023)."""

import keras

from keras_pqcl.models.self_distillation import NamedMethod, base_terms, ramp
from keras_pqcl.models.terms import PositionalQueries


@keras.saving.register_keras_serializable(package="keras_pqcl")
class PQCL(NamedMethod):
    """Positional queries on top of iBOT (``base="ibot"``) or DINO: ``[CLS, (masked
    patches,) PositionalQueries]``, ``loss = lambda1 L_cls (+ lambda2 L_mim) + lambda3 L_query``.

    The student never sees the local crops: for each global view it gets one query token per
    local-crop patch, ``mask_token + sincos(position of that patch in the view)``, which reads
    the view's tokens and must predict the teacher's output for that patch, computed from the
    local crop's pixels. ``L_cls`` is between the two global views only unless
    ``local_cls_terms``. One shared head maps CLS, patch and query tokens to ``K`` logits.

    Args:
        backbone: the student backbone with ``use_mask_token=True`` and
            ``pos_embed="sincos"``, made for the global crop size (any table with
            ``query_position_code="table"``).
        base: ``"ibot"`` (the released code) or ``"dino"`` (reconstructed: unmasked global
            views, no MIM term; the mask token then only builds the queries).
        out_dim: prototypes ``K`` of the shared head (8192, the PQCL code's value).
        hidden_dim, bottleneck_dim, head_layers, norm_last_layer, student_temp: as :class:`DINO`.
        warmup_teacher_temp, teacher_temp: CLS teacher temperature 0.04 -> 0.07.
        warmup_teacher_patch_temp, teacher_patch_temp: MIM teacher temperature (ibot).
        warmup_teacher_query_temp, teacher_query_temp: query teacher temperature 0.04 -> 0.07;
            the PQCL code delays its warm-up by ``pred_start_epoch``, as the patch one's.
        warmup_teacher_temp_epochs: length of the warm-ups (30 epochs).
        lambda1, lambda2, lambda3: weights of ``L_cls``, ``L_mim``, ``L_query`` (1, 1, 1).
        pred_start_epoch: first epoch with MIM masks (ibot); queries are on from the start.
        local_cls_terms: the student also encodes the local crops and their CLS joins
            ``L_cls`` (False, as the PQCL code).
        center_momentum: 0.9 for every center.
        query_position_code: ``"sincos"`` (PQCL: the backbone must have ``pos_embed="sincos"``)
            or ``"table"``: each query carries the backbone's own position table read
            bilinearly at its place, so a learned table works too (continuing DINOv2 weights,
            whose table is learned). See :class:`~keras_pqcl.models.terms.PositionalQueries`.
        **kwargs: as :class:`DINO`.

    Data: ``"global_crops"``, ``"local_crops"`` ``(B, n, s, s, 3)``, ``"query_coords"``
        ``(B, G, n, L*L, 2)`` (``QueryConfig(p)``) and, for ibot, ``"global_masks"``.

    Logs: ``loss``, ``cls``, ``mim`` (ibot), ``query``, ``query_agreement`` (epoch means),
        each teacher temperature, ``teacher_entropy``, ``masked_fraction`` (ibot) and the
        schedules.

    Official code: github.com/Sherrylone/PQCL.
    """

    def __init__(
        self,
        backbone,
        base="ibot",
        out_dim=8192,
        hidden_dim=2048,
        bottleneck_dim=256,
        head_layers=3,
        norm_last_layer=True,
        student_temp=0.1,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_patch_temp=0.04,
        teacher_patch_temp=0.07,
        warmup_teacher_query_temp=0.04,
        teacher_query_temp=0.07,
        warmup_teacher_temp_epochs=30,
        lambda1=1.0,
        lambda2=1.0,
        lambda3=1.0,
        pred_start_epoch=0,
        local_cls_terms=False,
        center_momentum=0.9,
        query_position_code="sincos",
        **kwargs,
    ):
        self._setup(locals(), kwargs)

    @staticmethod
    def make_terms(args):
        return base_terms(args, args.base, args.local_cls_terms) + [
            PositionalQueries(
                args.out_dim,
                args.student_temp,
                ramp(args, "teacher_query_temp", args.pred_start_epoch),
                args.center_momentum,
                weight=args.lambda3,
                position_code=args.query_position_code,
            )
        ]
