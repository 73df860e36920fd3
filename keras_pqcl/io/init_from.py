"""Start a pre-training run from existing backbone weights (``Recipe.init_from``,
``keras-pqcl pretrain --init-from FILE``): continued pre-training.

The weights are copied into the freshly built *student* backbone before the model is
constructed; the model copies its student into the teacher when it is built
(:meth:`~keras_pqcl.models.SelfSupervisedModel.add_teacher`), so both networks start from
the file while the heads, the optimizer and the schedules start fresh, as in a new run.
"""

import os

from keras import ops

#: File endings read as PyTorch checkpoints; everything else goes through ``load_backbone``.
TORCH_SUFFIXES = (".pth", ".pt")
# Variables that one side may have and the other not without the two being different
# networks: iBOT/PQCL add a mask token to the ViT that DINO has no use for, so a DINO
# backbone may start an iBOT run (the token keeps its zero init) and the other way round.
_OPTIONAL = ("mask_token",)


def check_init_from(path):
    """Raise the one-line error of an ``init_from`` that no run can read: missing, a
    directory, or (``.keras``) no Keras archive. Cheap: nothing is deserialised, so a
    wrong path fails before the data is built."""
    path = os.fspath(path)
    if path.lower().endswith(TORCH_SUFFIXES):
        if not os.path.exists(path):
            raise FileNotFoundError(f"init_from file not found: {path!r} (a .keras backbone or a .pth checkpoint)")
        if os.path.isdir(path):
            raise ValueError(f"init_from {path!r} is a directory; pass the .pth file itself.")
        return
    from keras_pqcl.io.load import check_archive

    # load_backbone's own checks, so both entry points word a bad file the same way.
    check_archive(path)


def init_backbone_from(backbone, path):
    """Copy the weights of the backbone in ``path`` into ``backbone`` (built, same
    architecture) and return ``backbone``.

    ``path``: a ``.keras`` backbone (``teacher_backbone.keras`` of an earlier run; a whole
    checkpoint gives its teacher), read with :func:`~keras_pqcl.io.load.load_backbone`, or a
    PyTorch DINO/iBOT/PQCL ``.pth``/``.pt`` read with
    :func:`~keras_pqcl.io.torch_checkpoint.load_torch_checkpoint` (its teacher) for the
    ViT sizes of ``backbone``.

    Variables are matched by their path inside the backbone. A learned position table made
    for another image size is resampled to ``backbone``'s grid (bicubic, as the backbone
    does at call time); a fixed sin-cos table is the same function of the grid in both, so
    ``backbone`` keeps its own. A learned table cannot start a fixed sin-cos one (it would be
    frozen with the wrong values): that, like any other difference in variables or shapes,
    is one ValueError naming the file and the first differing variable.
    """
    path = os.fspath(path)
    check_init_from(path)
    source = _load(backbone, path)
    _copy(source, backbone, path)
    return backbone


def _load(backbone, path):
    if not path.lower().endswith(TORCH_SUFFIXES):
        from keras_pqcl.io.load import load_backbone

        return load_backbone(path, use="teacher")
    if not hasattr(backbone, "blocks"):
        raise ValueError(
            f"init_from {path!r} is a PyTorch ViT checkpoint, but the recipe's backbone {backbone.name!r} is not a "
            "ViT; use a ViT recipe, or a .keras file saved from this backbone."
        )
    from keras_pqcl.io.torch_checkpoint import load_torch_checkpoint

    arch = dict(embed_dim=backbone.embed_dim, depth=backbone.depth, num_heads=backbone.num_heads)
    try:
        # image_size=None takes the checkpoint's own grid; _copy resamples it to the recipe's.
        return load_torch_checkpoint(path, arch=arch, patch_size=backbone.patch_size, image_size=None)
    except ValueError as error:
        raise ValueError(f"init_from {path!r} does not fit the recipe's backbone: {error}") from None


def _relative(model):
    """``{path inside the model: variable}``, without stochastic-depth seed states (a
    saved teacher has none, a student with drop_path_rate > 0 has some; neither is a weight)."""
    variables = [v for v in model.weights if "seed_generator" not in v.path]
    # The first path component is the backbone's name ("vit_small", a checkpoint's
    # "teacher_..."), which says nothing about the architecture.
    return {v.path.split("/", 1)[-1]: v for v in variables}


def _copy(source, target, path):
    src, dst = _relative(source), _relative(target)
    fix = "use the recipe whose backbone matches the file (backbone, patch_size, backbone_args)"
    head = f"init_from {path!r} does not match the recipe's backbone {target.name!r}"
    for key in list(dst) + [k for k in src if k not in dst]:
        if key.split("/")[-1] in _OPTIONAL:
            continue
        if key not in src or key not in dst:
            where, other = ("the recipe's backbone", "file") if key in dst else ("the file", "recipe's backbone")
            shape = tuple((dst[key] if key in dst else src[key]).shape)
            raise ValueError(f"{head}: {where} has {key} {shape}, the {other} has no such variable; {fix}.")
    kinds = getattr(source, "pos_embed_kind", None), getattr(target, "pos_embed_kind", None)
    if kinds == ("learned", "sincos"):
        raise ValueError(
            f"{head}: the file's position table is learned (e.g. DINOv2's), the recipe's is the fixed sin-cos "
            f"table; set pos_embed='learned' in the recipe (for PQCL also method_args query_position_code='table', "
            f"as pqcl_continue_vit_small14), or start from a backbone trained with pos_embed='sincos'."
        )
    for key, variable in dst.items():
        if key not in src:
            continue  # an optional variable the file lacks keeps its initial value
        value = ops.convert_to_numpy(src[key])
        if key == "pos_embed" and tuple(value.shape) != tuple(variable.shape):
            if kinds[1] == "sincos":
                continue  # the fixed table of the recipe's grid, already in place
            value = _resampled_positions(source, target, value, head, fix)
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"{head}: {key} is {tuple(value.shape)} in the file and {tuple(variable.shape)} in the "
                f"recipe's backbone; {fix}."
            )
        variable.assign(value.astype(variable.dtype))


def _resampled_positions(source, target, value, head, fix):
    """The file's learned table resampled to ``target``'s grid (same width only)."""
    grid = getattr(target, "grid_size", None)
    if grid is None or not hasattr(source, "position_embedding") or value.shape[-1] != target.embed_dim:
        raise ValueError(
            f"{head}: pos_embed is {tuple(value.shape)} in the file and {tuple(target.pos_embed.shape)} in the "
            f"recipe's backbone; {fix}."
        )
    return ops.convert_to_numpy(source.position_embedding((grid, grid)))
