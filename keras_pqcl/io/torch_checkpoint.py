"""Import ViT backbones from PyTorch DINO, iBOT and PQCL checkpoints.

The key names and tensor layouts are those of the official repositories:
facebookresearch/dino (Caron et al., ICCV 2021), bytedance/ibot (Zhou et al., ICLR 2022) and
Sherrylone/PQCL (Zhang et al., ICML 2023), which all share the timm/DeiT ViT naming. This
module only reads their checkpoints; it contains no code from them.

torch is imported only when a file path is given, so the library imports without it.
"""

import argparse
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping

import numpy as np

from keras_pqcl.backbones.vit import POS_EMBED_KINDS, VIT_PRESETS, VisionTransformer
from keras_pqcl.layers.pos_embed import sincos_grid

TORCH_PIN = "torch==2.13.0"

_logger = logging.getLogger(__name__)

# Sub-dicts of a training checkpoint that may hold one network's weights, in the order
# key=None tries them: the teacher is what the papers evaluate, and the generic wrappers of
# released weights hold a teacher too.
CONTAINER_KEYS = ("teacher", "state_dict", "model", "student")
# Generic wrappers hold a single network, so using one when "teacher" was asked for cannot
# silently pick the student: released teacher-only weights come wrapped like that.
_GENERIC_CONTAINERS = ("state_dict", "model")
# DistributedDataParallel adds "module.", MultiCropWrapper adds "backbone."; either order.
_WRAPPER_PREFIXES = ("module.", "backbone.")
# Projection heads (DINOHead/iBOTHead keys, standalone or under "head."/"head2."): not part
# of the backbone, so they are dropped rather than reported as unexpected.
_HEAD_KEY = re.compile(r"^(head\d*|last_layer\d*|mlp)(\.|$)")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_ARCH_PREFIXES = ("vit_", "deit_", "pos_")
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
_PQCL_UNUSED_KEYS = frozenset(
    ["norm2.weight", "norm2.bias"] + [f"query_block.{param}" for param in _BLOCK_PARAMS]
)
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
    **kwargs,
):
    """Build a Keras :class:`VisionTransformer` holding a PyTorch DINO/iBOT/PQCL ViT.

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
      calls) are dropped, with one ``logging`` INFO line giving their count.

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
        masked_embed                  (1, D)  optional: iBOT/PQCL mask token

    Linear weights are transposed (torch stores ``(out, in)``, Keras ``(in, out)``); the
    fused qkv output order ``(3, heads, head_dim)`` is the same in both, so no reshuffle.

    Args:
        path_or_state_dict: path to a ``.pth``/``.pt`` file (needs torch) or an already
            loaded dict of NumPy arrays or torch tensors, in any layout above.
        arch: ``"vit_tiny"``, ``"vit_small"``, ``"vit_base"`` or ``"vit_large"`` (the
            prefixes ``deit_`` (DINO) and ``pos_`` (PQCL), or none, are accepted too), or a
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
        **kwargs: other :class:`VisionTransformer` arguments (``name``, ``dtype``,
            ``drop_path_rate``, ``use_mask_token`` to add a zero mask token when the
            checkpoint has none).

    Returns:
        A built :class:`VisionTransformer` whose ``"cls"`` ``(B, D)`` and ``"patches"``
        ``(B, N, D)`` outputs on NHWC images equal the PyTorch model's on the NCHW ones.
        It has a mask token iff the checkpoint has ``masked_embed`` (or one was asked for).

    Example:
    >>> backbone = load_torch_checkpoint("dino_deitsmall16.pth")  # doctest: +SKIP
    """
    checkpoint = _read(path_or_state_dict, weights_only)
    raw = _select(checkpoint, key)
    state = _backbone_entries(raw)
    geometry = _geometry(state)
    dim, depth = geometry["dim"], geometry["depth"]
    config, name = _resolve_arch(arch, dim, depth)

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
    _check_keys(state, depth, geometry["qkv_bias"], strict)

    clash = sorted(set(kwargs) & set(_DERIVED_ARGS))
    if clash:
        raise TypeError(
            f"{clash} come from the checkpoint and the arch/patch_size/image_size/pos_embed "
            "arguments; remove them from the keyword arguments."
        )
    mlp_ratio = 4.0
    if geometry["hidden"]:
        mlp_ratio = geometry["hidden"] / dim
        if int(dim * mlp_ratio) != geometry["hidden"]:  # the backbone rounds dim * ratio down
            raise ValueError(
                f"MLP width {geometry['hidden']} is not representable as {dim} * mlp_ratio."
            )
    use_mask_token = bool(kwargs.pop("use_mask_token", False)) or "masked_embed" in state
    kwargs.setdefault("name", name)
    backbone = VisionTransformer(
        patch_size=p,
        mlp_ratio=mlp_ratio,
        qkv_bias=geometry["qkv_bias"],
        pos_embed=kind,
        image_size=image_size,
        use_mask_token=use_mask_token,
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
            "load_torch_checkpoint expects a path to a .pth/.pt file or a dict of arrays, got "
            f"{type(source).__name__}."
        )
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path!r}.")
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
            " The file holds Python objects the safe loader refuses; if you trust it, pass "
            "weights_only=False."
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


