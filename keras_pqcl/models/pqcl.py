"""PQCL: patch-level contrastive learning via positional queries (Zhang et al., ICML 2023).

A plug-in on iBOT (or DINO): the student never sees the local crops. For each global view
it gets one query token per local-crop patch, ``mask_token + sincos(position of that patch
in the view)``, which reads the view's tokens (never the reverse) and must predict the
teacher's output for that patch, computed from the local crop's pixels.
"""

import keras
from keras import ops

from keras_pqcl.layers.pos_embed import sincos_embedding
from keras_pqcl.losses.query_loss import QueryLoss
from keras_pqcl.models.base import crop_major, require
from keras_pqcl.models.dino import mean_output_entropy
from keras_pqcl.models.ibot import IBOT, encode, views_major
from keras_pqcl.models.needs import Needs, argument

BASES = ("ibot", "dino")

QUERY_HINT = (
    "Build the dataset with pretrain_dataset(..., queries=keras_pqcl.data.QueryConfig(patch_size=p)), "
    "p = the backbone's patch size, and MultiCropConfig(n_local >= 1)."
)


@keras.saving.register_keras_serializable(package="keras_pqcl")
class PQCL(IBOT):
    """Positional-query contrastive learning on top of iBOT (``base="ibot"``) or DINO.

    Per step, with ``G`` global views, ``n`` local crops of ``L x L`` patches and
    ``T = n * L * L`` queries per view:

    * student, per global view: the image (masked for ``base="ibot"``, unmasked for
      ``base="dino"``) plus the ``T`` query tokens
      ``positional_queries(sincos_embedding(query_coords of that view, D))``; image tokens
      never attend to the queries. One shared head (the last layer of the CLS token) maps
      CLS, patch and query tokens to ``K`` logits;
    * teacher: both global views unmasked (CLS, and patches for the MIM term), and each
      local crop on its own (its position table interpolated to the local grid); the
      local crops' patch tokens, CLS dropped and crops concatenated, give the query targets
      ``(B, T, K)``;
    * ``loss = lambda1 * L_cls + lambda2 * L_mim + lambda3 * L_query``. ``L_cls`` is
      DINO's CLS loss between the two global views only (the student encodes no local
      crop unless ``local_cls_terms=True``); ``L_mim`` is iBOT's masked-patch loss (absent
      for ``base="dino"``); ``L_query`` is :class:`~keras_pqcl.losses.QueryLoss` with the
      third center and its own temperature schedule.

    Args:
        backbone: the student backbone with ``use_mask_token=True`` and
            ``pos_embed="sincos"`` (the queries are sin-cos codes of positions, which
            mean something only if the image tokens carry the same fixed code), made for
            the global crop size (``image_size``).
        base: ``"ibot"`` (the released code) or ``"dino"`` (reconstructed, as only the
            iBOT version was released: unmasked global views, no MIM term; the mask token
            then only builds the queries).
        out_dim: prototypes ``K`` of the shared head (8192, the PQCL code's value; DINO's
            own 65536 is the natural choice for ``base="dino"``).
        hidden_dim, bottleneck_dim, head_layers, norm_last_layer, student_temp: as
            :class:`DINO`.
        warmup_teacher_temp, teacher_temp: CLS teacher temperature 0.04 -> 0.07.
        warmup_teacher_patch_temp, teacher_patch_temp: MIM teacher temperature (ibot).
        warmup_teacher_query_temp, teacher_query_temp: query teacher temperature
            0.04 -> 0.07.
        warmup_teacher_temp_epochs: length of the three warm-ups (30 epochs).
        lambda1, lambda2, lambda3: weights of ``L_cls``, ``L_mim``, ``L_query`` (1, 1, 1).
        pred_start_epoch: first epoch with MIM masks (``base="ibot"``); queries are on from
            the start.
        local_cls_terms: the student also encodes the local crops (unmasked) and their CLS
            joins ``L_cls`` as in DINO/iBOT (False, as the PQCL code).
        center_momentum: 0.9 for every center.
        teacher_momentum, teacher_momentum_end, freeze_last_layer: as :class:`DINO`.

    Data: batches are dicts (:func:`keras_pqcl.data.pretrain_dataset` with
        ``queries=QueryConfig(p)`` and, for ``base="ibot"``, ``masks=MaskConfig(p)``) with
        ``"global_crops"`` ``(B, G, S, S, 3)``, ``"local_crops"`` ``(B, n, s, s, 3)``,
        ``"query_coords"`` ``(B, G, n, L*L, 2)`` (or ``"query_tables"``
        ``(B, G, n, L*L, D)``) and ``"global_masks"`` ``(B, G, S/p, S/p)`` (ibot).

    Logs: ``loss``, ``cls``, ``mim`` (ibot), ``query``, ``query_agreement`` (argmax
        agreement of the query-averaged student and teacher distributions, the
        reference's "acc"), all epoch means; ``teacher_temp``, ``teacher_patch_temp``
        (ibot), ``teacher_query_temp``, ``teacher_entropy``, ``masked_fraction`` (ibot)
        and the schedules of :class:`DINO`.

    Reference: Zhang et al., "Patch-level Contrastive Learning via Positional Query for
    Visual Pre-training", ICML 2023; official code github.com/Sherrylone/PQCL.
    """

    loss_terms = ("cls", "mim", "query", "query_agreement")
    backbone_reasons = {
        "pos_embed": "PQCL's queries are fixed sin-cos codes of positions, so the image tokens must carry "
        "the same fixed code, as PQCL's pos_* architectures",
    }

    @classmethod
    def needs(cls, **method_args):
        """A ViT with a mask token (it builds the queries) and the sin-cos table (the
        queries' codes must match the image tokens'); batches with ``query_coords`` and, for
        ``base="ibot"``, ``global_masks``."""
        base = argument(cls, method_args, "base")
        return Needs(backbone="vit", mask_token=True, pos_embed="sincos", masks=base == "ibot", queries=True)

    @property
    def collapse_terms(self):
        # One shared head: every term is a cross-entropy over the same out_dim prototypes.
        terms = {"cls": self.out_dim, "query": self.out_dim}
        if self.base == "ibot":
            terms["mim"] = self.out_dim
        return terms

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
        **kwargs,
    ):
        if base not in BASES:
            raise ValueError(f"PQCL base must be one of {BASES}, got {base!r}.")
        # The backbone is checked against the outermost class's needs for these arguments.
        kwargs.setdefault("_needs", type(self).needs(base=base))
        # The PQCL head applies its CLS last layer to CLS, patch and query tokens alike: one head.
        kwargs.pop("patch_out_dim", None)
        kwargs.pop("shared_head", None)
        super().__init__(
            backbone,
            out_dim=out_dim,
            patch_out_dim=out_dim,
            shared_head=True,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            head_layers=head_layers,
            norm_last_layer=norm_last_layer,
            student_temp=student_temp,
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_patch_temp=warmup_teacher_patch_temp,
            teacher_patch_temp=teacher_patch_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            lambda1=lambda1,
            lambda2=lambda2,
            pred_start_epoch=pred_start_epoch,
            center_momentum=center_momentum,
            **kwargs,
        )
        self.base = base
        self.lambda3 = float(lambda3)
        self.warmup_teacher_query_temp = warmup_teacher_query_temp
        self.teacher_query_temp = teacher_query_temp
        self.local_cls_terms = bool(local_cls_terms)
        if base == "dino":
            # No MIM term: no "mim" log. (ibot_loss.center2 exists but stays at 0.)
            self.trackers.pop("mim")
        self.query_loss = QueryLoss(
            out_dim, student_temp=student_temp, center_momentum=center_momentum, name="query_loss"
        )
        self.built = True

    # ------------------------------------------------------------------ pieces
    def teacher_query_temp_at(self, step):
        """Query teacher temperature at optimizer ``step`` (scalar), indexed by epoch.

        Held at ``warmup_teacher_query_temp`` before ``pred_start_epoch``, then
        ``linspace(warmup_teacher_query_temp, teacher_query_temp,
        warmup_teacher_temp_epochs)``, then ``teacher_query_temp``: the PQCL code delays
        this warm-up by the MIM start epoch exactly as it delays the patch temperature's.
        With ``pred_start_epoch=0`` it starts at epoch 0.
        """
        return self.warmup_temp(
            step, self.warmup_teacher_query_temp, self.teacher_query_temp, start_epoch=self.pred_start_epoch
        )

    def queries_from_coords(self, coords):
        """Query tokens ``(..., D)``: the mask token plus the sin-cos code of ``coords``
        ``(..., 2)`` = (x, y) in global-patch units of the view."""
        return self.student_backbone.positional_queries(
            sincos_embedding(coords, self.student_backbone.embed_dim)
        )

    def student_logits(self, images, masks=None, query_coords=None, training=False):
        """Student logits of one batch of global views.

        Args:
            images: ``(B, S, S, 3)``.
            masks: optional bool ``(B, S/p, S/p)``.
            query_coords: optional ``(B, T, 2)`` positions of the queries in these views.

        Returns:
            dict ``"cls"`` ``(B, K)``, ``"patches"`` ``(B, N, K)`` and, with
            ``query_coords``, ``"queries"`` ``(B, T, K)``. The image-token logits do not
            depend on the queries.
        """
        queries = None if query_coords is None else self.queries_from_coords(query_coords)
        return encode(
            self.student_backbone, self.student_head, images, masks=masks, queries=queries, training=training
        )

    def teacher_local_logits(self, local_crops):
        """Query targets: teacher logits of the local crops' patch tokens ``(B, T, K)``,
        each crop encoded on its own, crops concatenated along the tokens."""
        n_local = local_crops.shape[1]
        features = self.teacher_backbone(crop_major(local_crops), training=False)
        logits = ops.stop_gradient(self.teacher_head.token_logits(features["patches"]))  # (n B, L², K)
        per_crop = logits.shape[1]
        logits = ops.reshape(logits, (n_local, -1, per_crop, self.out_dim))
        return ops.reshape(ops.swapaxes(logits, 0, 1), (-1, n_local * per_crop, self.out_dim))

    #: Appended to the errors about query coordinates (ADCLR names its own option).
    query_hint = QUERY_HINT

    def query_positions(self, data, global_crops, local_crops):
        """Sin-cos codes ``(G * B, T, D)``, view-major, of where each local-crop patch lies
        in each global view: ``sincos_embedding`` of the batch's ``query_coords`` (or its
        precomputed ``query_tables``), checked against the crops and the backbone."""
        backbone, name = self.student_backbone, type(self).__name__
        p, dim = backbone.patch_size, backbone.embed_dim
        n_global, n_local = global_crops.shape[1], local_crops.shape[1]
        per_crop = (local_crops.shape[2] // p) * (local_crops.shape[3] // p)
        if global_crops.shape[2] != global_crops.shape[3] or global_crops.shape[2] // p != backbone.grid_size:
            raise ValueError(
                f"{name}'s query positions are sin-cos codes on the global view's patch grid, so the "
                f"backbone's table must be made for the global crops: got {global_crops.shape[2]}x"
                f"{global_crops.shape[3]}-px global crops and image_size={backbone.image_size}; build the "
                f"backbone with image_size={global_crops.shape[2]}."
            )
        if isinstance(data, dict) and data.get("query_coords") is None and data.get("query_tables") is not None:
            key, last = "query_tables", dim
        else:
            key, last = "query_coords", 2
        values = require(data, key, name, self.query_hint)
        expected = (n_global, n_local, per_crop, last)
        if tuple(values.shape[1:]) != expected:
            raise ValueError(
                f"{key} has shape {tuple(values.shape)}, expected (B, {', '.join(map(str, expected))}) for "
                f"{n_global} global views and {n_local} local crops of {local_crops.shape[2]} px "
                f"with patch size {p}; set QueryConfig(patch_size={p})."
            )
        values = views_major(ops.reshape(values, (-1, n_global, n_local * per_crop, last)))
        if key == "query_tables":
            return ops.cast(values, "float32")
        return sincos_embedding(values, dim)

    def _query_inputs(self, data, global_crops, local_crops):
        """Query tokens ``(G * B, T, D)``, view-major: mask token + position codes."""
        return self.student_backbone.positional_queries(self.query_positions(data, global_crops, local_crops))

    # -------------------------------------------------------------------- step
    def ssl_forward(self, data, step, training=True):
        global_crops = require(data, "global_crops", "PQCL", QUERY_HINT)
        local_crops = require(data, "local_crops", "PQCL", QUERY_HINT)
        if not local_crops.shape[1]:
            raise ValueError(f"PQCL needs at least one local crop (the query crops). {QUERY_HINT}")
        ibot = self.base == "ibot"
        n_global, batch = global_crops.shape[1], ops.shape(global_crops)[0]
        images = crop_major(global_crops)
        queries = self._query_inputs(data, global_crops, local_crops)
        masks = self.student_masks(data, step, global_crops) if ibot else None

        teacher = self.teacher_logits(images, patches=ibot)
        targets = self.teacher_local_logits(local_crops)  # (B, T, K)
        student = encode(
            self.student_backbone, self.student_head, images, masks=masks, queries=queries,
            patches=ibot, training=training,
        )
        query_temp = self.teacher_query_temp_at(step)
        student_queries = ops.reshape(student["queries"], (n_global, batch, targets.shape[1], self.out_dim))
        # The monitor reads the query center before the loss moves it.
        agreement = self.query_loss.agreement(student_queries, targets, teacher_temp=query_temp)
        query = self.query_loss(student_queries, targets, teacher_temp=query_temp)
        return self.combine_terms(data, step, training, student, teacher, masks, query, agreement, query_temp)

    def combine_terms(self, data, step, training, student, teacher, masks, query, agreement, query_temp):
        """The loss and logs of one step, given the query term.

        Adds DINO's CLS term between the global views (plus the local crops' CLS with
        ``local_cls_terms``) and, for ``base="ibot"``, iBOT's masked-patch term.

        Args:
            student, teacher: logits of the ``G * B`` global views, view-major: ``"cls"``
                ``(G B, K)`` and, for ``base="ibot"``, ``"patches"`` ``(G B, N, K)``.
            masks: the student's masks ``(G B, h, w)`` (``base="ibot"``) or None.
            query: the query loss; agreement: its monitor; query_temp: its temperature.

        Returns:
            ``(loss, logs)``.
        """
        ibot, k = self.base == "ibot", self.out_dim
        n_global, batch = data["global_crops"].shape[1], ops.shape(data["global_crops"])[0]
        teacher_cls = ops.reshape(teacher["cls"], (n_global, batch, k))
        student_cls = [student["cls"]]
        if self.local_cls_terms:
            student_cls.append(self.local_cls_logits(data, training))
        student_cls = ops.reshape(ops.concatenate(student_cls, axis=0), (-1, batch, k))
        temp = self.teacher_temp_at(step)
        logs = self.schedule_logs(step)
        if ibot:
            n_patches = teacher["patches"].shape[1]
            patch_temp = self.teacher_patch_temp_at(step)
            terms = self.ibot_loss(
                student_cls,
                teacher_cls,
                ops.reshape(student["patches"], (n_global, batch, n_patches, k)),
                ops.reshape(teacher["patches"], (n_global, batch, n_patches, k)),
                ops.reshape(masks, (n_global, batch, n_patches)),
                teacher_temp=temp,
                teacher_patch_temp=patch_temp,
            )
            logs["teacher_patch_temp"] = patch_temp
            logs["masked_fraction"] = ops.mean(ops.cast(masks, "float32"))
        else:
            terms = {"cls": self.ibot_loss.cls_loss(student_cls, teacher_cls, teacher_temp=temp)}
        terms["query"] = query

        loss = self.lambda1 * terms["cls"] + self.lambda3 * terms["query"]
        if ibot:
            loss = loss + self.lambda2 * terms["mim"]
        logs.update(terms)
        logs["query_agreement"] = agreement
        logs["teacher_temp"] = temp
        logs["teacher_query_temp"] = query_temp
        logs["teacher_entropy"] = mean_output_entropy(teacher["cls"], self.ibot_loss.center, temp)
        return loss, logs

    def get_config(self):
        config = super().get_config()
        config.pop("patch_out_dim")
        config.pop("shared_head")
        config.update(
            base=self.base,
            lambda3=self.lambda3,
            warmup_teacher_query_temp=self.warmup_teacher_query_temp,
            teacher_query_temp=self.teacher_query_temp,
            local_cls_terms=self.local_cls_terms,
        )
        return config
