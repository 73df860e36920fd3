"""Import ViT backbones from PyTorch DINO, iBOT, PQCL and DINOv2 checkpoints.

The key names and tensor layouts are those of the official repositories:
facebookresearch/dino (Caron et al., ICCV 2021), bytedance/ibot (Zhou et al., ICLR 2022),
Sherrylone/PQCL (Zhang et al., ICML 2023) and facebookresearch/dinov2 (Oquab et al., TMLR
2024), which all share the timm/DeiT ViT naming (DINOv2 adds ``ls1``/``ls2`` LayerScale,
``register_tokens``, ``mask_token`` and the SwiGLU ``mlp.w12``/``mlp.w3``), and the Hugging
Face ``Dinov2Model`` layout (separate query/key/value), which is renamed to the former first.
This module only reads their checkpoints; it contains no code from them.

torch is imported only when a ``.pth`` path is given and ``safetensors`` only for a
``.safetensors`` path, so the library imports without either.
"""

import argparse
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping

import numpy as np

from keras_pqcl.backbones.vit import DINOV2_PRESETS, POS_EMBED_KINDS, VIT_PRESETS, VisionTransformer
from keras_pqcl.layers.pos_embed import sincos_grid
from keras_pqcl.layers.swiglu import swiglu_hidden_dim

TORCH_PIN = "torch==2.13.0"
SAFETENSORS_SUFFIX = ".safetensors"

_logger = logging.getLogger(__name__)

