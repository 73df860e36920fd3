"""The backbone contract: what every backbone declares and returns, and one check of it.

A backbone is a ``keras.Model`` that also declares, as attributes:

* ``pos_embed_kind``: ``"learned"`` or ``"sincos"``, the position table of a token backbone
  (:class:`~keras_pqcl.backbones.VisionTransformer`); ``None`` for a backbone without one
  (:class:`~keras_pqcl.backbones.ResNet`, whose convolutions carry position implicitly).
* ``has_mask_token``: whether it carries a learned mask token (iBOT's masked patches,
  PQCL's query tokens). Always False for a ResNet.
* ``embed_dim``: ``D``, the width of the ``"cls"`` and ``"patches"`` features below (the
  ViT's token width; the ResNet's C5 channels).
* ``patch_size``: the output stride of ``"patches"`` in pixels (the ViT's patch side; 32
  for the ResNet's C5).
* ``out_channels``: ``{name: channels}`` of the feature maps its ``call`` returns
  (``"C2".."C5"`` for the ResNet); empty for the ViT, whose ``call`` returns tokens.

and implements ``forward_features(images, training=False, n_last_blocks=1,
return_attention=False)`` for images ``(B, H, W, 3)``, returning one dict:

* ``"cls"`` ``(B, D)``: the image feature (the ViT's CLS token after the final LayerNorm;
  the ResNet's globally average-pooled C5);
* ``"patches"``: the spatial features at stride ``patch_size``: ``(B, N, D)``, N = h * w
  row-major tokens, for a token backbone; ``(B, h, w, D)``, the C5 map (sizes rounded up),
  for a convolutional one (``ndim`` tells them apart; the evaluation reshapes tokens to
  the grid);
* ``"last_blocks"``: a list of ``n_last_blocks`` tensors ``(B, 1 + N, D)``, image feature
  first and then the positions, of the last blocks (through the final LayerNorm for the
  ViT; the ResNet has one: pooled C5 then its positions), which the probes pool;
* ``"queries"`` ``(B, T, D)``: the query tokens' outputs, only from a token backbone
  given ``queries``;
* ``"attention"`` ``(B, heads, 1 + N, 1 + N)``: the last block's attention, only with
  ``return_attention=True`` (a ResNet raises a ValueError).

The methods state what they need in a :class:`~keras_pqcl.models.needs.Needs`;
:func:`check_backbone` compares the two and is called by every model constructor.
"""

import types


class Backbone:
    """Mixin naming the contract attributes (see the module docstring), with the values of
    a backbone that has neither position table nor mask token."""

    #: ``"learned"`` / ``"sincos"`` for a token backbone, None for a convolutional one.
    pos_embed_kind = None

    @property
    def has_mask_token(self):
        return getattr(self, "mask_token", None) is not None

    #: ``{feature map name: channels}`` of ``call``'s output; empty for token backbones.
    out_channels = types.MappingProxyType({})

    def forward_features(self, images, training=False, n_last_blocks=1, return_attention=False):
        raise NotImplementedError


CONTRACT = ("pos_embed_kind", "has_mask_token", "embed_dim", "patch_size", "out_channels", "forward_features")

#: The part of the contract a method of each backbone family reads, so checked: the token
#: methods read the table kind, mask token, width and patch size; the convolutional ones
#: only the feature maps (a stand-in that returns them and lists their widths will do).
READ_BY = {
    "vit": ("pos_embed_kind", "has_mask_token", "embed_dim", "patch_size"),
    "resnet": ("out_channels",),
}

#: The ViT builder the errors suggest.
_VIT_EXAMPLE = "kp.backbones.vit_small(16{})"


def check_backbone(backbone, needs, method, reasons=None):
    """Raise one ValueError naming every requirement of ``needs`` that ``backbone`` misses.

    Args:
        backbone: the student backbone given to a model.
        needs: the model's :class:`~keras_pqcl.models.needs.Needs` for its arguments.
        method: the model's name, for the message.
        reasons: optional ``{"pos_embed" | "mask_token": why}``, the model's explanation
            added to the message when that requirement is missed.
    """
    reasons = reasons or {}
    missing = [name for name in READ_BY[needs.backbone] if not hasattr(backbone, name)]
    if missing:
        raise ValueError(
            f"{method} needs a backbone that declares {', '.join(missing)} (the contract of "
            f"keras_pqcl.backbones.base); got {type(backbone).__name__}. Use kp.backbones.vit(...) or "
            "kp.backbones.resnet(...), or declare those attributes on your own backbone."
        )
    problems, fixes = [], []
    if needs.backbone == "vit" and backbone.pos_embed_kind is None:
        problems.append("a Vision Transformer (CLS and patch tokens with a position table)")
        fixes.append(f"build it with {_VIT_EXAMPLE.format('')}")
    if needs.backbone == "resnet":
        absent = [name for name in needs.feature_maps if name not in dict(backbone.out_channels or {})]
        if absent:
            problems.append(
                f"a backbone that returns a dict with {', '.join(map(repr, absent))} and lists its widths in "
                "`out_channels`"
            )
            fixes.append("use a ResNet, e.g. kp.backbones.resnet50()")
    if needs.backbone == "vit" and backbone.pos_embed_kind is not None:
        if needs.pos_embed is not None and backbone.pos_embed_kind != needs.pos_embed:
            problems.append(f"pos_embed={needs.pos_embed!r} (got {backbone.pos_embed_kind!r})")
            fixes.append(f"build the backbone with pos_embed={needs.pos_embed!r}" + _why(reasons, "pos_embed"))
        if needs.mask_token and not backbone.has_mask_token:
            problems.append("a mask token")
            fixes.append(
                f"build it with use_mask_token=True, e.g. {_VIT_EXAMPLE.format(', use_mask_token=True')}"
                + _why(reasons, "mask_token")
            )
    if problems:
        raise ValueError(f"{method} needs {' and '.join(problems)}; {'; '.join(fixes)}.")


def _why(reasons, requirement):
    return f" ({reasons[requirement]})" if reasons.get(requirement) else ""
