"""iBOT: image BERT pre-training with an online tokenizer (Zhou et al., ICLR 2022).

DINO's CLS self-distillation plus masked image modelling: the student sees its global views
with some patches replaced by the mask token and must predict, at those patches, the
teacher's distribution computed from the unmasked view.
"""

import keras
from keras import ops

from keras_pqcl.heads.ibot_head import iBOTHead
from keras_pqcl.losses.ibot_loss import iBOTLoss
from keras_pqcl.models.base import crop_major, require
from keras_pqcl.models.dino import SelfDistillation, mean_output_entropy
from keras_pqcl.models.needs import Needs


def views_major(x):
    """``(B, V, ...)`` -> ``(V * B, ...)``: all images of view 0 first, like :func:`crop_major`."""
    x = ops.swapaxes(x, 0, 1)
    return ops.reshape(x, (-1,) + tuple(x.shape[2:]))


def encode(backbone, head, images, masks=None, queries=None, patches=True, training=False):
    """Backbone then head on its tokens, with one head call for all of them.

    Args:
        backbone: a :class:`~keras_pqcl.backbones.VisionTransformer`.
        head: an :class:`~keras_pqcl.heads.iBOTHead`; queries need ``shared_head=True``
            (PQCL projects CLS, patch and query tokens with the same last layer).
        images: ``(B, H, W, 3)``.
        masks: optional bool ``(B, h, w)`` or ``(B, N)``: patches replaced by the mask token.
        queries: optional ``(B, T, D)`` query tokens (see ``positional_queries``).
        patches: also return patch logits (skip them when unused: ``N x K`` saved).

    Returns:
        dict of logits: ``"cls"`` ``(B, K)``, ``"patches"`` ``(B, N, K_p)`` if ``patches``,
        ``"queries"`` ``(B, T, K)`` if ``queries`` were given.
    """
    features = backbone(images, masks=masks, queries=queries, training=training)
    n = features["patches"].shape[1] if patches else 0
    parts = [features["cls"][:, None]]
    if patches:
        parts.append(features["patches"])
    if queries is not None:
        parts.append(features["queries"])
    tokens = ops.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    if head.last_layer2 is None:
        logits = head.token_logits(tokens)
        out = {"cls": logits[:, 0]}
        if patches:
            out["patches"] = logits[:, 1 : 1 + n]
        if queries is not None:
            out["queries"] = logits[:, 1 + n :]
        return out
    if queries is not None:
        raise ValueError("query tokens need a shared head (shared_head=True).")
    if not patches:
        return {"cls": head.token_logits(tokens[:, 0])}
    cls, patch_logits = head(tokens)
    return {"cls": cls, "patches": patch_logits}


