"""Fine-tuning optimizer: AdamW with layer-wise learning-rate decay, warm-up, poly or cosine.

Layer-wise decay (Clark et al., "ELECTRA", ICLR 2020; used to fine-tune BEiT, iBOT and
PQCL ViTs for segmentation, Bao et al., "BEiT", ICLR 2022) scales the learning rate of a
layer with id ``i`` out of ``L + 1`` by ``layer_decay ** (L + 1 - i)``:

* ViT with ``L`` blocks: patch embedding, CLS token, position table and mask token are layer
  0; block ``j`` is layer ``j + 1``; everything else (final norm, pyramid, decoder) is layer
  ``L + 1`` and keeps the full rate.
* ResNet: the stem (conv1, bn1) is layer 0, stage ``Cs`` (s = 2..5) layer ``s - 1``, the rest
  layer 5, i.e. ``L = 4``.

Weight decay skips biases, norms and vectors (as :class:`AdamW`) and also the CLS token,
position table and mask token (BEiT's fine-tuning does not decay them).
"""

import math

import keras
from keras import ops

from keras_pqcl.optimizers.adamw import AdamW
from keras_pqcl.schedules import WarmupCosine

SCHEDULES = ("poly", "cosine")
NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token")


@keras.saving.register_keras_serializable(package="keras_pqcl")
class WarmupPoly(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up ``0 -> start`` over ``warmup_steps``, then polynomial decay
    ``end + (start - end) (1 - t / T) ** power`` with t, T counted after the warm-up
    (mmsegmentation's ``PolyLR``; power 1.0 in BEiT's segmentation, 0.9 in UperNet's)."""

    def __init__(self, start, end, total_steps, warmup_steps=0, power=1.0):
        self.start, self.end, self.power = float(start), float(end), float(power)
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = float(self.warmup_steps)
        progress = ops.clip((step - warm) / max(self.total_steps - warm, 1.0), 0.0, 1.0)
        value = self.end + (self.start - self.end) * ops.power(1.0 - progress, self.power)
        if self.warmup_steps:
            value = ops.where(step < warm, self.start * step / warm, value)
        return value

    def get_config(self):
        return dict(
            start=self.start,
            end=self.end,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            power=self.power,
        )


@keras.saving.register_keras_serializable(package="keras_pqcl")
class LayerDecayAdamW(AdamW):
    """:class:`AdamW` whose learning rate is scaled per variable.

    Args:
        lr_multipliers: ``{variable.path: multiplier}``; variables not listed get 1.0.
        no_decay: variable names (last path component) never weight-decayed, on top of
            :class:`AdamW`'s biases and vectors.
        other arguments: :class:`AdamW`.
    """

    def __init__(self, lr_multipliers=None, no_decay=NO_DECAY_NAMES, **kwargs):
        super().__init__(**kwargs)
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        self.no_decay = tuple(no_decay)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._lr_scale = [self.lr_multipliers.get(v.path, 1.0) for v in var_list]
        self._decays = [d and v.name not in self.no_decay for d, v in zip(self._decays, var_list)]

    def lr_multiplier(self, variable):
        """The multiplier of ``variable`` (from ``lr_multipliers``, else 1.0)."""
        return self.lr_multipliers.get(variable.path, 1.0)

    def update_step(self, gradient, variable, learning_rate):
        scale = self._lr_scale[self._get_variable_index(variable)]
        super().update_step(gradient, variable, learning_rate * scale if scale != 1.0 else learning_rate)

    def get_config(self):
        return {**super().get_config(), "lr_multipliers": dict(self.lr_multipliers), "no_decay": list(self.no_decay)}


def layer_ids(backbone):
    """``({variable.path: layer id}, L)`` for a ViT or ResNet backbone (see the module docstring)."""
    ids = {}
    if getattr(backbone, "pos_embed_kind", None) is not None and hasattr(backbone, "blocks"):
        depth = len(backbone.blocks)
        for v in backbone.patch_embed.weights:
            ids[v.path] = 0
        for v in (getattr(backbone, name, None) for name in NO_DECAY_NAMES):
            if v is not None:
                ids[v.path] = 0
        for j, block in enumerate(backbone.blocks):
            for v in block.weights:
                ids[v.path] = j + 1
        return ids, depth
    if hasattr(backbone, "stages") and hasattr(backbone, "conv1"):
        for layer in (backbone.conv1, backbone.bn1):
            for v in layer.weights:
                ids[v.path] = 0
        for s, blocks in enumerate(backbone.stages):
            for block in blocks:
                for v in block.weights:
                    ids[v.path] = s + 1
        return ids, len(backbone.stages)
    raise ValueError(
        f"layer-wise decay needs a keras_pqcl ViT or ResNet backbone; got {type(backbone).__name__}. Pass "
        "layer_decay=1.0 to fine-tune it with one learning rate."
    )


def layer_decay_multipliers(model, layer_decay):
    """``{variable.path: layer_decay ** (L + 1 - layer id)}`` for the backbone's variables
    (``model.backbone``, or ``model`` itself when it is the backbone)."""
    backbone = getattr(model, "backbone", model)
    ids, num_layers = layer_ids(backbone)
    paths = [v.path for v in model.trainable_variables]
    clashes = sorted({p for p in paths if paths.count(p) > 1 and p in ids})
    if clashes:
        raise ValueError(
            f"variables share the paths {clashes[:3]}, so their learning rates cannot be told apart; give the "
            "model's layers unique names."
        )
    return {path: float(layer_decay) ** (num_layers + 1 - i) for path, i in ids.items()}


def finetune_adamw(
    model,
    lr,
    layer_decay=0.65,
    weight_decay=0.05,
    warmup_steps=0,
    total_steps=None,
    schedule="poly",
    min_lr=0.0,
    power=1.0,
    beta_2=0.999,
    clip_per_tensor=None,
):
    """AdamW for fine-tuning ``model`` (a :class:`~keras_pqcl.tasks.SemanticSegmenter` or a
    bare backbone) with layer-wise learning-rate decay.

    Args:
        model: built model whose backbone is ``model.backbone`` (or the backbone itself).
        lr: peak learning rate (of the decoder; backbone layers get less).
        layer_decay: per-layer factor (0.65 in BEiT's ViT-B segmentation); 1.0 disables it.
        weight_decay: decoupled decay (0.05).
        warmup_steps: linear warm-up from 0 (BEiT: 1500).
        total_steps: length of the schedule in steps (required).
        schedule: ``"poly"`` (:class:`WarmupPoly`) or ``"cosine"`` (warm-up then cosine).
        min_lr: final learning rate.
        power: exponent of the poly schedule.
        beta_2: Adam's second-moment decay.
        clip_per_tensor: optional per-tensor gradient-norm bound (None).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}.")
    if total_steps is None or int(total_steps) <= 0:
        raise ValueError(
            f"total_steps must be a positive number of steps (epochs x steps per epoch); got {total_steps!r}."
        )
    if not 0.0 < float(layer_decay) <= 1.0 or math.isnan(float(layer_decay)):
        raise ValueError(f"layer_decay must lie in (0, 1]; got {layer_decay!r}.")
    if int(warmup_steps) >= int(total_steps):
        raise ValueError(f"warmup_steps={warmup_steps} must be smaller than total_steps={total_steps}.")
    if schedule == "poly":
        rate = WarmupPoly(lr, min_lr, total_steps, warmup_steps=warmup_steps, power=power)
    else:
        rate = WarmupCosine(lr, min_lr, total_steps, warmup_steps=warmup_steps)
    multipliers = layer_decay_multipliers(model, layer_decay) if float(layer_decay) != 1.0 else {}
    return LayerDecayAdamW(
        lr_multipliers=multipliers,
        learning_rate=rate,
        weight_decay=weight_decay,
        beta_2=beta_2,
        clip_per_tensor=clip_per_tensor,
    )
