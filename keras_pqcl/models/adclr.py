"""ADCLR: patch-level contrasting without patch correspondence (Zhang et al., ICLR 2023)."""

import keras

from keras_pqcl.models.self_distillation import NamedMethod, base_terms, ramp
from keras_pqcl.models.terms import QueryCrops


@keras.saving.register_keras_serializable(package="keras_pqcl")
class ADCLR(NamedMethod):
    """Query crops on top of DINO (``base="dino"``) or iBOT: ``[CLS, (masked patches,)
    QueryCrops]``. Adds no weights.

    The query crops are the pipeline's local crops (``MultiCropConfig.n_local`` /
    ``local_size``: the paper's number and size of query crops). They are patch-embedded with
    the backbone's own patch embedding and appended to every global view as query tokens;
    the queries read the view's tokens, never the reverse, so the global representation is
    the baseline's; each query is contrasted with the same query appended to the other view.
    See :class:`~keras_pqcl.models.terms.QueryCrops`.

    Args:
        backbone: the student backbone, made for the global crop size; a mask token for
            ``base="ibot"``; ``pos_embed="sincos"`` for ``query_position="global"``.
        base: ``"dino"`` (ViT-S in the paper) or ``"ibot"`` (ViT-B in the paper).
        query_position: ``"crop"`` (default: the paper's position code is unknown, and the
            crop's own interpolated table is the most plausible one) or ``"global"``.
        target: ``"cross_view"`` (default) or ``"crop"`` (the ADCLR mode of the PQCL code).
        out_dim: prototypes ``K`` of the one shared head; None means DINO's 65536 for
            ``base="dino"`` and iBOT's 8192 for ``"ibot"``.
        lambda3: weight of ``L_query``. The paper weighs global and query terms about 1:1;
            the exact value is not known (1.0).
        local_cls_terms: the student encodes the query crops on their own too, as DINO's
            local crops (True; "DINO CLS loss as usual").
        other arguments: as :class:`PQCL`.

    Reference: arXiv 2306.13337; the query pixels follow the ADCLR mode of
    github.com/Sherrylone/PQCL. The paper's body was not available: query positions, the
    cross-view target and the loss weight are a reconstruction from the abstract and that code.
    """

    def __init__(
        self,
        backbone,
        base="dino",
        query_position="crop",
        target="cross_view",
        out_dim=None,
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
        local_cls_terms=True,
        center_momentum=0.9,
        **kwargs,
    ):
        arguments = dict(locals())
        if out_dim is None:
            arguments["out_dim"] = 65536 if base == "dino" else 8192
        self._setup(arguments, kwargs)

    @staticmethod
    def make_terms(args):
        out_dim = args.out_dim or (65536 if args.base == "dino" else 8192)
        args = type(args)(**{**vars(args), "out_dim": out_dim})
        return base_terms(args, args.base, args.local_cls_terms) + [
            QueryCrops(
                out_dim,
                query_position=args.query_position,
                target=args.target,
                student_temp=args.student_temp,
                teacher_temp=ramp(args, "teacher_query_temp", args.pred_start_epoch),
                center_momentum=args.center_momentum,
                weight=args.lambda3,
            )
        ]