@keras.saving.register_keras_serializable(package="keras_pqcl")
class IBOT(SelfDistillation):
    """Student ViT with a mask token + EMA teacher, iBOT heads and the iBOT loss.

    Per step, with ``G`` global and ``n`` local crops of ``B`` images:

    * teacher: both global crops, unmasked -> CLS ``(G, B, K)`` and patch ``(G, B, N, K_p)``
      logits;
    * student: the global crops with their masks -> CLS and patch logits; the local crops
      unmasked -> CLS logits only;
    * ``loss = lambda1 * L_cls + lambda2 * L_mim`` (:class:`~keras_pqcl.losses.iBOTLoss`):
      DINO's cross-view CLS loss over all student crops, and the masked-patch loss within
      each global view with its own center and teacher temperature.

    Before ``pred_start_epoch`` the masks are switched off in the step (so ``L_mim`` is 0)
    and the patch temperature stays at ``warmup_teacher_patch_temp``; its warm-up starts
    at that epoch.

    Args:
        backbone: the student backbone, built with ``use_mask_token=True`` (e.g.
            ``vit_small(16, drop_path_rate=0.1, use_mask_token=True)``); the teacher is a
            copy with stochastic depth off.
        out_dim: CLS prototypes ``K`` (8192).
        patch_out_dim: patch prototypes ``K_p``; None (default) means ``out_dim`` (8192 in
            the recipes). Must equal ``out_dim`` when ``shared_head``.
        shared_head: one last layer for CLS and patch tokens (True, the published recipes).
            Student and teacher always share the same head layout here (the reference's
            default arguments give the student separate heads but the teacher a shared
            one; the published recipes share both).
        hidden_dim, bottleneck_dim, head_layers, norm_last_layer: as :class:`DINO`.
        student_temp: 0.1 for both terms.
        warmup_teacher_temp, teacher_temp: CLS teacher temperature 0.04 -> 0.07.
        warmup_teacher_patch_temp, teacher_patch_temp: patch teacher temperature 0.04 -> 0.07.
        warmup_teacher_temp_epochs: length of both warm-ups (30 epochs).
        lambda1, lambda2: weights of ``L_cls`` and ``L_mim`` (1, 1).
        pred_start_epoch: first epoch with masked image modelling (0).
        center_momentum: 0.9 for both centers.
        teacher_momentum, teacher_momentum_end, freeze_last_layer: as :class:`DINO`.

    Data: batches are dicts (:func:`keras_pqcl.data.pretrain_dataset` with
        ``masks=MaskConfig(patch_size)``) with ``"global_crops"`` ``(B, G, S, S, 3)``,
        ``"global_masks"`` bool ``(B, G, S/p, S/p)`` and optionally ``"local_crops"``
        ``(B, n, s, s, 3)``.

    Logs: ``loss``, ``cls``, ``mim`` (epoch means), ``teacher_temp``,
        ``teacher_patch_temp``, ``teacher_entropy`` (of the teacher's mean CLS
        distribution), ``masked_fraction`` (of the student's global patches), and the
        schedules of :class:`DINO`.

    Reference: Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022.
    """

    loss_terms = ("cls", "mim")

    @classmethod
    def needs(cls, **method_args):
        """A ViT with a mask token (any position table); batches with ``global_masks``."""
        return Needs(backbone="vit", mask_token=True, masks=True)

    @property
    def collapse_terms(self):
        return {"cls": self.out_dim, "mim": self.patch_out_dim}

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
        super().__init__(
            backbone,
            out_dim=out_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            head_layers=head_layers,
            norm_last_layer=norm_last_layer,
            student_temp=student_temp,
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            center_momentum=center_momentum,
            **kwargs,
        )
        self.patch_out_dim = out_dim if patch_out_dim is None else patch_out_dim
        self.shared_head = shared_head
        self.warmup_teacher_patch_temp = warmup_teacher_patch_temp
        self.teacher_patch_temp = teacher_patch_temp
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.pred_start_epoch = int(pred_start_epoch)
        self.add_heads(iBOTHead, patch_out_dim=self.patch_out_dim, shared_head=shared_head)
        self.ibot_loss = iBOTLoss(
            out_dim, self.patch_out_dim, student_temp=student_temp, center_momentum=center_momentum, name="ibot_loss"
        )
        self.built = True

    # ------------------------------------------------------------------ pieces
    def teacher_patch_temp_at(self, step):
        return self.warmup_temp(
            step, self.warmup_teacher_patch_temp, self.teacher_patch_temp, start_epoch=self.pred_start_epoch
        )

    def student_masks(self, data, step, global_crops):
        """The batch's ``global_masks`` as ``(G * B, N)`` bool, crop-major; all False before
        ``pred_start_epoch`` (decided in-graph from ``step``)."""
        masks = require(
            data,
            "global_masks",
            type(self).__name__,
            "Build the dataset with pretrain_dataset(..., masks=keras_pqcl.data.MaskConfig(patch_size=p)), "
            "p = the backbone's patch size.",
        )
        p = self.student_backbone.patch_size
        grid = (global_crops.shape[2] // p, global_crops.shape[3] // p)
        if tuple(masks.shape[1:]) not in ((global_crops.shape[1],) + grid, (global_crops.shape[1], grid[0] * grid[1])):
            raise ValueError(
                f"global_masks has shape {tuple(masks.shape)}, expected (B, {global_crops.shape[1]}, "
                f"{grid[0]}, {grid[1]}) for {global_crops.shape[2]}-px global crops and patch size {p}; "
                f"set MaskConfig(patch_size={p})."
            )
        masks = ops.reshape(views_major(ops.cast(masks, "bool")), (-1, grid[0] * grid[1]))
        if self.pred_start_epoch:
            masks = ops.logical_and(masks, self.epoch_at(step) >= float(self.pred_start_epoch))
        return masks

    def student_logits(self, images, masks=None, training=False):
        """Student CLS ``(B, K)`` and patch ``(B, N, K_p)`` logits of (masked) ``images``."""
        return encode(self.student_backbone, self.student_head, images, masks=masks, training=training)

    def teacher_logits(self, images, patches=True):
        """Teacher CLS ``(B, K)`` and patch ``(B, N, K_p)`` logits (never masked)."""
        out = encode(self.teacher_backbone, self.teacher_head, images, patches=patches, training=False)
        return {k: ops.stop_gradient(v) for k, v in out.items()}

    def local_cls_logits(self, data, training):
        """Student CLS logits ``(n * B, K)`` of the unmasked local crops, or None."""
        local = data.get("local_crops") if isinstance(data, dict) else None
        if local is None or not local.shape[1]:
            return None
        features = self.student_backbone(crop_major(local), training=training)
        return self.student_head.token_logits(features["cls"])

    # -------------------------------------------------------------------- step
    def ssl_forward(self, data, step, training=True):
        global_crops = require(
            data, "global_crops", "IBOT", "Use keras_pqcl.data.pretrain_dataset(..., masks=MaskConfig(p))."
        )
        n_global, batch = global_crops.shape[1], ops.shape(global_crops)[0]
        images = crop_major(global_crops)
        masks = self.student_masks(data, step, global_crops)

        teacher = self.teacher_logits(images)
        student = self.student_logits(images, masks=masks, training=training)
        student_cls = [student["cls"]]
        local_cls = self.local_cls_logits(data, training)
        if local_cls is not None:
            student_cls.append(local_cls)

        k, kp = self.out_dim, self.patch_out_dim
        n_patches = teacher["patches"].shape[1]
        temp, patch_temp = self.teacher_temp_at(step), self.teacher_patch_temp_at(step)
        terms = self.ibot_loss(
            ops.reshape(ops.concatenate(student_cls, axis=0), (-1, batch, k)),
            ops.reshape(teacher["cls"], (n_global, batch, k)),
            ops.reshape(student["patches"], (n_global, batch, n_patches, kp)),
            ops.reshape(teacher["patches"], (n_global, batch, n_patches, kp)),
            ops.reshape(masks, (n_global, batch, n_patches)),
            teacher_temp=temp,
            teacher_patch_temp=patch_temp,
        )
        loss = self.lambda1 * terms["cls"] + self.lambda2 * terms["mim"]

        logs = self.schedule_logs(step)
        logs.update(terms)
        logs["teacher_temp"] = temp
        logs["teacher_patch_temp"] = patch_temp
        logs["teacher_entropy"] = mean_output_entropy(teacher["cls"], self.ibot_loss.center, temp)
        logs["masked_fraction"] = ops.mean(ops.cast(masks, "float32"))
        return loss, logs

    def get_config(self):
        config = super().get_config()
        config.update(
            patch_out_dim=self.patch_out_dim,
            shared_head=self.shared_head,
            warmup_teacher_patch_temp=self.warmup_teacher_patch_temp,
            teacher_patch_temp=self.teacher_patch_temp,
            lambda1=self.lambda1,
            lambda2=self.lambda2,
            pred_start_epoch=self.pred_start_epoch,
        )
        return config
