"""Recipes: one dataclass holds every setting of a pre-training run, with the paper defaults.

A recipe file in ``recipes/`` defines ``get_recipe()`` returning a :class:`Recipe` that names
only what differs from these defaults (big_vision's "configs as code").
"""

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Recipe:
    """All settings of one pre-training run. Defaults: DINO ViT-S/16 (Caron et al. 2021).

    Attributes:
        name: recipe name (written to the output folder).
        description: one line shown by ``keras-pqcl recipes``.
        method: ``"dino"``, ``"ibot"``, ``"pqcl"`` (iBOT+PQCL), ``"dino_pqcl"``, ``"adclr"``
            (ViTs), ``"densecl"`` or ``"mcl"`` (ResNets); see :data:`keras_pqcl.training.METHODS`.
        backbone: ViT preset (``vit_tiny|vit_small|vit_base|vit_large``, DINOv2's
            ``vit_small14|vit_base14|vit_large14|vit_giant14`` and their ``_reg`` variants, which
            want ``patch_size=14``) or ResNet preset (``resnet50|resnet101|resnet_tiny``).
        patch_size: 16; for a ResNet, its output stride (32), to which crop sizes are checked.
        drop_path_rate: student stochastic depth (0.1); the teacher uses 0.
        pos_embed: ``"learned"`` or ``"sincos"``; ``None`` = the method's (sin-cos for PQCL,
            learned otherwise).
        backbone_args: extra ``VisionTransformer`` arguments (e.g. ``depth`` for tiny runs).
        method_args: method arguments (``out_dim``, ``norm_last_layer``, temperatures...).
        data: data source (``"synthetic_scenes"``, a folder, ``"tfds:NAME"``).
        crops: ``keras_pqcl.data.MultiCropConfig`` arguments (MCL: ``MontageConfig``).
        masks: ``keras_pqcl.data.MaskConfig`` arguments for methods with iBOT masks
            (``patch_size`` comes from the recipe).
        queries: ``keras_pqcl.data.QueryConfig`` arguments for PQCL (``flip_correct``).
        batch_size: global batch (split over devices).
        epochs: 100.
        base_lr: 5e-4, scaled by ``batch_size / 256``.
        min_lr: 1e-6.
        warmup_epochs: 10 (linear learning-rate warm-up).
        weight_decay, weight_decay_end: cosine 0.04 -> 0.4.
        clip_grad: per-tensor gradient clipping (3.0).
        teacher_momentum: EMA momentum at step 0, rising to 1 (0.996).
        precision: ``"float32"`` or ``"mixed_bfloat16"``.
        jit_compile: passed to ``compile`` (``"auto"``: JAX compiles, TF on CPU does not).
        seed: random seed for weights and data.
        checkpoint_every: epochs between end-of-epoch checkpoints (the last epoch is always
            saved).
        checkpoint_every_steps: also checkpoint every N optimizer steps inside an epoch, for
            long epochs (``None``: off). A run resumed from such a checkpoint continues at
            that step.
        checkpoint_every_minutes: also checkpoint every N minutes inside an epoch (``None``: off).
        keep_checkpoints: checkpoints kept, newest first (2): a resume falls back to the
            older one when the newest cannot be read.
        stop_on_collapse: stop (after saving) when the run collapses; otherwise only warn
            (see :class:`keras_pqcl.callbacks.CollapseGuard`).
        steps_per_epoch: cap the steps of an epoch (``None``: every full batch of the data).
        knn_every: evaluate the teacher's k-NN top-1 on held-out labelled images every
            ``knn_every`` epochs and log it as ``knn_top1`` (0: off). See ``knn_data``.
        knn_data: a folder with ``train/`` and ``val/`` sub-folders of class folders (the
            ImageNet layout) for that k-NN; ``None`` with ``synthetic_scenes`` data uses
            held-out generated images (seeds 1 and 2, never seen in pre-training).
        init_from: continued pre-training: a ``.keras`` backbone (an earlier run's
            ``teacher_backbone.keras``; a checkpoint gives its teacher) or a PyTorch
            DINO/iBOT/PQCL ``.pth``/``.pt`` checkpoint (its teacher) whose weights start both
            the student and the teacher backbone; heads, optimizer and schedules start fresh.
            The architecture must match the recipe's backbone (a learned position table of
            another image size is resampled). ``None``: random init. On ``--resume`` with a
            checkpoint the checkpoint's weights win, and the value cannot change.
    """

    name: str = "custom"
    description: str = ""
    method: str = "dino"
    backbone: str = "vit_small"
    patch_size: int = 16
    drop_path_rate: float = 0.1
    pos_embed: Optional[str] = None
    backbone_args: dict = field(default_factory=dict)
    method_args: dict = field(default_factory=dict)
    data: str = "synthetic_scenes"
    crops: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    queries: dict = field(default_factory=dict)
    batch_size: int = 64
    epochs: int = 100
    base_lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    teacher_momentum: float = 0.996
    precision: str = "float32"
    jit_compile: object = "auto"
    seed: int = 0
    checkpoint_every: int = 1
    checkpoint_every_steps: Optional[int] = None
    checkpoint_every_minutes: Optional[float] = None
    keep_checkpoints: int = 2
    stop_on_collapse: bool = False
    steps_per_epoch: Optional[int] = None
    knn_every: int = 0
    knn_data: Optional[str] = None
    init_from: Optional[str] = None

    def replace(self, **changes):
        """A copy with ``changes`` applied (``None`` values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"Unknown recipe fields {sorted(unknown)}.")
        return dataclasses.replace(self, **changes)

    def derive(self, **changes):
        """A copy with ``changes``, where dict fields (``method_args``, ``crops``, ``masks``...)
        are merged key by key instead of replaced: ``tiny.derive(method="ibot",
        crops=dict(n_local=2))`` keeps the other crop settings."""
        merged = {
            key: {**getattr(self, key), **value}
            if isinstance(getattr(self, key, None), dict) and isinstance(value, dict)
            else value
            for key, value in changes.items()
        }
        return self.replace(**merged)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


#: Recipe fields a resumed run may change; every other field fixes the data, the model or
#: the schedules the checkpoint was trained with.
RESUMABLE_FIELDS = frozenset(
    {
        "name",
        "description",
        "epochs",
        "knn_every",
        "knn_data",
        "checkpoint_every",
        "checkpoint_every_steps",
        "checkpoint_every_minutes",
        "keep_checkpoints",
        "stop_on_collapse",
        "jit_compile",
    }
)


def check_resume(previous, recipe):
    """Raise a ValueError naming every field of ``recipe`` that differs from ``previous``
    (the resumed run's ``recipe.json`` dict) but cannot change on resume."""
    current = json.loads(recipe.to_json())
    changed = [
        f"{key} (was {previous[key]!r}, now {value!r})"
        for key, value in current.items()
        if key not in RESUMABLE_FIELDS and key in previous and previous[key] != value
    ]
    if changed:
        raise ValueError(
            "--resume cannot change " + "; ".join(changed) + ": the checkpoint was trained with the old "
            "value. Drop the change, or start a new run with another --output."
        )


def check_recipe(recipe):
    """One clear error for a recipe value no run can use."""
    if recipe.precision not in ("float32", "mixed_bfloat16"):
        raise ValueError(f"precision must be 'float32' or 'mixed_bfloat16', got {recipe.precision!r}.")
    for key in ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints"):
        value = getattr(recipe, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a whole number >= 1, got {value!r}.")
    for key in ("steps_per_epoch", "checkpoint_every_steps"):
        value = getattr(recipe, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a whole number >= 1 (or unset), got {value!r}.")
    if recipe.checkpoint_every_minutes is not None and not recipe.checkpoint_every_minutes > 0:
        raise ValueError(f"checkpoint_every_minutes must be > 0 (or unset), got {recipe.checkpoint_every_minutes!r}.")
    if recipe.knn_every < 0:
        raise ValueError(f"knn_every must be >= 0 (0: off), got {recipe.knn_every!r}.")
    knn_splits(recipe)  # a wrong --knn-data fails now, not after the data is built


def knn_splits(recipe):
    """``(train, test)`` folders of ``recipe.knn_data``, or None when it is unset."""
    if not (recipe.knn_every and recipe.knn_data):
        return None
    splits = [os.path.join(recipe.knn_data, split) for split in ("train", "val")]
    missing = [path for path in splits if not os.path.isdir(path)]
    if missing:
        raise ValueError(
            f"knn_data={recipe.knn_data!r} needs train/ and val/ sub-folders of class folders; "
            f"missing: {', '.join(missing)}."
        )
    return splits


def recipes_dir():
    """The ``recipes/`` folder of a source checkout (None when installed without it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(os.path.dirname(here), "recipes")
    return path if os.path.isdir(path) else None


def available_recipes():
    names = set()
    folder = recipes_dir()
    if folder:
        names |= {f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")}
    try:
        from keras_pqcl import recipes as packaged

        folder = os.path.dirname(packaged.__file__)
        names |= {f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")}
    except ImportError:
        pass
    return sorted(names)


def load_recipe(name_or_path):
    """Load a recipe by name (``"tiny"``) or by path to a ``.py`` file defining ``get_recipe``."""
    path = name_or_path
    if not name_or_path.endswith(".py"):
        path = None
        folder = recipes_dir()
        if folder and os.path.exists(os.path.join(folder, name_or_path + ".py")):
            path = os.path.join(folder, name_or_path + ".py")
        else:
            try:
                module = importlib.import_module(f"keras_pqcl.recipes.{name_or_path}")
                return module.get_recipe()
            except ImportError:
                pass
        if path is None:
            raise ValueError(
                f"Unknown recipe {name_or_path!r}. Available: {', '.join(available_recipes()) or 'none'}; "
                "or pass the path of a .py file that defines get_recipe()."
            )
    if not os.path.exists(path):
        raise FileNotFoundError(f"Recipe file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"_recipe_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_recipe"):
        raise ValueError(f"Recipe file {path} must define get_recipe() returning a keras_pqcl.Recipe.")
    return module.get_recipe()
