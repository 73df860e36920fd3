"""DINO: self-distillation with no labels (Caron et al., ICCV 2021)."""

import keras
from keras import ops

from keras_pqcl import schedules
from keras_pqcl.backbones.base import check_backbone
from keras_pqcl.heads.dino_head import DINOHead
from keras_pqcl.losses.dino_loss import DINOLoss
from keras_pqcl.models.base import SelfSupervisedModel, crop_major, require
from keras_pqcl.models.needs import Needs


def clone_backbone(backbone, **overrides):
    """A new, built backbone of the same architecture (fresh variables, own names)."""
    config = backbone.get_config()
    config.update(overrides)
    clone = backbone.__class__.from_config(config)
    clone.build()
    return clone


class SelfDistillation(SelfSupervisedModel):
    """What DINO, iBOT and PQCL share: a ViT student with a projection head, their EMA
    teacher copies, the per-epoch teacher temperatures, ``call`` and (de)serialisation.

    A subclass calls ``super().__init__`` with the common arguments (see :class:`DINO`),
    then :meth:`add_heads` with its head class, then creates its loss.

    The student backbone is checked here, before anything is built, against
    ``type(self).needs(...)`` of the outermost constructor's arguments: a subclass whose
    requirements depend on its own arguments passes ``_needs=type(self).needs(...)`` up
    (the first one set wins, so a further subclass's answer is not overwritten).
    """

    #: ``{requirement: why}`` added to :func:`~keras_pqcl.backbones.check_backbone`'s error.
    backbone_reasons = {}

    def __init__(
        self,
        backbone,
        out_dim,
        hidden_dim=2048,
        bottleneck_dim=256,
        head_layers=3,
        norm_last_layer=True,
        student_temp=0.1,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=30,
        center_momentum=0.9,
        use_bn_in_head=False,
        _needs=None,
        **kwargs,
    ):
        check_backbone(
            backbone, _needs if _needs is not None else type(self).needs(), type(self).__name__,
            self.backbone_reasons,
        )
        super().__init__(**kwargs)
        self.out_dim = out_dim
        self.hidden_dim = hidden_dim
        self.bottleneck_dim = bottleneck_dim
        self.head_layers = head_layers
        self.norm_last_layer = norm_last_layer
        self.student_temp = student_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.center_momentum = center_momentum
        self.use_bn_in_head = use_bn_in_head

        self.student_backbone = backbone
        if not backbone.built:
            backbone.build()
        self.teacher_backbone = clone_backbone(backbone, drop_path_rate=0.0, name="teacher_backbone")

    def add_heads(self, head_class, **head_kwargs):
        """Build ``student_head`` and its EMA twin ``teacher_head`` (gain frozen at 1, as the
        reference builds it) and register both networks with the EMA."""
        args = dict(
            out_dim=self.out_dim,
            hidden_dim=self.hidden_dim,
            bottleneck_dim=self.bottleneck_dim,
            num_layers=self.head_layers,
            use_bn=self.use_bn_in_head,
            **head_kwargs,
        )
        self.student_head = head_class(norm_last_layer=self.norm_last_layer, name="student_head", **args)
        self.teacher_head = head_class(norm_last_layer=True, name="teacher_head", **args)
        dim = self.student_backbone.embed_dim
        self.student_head.build((None, dim))
        self.teacher_head.build((None, dim))
        self.add_teacher(self.teacher_backbone, self.student_backbone)
        self.add_teacher(self.teacher_head, self.student_head)

    def frozen_variables(self):
        layers = getattr(self.student_head, "last_layers", [self.student_head.last_layer])
        return [v for layer in layers for v in layer.trainable_variables]

    def warmup_temp(self, step, start, end, start_epoch=0):
        """``linspace(start, end, warmup_teacher_temp_epochs)`` per epoch, then ``end``;
        held at ``start`` before ``start_epoch`` (iBOT's delayed patch temperature)."""
        epoch = self.epoch_at(step)
        if start_epoch:
            epoch = ops.maximum(epoch - float(start_epoch), 0.0)
        return schedules.warmup_then_constant(epoch, start, end, self.warmup_teacher_temp_epochs)

    def teacher_temp_at(self, step):
        return self.warmup_temp(step, self.warmup_teacher_temp, self.teacher_temp)

    def call(self, images, training=False):
        """Student CLS features ``(batch, D)`` of ``images``."""
        return self.student_backbone(images, training=training)["cls"]

    def get_config(self):
        config = super().get_config()
        config.update(
            out_dim=self.out_dim,
            hidden_dim=self.hidden_dim,
            bottleneck_dim=self.bottleneck_dim,
            head_layers=self.head_layers,
            norm_last_layer=self.norm_last_layer,
            student_temp=self.student_temp,
            warmup_teacher_temp=self.warmup_teacher_temp,
            teacher_temp=self.teacher_temp,
            warmup_teacher_temp_epochs=self.warmup_teacher_temp_epochs,
            center_momentum=self.center_momentum,
            use_bn_in_head=self.use_bn_in_head,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_pqcl")
class DINO(SelfDistillation):
    """Student ViT + EMA teacher, DINO heads and the DINO loss.

    Args:
        backbone: the student backbone (e.g. ``vit_small(16, drop_path_rate=0.1)``); the
            teacher is a copy with stochastic depth off.
        out_dim: prototypes ``K`` (65536).
        hidden_dim, bottleneck_dim, head_layers: head MLP (2048, 256, 3).
        norm_last_layer: freeze the student's weight-norm gain at 1 (True; the reference
            recommends False for ViT-S with care).
        student_temp: 0.1.
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: the teacher
            temperature rises linearly from 0.04 to 0.07 over 30 epochs, then stays.
        center_momentum: 0.9.
        use_bn_in_head: BatchNorm after the head's hidden layers (False, as the reference's
            ViT recipes; see :class:`~keras_pqcl.heads.DINOHead`). The same flag reaches the
            iBOT, PQCL and ADCLR heads.
        teacher_momentum, teacher_momentum_end: EMA range when ``fit`` gets no
            ``TeacherEMA`` callback (0.996 -> 1).
        freeze_last_layer: epochs the student's last layer is frozen (1).

    Data: ``fit`` takes batches as dicts (see :mod:`keras_pqcl.data`) with
        ``"global_crops"`` ``(B, G, H, W, 3)`` and optionally ``"local_crops"``
        ``(B, L, h, w, 3)``.

    Logs: ``loss``, ``teacher_temp``, ``teacher_momentum``, ``learning_rate``,
        ``weight_decay`` and ``teacher_entropy`` (entropy of the teacher's mean output; near 0
        means collapse to one prototype, near ``ln K`` uniform collapse).
    """

    @classmethod
    def needs(cls, **method_args):
        """Any ViT: no mask token, no particular position table, multi-crop batches."""
        return Needs(backbone="vit")

    @property
    def collapse_terms(self):
        # DINO logs its one cross-entropy, over out_dim prototypes, as the loss itself.
        return {"loss": self.out_dim}

    def __init__(
        self,
        backbone,
        out_dim=65536,
        hidden_dim=2048,
        bottleneck_dim=256,
        head_layers=3,
        norm_last_layer=True,
        student_temp=0.1,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=30,
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
        self.add_heads(DINOHead)
        self.dino_loss = DINOLoss(out_dim, student_temp=student_temp, center_momentum=center_momentum, name="dino_loss")
        self.built = True

    def ssl_forward(self, data, step, training=True):
        global_crops = require(
            data, "global_crops", "DINO",
            "Batches are dicts with 'global_crops' (B, G, H, W, 3) and optionally 'local_crops'; "
            "use keras_pqcl.data.pretrain_dataset.")
        n_global, batch = global_crops.shape[1], ops.shape(global_crops)[0]
        globals_flat = crop_major(global_crops)

        teacher_cls = self.teacher_backbone(globals_flat, training=False)["cls"]
        teacher_logits = ops.stop_gradient(self.teacher_head(teacher_cls))

        # Same-resolution crops go through the backbone together, then one head call.
        student_cls = [self.student_backbone(globals_flat, training=training)["cls"]]
        if data.get("local_crops") is not None and data["local_crops"].shape[1]:
            student_cls.append(self.student_backbone(crop_major(data["local_crops"]), training=training)["cls"])
        student_logits = self.student_head(ops.concatenate(student_cls, axis=0))

        k = self.out_dim
        temp = self.teacher_temp_at(step)
        loss = self.dino_loss(
            ops.reshape(student_logits, (-1, batch, k)),
            ops.reshape(teacher_logits, (n_global, batch, k)),
            teacher_temp=temp,
        )
        logs = self.schedule_logs(step)
        logs["teacher_temp"] = temp
        logs["teacher_entropy"] = mean_output_entropy(teacher_logits, self.dino_loss.center, temp)
        return loss, logs


def mean_output_entropy(teacher_logits, center, temp):
    """Entropy (nats) of the batch-averaged teacher distribution: a collapse monitor."""
    t = ops.stop_gradient(ops.cast(teacher_logits, "float32"))
    p = ops.mean(ops.softmax((t - center) / temp, axis=-1), axis=0)
    return -ops.sum(p * ops.log(p + 1e-12))
