"""iBOT's term: masked image modelling with an online tokenizer (Zhou et al., ICLR 2022)."""

import keras
from keras import ops

from keras_pqcl.losses.ibot_loss import MaskedPatchLoss
from keras_pqcl.models.base import crop_major
from keras_pqcl.models.needs import Needs
from keras_pqcl.models.terms.base import DistillationTerm

MASKS_HINT = (
    "Build the dataset with pretrain_dataset(..., masks=keras_pqcl.data.MaskConfig(patch_size=p)), "
    "p = the backbone's patch size."
)


@keras.saving.register_keras_serializable(package="keras_pqcl")
class MaskedPatchDistillation(DistillationTerm):
    """The student sees its global views with the batch's masked patches replaced by the
    mask token and predicts, at those patches, the teacher's distribution from the unmasked
    view (:class:`~keras_pqcl.losses.MaskedPatchLoss`, its own center ``(1, 1, K_p)``).

    Before ``start_epoch`` the masks are switched off in the step (the term is 0) and the
    temperature's warm-up has not begun (its ``EpochRamp.start_epoch``).

    Args:
        out_dim: patch prototypes ``K_p``.
        student_temp: 0.1.
        teacher_temp: an :class:`~keras_pqcl.schedules.EpochRamp` (0.04 -> 0.07).
        center_momentum: 0.9.
        start_epoch: iBOT's ``pred_start_epoch`` (0).
        weight: ``lambda2``.

    Batches: ``"global_masks"`` bool ``(B, G, S/p, S/p)`` (or ``(B, G, N)``).

    Logs: ``mim`` (epoch mean), ``teacher_patch_temp`` and ``masked_fraction``.
    """

    log_name = "mim"
    temperature_name = "teacher_patch_temp"
    student_patches = teacher_patches = True

    loss_class = MaskedPatchLoss
    loss_name = "patch_loss"

    def __init__(self, out_dim, student_temp=0.1, teacher_temp=None, center_momentum=0.9, start_epoch=0, **kwargs):
        super().__init__(out_dim, student_temp, teacher_temp, center_momentum, **kwargs)
        self.start_epoch = int(start_epoch)

    def needs(self):
        return Needs(mask_token=True, masks=True)

    def student_masks(self, model, outputs):
        data, crops = outputs.data, outputs.data["global_crops"]
        masks = model.require(data, "global_masks", MASKS_HINT)
        p = model.student_backbone.patch_size
        grid = (crops.shape[2] // p, crops.shape[3] // p)
        if tuple(masks.shape[1:]) not in ((crops.shape[1],) + grid, (crops.shape[1], grid[0] * grid[1])):
            raise ValueError(
                f"global_masks has shape {tuple(masks.shape)}, expected (B, {crops.shape[1]}, {grid[0]}, {grid[1]}) "
                f"for {crops.shape[2]}-px global crops and patch size {p}; set MaskConfig(patch_size={p})."
            )
        masks = ops.reshape(crop_major(ops.cast(masks, "bool")), (-1, grid[0] * grid[1]))
        if self.start_epoch:
            masks = ops.logical_and(masks, model.schedules.epoch_at(outputs.step) >= float(self.start_epoch))
        return masks

    def loss(self, outputs, values):
        g, b = outputs.n_global, outputs.batch
        n, k = outputs.teacher["patches"].shape[1], self.out_dim
        temp = values[self.temperature_name]
        value = self.distillation(
            ops.reshape(outputs.student["patches"], (g, b, n, k)),
            ops.reshape(outputs.teacher["patches"], (g, b, n, k)),
            ops.reshape(outputs.masks, (g, b, n)),
            teacher_temp=temp,
        )
        return value, {self.log_name: value, "masked_fraction": ops.mean(ops.cast(outputs.masks, "float32"))}

    def get_config(self):
        config = super().get_config()
        config.update(start_epoch=self.start_epoch)
        return config
