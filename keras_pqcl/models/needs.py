"""What a method needs from its backbone and its batches, declared by the method itself.

Every model class answers :meth:`~keras_pqcl.models.SelfSupervisedModel.needs` from its
constructor arguments alone, before anything is built. The training runner builds the
backbone and the data pipeline from that answer, and the model's constructor checks the
backbone it is given against the same answer
(:func:`keras_pqcl.backbones.check_backbone`), so the two cannot disagree.

The answers read the constructors' own defaults (the self-distillation methods through the
loss terms their arguments build; DenseCL and MCL through :func:`constructor_arguments`):
change a default in a model and what the runner builds follows.
"""

import dataclasses
import inspect
from typing import Optional, Tuple

BACKBONE_FAMILIES = ("vit", "resnet")
BATCH_KINDS = ("multicrop", "montage")


@dataclasses.dataclass(frozen=True)
class Needs:
    """The requirements of one configured method.

    Attributes:
        backbone: ``"vit"``: a token backbone (CLS and patch tokens, a position table;
            :class:`~keras_pqcl.backbones.VisionTransformer`); ``"resnet"``: a convolutional
            backbone returning named feature maps (:class:`~keras_pqcl.backbones.ResNet`).
        mask_token: the student backbone must carry a learned mask token
            (``use_mask_token=True``).
        pos_embed: the position table the backbone must have (``"sincos"``), or None when
            any table will do (the runner then builds the ViT's default, ``"learned"``).
        feature_maps: names of the feature maps the method reads from the backbone's call
            (``"C5"``...); each must be listed in the backbone's ``out_channels``.
        masks: every batch carries ``"global_masks"`` (iBOT's masked image modelling).
        queries: every batch carries ``"query_coords"`` (positional queries).
        batches: ``"multicrop"`` (:func:`keras_pqcl.data.pretrain_dataset`) or ``"montage"``
            (:func:`keras_pqcl.data.mcl_dataset`).
    """

    backbone: str = "vit"
    mask_token: bool = False
    pos_embed: Optional[str] = None
    feature_maps: Tuple[str, ...] = ()
    masks: bool = False
    queries: bool = False
    batches: str = "multicrop"

    def __post_init__(self):
        if self.backbone not in BACKBONE_FAMILIES:
            raise ValueError(f"Needs.backbone must be one of {BACKBONE_FAMILIES}, got {self.backbone!r}.")
        if self.batches not in BATCH_KINDS:
            raise ValueError(f"Needs.batches must be one of {BATCH_KINDS}, got {self.batches!r}.")


def combine(needs):
    """One :class:`Needs` meeting all of ``needs`` (the terms' of one model): a mask token or
    batch entry that any needs; the one position table any requires (two different ones
    raise a ValueError)."""
    needs = list(needs)
    tables = {n.pos_embed for n in needs if n.pos_embed is not None}
    if len(tables) > 1:
        raise ValueError(f"The loss terms need different position tables: {sorted(tables)}.")
    return Needs(
        backbone="vit",
        mask_token=any(n.mask_token for n in needs),
        pos_embed=tables.pop() if tables else None,
        masks=any(n.masks for n in needs),
        queries=any(n.queries for n in needs),
    )


def constructor_arguments(cls, given):
    """``cls``'s constructor arguments besides the backbone: those of ``given`` that it names,
    the others at their defaults. Read from the live signature, so a method's ``needs`` cannot
    drift from what its constructor does."""
    parameters = inspect.signature(cls.__init__).parameters
    defaults = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **{name: value for name, value in given.items() if name in parameters}}