# Sub-dicts of a training checkpoint that may hold one network's weights, in the order
# key=None tries them: the teacher is what the papers evaluate, and the generic wrappers of
# released weights hold a teacher too.
CONTAINER_KEYS = ("teacher", "state_dict", "model", "student")
# Generic wrappers hold a single network, so using one when "teacher" was asked for cannot
# silently pick the student: released teacher-only weights come wrapped like that.
_GENERIC_CONTAINERS = ("state_dict", "model")
# DistributedDataParallel adds "module.", MultiCropWrapper adds "backbone."; either order.
# Hugging Face task models keep the backbone under "dinov2.".
_WRAPPER_PREFIXES = ("module.", "backbone.", "dinov2.")
# Projection heads (DINOHead/iBOTHead keys, standalone or under "head."/"head2."; DINOv2's
# "dino_head."/"ibot_head."; a Hugging Face "classifier."): not part of the backbone, so
# they are dropped rather than reported as unexpected.
_HEAD_KEY = re.compile(r"^(head\d*|last_layer\d*|mlp|dino_head|ibot_head|classifier)(\.|$)")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
# DINOv2 training checkpoints (block_chunks > 0) nest blocks as blocks.{chunk}.{index}.
_CHUNKED_BLOCK_KEY = re.compile(r"^blocks\.\d+\.(\d+)\.")
_ARCH_PREFIXES = ("vit_", "deit_", "pos_")
# DINOv2's hub names (dinov2_vits14, dinov2_vitg14_reg, ...) -> the presets here.
_DINOV2_HUB_NAMES = {"vits14": "small14", "vitb14": "base14", "vitl14": "large14", "vitg14": "giant14"}
# Position-table resampling (offset, antialias) of the released models when the caller does not
# say: DINO/iBOT/PQCL and DINOv2 without registers use scale factor (out + 0.1) / in;
# DINOv2 with registers and Hugging Face's Dinov2Model resample by size with antialiasing.
_V1_RESAMPLING = (0.1, False)
_REGISTER_RESAMPLING = (0.0, True)
# Hugging Face Dinov2Model names -> official names; q/k/v are fused separately.
_HF_RENAMES = (
    (re.compile(r"^embeddings\.cls_token$"), "cls_token"),
    (re.compile(r"^embeddings\.mask_token$"), "mask_token"),
    (re.compile(r"^embeddings\.register_tokens$"), "register_tokens"),
    (re.compile(r"^embeddings\.position_embeddings$"), "pos_embed"),
    (re.compile(r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$"), r"patch_embed.proj.\1"),
    (re.compile(r"^encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)$"), r"blocks.\1.norm\2.\3"),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$"), r"blocks.\1.attn.proj.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$"), r"blocks.\1.ls\2.gamma"),
    (re.compile(r"^encoder\.layer\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"blocks.\1.mlp.\2.\3"),
    (re.compile(r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.(weight|bias)$"), r"blocks.\1.mlp.w12.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.(weight|bias)$"), r"blocks.\1.mlp.w3.\2"),
    (re.compile(r"^layernorm\.(weight|bias)$"), r"norm.\1"),
)
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
_BLOCK_PARAMS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)
# PQCL's PosVisionTransformer builds a model-level LayerNorm ``norm2`` and a spare transformer
# block ``query_block`` that its forward pass never calls; its training checkpoints and extracted
# backbones still carry their weights. They are dropped by these exact root-level names only:
# ``blocks.{i}.norm2.*`` is each block's own (used) second LayerNorm, and any other unknown key
# stays an error under strict=True.
_PQCL_UNUSED_KEYS = frozenset(["norm2.weight", "norm2.bias"] + [f"query_block.{param}" for param in _BLOCK_PARAMS])
# Backbone arguments that come from the checkpoint and ``arch``, not from ``**kwargs``.
_DERIVED_ARGS = (
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "pos_embed",
    "image_size",
    "layer_scale_init",
    "num_register_tokens",
    "ffn",
)


def load_torch_checkpoint(
    path_or_state_dict,
    arch="vit_small",
    patch_size=16,
    key="teacher",
    image_size=224,
    pos_embed=None,
    strict=True,
    weights_only=True,
    interpolate_offset=None,
    interpolate_antialias=None,
    **kwargs,
):
    """Build a Keras :class:`VisionTransformer` holding a PyTorch DINO/iBOT/PQCL/DINOv2 ViT.

    Supported layouts (after loading, the top level is a dict):

    * a plain backbone state dict, e.g. DINO's released ``dino_deitsmall16_pretrain.pth``;
    * a training checkpoint whose ``"teacher"``, ``"student"``, ``"model"`` or
      ``"state_dict"`` entry holds the network (DINO/iBOT/PQCL ``checkpoint.pth`` also keep
      ``optimizer``, ``epoch``, ``args``..., which are ignored);
    * keys with ``module.`` (DistributedDataParallel) and/or ``backbone.`` (the multi-crop
      wrapper) prefixes, which are stripped;
    * projection-head keys (``head.*``, ``head2.*``, ``last_layer*``, top-level ``mlp.*``)
      are dropped;
    * PQCL's unused top-level ``norm2.weight``/``norm2.bias`` and ``query_block.*`` (a
      LayerNorm and a transformer block its ``PosVisionTransformer`` builds but never
      calls) are dropped, with one ``logging`` INFO line giving their count;
    * DINOv2 (official ``.pth``, e.g. ``dinov2_vits14_reg4_pretrain.pth``, or a training
      checkpoint's teacher): ``blocks.{i}.ls1.gamma``/``ls2.gamma`` (LayerScale),
      ``register_tokens`` ``(1, R, D)``, ``mask_token`` ``(1, D)``, the SwiGLU
      ``blocks.{i}.mlp.w12`` ``(2H', D)`` / ``mlp.w3`` ``(D, H')`` of ViT-g, chunked
      ``blocks.{chunk}.{i}.*`` names, ``dino_head.*``/``ibot_head.*`` dropped;
    * Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (``.safetensors`` file
      or dict): ``embeddings.*``, ``encoder.layer.{i}.attention.attention.query/key/value``
      (fused into qkv in that order), ``attention.output.dense``, ``layer_scale1.lambda1``,
      ``mlp.weights_in/weights_out`` (SwiGLU), ``layernorm.*``; a ``dinov2.`` prefix and a
      ``classifier.*`` head are dropped.

    The architecture options are read from the weights: LayerScale from ``ls1``/``ls2``,
    the register count from ``register_tokens``, the FFN from ``mlp.w12``.

    Backbone keys and PyTorch shapes (``D`` width, ``p`` patch, ``N`` patches, ``H`` MLP
    hidden width)::

        cls_token                     (1, 1, D)
        pos_embed                     (1, 1 + N, D)  learned, or PQCL's fixed sin-cos table
        patch_embed.proj.weight/bias  (D, 3, p, p) / (D,)      -> Conv2D kernel (p, p, 3, D)
        blocks.{i}.norm1.weight/bias  (D,)
        blocks.{i}.attn.qkv.weight/bias   (3D, D) / (3D,)      -> Dense kernel (D, 3D)
        blocks.{i}.attn.proj.weight/bias  (D, D) / (D,)
        blocks.{i}.norm2.weight/bias  (D,)
        blocks.{i}.mlp.fc1.weight/bias    (H, D) / (H,)
        blocks.{i}.mlp.fc2.weight/bias    (D, H) / (D,)
        norm.weight/bias              (D,)
        masked_embed / mask_token     (1, D)  optional: iBOT/PQCL / DINOv2 mask token
        register_tokens               (1, R, D)  optional: DINOv2 registers
        blocks.{i}.ls1.gamma, ls2.gamma   (D,)   optional: DINOv2 LayerScale
        blocks.{i}.mlp.w12.weight/bias    (2H', D) / (2H',)  instead of fc1/fc2: SwiGLU,
        blocks.{i}.mlp.w3.weight/bias     (D, H') / (D,)     H' = swiglu_hidden_dim(H)

    Linear weights are transposed (torch stores ``(out, in)``, Keras ``(in, out)``); the
    fused qkv output order ``(3, heads, head_dim)`` is the same in both, so no reshuffle.

    Args:
        path_or_state_dict: path to a ``.pth``/``.pt`` file (needs torch), a ``.safetensors``
            file (needs ``safetensors``) or an already loaded dict of NumPy arrays or torch
            tensors, in any layout above.
        arch: ``"vit_tiny"``, ``"vit_small"``, ``"vit_base"`` or ``"vit_large"`` (the
            prefixes ``deit_`` (DINO) and ``pos_`` (PQCL), or none, are accepted too), a
            DINOv2 preset (``"vit_small14"``, ..., ``"vit_giant14_reg"``, or DINOv2's hub
            names ``"dinov2_vits14"``, ``"dinov2_vitg14_reg"``), or a
            dict of backbone sizes with at least ``num_heads`` (``embed_dim`` and ``depth``
            default to the checkpoint's and are checked if given). The head count cannot be
            read from the weights, hence this argument; depth and width are read and must
            agree with it.
        patch_size: expected patch size, checked against the patch-embedding kernel;
            ``None`` takes the checkpoint's.
        key: which network of a training checkpoint to load. ``"teacher"`` (default, the
            weights the papers evaluate) falls back to a ``"state_dict"``/``"model"``
            wrapper when there is no teacher entry. ``None`` picks the first present of
            teacher, state_dict, model, student. Ignored for plain backbone state dicts.
        image_size: the size the position table was made for; must agree with the number of
            rows of ``pos_embed`` (``(image_size / p) ** 2 + 1``). ``None`` infers it. Other
            input sizes still work: the backbone resamples the table at call time.
        pos_embed: ``"learned"`` (DINO, iBOT), ``"sincos"`` (PQCL's fixed table, stored
            non-trainable) or ``None`` to detect: a table equal to the library's own
            sin-cos table (to 1e-5) is taken as sin-cos.
        strict: raise on missing backbone keys and on unexpected non-head keys; with
            ``False`` they are reported in a warning, missing weights keep their
            initialisation and unexpected ones are ignored.
        weights_only: passed to ``torch.load``. Keep ``True`` unless the file is trusted:
            ``argparse.Namespace`` (the ``args`` entry of training checkpoints) is allowed
            anyway.
        interpolate_offset, interpolate_antialias: how the position table is resampled for
            other input sizes (see :class:`VisionTransformer`). ``None`` takes the reference
            of the layout: ``(0, True)`` for the Hugging Face layout (as ``transformers``'
            ``Dinov2Model``); otherwise a named DINOv2 ``arch`` preset's own values, else
            ``(0.1, False)`` for DINO/iBOT/PQCL and DINOv2 without registers and ``(0, True)``
            for DINOv2 with registers (as its hub models).
        **kwargs: other :class:`VisionTransformer` arguments (``name``, ``dtype``,
            ``drop_path_rate``, ``use_mask_token`` to add a zero mask token when the
            checkpoint has none).

    Raises:
        ValueError: one line naming the missing and unexpected keys (``strict=True``),
            a shape that does not fit, or an ``arch`` that disagrees with the weights.
        ImportError: a ``.pth`` without torch or a ``.safetensors`` without
            ``safetensors``, with the ``pip install`` command.

    Returns:
        A built :class:`VisionTransformer` whose ``"cls"`` ``(B, D)`` and ``"patches"``
        ``(B, N, D)`` outputs on NHWC images equal the PyTorch model's on the NCHW ones.
        It has a mask token iff the checkpoint has ``masked_embed``/``mask_token`` (or one was
        asked for).

    Example:
    >>> backbone = load_torch_checkpoint("dino_deitsmall16.pth")  # doctest: +SKIP
    """
    checkpoint = _read(path_or_state_dict, weights_only)
    raw = _select(checkpoint, key)
    state, hugging_face = _backbone_entries(raw)
    geometry = _geometry(state)
    dim, depth = geometry["dim"], geometry["depth"]
    config, name, preset = _resolve_arch(arch, dim, depth)
    _check_preset_options(preset, geometry, arch)

    p = geometry["patch_size"]
    if p is None:
        p = patch_size or 16
    elif patch_size is not None and patch_size != p:
        raise ValueError(
            f"The checkpoint's patch embedding is {p}x{p} (patch_embed.proj.weight "
            f"{geometry['patch_shape']}); patch_size={patch_size} was given. Pass "
            f"patch_size={p} (or None to read it from the checkpoint)."
        )

    grid = geometry["grid"]
    if grid is None:
        image_size = image_size or 224
    else:
        native = grid * p
        if image_size is None:
            image_size = native
        elif image_size != native:
            raise ValueError(
                f"The checkpoint's pos_embed holds {grid * grid} patch positions, a "
                f"{grid}x{grid} grid, i.e. image_size={native} with patch size {p}; got "
                f"image_size={image_size}. Pass image_size={native} (or None to infer it); "
                f"the backbone resamples the table for {image_size}-pixel inputs at call time."
            )

    kind = _pos_embed_kind(pos_embed, state.get("pos_embed"), grid, dim)
    _check_keys(state, geometry, strict)
    offset, antialias = _resampling(preset, geometry, hugging_face, interpolate_offset, interpolate_antialias)

    clash = sorted(set(kwargs) & set(_DERIVED_ARGS))
    if clash:
        raise TypeError(
            f"{clash} come from the checkpoint and the arch/patch_size/image_size/pos_embed "
            "arguments; remove them from the keyword arguments."
        )
    mlp_ratio = _mlp_ratio(geometry, dim)
    use_mask_token = bool(kwargs.pop("use_mask_token", False)) or _mask_key(state) is not None
    kwargs.setdefault("name", name)
    backbone = VisionTransformer(
        patch_size=p,
        mlp_ratio=mlp_ratio,
        qkv_bias=geometry["qkv_bias"],
        pos_embed=kind,
        image_size=image_size,
        use_mask_token=use_mask_token,
        # The value only initialises; the checkpoint's gains replace it.
        layer_scale_init=1e-5 if geometry["layer_scale"] else None,
        num_register_tokens=geometry["registers"],
        ffn=geometry["ffn"],
        interpolate_offset=offset,
        interpolate_antialias=antialias,
        **config,
        **kwargs,
    )
    _assign(backbone, state, dim, p, geometry["hidden"])
    return backbone


# ----------------------------------------------------------------------------- reading
def _read(source, weights_only):
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"load_torch_checkpoint expects a path to a .pth/.pt file or a dict of arrays, got {type(source).__name__}."
        )
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path!r}.")
    if path.lower().endswith(SAFETENSORS_SUFFIX):
        return _read_safetensors(path)
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"Reading the PyTorch checkpoint {path!r} needs torch, which is not installed. "
            f"Install it with `pip install {TORCH_PIN}` (the CPU build is enough), or load "
            "the file elsewhere and pass a dict of NumPy arrays instead of a path."
        ) from err
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        if weights_only and safe is not None:
            # DINO/iBOT/PQCL training checkpoints pickle their argparse options; a
            # Namespace is plain data, so allowing it keeps the safe loader usable.
            with safe([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ...
        hint = (
            " The file holds Python objects the safe loader refuses; if you trust it, pass weights_only=False."
            if weights_only
            else ""
        )
        raise ValueError(f"torch.load could not read {path!r}: {err}.{hint}") from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"{path!r} holds a {type(checkpoint).__name__}, not a dict; save the model's "
            "state_dict() (torch.save(model.state_dict(), path)) rather than the module."
        )
    return checkpoint


def _read_safetensors(path):
    try:
        from safetensors.numpy import load_file
    except ImportError as err:
        raise ImportError(
            f"Reading the safetensors file {path!r} needs the safetensors package, which is not "
            "installed. Install it with `pip install safetensors`, or load the file elsewhere "
            "and pass a dict of NumPy arrays instead of a path."
        ) from err
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError, OSError, ...
        raise ValueError(
            f"safetensors could not read {path!r}: {err}. Is it a complete .safetensors file "
            "(bfloat16 weights need the torch loader: save them as float32)?"
        ) from err


def _strip_prefixes(name):
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                stripped = True
    return name


def _is_backbone(entries):
    for name in entries:
        if not isinstance(name, str):
            continue
        name = _strip_prefixes(name)
        if name in ("cls_token", "pos_embed") or name.startswith(("blocks.", "patch_embed.")):
            return True
        if name.startswith(("embeddings.", "encoder.layer.")):  # Hugging Face
            return True
    return False


def _select(checkpoint, key, _depth=0):
    if _is_backbone(checkpoint):
        return checkpoint
    subdicts = [k for k, v in checkpoint.items() if isinstance(v, Mapping)]
    if key is not None and isinstance(checkpoint.get(key), Mapping):
        chosen = key
    else:
        if key is None:
            candidates = CONTAINER_KEYS
        elif key == "teacher":
            candidates = _GENERIC_CONTAINERS
        else:
            candidates = ()
        chosen = next((c for c in candidates if c in subdicts), None)
        if chosen is None:
            others = [k for k in checkpoint if k not in subdicts]
            raise ValueError(
                f"The checkpoint has no {key!r} entry holding ViT weights. Sub-dicts present: "
                f"{_preview(subdicts)}; other entries: {_preview(others)}. Pass key= one of "
                f"the sub-dicts{f' (e.g. key={subdicts[0]!r})' if subdicts else ''}, or "
                f"key=None to pick the first present of {list(CONTAINER_KEYS)}."
            )
    if _depth < 2 and not _is_backbone(checkpoint[chosen]):
        return _select(checkpoint[chosen], key, _depth + 1)
    if not _is_backbone(checkpoint[chosen]):
        raise ValueError(
            f"The checkpoint entry {chosen!r} holds no ViT backbone weights (no cls_token, "
            f"pos_embed, patch_embed.* or blocks.* keys); its keys: "
            f"{_preview(list(checkpoint[chosen]))}."
        )
    return checkpoint[chosen]


def _preview(names, limit=10):
    names = [str(n) for n in names]
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{', '.join(names[:limit])}{more}]" if names else "none"


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor; torch itself need not be imported here
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # NumPy has no bfloat16
        value = value.numpy()
    return np.asarray(value)


def _from_hugging_face(state):
    """Hugging Face ``Dinov2Model`` names -> official ones, q/k/v fused into qkv (in that
    order, the layout of DINOv2's fused projection). Unknown names pass through unchanged,
    to be reported as unexpected."""
    renamed, parts = {}, {}
    for name, value in state.items():
        match = _HF_QKV.match(name)
        if match:
            index, which, kind = match.groups()
            parts.setdefault((index, kind), {})[which] = (name, value)
            continue
        for pattern, target in _HF_RENAMES:
            if pattern.match(name):
                name = pattern.sub(target, name)
                break
        renamed[name] = value
    for (index, kind), found in parts.items():
        if len(found) < 3:
            # Left under their own names: the key check lists them as unexpected and the
            # fused blocks.{i}.attn.qkv.* as missing.
            renamed.update(dict(found.values()))
            continue
        values = [found[which][1] for which in ("query", "key", "value")]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) != 1:
            raise ValueError(
                f"encoder.layer.{index}.attention.attention query/key/value {kind}s have different shapes "
                f"{[tuple(v.shape) for v in values]}; the checkpoint is not a Dinov2Model."
            )
        renamed[f"blocks.{index}.attn.qkv.{kind}"] = np.concatenate(values, axis=0)
    return renamed


def _backbone_entries(raw):
    """Prefix-free backbone entries as NumPy arrays in the official names, and whether the
    layout was Hugging Face's; head keys and PQCL's unused ``norm2``/``query_block`` weights
    dropped (the latter logged)."""
    state, unused = {}, []
    for original, value in raw.items():
        if not isinstance(original, str):
            continue
        name = _strip_prefixes(original)
        chunked = _CHUNKED_BLOCK_KEY.match(name)
        if chunked:
            name = f"blocks.{chunked.group(1)}." + name[chunked.end() :]
        if _HEAD_KEY.match(name):
            continue
        if name in _PQCL_UNUSED_KEYS:
            unused.append(name)
            continue
        if name in state:
            raise ValueError(
                f"Two checkpoint keys map to {name!r} once module./backbone. prefixes are "
                f"removed (one is {original!r}); pass the sub-dict of one network only."
            )
        state[name] = _to_numpy(value)
    if unused:
        prefixes = sorted({name.split(".")[0] + "." for name in unused})
        _logger.info(
            "load_torch_checkpoint: dropped %d weights of PQCL's unused modules (%s*): its "
            "forward pass never calls them.",
            len(unused),
            "*, ".join(prefixes),
        )
    hugging_face = any(name.startswith(("embeddings.", "encoder.layer.", "layernorm.")) for name in state)
    if hugging_face:
        state = _from_hugging_face(state)
    return state, hugging_face


# ------------------------------------------------------------------------ architecture
def _geometry(state):
    dim = None
    for name, axis in (
        ("cls_token", -1),
        ("patch_embed.proj.weight", 0),
        ("pos_embed", -1),
        ("norm.weight", 0),
    ):
        if name in state:
            dim = int(state[name].shape[axis])
            break
    if dim is None:
        raise ValueError(
            "Could not find the ViT width: none of cls_token, patch_embed.proj.weight, "
            f"pos_embed, norm.weight is present. Keys: {_preview(sorted(state))}."
        )
    indices = {int(m.group(1)) for m in map(_BLOCK_KEY.match, state) if m}
    depth = max(indices) + 1 if indices else 0

    patch, patch_shape = None, None
    if "patch_embed.proj.weight" in state:
        patch_shape = tuple(state["patch_embed.proj.weight"].shape)
        if len(patch_shape) != 4 or patch_shape[2] != patch_shape[3] or patch_shape[1] != 3:
            raise ValueError(
                f"patch_embed.proj.weight has shape {patch_shape}; expected a square RGB Conv2d kernel (D, 3, p, p)."
            )
        patch = patch_shape[-1]

    grid = None
    if "pos_embed" in state:
        rows = int(np.prod(state["pos_embed"].shape)) // dim - 1
        grid = math.isqrt(max(rows, 0))
        if grid * grid != rows:
            raise ValueError(
                f"pos_embed has {rows} patch rows (shape {tuple(state['pos_embed'].shape)}), "
                "not a square grid plus one CLS row; only square position tables are supported."
            )

    # SwiGLU (DINOv2's ViT-g) replaces fc1/fc2 by w12/w3; w12 holds gate and value.
    ffn = "swiglu" if any(f"blocks.{i}.mlp.w12.weight" in state for i in indices) else "mlp"
    hidden = None
    first = f"blocks.{min(indices)}." if indices else None
    if first and ffn == "mlp" and first + "mlp.fc1.weight" in state:
        hidden = int(state[first + "mlp.fc1.weight"].shape[0])
    elif first and ffn == "swiglu" and first + "mlp.w12.weight" in state:
        hidden = int(state[first + "mlp.w12.weight"].shape[0]) // 2
    qkv_bias = True
    if indices:
        qkv_bias = any(f"blocks.{i}.attn.qkv.bias" in state for i in indices)
    registers = 0
    if "register_tokens" in state:
        shape = tuple(state["register_tokens"].shape)
        if len(shape) != 3 or shape[0] != 1 or shape[2] != dim:
            raise ValueError(f"register_tokens has shape {shape}; a ViT of width {dim} needs (1, R, {dim}).")
        registers = shape[1]
    return dict(
        dim=dim,
        depth=depth,
        patch_size=patch,
        patch_shape=patch_shape,
        grid=grid,
        hidden=hidden,
        qkv_bias=qkv_bias,
        ffn=ffn,
        layer_scale=any(f"blocks.{i}.ls1.gamma" in state or f"blocks.{i}.ls2.gamma" in state for i in indices),
        registers=registers,
    )


def _mlp_ratio(geometry, dim):
    """The ``mlp_ratio`` whose FFN has the checkpoint's hidden width."""
    hidden = geometry["hidden"]
    if not hidden:
        return 4.0
    if geometry["ffn"] == "swiglu":
        # DINOv2's rule maps the MLP width 4 * dim to the SwiGLU width; try it first, then
        # the ratio whose two thirds give the width exactly.
        for ratio in (4.0, hidden * 1.5 / dim):
            if swiglu_hidden_dim(int(dim * ratio)) == hidden:
                return ratio
        raise ValueError(
            f"SwiGLU width {hidden} (mlp.w12 has 2 x {hidden} outputs) is not DINOv2's rounding of "
            f"two thirds of an MLP width (a multiple of 8); the checkpoint is not a DINOv2 ViT."
        )
    ratio = hidden / dim
    if int(dim * ratio) != hidden:  # the backbone rounds dim * ratio down
        raise ValueError(f"MLP width {hidden} is not representable as {dim} * mlp_ratio.")
    return ratio


def _mask_key(state):
    """The mask token's name: iBOT/PQCL ``masked_embed`` or DINOv2 ``mask_token``."""
    return next((name for name in ("masked_embed", "mask_token") if name in state), None)


def _resampling(preset, geometry, hugging_face, offset, antialias):
    """``(interpolate_offset, interpolate_antialias)``: the caller's, else the reference of the
    layout: ``transformers``' for Hugging Face weights, else the named DINOv2 preset's, else
    DINOv2's hub models' (by registers) or DINO's (see ``_V1_RESAMPLING``)."""
    if hugging_face:
        default = _REGISTER_RESAMPLING
    elif preset is not None and preset in DINOV2_PRESETS:
        default = (
            DINOV2_PRESETS[preset].get("interpolate_offset", 0.1),
            DINOV2_PRESETS[preset].get("interpolate_antialias", False),
        )
    elif geometry["registers"]:
        default = _REGISTER_RESAMPLING
    else:
        default = _V1_RESAMPLING
    return (
        default[0] if offset is None else offset,
        default[1] if antialias is None else bool(antialias),
    )


def _check_preset_options(preset, geometry, arch):
    """A named DINOv2 preset must agree with the weights on registers and FFN."""
    if preset is None or preset not in DINOV2_PRESETS:
        return
    options = DINOV2_PRESETS[preset]
    wanted = (options.get("num_register_tokens", 0), options.get("ffn", "mlp"))
    found = (geometry["registers"], geometry["ffn"])
    if wanted != found:
        fix = preset[: -len("_reg")] if preset.endswith("_reg") else preset + "_reg"
        raise ValueError(
            f"arch={arch!r} has {wanted[0]} register tokens and a {wanted[1]} FFN; the checkpoint has "
            f"{found[0]} register tokens and a {found[1]} FFN. Pass arch={fix!r} if that matches, or "
            f"arch=dict(embed_dim={geometry['dim']}, depth={geometry['depth']}, num_heads=...)."
        )


def _preset_for(dim, depth):
    for name, preset in VIT_PRESETS.items():
        if preset["embed_dim"] == dim and preset["depth"] == depth:
            return name
    return None


def _resolve_arch(arch, dim, depth):
    """Backbone sizes from ``arch``, checked against the checkpoint's depth and width."""
    if isinstance(arch, Mapping):
        config = dict(arch)
        unknown = sorted(set(config) - {"embed_dim", "depth", "num_heads"})
        if unknown or "num_heads" not in config:
            raise ValueError(f"arch as a dict takes num_heads (required), embed_dim and depth; got {sorted(config)}.")
        config.setdefault("embed_dim", dim)
        config.setdefault("depth", depth)
        name = "vit"
        preset = None
        label = f"arch={dict(arch)!r}"
    else:
        name = _preset_name(str(arch))
        if name not in VIT_PRESETS:
            raise ValueError(
                f"Unknown arch {arch!r}; choose one of {sorted(VIT_PRESETS)} (deit_/pos_ "
                "prefixes and DINOv2's dinov2_vits14[_reg] names accepted) or pass a dict such as "
                "dict(embed_dim=384, depth=12, num_heads=6)."
            )
        preset = name
        # Only the sizes: the DINOv2 options are read from the weights.
        config = {k: VIT_PRESETS[name][k] for k in ("embed_dim", "depth", "num_heads")}
        label = f"arch={arch!r}"
    differences = []
    if config["depth"] != depth:
        differences.append(f"depth {depth} vs {config['depth']}")
    if config["embed_dim"] != dim:
        differences.append(f"width {dim} vs {config['embed_dim']}")
    if differences:
        inferred = _preset_for(dim, depth)
        if inferred:
            described, fix = f" ({inferred})", f"Pass arch={inferred!r}."
        else:
            described = " (no preset has this size)"
            fix = (
                f"Pass arch=dict(embed_dim={dim}, depth={depth}, num_heads=...) (the "
                "presets use one head per 64 channels)."
            )
        raise ValueError(
            f"The checkpoint has {depth} blocks of width {dim}{described}; {label} expects "
            f"{config['depth']} x {config['embed_dim']} (checkpoint vs arch: "
            f"{', '.join(differences)}). {fix}"
        )
    if dim % config["num_heads"]:
        raise ValueError(f"Width {dim} is not divisible by num_heads={config['num_heads']}.")
    return config, name, preset


def _preset_name(name):
    if name.startswith("dinov2_"):
        base, _, suffix = name[len("dinov2_") :].partition("_")
        if base in _DINOV2_HUB_NAMES and suffix in ("", "reg", "reg4"):
            return f"vit_{_DINOV2_HUB_NAMES[base]}" + ("_reg" if suffix else "")
    for prefix in _ARCH_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return f"vit_{name}"


def _pos_embed_kind(requested, table, grid, dim):
    if requested is not None and requested not in POS_EMBED_KINDS:
        raise ValueError(f"pos_embed must be None or one of {POS_EMBED_KINDS}, got {requested!r}.")
    if table is None or grid is None:
        return requested or "learned"
    gap = np.inf
    if dim % 4 == 0:
        reference = sincos_grid(grid, grid, dim)
        gap = float(np.max(np.abs(table.reshape(-1, dim).astype(np.float64) - reference)))
    is_sincos = gap <= 1e-5
    if requested is None:
        return "sincos" if is_sincos else "learned"
    if requested == "sincos" and not is_sincos:
        raise ValueError(
            "pos_embed='sincos' was asked for, but the checkpoint's table is not the fixed "
            f"2-D sin-cos table (max difference {gap:.3g}); it was learned (DINO/iBOT). Pass "
            "pos_embed='learned' or None."
        )
    return requested


def _expected_keys(geometry):
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    if geometry["registers"]:
        keys.append("register_tokens")
    params = list(_BLOCK_PARAMS)
    if geometry["ffn"] == "swiglu":
        params = [p for p in params if not p.startswith("mlp.")]
        params += ["mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias"]
    if geometry["layer_scale"]:
        params += ["ls1.gamma", "ls2.gamma"]
    for i in range(geometry["depth"]):
        for param in params:
            if param == "attn.qkv.bias" and not geometry["qkv_bias"]:
                continue
            keys.append(f"blocks.{i}.{param}")
    return keys + ["norm.weight", "norm.bias"]


def _check_keys(state, geometry, strict):
    expected = _expected_keys(geometry)
    missing = [k for k in expected if k not in state]
    known = set(expected) | {"masked_embed", "mask_token"}
    unexpected = [k for k in state if k not in known]
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing backbone keys: {_preview(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
    report = "; ".join(parts)
    if strict:
        raise ValueError(
            f"The checkpoint does not match a DINO/iBOT/PQCL/DINOv2 ViT: {report} (names after "
            "removing module./backbone. prefixes and head keys, in the official layout; Hugging Face "
            "names are renamed to it first). Check key= and the file, "
            "or pass strict=False to keep initial values for missing weights and ignore "
            "unexpected ones."
        )
    warnings.warn(
        f"load_torch_checkpoint(strict=False): {report}. Missing weights keep their "
        "initialisation; unexpected keys are ignored.",
        stacklevel=3,
    )


# --------------------------------------------------------------------------- assigning
def _linear(weight):
    return weight.T


def _conv(weight):
    # torch Conv2d (out, in, kh, kw) -> Keras channels-last Conv2D (kh, kw, in, out).
    return weight.transpose(2, 3, 1, 0)


def _assign(backbone, state, dim, patch, hidden):
    if hidden is None and backbone.blocks:
        hidden = backbone.blocks[0].mlp.hidden_dim
    conv = backbone.patch_embed.proj
    entries = [
        ("cls_token", backbone.cls_token, None, None),
        ("pos_embed", backbone.pos_embed, None, None),
        ("patch_embed.proj.weight", conv.kernel, (dim, 3, patch, patch), _conv),
        ("patch_embed.proj.bias", conv.bias, (dim,), None),
        ("norm.weight", backbone.norm.gamma, (dim,), None),
        ("norm.bias", backbone.norm.beta, (dim,), None),
    ]
    mask_key = _mask_key(state)
    if backbone.mask_token is not None and mask_key is not None:
        entries.append((mask_key, backbone.mask_token, None, None))
    if backbone.register_tokens is not None:
        entries.append(("register_tokens", backbone.register_tokens, None, None))
    for i, block in enumerate(backbone.blocks):
        attn, mlp = block.attn, block.mlp
        layers = {
            "norm1": (block.norm1.gamma, block.norm1.beta, (dim,), None),
            "attn.qkv": (attn.qkv.kernel, attn.qkv.bias, (3 * dim, dim), _linear),
            "attn.proj": (attn.proj.kernel, attn.proj.bias, (dim, dim), _linear),
            "norm2": (block.norm2.gamma, block.norm2.beta, (dim,), None),
        }
        if block.ffn == "swiglu":
            layers["mlp.w12"] = (mlp.w12.kernel, mlp.w12.bias, (2 * hidden, dim), _linear)
            layers["mlp.w3"] = (mlp.w3.kernel, mlp.w3.bias, (dim, hidden), _linear)
        else:
            layers["mlp.fc1"] = (mlp.fc1.kernel, mlp.fc1.bias, (hidden, dim), _linear)
            layers["mlp.fc2"] = (mlp.fc2.kernel, mlp.fc2.bias, (dim, hidden), _linear)
        for layer, (weight, bias, shape, transform) in layers.items():
            entries.append((f"blocks.{i}.{layer}.weight", weight, shape, transform))
            if bias is not None:
                entries.append((f"blocks.{i}.{layer}.bias", bias, shape[:1], None))
        if block.ls1 is not None:
            entries.append((f"blocks.{i}.ls1.gamma", block.ls1.gamma, (dim,), None))
            entries.append((f"blocks.{i}.ls2.gamma", block.ls2.gamma, (dim,), None))

    for name, variable, torch_shape, transform in entries:
        if name not in state:
            continue  # reported by _check_keys
        value = state[name]
        if torch_shape is not None and tuple(value.shape) != torch_shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; a ViT of width {dim} (patch {patch}, "
                f"MLP {hidden}) needs {torch_shape}. The checkpoint is not a standard "
                "DINO/iBOT/PQCL/DINOv2 ViT or mixes architectures."
            )
        if transform is not None:
            value = transform(value)
        elif value.size == int(np.prod(variable.shape)):
            # cls_token (1, 1, D), pos_embed (1, 1 + N, D) and masked_embed (1, D) differ
            # from Keras only by leading unit axes in some forks.
            value = value.reshape(variable.shape)
        else:
            raise ValueError(f"{name} has shape {tuple(value.shape)}; the backbone needs {tuple(variable.shape)}.")
        variable.assign(value.astype(np.float32))
