"""ADCLR: patch-level contrasting without patch correspondence (Zhang et al., ICLR 2023).

A plug-in on DINO (or iBOT) that adds no weights: small query crops, cut from the same image
as the global views, are patch-embedded with the backbone's own patch embedding and appended
to every global view as query tokens. The queries read the view's tokens, never the
reverse, so the global representation is the baseline's; each query is contrasted with the
same query appended to the other view, which is the whole correspondence.
"""

import keras
from keras import ops

from keras_pqcl.models.base import crop_major, require
from keras_pqcl.models.ibot import encode
from keras_pqcl.models.needs import Needs, argument
from keras_pqcl.models.pqcl import BASES, PQCL

QUERY_POSITIONS = ("crop", "global")
TARGETS = ("cross_view", "crop")

CROPS_HINT = (
    "ADCLR's query crops are the pipeline's local crops: build the dataset with "
    "pretrain_dataset(..., crops=MultiCropConfig(n_local >= 1, local_size = a multiple of the "
    "backbone's patch size))."
)
GLOBAL_POSITION_HINT = (
    "query_position='global' places each query at its patch's position in every global view: build "
    "the dataset with pretrain_dataset(..., queries=keras_pqcl.data.QueryConfig(patch_size=p)), "
    "p = the backbone's patch size, or use query_position='crop' (no coordinates needed)."
)