def _backbone_entries(raw):
    """Prefix-free backbone entries as NumPy arrays; head keys and PQCL's unused
    ``norm2``/``query_block`` weights dropped (the latter logged)."""
    state, unused = {}, []
    for original, value in raw.items():
        if not isinstance(original, str):
            continue
        name = _strip_prefixes(original)
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
    return state


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
                f"patch_embed.proj.weight has shape {patch_shape}; expected a square RGB "
                "Conv2d kernel (D, 3, p, p)."
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

    hidden = None
    fc1 = next((f"blocks.{i}.mlp.fc1.weight" for i in sorted(indices)), None)
    if fc1 in state:
        hidden = int(state[fc1].shape[0])
    qkv_bias = True
    if indices:
        qkv_bias = any(f"blocks.{i}.attn.qkv.bias" in state for i in indices)
    return dict(
        dim=dim,
        depth=depth,
        patch_size=patch,
        patch_shape=patch_shape,
        grid=grid,
        hidden=hidden,
        qkv_bias=qkv_bias,
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
            raise ValueError(
                "arch as a dict takes num_heads (required), embed_dim and depth; got "
                f"{sorted(config)}."
            )
        config.setdefault("embed_dim", dim)
        config.setdefault("depth", depth)
        name = "vit"
        label = f"arch={dict(arch)!r}"
    else:
        name = str(arch)
        for prefix in _ARCH_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        name = f"vit_{name}"
        if name not in VIT_PRESETS:
            raise ValueError(
                f"Unknown arch {arch!r}; choose one of {sorted(VIT_PRESETS)} (deit_/pos_ "
                "prefixes accepted) or pass a dict such as dict(embed_dim=384, depth=12, "
                "num_heads=6)."
            )
        config = dict(VIT_PRESETS[name])
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
    return config, name


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


def _expected_keys(depth, qkv_bias):
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for param in _BLOCK_PARAMS:
            if param == "attn.qkv.bias" and not qkv_bias:
                continue
            keys.append(f"blocks.{i}.{param}")
    return keys + ["norm.weight", "norm.bias"]


def _check_keys(state, depth, qkv_bias, strict):
    expected = _expected_keys(depth, qkv_bias)
    missing = [k for k in expected if k not in state]
    known = set(expected) | {"masked_embed"}
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
            f"The checkpoint does not match a DINO/iBOT/PQCL ViT: {report} (names after "
            "removing module./backbone. prefixes and head keys). Check key= and the file, "
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
    if backbone.mask_token is not None:
        entries.append(("masked_embed", backbone.mask_token, None, None))
    for i, block in enumerate(backbone.blocks):
        attn, mlp = block.attn, block.mlp
        layers = {
            "norm1": (block.norm1.gamma, block.norm1.beta, (dim,), None),
            "attn.qkv": (attn.qkv.kernel, attn.qkv.bias, (3 * dim, dim), _linear),
            "attn.proj": (attn.proj.kernel, attn.proj.bias, (dim, dim), _linear),
            "norm2": (block.norm2.gamma, block.norm2.beta, (dim,), None),
            "mlp.fc1": (mlp.fc1.kernel, mlp.fc1.bias, (hidden, dim), _linear),
            "mlp.fc2": (mlp.fc2.kernel, mlp.fc2.bias, (dim, hidden), _linear),
        }
        for layer, (weight, bias, shape, transform) in layers.items():
            entries.append((f"blocks.{i}.{layer}.weight", weight, shape, transform))
            if bias is not None:
                entries.append((f"blocks.{i}.{layer}.bias", bias, shape[:1], None))

    for name, variable, torch_shape, transform in entries:
        if name not in state:
            continue  # reported by _check_keys
        value = state[name]
        if torch_shape is not None and tuple(value.shape) != torch_shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; a ViT of width {dim} (patch {patch}, "
                f"MLP {hidden}) needs {torch_shape}. The checkpoint is not a standard "
                "DINO/iBOT/PQCL ViT or mixes architectures."
            )
        if transform is not None:
            value = transform(value)
        elif value.size == int(np.prod(variable.shape)):
            # cls_token (1, 1, D), pos_embed (1, 1 + N, D) and masked_embed (1, D) differ
            # from Keras only by leading unit axes in some forks.
            value = value.reshape(variable.shape)
        else:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; the backbone needs "
                f"{tuple(variable.shape)}."
            )
        variable.assign(value.astype(np.float32))
