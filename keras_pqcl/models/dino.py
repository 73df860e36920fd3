"""DINO: self-distillation with no labels (Caron et al., ICCV 2021)."""

import keras

from keras_pqcl.models.self_distillation import NamedMethod, base_terms


@keras.saving.register_keras_serializable(package="keras_pqcl")
class DINO(NamedMethod):
    """Student ViT + EMA teacher, DINO heads and one term, :class:`CLSDistillation`.

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
        **kwargs: :class:`~keras_pqcl.models.SelfDistillation`'s ``use_bn_in_head``
            (BatchNorm after the head's hidden layers; False as the reference's ViT recipes)
            and ``extra_terms`` (e.g. ``["koleo"]``); ``teacher_momentum`` (0.996),
            ``teacher_momentum_end`` (1) and ``freeze_last_layer`` (1 epoch).

    Data: ``fit`` takes dicts (see :mod:`keras_pqcl.data`) with ``"global_crops"``
        ``(B, G, H, W, 3)`` and optionally ``"local_crops"`` ``(B, L, h, w, 3)``.

    Logs: ``loss``, ``cls``, ``teacher_temp``, ``teacher_momentum``, ``learning_rate``,
        ``weight_decay`` and ``teacher_entropy`` (entropy of the teacher's mean output; near 0
        means collapse to one prototype, near ``ln K`` uniform collapse).
    """

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
        self._setup(locals(), kwargs)

    @staticmethod
    def make_terms(args):
        return base_terms(args, "dino")