@keras.saving.register_keras_serializable(package="keras_pqcl")
class ADCLR(PQCL):
    """Query-crop contrasting on top of DINO (``base="dino"``) or iBOT.

    The query crops are the pipeline's local crops: their count ``n`` and size ``s`` are
    ``MultiCropConfig.n_local`` / ``local_size`` (the paper's number of query patches and
    query crop size). With ``G`` global views of ``B`` images, ``L_h x L_w = s/p x s/p``
    patches per crop and ``T = n * L_h * L_w`` queries per view, per step:

    * query tokens ``(B, T, D)``: ``patch_embed(crop)`` (the same weights as the image
      tokens, pixels visible) plus a position code: ``query_position="crop"`` adds the
      backbone's own position table interpolated to the crop's grid (patch rows, as for a
      DINO local crop); ``"global"`` adds the sin-cos code of where each crop patch lies in
      each global view (``query_coords``, as PQCL builds them). Crops are concatenated
      along the tokens, each row-major;
    * student, per global view: the image (masked for ``base="ibot"``) with the ``T``
      query tokens appended; image tokens never attend to queries, queries attend to the
      image tokens and to each other. With ``local_cls_terms`` the student also encodes
      the query crops unmasked on their own, and their CLS joins the CLS loss (DINO's
      multi-crop);
    * teacher: ``target="cross_view"``: each unmasked global view with the query tokens
      appended (built from the teacher's own patch embedding and positions); the query
      outputs of view ``a`` ``(B, T, K)`` are the targets of the student's queries in
      view ``b != a``, query ``i`` to query ``i``. ``target="crop"`` (the unified PQCL
      code's ADCLR mode): each query crop encoded on its own, its patch tokens are the
      targets of the queries in every view, exactly as PQCL;
    * ``loss = lambda1 * L_cls + lambda2 * L_mim + lambda3 * L_query``. ``L_query`` is the
      DINO-style cross-entropy of :class:`~keras_pqcl.losses.QueryLoss` (its own center and
      teacher-temperature schedule), averaged over the ``G (G - 1)`` view pairs for
      ``"cross_view"``; the center moves once per step towards the mean of all teacher
      query outputs ``(G, B, T)`` (``"cross_view"``) or local-patch outputs (``"crop"``).

    Args:
        backbone: the student backbone, made for the global crop size, with
            ``use_mask_token=True`` (the iBOT/PQCL machinery needs one; ``base="dino"``
            never reads it, so there it is made non-trainable and stays at zero). Learned
            or sin-cos position embeddings for ``query_position="crop"``;
            ``pos_embed="sincos"`` for ``"global"``.
        base: ``"dino"`` (ADCLR on DINO, ViT-S in the paper; unmasked global views, no MIM)
            or ``"ibot"`` (ViT-B in the paper; masked global views, MIM term).
        query_position: ``"crop"`` (default: the paper's position code is unknown, and
            the crop's own interpolated table is the most plausible one) or ``"global"``.
        target: ``"cross_view"`` (default: the teacher's query outputs given the other
            global view) or ``"crop"`` (the teacher's encoding of the query crop on its own,
            as in the ADCLR mode of the PQCL code).
        out_dim: prototypes ``K`` of the one shared head (CLS, patch and query tokens);
            None means DINO's 65536 for ``base="dino"`` and iBOT's 8192 for ``"ibot"``.
        lambda3: weight of ``L_query``. The paper weighs global and query terms about
            1:1; the exact value is not known (1.0).
        local_cls_terms: the student encodes the query crops on their own too, as DINO's
            local crops (True; "DINO CLS loss as usual").
        hidden_dim, bottleneck_dim, head_layers, norm_last_layer, student_temp,
            warmup_teacher_temp, teacher_temp, warmup_teacher_patch_temp,
            teacher_patch_temp, warmup_teacher_query_temp, teacher_query_temp,
            warmup_teacher_temp_epochs, lambda1, lambda2, pred_start_epoch,
            center_momentum, teacher_momentum, teacher_momentum_end, freeze_last_layer:
            as :class:`PQCL`.

    Data: batches are dicts (:func:`keras_pqcl.data.pretrain_dataset`) with
        ``"global_crops"`` ``(B, G, S, S, 3)``, ``"local_crops"`` ``(B, n, s, s, 3)`` (the
        query crops), ``"global_masks"`` ``(B, G, S/p, S/p)`` for ``base="ibot"``
        (``MaskConfig(p)``) and, for ``query_position="global"``, ``"query_coords"``
        ``(B, G, n, L*L, 2)`` or ``"query_tables"`` ``(B, G, n, L*L, D)``
        (``QueryConfig(p)``).

    Logs: as :class:`PQCL`: ``loss``, ``cls``, ``mim`` (ibot), ``query``,
        ``query_agreement`` (argmax agreement of the query-averaged student and target
        distributions, over the view pairs for ``"cross_view"``), ``teacher_temp``,
        ``teacher_query_temp``, ``teacher_entropy``, ``teacher_patch_temp`` and
        ``masked_fraction`` (ibot) and the schedules of :class:`DINO`.

    Reference: Zhang et al., "Patch-Level Contrasting without Patch Correspondence for
    Accurate and Dense Contrastive Representation Learning" (ADCLR), ICLR 2023,
    arXiv 2306.13337; the query pixels follow the ADCLR mode of github.com/Sherrylone/PQCL.
    The paper's body was not available: query positions, the cross-view target and the
    loss weight are a reconstruction from the abstract and that code.
    """

    query_hint = GLOBAL_POSITION_HINT
    backbone_reasons = {
        "pos_embed": "with query_position='global' the queries carry fixed sin-cos codes of their place in "
        "the view, which match the image tokens only if those carry the same code; or use "
        "query_position='crop'",
        "mask_token": "ADCLR runs on the iBOT/PQCL machinery, which builds on one; with base='dino' it "
        "stays frozen at zero",
    }

    @classmethod
    def needs(cls, **method_args):
        """A ViT with a mask token always: the iBOT/PQCL machinery ADCLR inherits expects
        one, even where only ``base="ibot"`` reads it. The sin-cos table and
        ``query_coords`` only for ``query_position="global"`` (``"crop"`` positions the
        queries with the backbone's own table, whichever it is); ``global_masks`` only for
        ``base="ibot"``."""
        base = argument(cls, method_args, "base")
        query_position = argument(cls, method_args, "query_position")
        return Needs(
            backbone="vit", mask_token=True, pos_embed="sincos" if query_position == "global" else None,
            masks=base == "ibot", queries=query_position == "global",
        )

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
        if base not in BASES:
            raise ValueError(f"ADCLR base must be one of {BASES}, got {base!r}.")
        if query_position not in QUERY_POSITIONS:
            raise ValueError(f"ADCLR query_position must be one of {QUERY_POSITIONS}, got {query_position!r}.")
        if target not in TARGETS:
            raise ValueError(f"ADCLR target must be one of {TARGETS}, got {target!r}.")
        kwargs.setdefault("_needs", type(self).needs(base=base, query_position=query_position))
        if out_dim is None:
            out_dim = 65536 if base == "dino" else 8192
        super().__init__(
            backbone,
            base=base,
            out_dim=out_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            head_layers=head_layers,
            norm_last_layer=norm_last_layer,
            student_temp=student_temp,
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_patch_temp=warmup_teacher_patch_temp,
            teacher_patch_temp=teacher_patch_temp,
            warmup_teacher_query_temp=warmup_teacher_query_temp,
            teacher_query_temp=teacher_query_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            lambda1=lambda1,
            lambda2=lambda2,
            lambda3=lambda3,
            pred_start_epoch=pred_start_epoch,
            local_cls_terms=local_cls_terms,
            center_momentum=center_momentum,
            **kwargs,
        )
        self.query_position = query_position
        self.target = target
        if base == "dino":
            # Nothing reads the mask token without masks: frozen, it neither counts as a
            # parameter ADCLR adds nor draws "gradients do not exist" warnings.
            self.student_backbone.mask_token.trainable = False

    # ------------------------------------------------------------------ pieces
    def query_tokens(self, local_crops, n_views=1, positions=None, backbone=None):
        """Query tokens of the query crops, repeated for each view.

        Args:
            local_crops: ``(B, n, s, s, 3)``.
            n_views: how many views the tokens are appended to.
            positions: for ``query_position="global"``, the sin-cos codes ``(V * B, T, D)``
                of each crop patch in each view (view-major); ignored for ``"crop"``.
            backbone: whose patch embedding and position table to use (the student's by
                default; the teacher embeds the queries with its own).

        Returns:
            ``(n_views * B, T, D)``, view-major: row ``v * B + b`` holds image ``b``'s
            queries for view ``v``, crop 0's patches first, each crop row-major.
        """
        backbone = backbone or self.student_backbone
        n_local, height, width = local_crops.shape[1:4]
        grid = (height // backbone.patch_size, width // backbone.patch_size)
        per_crop, dim = grid[0] * grid[1], backbone.embed_dim
        tokens = backbone.patch_embed(crop_major(local_crops))  # (n B, L², D)
        if self.query_position == "crop":
            tokens = tokens + ops.cast(backbone.position_embedding(grid)[:, 1:], tokens.dtype)
        tokens = ops.reshape(tokens, (n_local, -1, per_crop, dim))
        tokens = ops.reshape(ops.swapaxes(tokens, 0, 1), (-1, n_local * per_crop, dim))
        if n_views > 1:
            tokens = ops.concatenate([tokens] * n_views, axis=0)
        if self.query_position == "global":
            if positions is None:
                raise ValueError(f"query_position='global' needs the queries' positions. {GLOBAL_POSITION_HINT}")
            tokens = tokens + ops.cast(positions, tokens.dtype)
        return tokens

    def student_logits(self, images, masks=None, queries=None, patches=True, training=False):
        """Student logits of one batch of global views.

        Args:
            images: ``(B, S, S, 3)``.
            masks: optional bool ``(B, S/p, S/p)`` (``base="ibot"``).
            queries: optional query tokens ``(B, T, D)`` from :meth:`query_tokens`.
            patches: also return the patch logits.

        Returns:
            dict ``"cls"`` ``(B, K)``, ``"patches"`` ``(B, N, K)`` and, with ``queries``,
            ``"queries"`` ``(B, T, K)``. The image-token logits do not depend on the queries.
        """
        return encode(
            self.student_backbone, self.student_head, images, masks=masks, queries=queries,
            patches=patches, training=training,
        )

    def teacher_logits(self, images, patches=True, queries=None):
        """Teacher logits of unmasked ``images``; with ``queries`` (built by
        :meth:`query_tokens` with ``backbone=teacher_backbone``) also ``"queries"``
        ``(B, T, K)``. No gradient."""
        out = encode(
            self.teacher_backbone, self.teacher_head, images, queries=queries, patches=patches, training=False
        )
        return {k: ops.stop_gradient(v) for k, v in out.items()}

    def _query_crops(self, data):
        """The batch's local crops, checked as query crops."""
        local_crops = require(data, "local_crops", "ADCLR", CROPS_HINT)
        if not local_crops.shape[1]:
            raise ValueError(f"ADCLR needs at least one local crop (the query crops). {CROPS_HINT}")
        p = self.student_backbone.patch_size
        height, width = local_crops.shape[2:4]
        if height % p or width % p:
            raise ValueError(
                f"ADCLR's query crops are {height}x{width} px, not a multiple of the patch size {p}: the "
                f"patch embedding would drop their borders. Set MultiCropConfig(local_size=...) to a "
                f"multiple of {p}, e.g. {max(p, height // p * p)}."
            )
        return local_crops

    def _query_positions(self, data, global_crops, local_crops):
        """``query_positions`` (PQCL's codes of each crop patch in each view) for
        ``query_position="global"``; None for ``"crop"``."""
        if self.query_position != "global":
            return None
        return self.query_positions(data, global_crops, local_crops)

    def _query_inputs(self, data, global_crops, local_crops):
        # PQCL's step (target="crop") builds the student's query tokens here.
        positions = self._query_positions(data, global_crops, local_crops)
        return self.query_tokens(local_crops, global_crops.shape[1], positions)

    def cross_view_query_loss(self, student_queries, teacher_queries, teacher_temp):
        """``L_query`` and its agreement monitor for ``target="cross_view"``.

        Args:
            student_queries: ``(G, B, T, K)`` student query logits of each view.
            teacher_queries: ``(G, B, T, K)`` teacher query logits of each view.
            teacher_temp: the query teacher temperature.

        Returns:
            ``(loss, agreement)``: the means over the ``G (G - 1)`` pairs ``a != b`` of
            :class:`QueryLoss` with teacher view ``a`` as target of student view ``b``. The
            query center then moves once, towards the mean of all ``G * B * T`` raw teacher
            query logits.
        """
        n_views = student_queries.shape[0]
        pairs = [(a, b) for a in range(n_views) for b in range(n_views) if a != b]
        # The monitor reads the center before the loss moves it.
        agreement = sum(
            self.query_loss.agreement(student_queries[b : b + 1], teacher_queries[a], teacher_temp=teacher_temp)
            for a, b in pairs
        ) / len(pairs)
        loss = sum(
            self.query_loss(
                student_queries[b : b + 1], teacher_queries[a], teacher_temp=teacher_temp, update_center=False
            )
            for a, b in pairs
        ) / len(pairs)
        self.query_loss.update_center(teacher_queries, axes=(0, 1, 2))
        return loss, agreement

    # -------------------------------------------------------------------- step
    def ssl_forward(self, data, step, training=True):
        global_crops = require(data, "global_crops", "ADCLR", CROPS_HINT)
        local_crops = self._query_crops(data)
        if self.target == "crop":
            # PQCL's step: only the query tokens (from _query_inputs) differ.
            return super().ssl_forward(data, step, training)
        n_global, batch = global_crops.shape[1], ops.shape(global_crops)[0]
        if n_global < 2:
            raise ValueError(
                f"target='cross_view' contrasts queries across global views and needs at least 2, got "
                f"{n_global}; set MultiCropConfig(n_global=2) or use target='crop'."
            )
        ibot = self.base == "ibot"
        images = crop_major(global_crops)
        positions = self._query_positions(data, global_crops, local_crops)
        masks = self.student_masks(data, step, global_crops) if ibot else None

        teacher_queries = self.query_tokens(local_crops, n_global, positions, backbone=self.teacher_backbone)
        teacher = self.teacher_logits(images, patches=ibot, queries=teacher_queries)
        student = self.student_logits(
            images, masks=masks, queries=self.query_tokens(local_crops, n_global, positions),
            patches=ibot, training=training,
        )
        n_queries, query_temp = teacher["queries"].shape[1], self.teacher_query_temp_at(step)
        query, agreement = self.cross_view_query_loss(
            ops.reshape(student["queries"], (n_global, batch, n_queries, self.out_dim)),
            ops.reshape(teacher["queries"], (n_global, batch, n_queries, self.out_dim)),
            teacher_temp=query_temp,
        )
        return self.combine_terms(data, step, training, student, teacher, masks, query, agreement, query_temp)

    def get_config(self):
        config = super().get_config()
        config.update(query_position=self.query_position, target=self.target)
        return config
